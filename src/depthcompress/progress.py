"""Progress of long work as plain events, and the package's logger.

Library functions draw nothing: a long stage calls the ``Reporter`` it was given (if any) with a
``Step`` after each unit of work, and writes messages to ``LOG``. The command line renders both
with rich (``report.RichProgress``, ``report.log_to_console``); a notebook or a service can pass
its own reporter, or none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

LOG = logging.getLogger("depthcompress")


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` units of the task ``task`` are finished; ``detail`` says what runs
    now (a block, a loss) and may be empty."""

    task: str
    done: int
    total: int
    detail: str = ""


Reporter = Callable[[Step], None]


def tell(reporter: Reporter | None, task: str, done: int, total: int, detail: str = "") -> None:
    """Report one step to ``reporter``; nothing when there is none."""
    if reporter is not None:
        reporter(Step(task, done, total, detail))
