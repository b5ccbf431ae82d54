"""The built-in CIFAR-10 networks: shapes, what the tracer finds in them, exact merges."""

from __future__ import annotations

import random

import pytest
import torch

import depthcompress as dc
from depthcompress.errors import ModelSpecError
from depthcompress.models import CIFAR_MBV2_EXCLUDE, get_model

from .conftest import random_plan, randomize_bn

# name, exclude, positions, residuals, of them with a projection shortcut
CASES = [
    ("cifar_mbv2", CIFAR_MBV2_EXCLUDE, 50, 10, 0),
    ("cifar_mbv2", (), 52, 10, 0),
    ("resnet20", (), 19, 9, 2),
]


def built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(get_model(name)).eval()


@pytest.mark.parametrize("name", ["cifar_mbv2", "resnet20"])
def test_forward_shape_on_32x32(name: str) -> None:
    with torch.no_grad():
        assert built(name)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_mbv2_ends_at_4x4_and_resnet20_has_identity_shortcuts() -> None:
    mbv2 = built("cifar_mbv2")
    with torch.no_grad():
        assert mbv2.features(mbv2.stem(torch.randn(1, 3, 32, 32))).shape[-2:] == (4, 4)
    identities = [m for m in built("resnet20").modules() if isinstance(m, torch.nn.Identity)]
    assert len(identities) == 7


@pytest.mark.parametrize(("name", "exclude", "positions", "residuals", "projections"), CASES)
def test_trace_finds_every_position_and_residual(
    name: str, exclude: tuple[str, ...], positions: int, residuals: int, projections: int
) -> None:
    chain = dc.trace(built(name), torch.randn(2, 3, 32, 32), exclude=exclude)
    assert chain.num_positions == positions
    assert len(chain.residuals) == residuals
    assert sum(r.shortcut is not None for r in chain.residuals) == projections
    assert dict(chain.barriers) == {}  # nn.Identity() shortcuts are looked through


@pytest.mark.parametrize("name", ["cifar_mbv2", "resnet20"])
def test_identity_and_random_plans_merge_exactly(name: str) -> None:
    model = built(name)
    x = torch.randn(2, 3, 32, 32)
    chain = dc.trace(model, x)
    plans = [dc.Plan.identity(chain)]
    rng = random.Random(name)
    plans += [random_plan(chain, rng) for _ in range(2)]
    for plan in plans:  # verify=True: a MergeError unless the merged network matches
        merged = dc.merge(dc.linearize(model, chain, plan), chain, plan, verify=True)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in merged.modules())
    assert any(j - i > 1 for plan in plans[1:] for i, j in plan.blocks)


def test_unknown_built_in_model_names_the_known_ones() -> None:
    with pytest.raises(ModelSpecError, match=r"cifar_mbv2.*fashion_mbv2.*resnet20"):
        get_model("resnet21")


@pytest.mark.parametrize("name", ["fashion_mbv2", "resnet20"])
def test_shipped_weights_load_and_record_their_command(name: str) -> None:
    """Each shipped checkpoint loads strictly into its built-in model, and the JSON beside it
    records the exact `depthcompress train` command and the accuracy it reached."""
    import json

    from depthcompress.models import trained_weights

    path = trained_weights(name)
    model = get_model(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    record = json.loads(path.with_name(path.name + ".json").read_text())
    assert record["command"].startswith(f"depthcompress train depthcompress:{name} ")
    assert 0 < record["test_accuracy"] <= 100
    channels = 1 if name == "fashion_mbv2" else 3
    size = 28 if name == "fashion_mbv2" else 32
    out = model.eval()(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
