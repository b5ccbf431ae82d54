"""Importance tables on a tiny CNN and a few batches: entries, layout, resume, shards, merge,
determinism, zero-shot, worker processes and Ray."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import depthcompress as dc
from depthcompress.data import DataError, ImageTensors, fashion_mnist, split_dataset
from depthcompress.devices import cuda_count as dc_cuda_count
from depthcompress.errors import DepthCompressError, FinetuneError, TableError
from depthcompress.importance import (
    COLUMNS,
    Entry,
    FinetuneSettings,
    entry_activations,
    entry_network,
    entry_plan,
    enumerate_entries,
    execution_plan,
    importance_table,
    merge_tables,
    read_table,
    shard_entries,
    sidecar_path,
)

SETTINGS = FinetuneSettings(steps=3, lr=0.05, batch_size=16, eval_batch_size=64)


class Tiny(nn.Module):
    """Stem, an inverted-residual block with an identity skip, a strided conv, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 8, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 4, 1, bias=False),
            nn.BatchNorm2d(4),
        )
        self.down = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        x = self.down(x)
        return self.fc(x.mean((2, 3)))


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture(scope="module")
def model() -> Tiny:
    return tiny()


@pytest.fixture(scope="module")
def chain(model: Tiny) -> dc.ConvChain:
    return dc.trace(model, torch.randn(1, 1, 28, 28))


@pytest.fixture(scope="module")
def data():
    """160 Fashion-MNIST training images (64 held out), or synthetic ones without the package."""
    try:
        fm = fashion_mnist("train")
    except DataError:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(160, 1, 28, 28, generator=gen)
        y = (x[:, 0, :14].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :14].mean((1, 2)) > 0).long()
        return split_dataset(TensorDataset(x, y), holdout=64, seed=0, name="synthetic")
    small = ImageTensors(fm.images[:160].clone(), fm.labels[:160].clone(), fm.mean, fm.std)
    return split_dataset(small, holdout=64, seed=0, name="fashion-mnist[:160]")


@pytest.fixture(scope="module")
def whole(model: Tiny, chain: dc.ConvChain, data, tmp_path_factory) -> Path:
    """The complete table of the tiny model, computed once in-process."""
    path = tmp_path_factory.mktemp("whole") / "imp.csv"
    importance_table(model, chain, data, path, settings=SETTINGS)
    return path


