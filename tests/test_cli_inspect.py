"""The inspect command: MODEL forms, the table, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from depthcompress.cli import app

runner = CliRunner()

FACTORY = """
import torch.nn as nn

def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

def not_a_model():
    return 3
"""


def test_inspect_torchvision_model_prints_table_and_block_count():
    result = runner.invoke(
        app,
        [
            "inspect",
            "torchvision:mobilenet_v2",
            "--mode",
            "reference",
            "--exclude",
            "features.0",
            "--exclude",
            "features.18",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "features.1.conv.0.0" in result.output
    assert "171 mergeable blocks" in result.output
    assert "relu6" in result.output


def test_inspect_factory_file_and_json(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    out = tmp_path / "chain.json"
    result = runner.invoke(
        app, ["inspect", f"{src}:tiny", "--input-shape", "1,3,8,8", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "3 mergeable blocks" in result.output
    assert json.loads(out.read_text())["num_positions"] == 2


def test_inspect_errors_are_one_clear_line(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    cases = {
        "torchvision:resnet": "did you mean",
        f"{src}:missing": f"defines no callable 'missing'; it defines not_a_model, tiny: name "
        f"one of them, e.g. {src}:not_a_model",
        f"{src}:not_a_model": "not an nn.Module",
        "nowhere.py:f": "does not exist",
        "resnet18": "must be 'torchvision:NAME'",
    }
    for spec, message in cases.items():
        result = runner.invoke(app, ["inspect", spec])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    bad_shape = runner.invoke(app, ["inspect", "torchvision:resnet18", "--input-shape", "1,3"])
    assert bad_shape.exit_code != 0
    assert "N,C,H,W" in bad_shape.output
