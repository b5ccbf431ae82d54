"""Every command's --help is readable at 80 columns: each option name appears whole."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from depthcompress.cli import app

COMMAND = typer.main.get_command(app)
COMMANDS = COMMAND.commands  # a TyperGroup: the commands by name
NAMES = sorted(COMMANDS)


def _help(args: list[str]) -> str:
    """The help text of `depthcompress ARGS --help` rendered 80 columns wide."""
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", NAMES)
def test_every_option_name_is_whole_at_80_columns(name: str) -> None:
    text = _help([name])
    assert all(len(line) <= 80 for line in text.splitlines()), text
    words = set(text.replace(",", " ").split())
    for param in COMMANDS[name].params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("-"):
                assert opt in words, f"{name}: {opt} is cut or missing\n{text}"


def test_the_command_list_fits_80_columns() -> None:
    text = _help([])
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert all(name in text.split() for name in NAMES)


def test_timing_threads_defaults() -> None:
    """compress times with all cores unless told (a deployment choice); the demo with 1 thread,
    since 2-thread timings on a shared 2-core machine are bimodal."""
    import inspect

    from depthcompress import cli

    assert inspect.signature(cli.compress_cmd).parameters["threads"].default is None
    assert inspect.signature(cli.demo_cmd).parameters["threads"].default == 1
