"""The learning-rate probe and the control run: before the compressed network is fine-tuned, a
copy of the network it comes from (the original; with width, the width-pruned network, which is
what depth compression fine-tunes) is fine-tuned for a few steps under the same recipe at the
configured lr and smaller ones, and scored on the held-out split. The largest lr that keeps that
network where it was is used, and the network fine-tuned at that lr is the *control*: what the
recipe alone keeps, against which the compressed network's accuracy tells the plan's loss from the
recipe's. ``ProbeResult.network`` names the network probed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import DepthCompressError, DivergedError
from .finetune import FinetuneConfig, evaluate, finetune
from .progress import LOG, Reporter, tell

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import SplitData


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """How the lr probe runs: ``steps`` fine-tuning steps per candidate (at most one epoch),
    ``candidates`` learning rates from the configured one down by ``factor`` each, accepted when
    the held-out accuracy stays within ``tolerance`` percentage points of the original's; after
    fine-tuning, a compressed network more than ``warn_drop`` points below the control warns."""

    steps: int = 150
    candidates: int = 4
    factor: float = 4.0
    tolerance: float = 1.0
    warn_drop: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"probe steps must be ≥ 1, got {self.steps}")
        if self.candidates < 1:
            problems.append(f"probe candidates must be ≥ 1, got {self.candidates}")
        if not self.factor > 1:
            problems.append(f"probe factor must be > 1, got {self.factor}")
        if self.tolerance < 0 or self.warn_drop < 0:
            problems.append("probe tolerance and warn_drop must be ≥ 0")
        if problems:
            raise DepthCompressError("; ".join(problems))

    def lrs(self, lr: float) -> list[float]:
        """The candidate learning rates, largest first: ``lr``, ``lr/factor``, ..."""
        return [lr / self.factor**k for k in range(self.candidates)]


@dataclass(frozen=True)
class ProbeTrial:
    """One candidate: its lr, the mean training loss (NaN when it diverged) and the held-out
    accuracy (%) of the original after the probe steps (None when it diverged)."""

    lr: float
    loss: float
    accuracy: float | None


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found: the probed network's held-out accuracy (``original_accuracy``),
    every candidate tried (largest first; trying stops at the first accepted), the lr chosen,
    whether any candidate was accepted, the steps and tolerance used, and which network was
    probed (``network``: "original", or the width-pruned one)."""

    original_accuracy: float
    trials: tuple[ProbeTrial, ...]
    lr: float
    accepted: bool
    steps: int
    tolerance: float
    network: str = "original"

    @property
    def control_accuracy(self) -> float | None:
        """Held-out accuracy of the control: the original after the probe at the chosen lr."""
        return next(t.accuracy for t in self.trials if t.lr == self.lr)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as ``lr_probe.json`` stores it."""
        return {**asdict(self), "control_accuracy": self.control_accuracy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Read a result from its plain-data form."""
        trials = tuple(ProbeTrial(**t) for t in data["trials"])
        return cls(
            original_accuracy=data["original_accuracy"],
            trials=trials,
            lr=data["lr"],
            accepted=data["accepted"],
            steps=data["steps"],
            tolerance=data["tolerance"],
            network=data.get("network", "original"),  # absent in files made before width
        )


