"""Fine-tuning of a linearized tiny CNN on synthetic data: loss goes down, cosine schedule, KD,
checkpoint and resume, refused resumes, exact merge afterwards, and two gloo processes."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import depthcompress as dc
from depthcompress.finetune import (
    BEST,
    LAST,
    EpochStats,
    FinetuneConfig,
    FinetuneError,
    evaluate,
    finetune,
    load_checkpoint,
    training_loss,
)

CONFIG = FinetuneConfig(epochs=2, lr=0.05, batch_size=32)


class Tiny(nn.Module):
    """Three conv-BN-ReLU layers (the middle one made linear by the plan) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """1×12×12 noise over one of four textures (horizontal or vertical stripes, checkerboard,
    flat): learnable by a small conv net with global pooling."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    i = torch.arange(12)
    rows, cols = (i[:, None] % 2).float(), (i[None, :] % 2).float()
    textures = torch.stack(
        [rows.expand(12, 12), cols.expand(12, 12), (rows + cols) % 2, torch.full((12, 12), 0.5)]
    )
    x = textures[y].unsqueeze(1) * 2.0 - 1.0 + torch.randn(n, 1, 12, 12, generator=gen) * 0.5
    return TensorDataset(x, y)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Single-threaded CPU kernels make runs bitwise reproducible."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture(scope="module")
def chain(model: Tiny) -> dc.ConvChain:
    return dc.trace(model, torch.randn(1, 1, 12, 12))


@pytest.fixture(scope="module")
def plan(chain: dc.ConvChain) -> dc.Plan:
    plan = dc.Plan.for_activations(chain, set(chain.activation_positions) - {1})
    assert len(plan.blocks) < chain.num_positions  # something is merged
    return plan


@pytest.fixture
def linear(model: Tiny, chain: dc.ConvChain, plan: dc.Plan) -> torch.fx.GraphModule:
    return dc.linearize(model, chain, plan)


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    return make_data()


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- training --------------------------------------------------------------------------------


def test_loss_decreases_and_accuracy_rises(linear, data) -> None:
    config = FinetuneConfig(epochs=4, lr=0.05, batch_size=32)
    before = evaluate(linear, data)
    result = finetune(linear, data, config, holdout_data=data, progress=False)
    losses = [h.loss for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert result.model is linear and not linear.training
    assert result.train_loss == losses[-1]
    assert result.history[-1].accuracy > max(before, 50.0)
    assert result.best_accuracy == max(h.accuracy for h in result.history)
    assert result.last_checkpoint is None and result.best_checkpoint is None


def test_cosine_schedule_reaches_zero(linear, data) -> None:
    result = finetune(linear, data, CONFIG, progress=False)
    assert result.history[0].lr == pytest.approx(CONFIG.lr / 2)  # cos(π/2) halfway
    assert result.history[-1].lr == pytest.approx(0.0, abs=1e-12)


def test_steps_per_epoch_beyond_one_pass(linear, data, tmp_path) -> None:
    seen: list[EpochStats] = []
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=64, steps_per_epoch=10, optimizer="adamw")
    finetune(
        linear, data, config, checkpoint_dir=tmp_path, progress=False, on_epoch_end=seen.append
    )
    assert [s.epoch for s in seen] == [1]
    steps = load_checkpoint(tmp_path / LAST)["scheduler"]["last_epoch"]
    assert steps == 10  # 10 steps of 64 = 2.5 passes over 256 examples
    few = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, steps_per_epoch=3)
    assert finetune(linear, make_data(20), few, progress=False).history  # data < one batch


def test_distributed_false_ignores_torchrun_env(linear, data, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=32)
    assert finetune(linear, data, config, progress=False, distributed=False).history
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(FinetuneError, match="torchrun"):
        finetune(linear, data, config, progress=False)


def test_callers_random_stream_is_untouched(linear, data) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(linear, data, FinetuneConfig(epochs=1, lr=0.01, batch_size=32), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_training_loss_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0])
    soft = -(teacher.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    hard = F.cross_entropy(logits, labels)
    got = training_loss(logits, labels, teacher, distill=0.3)
    assert torch.allclose(got, 0.3 * soft + 0.7 * hard)
    assert torch.equal(training_loss(logits, labels, teacher), hard)
    with pytest.raises(FinetuneError, match="teacher"):
        training_loss(logits, labels, None, distill=0.3)


def test_distillation_runs_and_needs_a_teacher(model, linear, data) -> None:
    teacher = copy.deepcopy(model).train()
    config = FinetuneConfig(epochs=1, lr=0.05, batch_size=32, distill=0.3)
    with pytest.raises(FinetuneError, match="needs a teacher"):
        finetune(linear, data, config, progress=False)
    untouched = copy.deepcopy(teacher)
    result = finetune(linear, data, config, teacher=teacher, progress=False)
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert teacher.training and state_equal(teacher, untouched)  # teacher not trained


def test_bad_configs_are_refused(linear) -> None:
    with pytest.raises(FinetuneError, match="distill"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, distill=1.5)
    with pytest.raises(FinetuneError, match="optimizer"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(FinetuneError, match="fewer than one batch"):
        finetune(linear, make_data(16), CONFIG, progress=False)


def test_merge_is_exact_after_finetuning(linear, chain, plan, data) -> None:
    finetune(linear, data, FinetuneConfig(epochs=2, lr=0.1, batch_size=32), progress=False)
    merged = dc.merge(linear, chain, plan)  # raises MergeError if it does not match
    x = data.tensors[0][:64]
    with torch.no_grad():
        expected, got = linear(x), merged(x)
    assert ((expected - got).abs().max() / expected.abs().max()).item() < 1e-4


# --- checkpoints -----------------------------------------------------------------------------


class Crash(Exception):
    """Stands in for a job killed after its first checkpoint."""


def test_resume_gives_the_same_weights(model, chain, plan, data, tmp_path) -> None:
    """Bit-identical weights after a resume: on the CPU, as CUDA convolutions are not
    deterministic (finetune picks CUDA when there is one)."""
    tune = functools.partial(finetune, device="cpu")
    whole = dc.linearize(model, chain, plan)
    one_go = tune(whole, data, CONFIG, checkpoint_dir=tmp_path / "a", progress=False)

    def crash(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Crash

    first = dc.linearize(model, chain, plan)
    with pytest.raises(Crash):
        tune(first, data, CONFIG, checkpoint_dir=tmp_path / "b", on_epoch_end=crash)
    assert load_checkpoint(tmp_path / "b" / LAST)["epoch"] == 1
    assert not state_equal(first, whole)

    again = dc.linearize(model, chain, plan)
    resumed = tune(again, data, CONFIG, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_epochs == 1
    assert state_equal(again, whole)
    assert [h.loss for h in resumed.history] == [h.loss for h in one_go.history]

    done = dc.linearize(model, chain, plan)  # a finished run only reloads its weights
    finished = tune(done, data, CONFIG, checkpoint_dir=tmp_path / "b", progress=False)
    assert finished.resumed_epochs == 2 and state_equal(done, whole)
    assert not done.training

    reload = dc.linearize(model, chain, plan)  # the pipeline's way back from a checkpoint
    reload.load_state_dict(load_checkpoint(tmp_path / "a" / LAST)["model"])
    assert state_equal(reload, whole)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [LAST]  # no temp files left


def test_mismatched_config_is_refused(linear, data, tmp_path) -> None:
    finetune(linear, data, CONFIG, checkpoint_dir=tmp_path, progress=False)
    other = FinetuneConfig(epochs=2, lr=0.1, batch_size=32)
    with pytest.raises(FinetuneError, match=r"lr: 0\.05 in the checkpoint, 0\.1 now") as err:
        finetune(linear, data, other, checkpoint_dir=tmp_path, progress=False)
    assert "another checkpoint directory" in str(err.value) and "delete" in str(err.value)
    workers = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, num_workers=1)
    assert finetune(linear, data, workers, checkpoint_dir=tmp_path, progress=False).history


def test_checkpoint_of_another_network_is_refused(model, chain, data, tmp_path) -> None:
    plan_a = dc.Plan.identity(chain)
    finetune(
        dc.linearize(model, chain, plan_a), data, CONFIG, checkpoint_dir=tmp_path, progress=False
    )
    plan_b = dc.Plan.for_activations(chain, set(chain.activation_positions) - {1})
    with pytest.raises(FinetuneError, match="another linearized network"):
        finetune(
            dc.linearize(model, chain, plan_b),
            data,
            CONFIG,
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_best_checkpoint_tracks_holdout_accuracy(linear, data, tmp_path) -> None:
    result = finetune(
        linear, data, CONFIG, checkpoint_dir=tmp_path, holdout_data=data, progress=False
    )
    best = load_checkpoint(tmp_path / BEST)
    assert result.best_checkpoint == tmp_path / BEST
    assert best["accuracy"] == result.best_accuracy
    assert best["epoch"] == max(result.history, key=lambda h: h.accuracy).epoch


# --- two processes ---------------------------------------------------------------------------

SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path

import torch

sys.path.insert(0, {tests!r})
import depthcompress as dc
from depthcompress.finetune import FinetuneConfig, end_distributed, finetune
from test_finetune import Tiny, make_data

torch.set_num_threads(1)
out = Path(sys.argv[1])
torch.manual_seed(0)
model = Tiny()
chain = dc.trace(model, torch.randn(1, 1, 12, 12))
plan = dc.Plan.for_activations(chain, set(chain.activation_positions) - {{1}})
linear = dc.linearize(model, chain, plan)
config = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, distill=0.3)
data = make_data()
result = finetune(linear, data, config, teacher=model, checkpoint_dir=out / "ckpt",
                  holdout_data=make_data(64, seed=1), progress=False)
h = hashlib.sha256()
for name, t in linear.state_dict().items():
    h.update(name.encode())
    h.update(t.detach().contiguous().numpy().tobytes())
rank = os.environ["RANK"]
info = {{"hash": h.hexdigest(), "world": torch.distributed.get_world_size(),
        "loss": result.train_loss, "accuracy": result.history[-1].accuracy}}
(out / f"rank{{rank}}.json").write_text(json.dumps(info))
end_distributed()  # exiting with the gloo group open can abort a rank
"""


def test_two_processes_with_torchrun(tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    assert ranks[0]["loss"] == ranks[1]["loss"]  # loss averaged over both processes
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    ckpt = load_checkpoint(tmp_path / "ckpt" / LAST)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    h = hashlib.sha256()
    for name, t in ckpt["model"].items():
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == ranks[0]["hash"]  # rank 0 wrote the final weights
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))