def scores(path: Path) -> list[tuple]:
    """Rows without the timing column (the only one that varies between identical runs)."""
    _, rows = read_table(path)
    return [tuple(r[c] for c in COLUMNS if c != "seconds") for r in rows]


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Row lists equal, NaN equal to NaN."""

    def norm(rows: list[tuple]) -> list[tuple]:
        return [
            tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows
        ]

    return norm(a) == norm(b)


# --- entries ----------------------------------------------------------------------------------


def test_tiny_chain_shape(chain: dc.ConvChain) -> None:
    assert chain.num_positions == 5
    assert chain.linear_positions == (4,)
    assert [(r.start, r.end) for r in chain.residuals] == [(1, 4)]


def test_enumeration_reference_rule(chain: dc.ConvChain) -> None:
    entries = enumerate_entries(chain)
    assert entries == sorted(entries)
    linear = set(chain.linear_positions)
    for e in entries:
        assert (e.st, e.end) in chain.blocks
        if e.st == 0:
            assert (e.st_act, e.end_act) == (1, 1)
        assert e.st_act == 1 or e.st in linear
        assert e.end_act == 1 or e.end in linear
        assert (e.st_act, e.end_act) != (0, 0)
    assert Entry(4, 5, 0, 1) in entries and Entry(4, 5, 1, 1) in entries
    assert Entry(3, 4, 1, 0) in entries and Entry(3, 4, 1, 1) in entries
    everything = enumerate_entries(chain, exclude_zeros=False)
    assert set(entries) < set(everything)
    assert all(e.st_act == 1 or e.st in linear for e in everything)


def test_enumeration_mobilenet_v2_matches_reference_count() -> None:
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.mobilenet_v2()
    chain = dc.trace(
        net, torch.randn(1, 3, 224, 224), mode="reference", exclude=["features.0", "features.18"]
    )
    entries = enumerate_entries(chain)
    assert len(entries) == 315
    assert sum(e.end - e.st == 1 for e in entries) == 83


def test_entry_activations_and_plan(chain: dc.ConvChain) -> None:
    a0 = set(chain.activation_positions)
    assert a0 == {1, 2, 3, 5}
    assert entry_activations(chain, Entry(1, 4, 1, 0)) == frozenset({1, 5})
    assert entry_activations(chain, Entry(1, 4, 1, 1)) == frozenset({1, 4, 5})
    assert entry_activations(chain, Entry(4, 5, 0, 1)) == frozenset({1, 2, 3, 5})
    assert entry_activations(chain, Entry(4, 5, 1, 1)) == frozenset({1, 2, 3, 4, 5})
    assert entry_activations(chain, Entry(0, 3, 1, 1)) == frozenset({3, 5})
    for e in enumerate_entries(chain):
        plan = entry_plan(chain, e)
        plan.validate(chain)
        assert plan.activations == entry_activations(chain, e)


def test_entry_network_reinitialises_only_single_conv_spans(
    model: Tiny, chain: dc.ConvChain
) -> None:
    torch.manual_seed(1)
    single = entry_network(model, chain, Entry(1, 2, 1, 1))
    assert not torch.equal(single.get_submodule("block.0").weight, model.block[0].weight)
    assert torch.equal(single.get_submodule("block.3").weight, model.block[3].weight)
    assert torch.equal(single.get_submodule("block.1").running_var, torch.ones(8))
    kept = entry_network(model, chain, Entry(1, 2, 1, 1), reinit_single=False)
    assert torch.equal(kept.get_submodule("block.0").weight, model.block[0].weight)
    multi = entry_network(model, chain, Entry(1, 3, 1, 1))
    assert torch.equal(multi.get_submodule("block.0").weight, model.block[0].weight)


def test_shards_are_disjoint_and_cover(chain: dc.ConvChain) -> None:
    entries = enumerate_entries(chain)
    parts = [shard_entries(entries, (k, 3)) for k in (1, 2, 3)]
    assert sorted(e for p in parts for e in p) == entries
    assert parts[0][0] == entries[0] and parts[1][0] == entries[1]


# --- tables -----------------------------------------------------------------------------------


def test_table_layout_and_sidecar(chain: dc.ConvChain, whole: Path) -> None:
    path = whole
    with path.open() as fh:
        header = next(csv.reader(fh))
    assert header == [
        "st",
        "end",
        "st_act",
        "end_act",
        "val_acc",
        "val_loss",
        "train_loss",
        "steps",
        "seconds",
    ]
    meta, rows = read_table(path)
    entries = enumerate_entries(chain)
    assert [(r["st"], r["end"], r["st_act"], r["end_act"]) for r in rows] == entries
    assert all(r["steps"] == 3 and r["train_loss"] > 0 for r in rows)
    assert all(-100 <= r["val_acc"] <= 100 for r in rows)
    side = json.loads(sidecar_path(path).read_text())
    assert side == meta
    assert side["data"]["holdout"] == 64 and side["data"]["holdout_seed"] == 0
    assert side["data"]["fingerprint"]
    assert side["settings"]["steps"] == 3 and side["settings"]["lr"] == 0.05
    assert side["settings"]["batch_size"] == 16 and side["settings"]["seed"] == 0
    assert side["entries"]["count"] == len(entries)
    assert 0 <= side["base"]["val_acc"] <= 100
    assert side["versions"]["torch"] == torch.__version__
    assert side["model"]["weights_sha256"] and side["model"]["chain_sha256"]


def test_resume_after_interruption(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    path = tmp_path / "imp.csv"
    seen = []

    def crash(row: dict) -> None:
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        importance_table(model, chain, data, path, settings=SETTINGS, on_row=crash)
    _, rows = read_table(path)
    assert len(rows) == 3
    with path.open("a") as fh:  # a kill in the middle of writing a row
        fh.write("2,3,1,1,-1.2")
    again = importance_table(model, chain, data, path, settings=SETTINGS)
    assert again.skipped == 3
    assert again.computed == len(enumerate_entries(chain)) - 3
    assert same(scores(path), scores(whole))
    done = importance_table(model, chain, data, path, settings=SETTINGS)
    assert done.computed == 0


def test_resume_refuses_other_settings(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path
) -> None:
    path = tmp_path / "imp.csv"
    one = [enumerate_entries(chain)[0]]
    importance_table(model, chain, data, path, settings=SETTINGS, entries=one)
    other = FinetuneSettings(steps=3, lr=0.1, batch_size=16, eval_batch_size=64)
    with pytest.raises(TableError, match=r"settings\.lr: 0\.05 vs 0\.1"):
        importance_table(model, chain, data, path, settings=other)
    torch.manual_seed(5)
    with pytest.raises(TableError, match="weights_sha256"):
        importance_table(Tiny(), chain, data, path, settings=SETTINGS)
    sidecar_path(path).unlink()
    with pytest.raises(TableError, match="no sidecar"):
        importance_table(model, chain, data, path, settings=SETTINGS)


def test_a_second_run_on_the_same_table_is_refused(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path
) -> None:
    """Rows go through the locked appender: a run on a table another run is writing stops
    before it measures anything, instead of interleaving its rows."""
    from depthcompress.files import csv_appender

    path = tmp_path / "imp.csv"
    one = [enumerate_entries(chain)[0]]
    importance_table(model, chain, data, path, settings=SETTINGS, entries=one)
    before = path.read_bytes()
    with csv_appender(path, COLUMNS), pytest.raises(TableError, match="another depthcompress run"):
        importance_table(model, chain, data, path, settings=SETTINGS, on_row=pytest.fail)
    assert path.read_bytes() == before


def test_steps_go_to_the_reporter(model: Tiny, chain: dc.ConvChain, data, tmp_path: Path) -> None:
    from depthcompress.progress import Step

    steps: list[Step] = []
    two = enumerate_entries(chain)[:2]
    importance_table(
        model,
        chain,
        data,
        tmp_path / "imp.csv",
        settings=SETTINGS,
        entries=two,
        progress=steps.append,
    )
    assert [(s.task, s.done, s.total) for s in steps] == [("importance", n, 2) for n in range(3)]
    assert steps[-1].detail == f"imp.csv: entry {tuple(two[1])}"


def test_a_diverging_entry_is_named_with_the_options_to_change(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path
) -> None:
    """An absurd lr makes the loss NaN: the error names the entry (its block and the removed
    activations) and the CLI options of the lr and of gradient clipping."""
    entry = Entry(1, 3, 1, 1)  # convs 2..3 merged, the activation at 2 removed
    absurd = FinetuneSettings(steps=3, lr=1e12, batch_size=16, eval_batch_size=64)
    with pytest.raises(FinetuneError) as err:
        importance_table(
            model,
            chain,
            data,
            tmp_path / "imp.csv",
            settings=absurd,
            entries=[entry],
        )
    message = str(err.value)
    for part in (
        "entry (st=1, end=3, st_act=1, end_act=1)",
        "convs 2..3 merged, activation(s) at 2 removed",
        "now 1e+12",
        "--importance-lr",
        "--importance-grad-clip",
        "--grad-clip",
    ):
        assert part in message, message
    assert "epoch" not in message, message
    with pytest.raises(DepthCompressError, match="grad_clip must be positive"):
        FinetuneSettings(grad_clip=0.0)


def test_same_seed_same_table(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    b, c = tmp_path / "b.csv", tmp_path / "c.csv"
    importance_table(model, chain, data, b, settings=SETTINGS)
    other = FinetuneSettings(steps=3, lr=0.05, batch_size=16, eval_batch_size=64, seed=1)
    importance_table(model, chain, data, c, settings=other)
    assert same(scores(whole), scores(b))
    assert not same(scores(whole), scores(c))


def test_shards_merge_to_the_single_run(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    parts = [tmp_path / f"part{k}.csv" for k in (1, 2, 3)]
    for k, part in enumerate(parts, start=1):
        importance_table(model, chain, data, part, settings=SETTINGS, shard=f"{k}/3")
        assert json.loads(sidecar_path(part).read_text())["shard"] == f"{k}/3"
    out = tmp_path / "merged.csv"
    meta, rows = merge_tables(parts[::-1], out)
    assert same(scores(out), scores(whole))
    assert meta["shard"] is None and len(rows) == len(enumerate_entries(chain))
    assert read_table(out)[0]["base"] == read_table(whole)[0]["base"]


def test_merge_refuses_mismatched_overlapping_or_incomplete_parts(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path
) -> None:
    p1, p2, q2 = tmp_path / "p1.csv", tmp_path / "p2.csv", tmp_path / "q2.csv"
    first = enumerate_entries(chain)[:4]
    kw = {"entries": first}
    importance_table(model, chain, data, p1, settings=SETTINGS, shard="1/2", **kw)
    importance_table(model, chain, data, p2, settings=SETTINGS, shard="2/2", **kw)
    other = FinetuneSettings(steps=4, lr=0.05, batch_size=16, eval_batch_size=64)
    importance_table(model, chain, data, q2, settings=other, shard="2/2", **kw)
    out = tmp_path / "out.csv"
    with pytest.raises(TableError, match=r"not compatible.*settings\.steps: 3 vs 4"):
        merge_tables([p1, q2], out)
    with pytest.raises(TableError, match="parts overlap"):
        merge_tables([p1, p2, p1], out)
    with pytest.raises(TableError, match="run the missing shards"):
        merge_tables([p1], out)
    assert not out.exists()
    _, rows = merge_tables([p2, p1], out, allow_missing=True)
    assert len(rows) == 4 and read_table(out)[1] == rows


def test_zero_shot_scores_untouched_spans_as_zero(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path
) -> None:
    path = tmp_path / "zs.csv"
    zs = FinetuneSettings(steps=0, eval_batch_size=64)
    result = importance_table(model, chain, data, path, settings=zs)
    by = {Entry(r["st"], r["end"], r["st_act"], r["end_act"]): r for r in result.rows}
    assert all(r["steps"] == 0 and math.isnan(r["train_loss"]) for r in result.rows)
    # a single conv with both flags as in the original network changes nothing
    for e in (Entry(0, 1, 1, 1), Entry(1, 2, 1, 1), Entry(2, 3, 1, 1), Entry(3, 4, 1, 0)):
        assert by[e]["val_acc"] == 0.0 and by[e]["val_loss"] == 0.0


def test_worker_processes_give_the_same_table(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    entries = enumerate_entries(chain)[:4]
    path = tmp_path / "w.csv"
    result = importance_table(
        model, chain, data, path, settings=SETTINGS, entries=entries, workers=2
    )
    assert result.computed == 4
    assert same(scores(path), scores(whole)[:4])


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DEPTHCOMPRESS_SLOW"),
    reason="starts a local Ray instance (20 s to 2 min here): set DEPTHCOMPRESS_SLOW=1",
)
def test_ray_executor_on_a_local_instance(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="Ray is optional: pip install 'depthcompress[ray]'")
    entries = enumerate_entries(chain)[:3]
    path = tmp_path / "r.csv"
    result = importance_table(
        model,
        chain,
        data,
        path,
        settings=SETTINGS,
        entries=entries,
        executor="ray",
    )
    assert result.computed == 3
    assert same(scores(path), scores(whole)[:3])


# --- devices and precision -------------------------------------------------------------------


def test_execution_plan_on_the_cpu() -> None:
    plan = execution_plan("cpu", 3, cuda_count=0, cpu_count=4)
    assert plan.devices == ("cpu",) * 3 and plan.workers == 3 and plan.note is None
    assert execution_plan("cpu", 1, cuda_count=2, cpu_count=1).devices == ("cpu",)
    busy = execution_plan("cpu", 4, cuda_count=0, cpu_count=4, loader_workers=1)
    assert busy.workers == 2  # workers × (threads + loaders) kept within the cores
    assert busy.note is not None and "exceed the 4 CPU cores" in busy.note
    assert "so 2 worker(s) run the entries" in busy.note


def test_cpu_workers_times_threads_never_exceed_the_cores() -> None:
    """Fewer workers, never fewer threads (they change CPU results, so they key the table)."""
    for cores in range(1, 9):
        for threads in range(1, 5):
            for workers in range(1, 9):
                plan = execution_plan(
                    "cpu", workers, cuda_count=0, cpu_count=cores, threads=threads
                )
                assert 1 <= plan.workers <= workers
                assert plan.workers * threads <= cores or plan.workers == 1
                assert (plan.note is None) == (workers * threads <= cores)
    two = execution_plan("cpu", 2, cuda_count=0, cpu_count=2, threads=2)
    assert two.workers == 1 and "4 would exceed the 2 CPU cores" in (two.note or "")
    alone = execution_plan("cpu", 1, cuda_count=0, cpu_count=2, threads=4)
    assert alone.workers == 1 and "lower --train-threads" in (alone.note or "")


def test_execution_plan_never_shares_a_gpu_between_processes() -> None:
    alone = execution_plan("cuda", 1, cuda_count=1, cpu_count=16)
    assert alone.devices == ("cuda:0",) and alone.note is None
    one = execution_plan("cuda", 4, cuda_count=1, cpu_count=16)
    assert one.devices == ("cuda:0",)  # in this process, one entry after another
    assert one.note is not None and "one after another on cuda:0" in one.note
    assert "--device cuda" not in one.note  # nothing else to suggest with one GPU
    spread = execution_plan("cuda", 2, cuda_count=2, cpu_count=16)
    assert spread.devices == ("cuda:0", "cuda:1") and spread.note is None
    fewer = execution_plan("cuda", 4, cuda_count=2, cpu_count=16)
    assert fewer.devices == ("cuda:0", "cuda:1")
    assert fewer.note is not None and "2 worker processes" in fewer.note
    more = execution_plan("cuda", 2, cuda_count=4, cpu_count=16)
    assert more.devices == ("cuda:0", "cuda:1")
    pinned = execution_plan("cuda:1", 2, cuda_count=2, cpu_count=16)
    assert pinned.devices == ("cuda:1",)
    assert pinned.note is not None and "--device cuda to run one worker on each" in pinned.note
    with pytest.raises(DepthCompressError, match="no CUDA device is visible"):
        execution_plan("cuda", 2, cuda_count=0, cpu_count=16)
    with pytest.raises(DepthCompressError, match="does not exist"):
        execution_plan("cuda:3", 1, cuda_count=1, cpu_count=16)
    with pytest.raises(DepthCompressError, match="workers must be"):
        execution_plan("cuda", 0, cuda_count=1, cpu_count=16)


def test_importance_table_follows_the_plan_of_the_machine(
    model: Tiny, chain: dc.ConvChain, data, tmp_path: Path, monkeypatch
) -> None:
    """With torch's view of the machine monkeypatched: a GPU request on a machine without one is
    refused before a file is written; an oversubscribed CPU is reported through ``log``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.csv"
    with pytest.raises(DepthCompressError, match="no CUDA device is visible"):
        importance_table(model, chain, data, path, settings=SETTINGS, device="cuda")
    assert not path.exists() and not sidecar_path(path).exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    plan = execution_plan("cuda", 3, cuda_count=dc_cuda_count(), cpu_count=8)
    assert plan.devices == ("cuda:0",)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    notes: list[str] = []
    entries = enumerate_entries(chain)[:1]
    importance_table(
        model,
        chain,
        data,
        tmp_path / "cpu.csv",
        settings=SETTINGS,
        workers=2,
        entries=entries,
        log=notes.append,
    )
    assert len(notes) == 1 and "exceed the 1 CPU cores" in notes[0]


