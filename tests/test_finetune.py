"""Fine-tuning of a linearized tiny CNN on synthetic data: loss goes down, cosine schedule, KD,
checkpoint and resume, refused resumes, exact merge afterwards, and two gloo processes."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
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
from depthcompress.devices import resolve_device
from depthcompress.errors import DeviceError
from depthcompress.finetune import (
    BEST,
    LAST,
    EpochStats,
    FinetuneConfig,
    FinetuneError,
    StepCheckpoints,
    check_amp,
    evaluate,
    finetune,
    load_checkpoint,
    process_group_backend,
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
    result = finetune(linear, data, config, holdout_data=data)
    losses = [h.loss for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert result.model is linear and not linear.training
    assert result.train_loss == losses[-1]
    assert result.history[-1].accuracy > max(before, 50.0)
    assert result.best_accuracy == max(h.accuracy for h in result.history)
    assert result.last_checkpoint is None and result.best_checkpoint is None


def test_cosine_schedule_reaches_zero(linear, data) -> None:
    result = finetune(linear, data, CONFIG)
    assert result.history[0].lr == pytest.approx(CONFIG.lr / 2)  # cos(π/2) halfway
    assert result.history[-1].lr == pytest.approx(0.0, abs=1e-12)


def test_steps_per_epoch_beyond_one_pass(linear, data, tmp_path) -> None:
    seen: list[EpochStats] = []
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=64, steps_per_epoch=10, optimizer="adamw")
    finetune(linear, data, config, checkpoint_dir=tmp_path, on_epoch_end=seen.append)
    assert [s.epoch for s in seen] == [1]
    steps = load_checkpoint(tmp_path / LAST)["scheduler"]["last_epoch"]
    assert steps == 10  # 10 steps of 64 = 2.5 passes over 256 examples
    few = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, steps_per_epoch=3)
    assert finetune(linear, make_data(20), few).history  # data < one batch


def test_distributed_false_ignores_torchrun_env(linear, data, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=32)
    assert finetune(linear, data, config, distributed=False).history
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(FinetuneError, match="torchrun"):
        finetune(linear, data, config)


def test_steps_go_to_the_reporter(linear, data) -> None:
    """A reporter sees the run's steps over all epochs (every 10th, each epoch's start and end)
    with the epoch and running loss; without one nothing is drawn."""
    from depthcompress.progress import Step

    steps: list[Step] = []
    config = FinetuneConfig(epochs=2, lr=0.01, batch_size=32, steps_per_epoch=12)
    finetune(linear, data, config, holdout_data=data, progress=steps.append)
    assert {s.task for s in steps} == {"fine-tuning"} and {s.total for s in steps} == {24}
    assert [s.done for s in steps] == [0, 10, 12, 12, 12, 22, 24, 24]
    assert steps[1].detail.startswith("epoch 1/2 loss ") and "acc" in steps[-1].detail


def test_callers_random_stream_is_untouched(linear, data) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(linear, data, FinetuneConfig(epochs=1, lr=0.01, batch_size=32))
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
        finetune(linear, data, config)
    untouched = copy.deepcopy(teacher)
    result = finetune(linear, data, config, teacher=teacher)
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert teacher.training and state_equal(teacher, untouched)  # teacher not trained


def test_bad_configs_are_refused(linear) -> None:
    with pytest.raises(FinetuneError, match="distill"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, distill=1.5)
    with pytest.raises(FinetuneError, match="optimizer"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(FinetuneError, match="fewer than one batch"):
        finetune(linear, make_data(16), CONFIG)


def test_merge_is_exact_after_finetuning(linear, chain, plan, data) -> None:
    finetune(linear, data, FinetuneConfig(epochs=2, lr=0.1, batch_size=32))
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
    one_go = tune(whole, data, CONFIG, checkpoint_dir=tmp_path / "a")

    def crash(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Crash

    first = dc.linearize(model, chain, plan)
    with pytest.raises(Crash):
        tune(first, data, CONFIG, checkpoint_dir=tmp_path / "b", on_epoch_end=crash)
    assert load_checkpoint(tmp_path / "b" / LAST)["epoch"] == 1
    assert not state_equal(first, whole)

    again = dc.linearize(model, chain, plan)
    resumed = tune(again, data, CONFIG, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_epochs == 1
    assert state_equal(again, whole)
    assert [h.loss for h in resumed.history] == [h.loss for h in one_go.history]

    done = dc.linearize(model, chain, plan)  # a finished run only reloads its weights
    finished = tune(done, data, CONFIG, checkpoint_dir=tmp_path / "b")
    assert finished.resumed_epochs == 2 and state_equal(done, whole)
    assert not done.training

    reload = dc.linearize(model, chain, plan)  # the pipeline's way back from a checkpoint
    reload.load_state_dict(load_checkpoint(tmp_path / "a" / LAST)["model"])
    assert state_equal(reload, whole)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [LAST]  # no temp files left


def test_resume_mid_epoch_gives_the_same_weights(model, chain, plan, data, tmp_path) -> None:
    """An interruption within an epoch loses only the steps since the last step checkpoint: the
    rerun goes on from that step with the same batches and RNG, bit-identical on the CPU."""
    from depthcompress.progress import Step

    config = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, steps_per_epoch=12)
    tune = functools.partial(finetune, device="cpu", holdout_data=data)
    whole = dc.linearize(model, chain, plan)
    one_go = tune(whole, data, config, checkpoint_dir=tmp_path / "a")

    def crash(step: Step) -> None:
        if step.done == 12 + 10:  # epoch 2, after its 10th step
            raise Crash

    every = StepCheckpoints(seconds=None, steps=3)
    first = dc.linearize(model, chain, plan)
    with pytest.raises(Crash):
        tune(first, data, config, checkpoint_dir=tmp_path / "b", progress=crash,
             checkpoint_every=every)  # fmt: skip
    saved = load_checkpoint(tmp_path / "b" / LAST)
    assert (saved["epoch"], saved["step"]) == (1, 9)  # steps 10 was lost, 1..9 were not

    again = dc.linearize(model, chain, plan)
    resumed = tune(again, data, config, checkpoint_dir=tmp_path / "b", checkpoint_every=every)
    assert resumed.resumed_epochs == 1 and state_equal(again, whole)
    assert [h.loss for h in resumed.history] == [h.loss for h in one_go.history]
    assert [h.accuracy for h in resumed.history] == [h.accuracy for h in one_go.history]
    assert load_checkpoint(tmp_path / "b" / LAST)["step"] == 0  # the run's end: whole epochs


def test_step_checkpoints_by_time(linear, data, tmp_path) -> None:
    """By default a checkpoint is due after 120 s of an epoch; a tiny interval writes one after
    every step, so a crash loses none."""
    assert StepCheckpoints().due(7, 119.0) is False and StepCheckpoints().due(7, 120.0) is True
    assert StepCheckpoints(seconds=None, steps=4).due(8, 0.0) is True
    assert StepCheckpoints(seconds=None).due(8, 1e9) is False
    with pytest.raises(FinetuneError, match="checkpoint seconds"):
        StepCheckpoints(seconds=0.0)
    with pytest.raises(FinetuneError, match="checkpoint steps"):
        StepCheckpoints(steps=0)

    def crash(step) -> None:
        if step.done == 10:
            raise Crash

    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, steps_per_epoch=12)
    with pytest.raises(Crash):
        finetune(linear, data, config, checkpoint_dir=tmp_path, progress=crash,
                 checkpoint_every=StepCheckpoints(seconds=1e-9))  # fmt: skip
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step"]) == (0, 10)


def test_training_threads_are_a_setting(linear, data, tmp_path) -> None:
    """The run trains with ``config.threads`` torch threads (1 by default), restores the caller's
    count, and a checkpoint made with another count is refused: it changes CPU results."""
    assert FinetuneConfig(epochs=1, lr=0.01, batch_size=32).threads == 1
    with pytest.raises(FinetuneError, match="threads must be"):
        FinetuneConfig(epochs=1, lr=0.01, batch_size=32, threads=0)
    seen: list[int] = []
    two = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, threads=2)
    finetune(linear, data, two, checkpoint_dir=tmp_path,
             on_epoch_end=lambda _: seen.append(torch.get_num_threads()))  # fmt: skip
    assert seen == [2] and torch.get_num_threads() == 1
    assert load_checkpoint(tmp_path / LAST)["config"]["threads"] == 2
    one = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, threads=1)
    with pytest.raises(FinetuneError, match="threads: 2 in the checkpoint, 1 now"):
        finetune(linear, data, one, checkpoint_dir=tmp_path)


def test_mismatched_config_is_refused(linear, data, tmp_path) -> None:
    finetune(linear, data, CONFIG, checkpoint_dir=tmp_path)
    other = FinetuneConfig(epochs=2, lr=0.1, batch_size=32)
    with pytest.raises(FinetuneError, match=r"lr: 0\.05 in the checkpoint, 0\.1 now") as err:
        finetune(linear, data, other, checkpoint_dir=tmp_path)
    assert "another checkpoint directory" in str(err.value) and "delete" in str(err.value)
    workers = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, num_workers=1)
    assert finetune(linear, data, workers, checkpoint_dir=tmp_path).history


def test_checkpoint_of_another_network_is_refused(model, chain, data, tmp_path) -> None:
    plan_a = dc.Plan.identity(chain)
    finetune(dc.linearize(model, chain, plan_a), data, CONFIG, checkpoint_dir=tmp_path)
    plan_b = dc.Plan.for_activations(chain, set(chain.activation_positions) - {1})
    with pytest.raises(FinetuneError, match="another linearized network"):
        finetune(
            dc.linearize(model, chain, plan_b),
            data,
            CONFIG,
            checkpoint_dir=tmp_path,
        )


def test_best_checkpoint_tracks_holdout_accuracy(linear, data, tmp_path) -> None:
    result = finetune(linear, data, CONFIG, checkpoint_dir=tmp_path, holdout_data=data)
    best = load_checkpoint(tmp_path / BEST)
    assert result.best_checkpoint == tmp_path / BEST
    assert best["accuracy"] == result.best_accuracy
    assert best["epoch"] == max(result.history, key=lambda h: h.accuracy).epoch


# --- GPU choices: mixed precision, memory format, loader workers, devices -----------------------

BF16 = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, amp="bf16")


def test_cpu_defaults_are_the_float32_contiguous_in_process_run(model, chain, plan, data) -> None:
    assert CONFIG.channels_last is None and CONFIG.num_workers is None and CONFIG.amp is None
    resolved = CONFIG.for_device(torch.device("cpu"))
    assert resolved.channels_last is False and resolved.num_workers == 0
    default = dc.linearize(model, chain, plan)
    finetune(default, data, CONFIG)
    explicit = dc.linearize(model, chain, plan)
    old = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, channels_last=False, num_workers=0)
    finetune(explicit, data, old)
    assert state_equal(default, explicit)  # the CPU default is the former behaviour, bit for bit


def test_cuda_defaults_follow_the_device(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cuda = CONFIG.for_device(torch.device("cuda", 0))
    assert cuda.channels_last is True and cuda.num_workers == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert CONFIG.for_device(torch.device("cuda", 0)).num_workers == 2
    asked = FinetuneConfig(epochs=1, lr=0.1, batch_size=8, channels_last=False, num_workers=1)
    assert asked.for_device(torch.device("cuda", 0)) == asked


def test_amp_settings_are_validated(linear, data, tmp_path) -> None:
    with pytest.raises(FinetuneError, match="amp must be 'bf16', 'fp16' or None"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, amp="fp32")  # type: ignore[arg-type]
    with pytest.raises(FinetuneError, match="num_workers"):
        FinetuneConfig(epochs=1, lr=0.1, batch_size=8, num_workers=-1)
    fp16 = FinetuneConfig(epochs=1, lr=0.05, batch_size=32, amp="fp16")
    with pytest.raises(FinetuneError, match=r"fp16 needs a CUDA device.*--amp bf16") as err:
        finetune(linear, data, fp16, checkpoint_dir=tmp_path / "ck")
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "ck").exists()  # refused before anything was written
    check_amp("bf16", "cpu")  # allowed on the CPU
    check_amp(None, "cuda:0")


def test_bf16_on_the_cpu_trains_and_resumes(model, chain, plan, data, tmp_path) -> None:
    whole = dc.linearize(model, chain, plan)
    one_go = finetune(whole, data, BF16, checkpoint_dir=tmp_path / "a", holdout_data=data)
    losses = [h.loss for h in one_go.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    fp32 = dc.linearize(model, chain, plan)
    finetune(fp32, data, CONFIG)
    assert not state_equal(whole, fp32)  # autocast was on
    assert all(p.dtype == torch.float32 for p in whole.parameters())  # weights stay float32
    ckpt = load_checkpoint(tmp_path / "a" / LAST)
    assert ckpt["config"]["amp"] == "bf16" and ckpt["scaler"] is None  # bf16 needs no scaler

    def crash(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Crash

    first = dc.linearize(model, chain, plan)
    with pytest.raises(Crash):
        finetune(
            first,
            data,
            BF16,
            checkpoint_dir=tmp_path / "b",
            holdout_data=data,
            on_epoch_end=crash,
        )
    again = dc.linearize(model, chain, plan)
    resumed = finetune(again, data, BF16, checkpoint_dir=tmp_path / "b", holdout_data=data)
    assert resumed.resumed_epochs == 1 and state_equal(again, whole)
    assert [h.loss for h in resumed.history] == losses
    with pytest.raises(FinetuneError, match="amp: 'bf16' in the checkpoint, None now"):
        finetune(
            dc.linearize(model, chain, plan),
            data,
            CONFIG,
            checkpoint_dir=tmp_path / "b",
        )


def test_fp16_gradient_scaler_state_is_checkpointed(
    model, chain, plan, data, tmp_path, monkeypatch
) -> None:
    """The scaler path, run on the CPU by lifting the CUDA-only rule (CPU autocast has fp16)."""
    import depthcompress.finetune as ft

    monkeypatch.setattr(ft, "check_amp", lambda amp, device: None)
    fp16 = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, amp="fp16", grad_clip=5.0)
    whole = dc.linearize(model, chain, plan)
    one_go = finetune(whole, data, fp16, checkpoint_dir=tmp_path / "a")
    assert all(math.isfinite(h.loss) for h in one_go.history)
    scaler = load_checkpoint(tmp_path / "a" / LAST)["scaler"]
    assert scaler is not None and scaler["scale"] > 0 and "_growth_tracker" in scaler

    def crash(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        finetune(
            dc.linearize(model, chain, plan),
            data,
            fp16,
            checkpoint_dir=tmp_path / "b",
            on_epoch_end=crash,
        )
    again = dc.linearize(model, chain, plan)
    finetune(again, data, fp16, checkpoint_dir=tmp_path / "b")
    assert state_equal(again, whole)
    assert load_checkpoint(tmp_path / "b" / LAST)["scaler"] == scaler


def test_evaluate_under_autocast(linear, data) -> None:
    plain = evaluate(linear, data)
    assert abs(evaluate(linear, data, amp="bf16") - plain) <= 5.0
    with pytest.raises(FinetuneError, match="fp16 needs a CUDA device"):
        evaluate(linear, data, amp="fp16")


def test_device_of_each_process() -> None:
    """Each torchrun process gets its own GPU through the one device resolver."""
    cpu, cuda = torch.device("cpu"), torch.device
    pick = resolve_device
    assert pick(None, local_rank=0, gpus=0) == cpu and pick("cpu", local_rank=3, gpus=2) == cpu
    assert pick(None, local_rank=1, gpus=2) == cuda("cuda", 1)
    assert pick("cuda", local_rank=0, gpus=1) == cuda("cuda", 0)
    assert pick("cuda", local_rank=3, gpus=4) == cuda("cuda", 3)  # torchrun rank 3, own GPU
    assert pick("cuda:1", local_rank=0, gpus=2) == cuda("cuda", 1)
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        pick("cuda", local_rank=0, gpus=0)
    with pytest.raises(DeviceError, match=r"cuda:3 does not exist.*1 CUDA device \(cuda:0\)"):
        pick("cuda:3", local_rank=0, gpus=1)
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=2 .*--nproc_per_node"):
        pick("cuda", local_rank=2, gpus=2)
    with pytest.raises(DeviceError, match="'gpu0' is not a device"):
        pick("gpu0", local_rank=0, gpus=1)
    assert process_group_backend(cuda("cuda", 0)) == "nccl"
    assert process_group_backend(cpu) == "gloo"


def test_world_sets_an_indexed_cuda_device(monkeypatch) -> None:
    """``device="cuda"`` reaches ``torch.cuda.set_device`` as ``cuda:LOCAL_RANK`` (an index-less
    device made it raise "Expected a torch.device with a specified index")."""
    import depthcompress.finetune as ft

    chosen: list[torch.device] = []

    def set_device(dev: torch.device) -> None:
        if dev.index is None:
            raise ValueError("Expected a torch.device with a specified index")
        chosen.append(dev)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = ft._world("cuda", distributed=True)
    assert world.device == torch.device("cuda", 1) and chosen == [world.device]
    assert ft._world("cuda", distributed=False).device == torch.device("cuda", 0)  # alone: 0
    assert ft._world(None, distributed=True).device == torch.device("cuda", 1)


def test_batches_are_pinned_for_cuda(data, monkeypatch) -> None:
    from depthcompress.data import batches

    pinned: list[torch.Size] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        pinned.append(self.shape)
        return self.clone()

    order = torch.arange(40)
    plain = list(batches(data, order, 16))
    assert not pinned
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    got = list(batches(data, order, 16, pin_memory=True))
    assert len(pinned) == 2 * len(got) == 6
    pairs = [(a, b) for (x, y), (u, v) in zip(plain, got, strict=True) for a, b in ((x, u), (y, v))]
    assert all(torch.equal(a, b) for a, b in pairs)


def test_compress_settings_refuse_fp16_without_a_gpu(monkeypatch) -> None:
    from depthcompress.cli import _compress_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kw = dict(
        budget="0.6x", backend="onnxruntime", threads=None, batch=1, mode="general",
        max_kernel_size=15, exclude=None, importance_steps=2, importance_lr=0.05, workers=1,
        alpha=1.6, epochs=1, lr=0.01, finetune_batch_size=32, optimizer="sgd", distill=0.0,
        device=None, seed=0, loader_workers=None,
    )  # fmt: skip
    with pytest.raises(dc.DepthCompressError, match="fp16 needs a CUDA device"):
        _compress_settings(**kw, amp="fp16")
    settings = _compress_settings(**kw, amp="bf16")
    assert settings.importance.amp == settings.finetune.amp == "bf16"
    stages = settings.stage_settings()
    assert stages["importance"]["importance"]["amp"] == "bf16"
    assert stages["finetune"]["finetune"]["amp"] == "bf16"  # a changed --amp refuses a resume
    demo = _compress_settings(**kw, amp="bf16", importance_amp=None)
    assert demo.importance.amp is None and demo.finetune.amp == "bf16"
    assert demo.importance.threads == demo.finetune.threads == 1  # --train-threads' default
    two = _compress_settings(**kw, amp=None, train_threads=2).stage_settings()
    assert two["importance"]["importance"]["threads"] == two["finetune"]["finetune"]["threads"] == 2


def test_one_fine_tuning_lr_default() -> None:
    """The API's, ``compress``'s and the demo's fine-tuning lr are one constant (the demo's)."""
    import inspect

    from depthcompress.cli import compress_cmd
    from depthcompress.defaults import FINETUNE_LR

    assert dc.CompressSettings(budget=dc.Budget.parse("0.5x")).finetune.lr == FINETUNE_LR == 0.02
    assert inspect.signature(compress_cmd).parameters["lr"].default == FINETUNE_LR


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
                  holdout_data=make_data(64, seed=1))
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
