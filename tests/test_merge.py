"""Linearize/merge semantics: inverted residuals, inserted activations, no mutation, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

import depthcompress as dc
from tests.conftest import conv_count, randomize_bn, rel_err


@pytest.fixture(scope="module")
def mbv2():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(), seed=3).eval()
    x = torch.randn(2, 3, 64, 64)
    chain = dc.trace(model, x, mode="reference", exclude=["features.0", "features.18"])
    return model, chain, x


def plan_merging(chain: dc.ConvChain, *spans: tuple[int, int]) -> dc.Plan:
    """Boundaries everywhere except strictly inside the given spans; activations kept at ends."""
    inside = {p for i, j in spans for p in range(i + 1, j)}
    ends = frozenset(range(1, chain.num_positions + 1)) - inside
    return dc.Plan(activations=frozenset(chain.activation_positions) & ends, boundaries=ends)


def test_whole_inverted_residual_merges_into_one_conv(mbv2):
    model, chain, x = mbv2
    assert (5, 8) in chain.blocks  # expand 1x1 -> depthwise 3x3 -> project 1x1, with the skip
    plan = plan_merging(chain, (5, 8))
    linear = dc.linearize(model, chain, plan).eval()
    merged = dc.merge(linear, chain, plan)
    with torch.no_grad():
        assert rel_err(linear(x), merged(x)) <= 1e-4
    assert conv_count(merged) == conv_count(model) - 2
    block = merged.get_submodule("depthcompress_block_5_8")
    assert block.kernel_size == (3, 3) and block.groups == 1
    adds = [n for n in merged.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == len(chain.residuals) - 1  # the skip is inside the kernel now


def test_two_residuals_inside_one_block(mbv2):
    model, chain, x = mbv2
    assert (11, 17) in chain.blocks
    plan = plan_merging(chain, (11, 17), (20, 29))
    linear = dc.linearize(model, chain, plan).eval()
    merged = dc.merge(linear, chain, plan)
    with torch.no_grad():
        assert rel_err(linear(x), merged(x)) <= 1e-4
    assert merged.get_submodule("depthcompress_block_11_17").kernel_size == (5, 5)
    assert merged.get_submodule("depthcompress_block_20_29").kernel_size == (7, 7)
    assert conv_count(merged) == conv_count(model) - 5 - 8


def test_inserted_activation_at_a_linear_position(mbv2):
    model, chain, x = mbv2
    plan = dc.Plan.identity(chain)
    plan = dc.Plan(activations=plan.activations | {8}, boundaries=plan.boundaries)
    linear = dc.linearize(model, chain, plan).eval()
    merged = dc.merge(linear, chain, plan)
    assert isinstance(linear.get_submodule("depthcompress_act_8"), torch.nn.ReLU6)
    with torch.no_grad():
        out = linear(x)
        assert rel_err(out, merged(x)) <= 1e-4
        assert not torch.allclose(out, model(x))


def test_linearize_and_merge_leave_their_inputs_alone(mbv2):
    model, chain, _ = mbv2
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_merging(chain, (5, 8))
    linear = dc.linearize(model, chain, plan)
    assert linear.training and model.training
    lin_before = {k: v.clone() for k, v in linear.state_dict().items()}
    dc.merge(linear, chain, plan)
    assert linear.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in linear.state_dict().items():
        assert torch.equal(v, lin_before[k]), k
    model.eval()


def test_linearized_network_trains_and_still_merges(mbv2):
    model, chain, x = mbv2
    plan = plan_merging(chain, (11, 17))
    linear = dc.linearize(model, chain, plan).train()
    opt = torch.optim.SGD(linear.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        linear(x).square().mean().backward()
        opt.step()
    merged = dc.merge(linear, chain, plan)
    with torch.no_grad():
        assert rel_err(linear.eval()(x), merged(x)) <= 1e-4


def test_plan_errors_name_the_problem(mbv2):
    _, chain, _ = mbv2
    ident = dc.Plan.identity(chain)
    with pytest.raises(dc.PlanError, match=r"\[51\] that do not exist"):
        dc.Plan(activations=ident.activations, boundaries=ident.boundaries | {51}).validate(chain)
    with pytest.raises(dc.PlanError, match="last position 50"):
        dc.Plan(activations=frozenset(), boundaries=frozenset({10})).validate(chain)
    with pytest.raises(dc.PlanError, match=r"\[7\] are not boundaries"):
        dc.Plan(activations={7}, boundaries=ident.boundaries - {7}).validate(chain)
    with pytest.raises(dc.PlanError, match="hard boundaries"):
        dc.Plan(activations=frozenset(), boundaries=frozenset({50})).validate(chain)
    cut = dc.Plan(activations=frozenset(), boundaries=ident.boundaries - {7, 8})
    with pytest.raises(dc.PlanError, match=r"block \(6, 9\) cannot be merged: .*residual"):
        cut.validate(chain)
    with pytest.raises(dc.PlanError, match="integer"):
        dc.Plan(activations={"3"}, boundaries={3})


def test_plan_json_round_trip(tmp_path, mbv2):
    _, chain, _ = mbv2
    plan = plan_merging(chain, (5, 8), (11, 17))
    assert dc.Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert dc.Plan.load(tmp_path / "plan.json") == plan
    with pytest.raises(dc.PlanError, match="not valid JSON"):
        dc.Plan.from_json("{")
    with pytest.raises(dc.PlanError, match="'activations' and 'boundaries'"):
        dc.Plan.from_json('{"activations": [1]}')
    with pytest.raises(dc.PlanError, match="does not exist"):
        dc.Plan.load(tmp_path / "missing.json")


def test_merge_refuses_a_foreign_network_or_plan(mbv2):
    model, chain, _ = mbv2
    plan = plan_merging(chain, (5, 8))
    with pytest.raises(dc.DepthCompressError, match="linearize"):
        dc.merge(model, chain, plan)
    linear = dc.linearize(model, chain, plan)
    with pytest.raises(dc.MergeError, match="different plan"):
        dc.merge(linear, chain, dc.Plan.identity(chain))


def test_linearize_refuses_a_model_of_another_shape(mbv2):
    _, chain, _ = mbv2
    other = torchvision.models.mobilenet_v2(width_mult=0.5)
    with pytest.raises(dc.DepthCompressError, match="does not match the chain"):
        dc.linearize(other, chain, dc.Plan.identity(chain))


def test_plan_for_activations_is_the_coarsest_valid_cover(mbv2):
    _, chain, _ = mbv2
    a0 = set(chain.activation_positions)
    plan = dc.Plan.for_activations(chain, a0 - {6, 7})
    plan.validate(chain)
    assert plan.activations == frozenset(a0 - {6, 7})
    assert {2, 6, 7, 8}.isdisjoint(plan.boundaries)  # linear 2 and 8 merge onward: (1, 3), (5, 9)
    assert {5, 11, 14}.issubset(plan.boundaries)  # hard boundaries; (11, 14) keeps its skip bump
    with pytest.raises(dc.PlanError, match="not positions"):
        dc.Plan.for_activations(chain, {0})


def test_merge_refuses_a_network_that_gives_nan(mbv2):
    model, chain, _ = mbv2
    plan = plan_merging(chain, (5, 8))
    linear = dc.linearize(model, chain, plan).eval()
    with torch.no_grad():
        linear.get_submodule(chain.positions[6].conv).weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(dc.MergeError, match="linearized network produced non-finite values"):
        dc.merge(linear, chain, plan)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_close_refuses_non_finite_outputs_on_either_side(bad):
    from depthcompress.merging import check_close

    good = torch.ones(2, 3)
    poisoned = good.clone()
    poisoned[1, 2] = bad
    with pytest.raises(
        dc.MergeError, match=r"the merged network produced non-finite values \(1 of 6"
    ):
        check_close(good, poisoned, "merged network", "linearized network")
    with pytest.raises(dc.MergeError, match="the linearized network produced non-finite values"):
        check_close(poisoned, good, "merged network", "linearized network")
    with pytest.raises(dc.ExportError, match=r"x\.pt was not written"):
        check_close(
            (good, poisoned),
            (good, good),
            "file",
            "net",
            error=dc.ExportError,
            outcome="x.pt was not written",
        )
    assert (
        check_close((good, {"y": good}), (good, {"y": good}), "merged network", "linearized") == 0.0
    )