def test_bf16_entries_on_the_cpu(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path
) -> None:
    entries = enumerate_entries(chain)[:2]
    bf16 = FinetuneSettings(steps=3, lr=0.05, batch_size=16, eval_batch_size=64, amp="bf16")
    path = tmp_path / "bf16.csv"
    result = importance_table(model, chain, data, path, settings=bf16, entries=entries)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in result.rows)
    assert result.meta["settings"]["amp"] == "bf16"
    assert not same(scores(path), scores(whole)[:2])  # autocast changed the numbers
    with pytest.raises(TableError, match=r"settings\.amp: 'bf16' vs None"):
        importance_table(model, chain, data, path, settings=SETTINGS, entries=entries)
    fp16 = FinetuneSettings(steps=3, amp="fp16")
    with pytest.raises(DepthCompressError, match="fp16 needs a CUDA device"):
        importance_table(model, chain, data, tmp_path / "fp16.csv", settings=fp16)
    assert not (tmp_path / "fp16.csv").exists()
    with pytest.raises(DepthCompressError, match="amp must be"):
        FinetuneSettings(amp="fp8")


# --- command line -----------------------------------------------------------------------------

FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from test_importance import tiny
"""


def test_cli_shards_merge_and_refusals(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app
    from tests.test_data import make_image_folder

    runner = CliRunner()
    make_image_folder(tmp_path / "images", classes=2, per_class=12, size=28)
    factory = tmp_path / "net.py"
    factory.write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    common = [
        "importance", f"{factory}:tiny", "--data", str(tmp_path / "images"),
        "--input-shape", "1,1,28,28", "--holdout", "8", "--steps", "2", "--batch-size", "4",
        "--no-progress",
    ]  # fmt: skip
    whole = tmp_path / "whole.csv"
    result = runner.invoke(app, [*common, "-o", str(whole)])
    assert result.exit_code == 0, result.output
    assert "unmodified network" in result.output
    meta, rows = read_table(whole)
    assert meta["model"]["name"] == f"{factory}:tiny" and meta["data"]["name"] == "imagefolder"
    assert meta["data"]["channels"] == 1 and len(rows) == meta["entries"]["count"]
    parts = []
    for k in (1, 2):
        parts.append(tmp_path / f"part{k}.csv")
        result = runner.invoke(app, [*common, "--shard", f"{k}/2", "-o", str(parts[-1])])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.csv"
    result = runner.invoke(app, ["importance-merge", *map(str, parts), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert same(scores(merged), scores(whole))

    result = runner.invoke(app, ["importance-merge", str(parts[0]), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "missing shards" in result.output
    result = runner.invoke(app, [*common, "--lr", "0.5", "-o", str(whole)])
    assert result.exit_code == 2 and "settings.lr" in result.output


def test_cli_amp_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app
    from tests.test_data import make_image_folder

    make_image_folder(tmp_path / "images", classes=2, per_class=6, size=28)
    factory = tmp_path / "net.py"
    factory.write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    common = [
        "importance", f"{factory}:tiny", "--data", str(tmp_path / "images"),
        "--input-shape", "1,1,28,28", "--holdout", "4", "--steps", "1", "--batch-size", "4",
        "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "t.csv"
    result = CliRunner().invoke(app, [*common, "--amp", "fp16", "-o", str(out)])
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(app, [*common, "--amp", "half", "-o", str(out)])
    assert result.exit_code == 2 and "amp must be 'bf16', 'fp16'" in result.output


def test_cli_zero_shot_on_fashion_mnist(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app
    from depthcompress.data import FASHION_MNIST_DEB

    if not (FASHION_MNIST_DEB / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    out = tmp_path / "zs.csv"
    args = [
        "importance", "depthcompress:fashion_mbv2", "--exclude", "stem", "--exclude", "head",
        "--mode", "reference", "--zero-shot", "--holdout", "300", "--shard", "1/10",
        "--no-progress", "-o", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta, rows = read_table(out)
    assert meta["data"]["name"] == "fashion-mnist:train" and meta["shard"] == "1/10"
    assert meta["settings"]["steps"] == 0 and meta["entries"]["count"] == 74
    assert len(rows) == 8 and all(r["steps"] == 0 for r in rows)


def test_cli_defaults_are_the_library_defaults() -> None:
    import inspect

    from depthcompress.cli import importance_cmd
    from depthcompress.importance import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_HOLDOUT,
        DEFAULT_LR,
        DEFAULT_STEPS,
    )

    params = inspect.signature(importance_cmd).parameters
    assert params["steps"].default == DEFAULT_STEPS == FinetuneSettings().steps
    assert params["lr"].default == DEFAULT_LR == FinetuneSettings().lr
    assert params["batch_size"].default == DEFAULT_BATCH_SIZE == FinetuneSettings().batch_size
    assert params["holdout"].default == DEFAULT_HOLDOUT


def test_the_control_is_in_the_sidecar_read_back_and_added_to_older_tables(
    model: Tiny, chain: dc.ConvChain, data, whole: Path, tmp_path: Path, monkeypatch
) -> None:
    """What the entries' fine-tuning gives the unmodified network is measured once per table
    (after its rows), read back by ``ImportanceTable``, and a table without it gains it on its
    next run without recomputing a row."""
    from depthcompress import importance as importance_module
    from depthcompress.tables import ImportanceTable

    meta = json.loads(sidecar_path(whole).read_text())
    control = meta["control"]
    assert set(control) == {"val_acc", "val_loss"} and math.isfinite(control["val_acc"])
    assert ImportanceTable.read_csv(whole).control == control["val_acc"]
    older = tmp_path / "older.csv"
    older.write_text(whole.read_text())
    sidecar_path(older).write_text(json.dumps({k: v for k, v in meta.items() if k != "control"}))
    assert ImportanceTable.read_csv(older).control == 0.0  # an older table: no offset
    monkeypatch.setattr(importance_module, "measure_entry", None)  # no row is measured again
    importance_table(model, chain, data, older, settings=SETTINGS)
    assert json.loads(sidecar_path(older).read_text())["control"] == control