def probe_steps(train_size: int, config: FinetuneConfig, settings: ProbeSettings) -> int:
    """Steps per candidate: ``settings.steps``, at most one epoch of the data (at least one)."""
    return max(1, min(settings.steps, train_size // config.batch_size))


def _trial(
    original: nn.Module,
    data: SplitData,
    config: FinetuneConfig,
    device: torch.device | str | None,
    teacher: nn.Module,
) -> ProbeTrial:
    """Fine-tune a deep copy of ``original`` under ``config`` (one short epoch, distilled from
    ``teacher`` when the recipe distills) and score it."""
    distilled = copy.deepcopy(teacher) if config.distill > 0 else None
    try:
        result = finetune(
            copy.deepcopy(original),
            data.train,
            config,
            teacher=distilled,
            holdout_data=data.holdout,
            device=device,
            distributed=False,
        )
    except DivergedError:
        return ProbeTrial(lr=config.lr, loss=math.nan, accuracy=None)
    last = result.history[-1]
    return ProbeTrial(lr=config.lr, loss=last.loss, accuracy=last.accuracy)


def probe_lr(
    original: nn.Module,
    data: SplitData,
    config: FinetuneConfig,
    settings: ProbeSettings,
    *,
    device: torch.device | str | None = None,
    progress: Reporter | None = None,
    teacher: nn.Module | None = None,
    network: str = "original",
) -> ProbeResult:
    """Choose the fine-tuning lr: the largest candidate whose short fine-tuning of ``original``
    (the network that is fine-tuned, named ``network``) keeps a finite loss and its held-out
    accuracy within the tolerance (else the smallest, with a warning). Same optimizer, weight
    decay, distillation (from ``teacher``, default ``original`` itself), batch and seed as
    ``config``."""
    net = copy.deepcopy(original).to(device or "cpu")
    base = evaluate(net, data.holdout, batch_size=config.batch_size)
    del net
    steps = probe_steps(len(data.train), config, settings)  # type: ignore[arg-type]
    lrs, trials = settings.lrs(config.lr), []
    for k, lr in enumerate(lrs):
        tell(progress, "lr probe", k, len(lrs), f"lr {lr:g}")
        run = replace(config, epochs=1, steps_per_epoch=steps, lr=lr)
        trials.append(_trial(original, data, run, device, teacher or original))
        if _accepted(trials[-1], base, settings.tolerance):
            break
    tell(progress, "lr probe", len(lrs), len(lrs), "done")
    accepted = _accepted(trials[-1], base, settings.tolerance)
    result = ProbeResult(
        original_accuracy=base,
        trials=tuple(trials),
        lr=trials[-1].lr,
        accepted=accepted,
        steps=steps,
        tolerance=settings.tolerance,
        network=network,
    )
    if not accepted:
        LOG.warning(recipe_warning(result))
    return result


def _accepted(trial: ProbeTrial, base: float, tolerance: float) -> bool:
    """A finite loss and a held-out accuracy at most ``tolerance`` points below ``base``."""
    if not math.isfinite(trial.loss) or trial.accuracy is None:
        return False
    return trial.accuracy >= base - tolerance


def _acc(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.2f} %"


def recipe_warning(probe: ProbeResult) -> str:
    """The warning when even the smallest candidate lr moves the original network away."""
    tried = ", ".join(f"lr {t.lr:g}: {_acc(t.accuracy)}" for t in probe.trials)
    return (
        f"warning: the fine-tuning recipe itself costs the {probe.network} network accuracy: on "
        f"the held-out split it had {probe.original_accuracy:.2f} %, and after {probe.steps} steps "
        f"of fine-tuning ({tried}) no lr kept it within {probe.tolerance:g} points. The recipe "
        "is the problem, not the plan: try a smaller --lr or another --optimizer (adamw for a "
        "network trained with Adam); the smallest lr is used"
    )


def control_record(
    probe: ProbeResult, tuned_accuracy: float | None, settings: ProbeSettings, budget: str
) -> dict[str, Any]:
    """What ``evaluation.json`` keeps of the control: which network was probed, held-out
    accuracies of it (``original_holdout_accuracy``), of the control and of the fine-tuned
    compressed network, the chosen lr, and the warning if any."""
    return {
        "network": probe.network,
        "original_holdout_accuracy": probe.original_accuracy,
        "control_holdout_accuracy": probe.control_accuracy,
        "compressed_holdout_accuracy": tuned_accuracy,
        "lr": probe.lr,
        "steps": probe.steps,
        "accepted": probe.accepted,
        "warning": control_warning(probe, tuned_accuracy, settings, budget),
    }


def control_warning(
    probe: ProbeResult, tuned_accuracy: float | None, settings: ProbeSettings, budget: str
) -> str | None:
    """Who lost the accuracy, or None when the compressed network is within ``warn_drop`` points
    of the control: the recipe when the control itself lost more than the tolerance, else the
    plan when the fine-tuned compressed network falls more than ``warn_drop`` below it."""
    if not probe.accepted:
        return recipe_warning(probe)
    control = probe.control_accuracy
    if control is None or tuned_accuracy is None or tuned_accuracy >= control - settings.warn_drop:
        return None
    return (
        f"warning: the compressed network's held-out accuracy after fine-tuning, "
        f"{tuned_accuracy:.2f} %, is {control - tuned_accuracy:.1f} points below the control's "
        f"{control:.2f} % (the {probe.network} network fine-tuned under the same recipe at lr "
        f"{probe.lr:g}). "
        f"The plan for budget {budget} lost the accuracy, not the recipe: try a looser --budget "
        "or more --epochs"
    )


__all__ = [
    "ProbeResult",
    "ProbeSettings",
    "ProbeTrial",
    "control_record",
    "control_warning",
    "probe_lr",
    "probe_steps",
    "recipe_warning",
]
