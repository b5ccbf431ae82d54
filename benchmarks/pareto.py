"""Accuracy against measured speed-up: depth compression against channel pruning (issue 13).

    pip install -e '.[bench]'   # torch-pruning
    python benchmarks/pareto.py --epochs 2 --budgets 0.5x 0.6x 0.7x 0.8x \
        --ratios 0.1 0.2 0.3 0.4 --timings ort:1:64 --out runs/pareto

For one model and its data (default: the demo network ``depthcompress:fashion_mbv2`` with its
shipped weights, Fashion-MNIST; ``--model resnet20``: the CIFAR-10 model of record), (a)
depthcompress at each budget: the latency and importance tables once
(``compress(..., until="importance")``), a plan per budget (``dp.solve``), linearize, fine-tune,
merge; (b) Torch-Pruning's ``MetaPruner`` at each ratio with an L1 magnitude and a
Taylor (gradient) importance, ``round_to`` channels (16 suits ONNX Runtime on a CPU, 8 a GPU);
(c) with ``--joint RATIO:BUDGET ...``, both at once (issue 14): ``compress`` with ``width`` RATIO
(L1, the same ``round_to``) and BUDGET of the original's whole latency on the tables' backend
(the fastest plan where the budget is below it), in ``OUT/points/joint-R-B/compress``;
(d) with ``--layers`` (at ``--budgets``) or ``--layer-budgets B ...``, depthcompress with layer
pruning (issue 16, LayerMerge): the configuration tables made once beside the depth tables
(``compress(..., prune_layers=True, until="importance")``, whose depth tables are the same
files), a plan per budget over (segment, configuration) (``dp.solve_configs``);
(e) with ``--after RATIO:BUDGET ...``, width after depth (issue 14): the depth plan for BUDGET
linearized and fine-tuned for the first half of the epochs, merged, the *merged* network
channel-pruned by ``width.prune_width`` (L1, the same ``round_to``) and fine-tuned for the
second half, so every method has the same total epochs (its own point: the depth point's network
had all of them; the plan is the same).
Every network is fine-tuned with one ``FinetuneConfig`` (distillation from the original, as in
the demo), scored on the test set the same way, and timed against the original with
``speedup.paired_speedup`` (median per-round ratio, 95 % interval) at each
``backend:threads:batch``.

Each finished point (its network and its measurements) is written to ``OUT/points/NAME/`` as it
completes, and fine-tuning checkpoints every epoch, so a killed run continues where it stopped.
The results: ``points.json``, ``pareto.md`` (a table per timing setting) and one PNG per timing
setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import depthcompress as dc
from depthcompress.backends import Backend, get_backend, machine_info
from depthcompress.data import SplitData, fetch, num_classes
from depthcompress.dp import (
    NORMS,
    ConfigTables,
    config_tables,
    min_latency,
    min_latency_configs,
    resolve_norm,
    solve,
    solve_configs,
)
from depthcompress.export import save_torch
from depthcompress.files import atomic_open, write_json
from depthcompress.finetune import FinetuneConfig, evaluate, finetune
from depthcompress.pipeline import SEARCH_DIR, stage_files
from depthcompress.speedup import Rule, paired_speedup
from depthcompress.tables import (
    ImportanceTable,
    LatencyTable,
    OptimalLatencyTable,
    read_config_importance_rows,
    read_config_latency_rows,
)
from depthcompress.width import prune_width
from depthcompress.widthsearch import DEFAULT_RATIOS

ROOT = Path(__file__).resolve().parents[1]
TP_IMPORTANCES = ("l1", "taylor")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Timing:
    """One timing setting: backend, threads and batch (``ort:1:64``; ``cuda:0:64`` is torch on
    the GPU, where threads do not apply)."""

    backend: str
    threads: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Timing:
        """Read ``backend:threads:batch``."""
        backend, threads, batch = text.split(":")
        return cls("onnxruntime" if backend == "ort" else backend, int(threads), int(batch))

    @property
    def key(self) -> str:
        """The name of this setting in files and tables."""
        return f"{self.backend}-{self.threads}t-b{self.batch}"

    def get(self) -> Backend:
        """The backend that times this setting."""
        if self.backend == "cuda":
            return get_backend("torch", device="cuda")
        return get_backend(self.backend, threads=self.threads)


@dataclass(frozen=True)
class Setup:
    """What is compressed and how: the model, its data, the tables' settings and the one
    fine-tuning recipe every network gets (``settings.finetune``)."""

    name: str
    model: nn.Module
    data: SplitData
    test: Dataset
    settings: dc.CompressSettings


@dataclass(frozen=True)
class Options:
    """The points and their measurement."""

    budgets: tuple[str, ...]
    ratios: tuple[float, ...]
    timings: tuple[Timing, ...]
    rule: Rule = field(default_factory=Rule)
    round_to: int = 16
    importances: tuple[str, ...] = TP_IMPORTANCES
    taylor_batches: int = 4
    joint: tuple[str, ...] = ()
    layer_budgets: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    norm: str = "auto"
    control: bool = False
    joint_layers: tuple[str, ...] = ()
    retime: tuple[str, ...] = ()
    auto: tuple[str, ...] = ()
    auto_ratios: tuple[float, ...] = ()
    auto_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tables:
    """The chain and its tables, computed once for every budget."""

    chain: dc.ConvChain
    opt: OptimalLatencyTable
    importance: ImportanceTable
    original_ms: float
    configs: ConfigTables | None = None


def load() -> str:
    """The 1/5/15-minute load averages, to judge how noisy a measurement was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def example(setup: Setup) -> torch.Tensor:
    """One test input (batch 1)."""
    x, _ = fetch(setup.test, torch.arange(1))
    return x


def convs(net: nn.Module) -> int:
    """How many convolutions the network runs."""
    return sum(isinstance(m, nn.Conv2d) for m in net.modules())


def params(net: nn.Module) -> int:
    """How many parameters it has."""
    return sum(p.numel() for p in net.parameters())


def build_tables(setup: Setup, opts: Options, out: Path, log: Log) -> Tables:
    """The latency and importance tables in ``out/tables`` (resumed by ``compress``), with
    ``layer_budgets`` also the configuration tables (the depth tables stay the same files)."""
    wd = out / "tables"
    s = replace(setup.settings, prune_layers=bool(opts.layer_budgets))
    dc.compress(
        setup.model, setup.data, wd, s, test_data=setup.test,
        model_name=setup.name, until="importance", log=log,
    )  # fmt: skip
    chain = dc.trace(
        setup.model.eval(), example(setup), mode=s.mode, max_kernel_size=s.max_kernel_size,
        exclude=s.exclude,
    )  # fmt: skip
    latency = LatencyTable.read_csv(wd / "latency.csv")
    original_ms = sum(latency.time_of(k, k + 1) for k in range(chain.num_positions))
    tables = Tables(
        chain,
        OptimalLatencyTable.read_csv(wd / "opt_latency.csv"),
        ImportanceTable.read_csv(wd / "importance.csv"),
        original_ms,
    )
    if not opts.layer_budgets:
        return tables
    return replace(tables, configs=layer_tables(tables, wd, s))


def layer_tables(tables: Tables, wd: Path, s: dc.CompressSettings) -> ConfigTables:
    """Stage 2's input with layer pruning from the configuration tables in ``wd``; without them
    (no reducible conv: ``compress`` said so) the depth-only problem, merging alone."""
    lat, imp = wd / "latency_configs.csv", wd / "importance_configs.csv"
    times = {r.key: r.time for r in read_config_latency_rows(lat)} if lat.is_file() else {}
    rows = read_config_importance_rows(imp) if imp.is_file() else []
    norm = s.importance_norm()
    return config_tables(tables.opt, tables.importance, times, rows, alpha=s.alpha, norm=norm)


def tune(
    setup: Setup,
    net: nn.Module,
    where: Path,
    *,
    epochs: int | None = None,
    folder: str = "finetune",
) -> nn.Module:
    """The one fine-tuning recipe (``epochs`` of it where given), with the original as teacher,
    resumable per epoch from ``where/folder``."""
    cfg = setup.settings.finetune
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    result = finetune(
        net,
        setup.data.train,
        cfg,
        teacher=copy.deepcopy(setup.model) if cfg.distill > 0 else None,
        checkpoint_dir=where / folder,
        holdout_data=setup.data.holdout,
        device="cpu",
        distributed=False,
    )
    return result.model.cpu().eval()


def depth_plan(setup: Setup, tables: Tables, budget: str) -> tuple[dc.Plan, dict]:
    """The depth-only plan at ``budget`` (the fastest plan where the budget is below it) and
    what describes it."""
    ms = dc.Budget.parse(budget).resolve(tables.original_ms)
    fastest = min_latency(tables.opt, tables.importance)
    s = replace(setup.settings, prune_layers=False)
    sol = solve(
        tables.opt, tables.importance, max(ms, fastest), alpha=s.alpha, norm=s.importance_norm()
    )
    plan = dc.Plan.from_dict(sol.to_dict())
    return plan, {"plan": plan.to_dict(), "budget_ms": ms, "fastest": ms < fastest}


def depth_point(setup: Setup, tables: Tables, budget: str, where: Path) -> tuple[nn.Module, dict]:
    """The depthcompress network at ``budget``."""
    plan, extra = depth_plan(setup, tables, budget)
    return planned_point(setup, tables, plan, where), extra


def halves(epochs: int) -> tuple[int, int]:
    """An after point's epochs before and after pruning: the same total as every other method."""
    if epochs < 2:
        raise ValueError(f"an after point splits the fine-tuning in two: ≥ 2 epochs, not {epochs}")
    return epochs - epochs // 2, epochs // 2


def after_point(
    setup: Setup, opts: Options, tables: Tables, setting: str, where: Path
) -> tuple[nn.Module, dict]:
    """Depth then width at ``RATIO:BUDGET``: the depth plan fine-tuned for half the epochs and
    merged, the merged network channel-pruned (L1) and fine-tuned for the other half."""
    ratio, budget = setting.split(":")
    first, second = halves(setup.settings.finetune.epochs)
    plan, extra = depth_plan(setup, tables, budget)
    merged = planned_point(setup, tables, plan, where, epochs=first, folder="finetune-depth")
    slim = prune_width(merged, example(setup), float(ratio), round_to=opts.round_to)
    net = tune(setup, slim.model, where, epochs=second, folder="finetune-width")
    width = {"width": float(ratio), "budget": budget, "round_to": opts.round_to}
    made = {"epochs": [first, second], "merged_params": params(merged), "kept": slim.kept_json()}
    return net, {**extra, **width, **made}


def layer_point(setup: Setup, tables: Tables, budget: str, where: Path) -> tuple[nn.Module, dict]:
    """The depthcompress network with layer pruning at ``budget`` (the fastest plan where the
    budget is below it): a configuration per segment, same tables, same fine-tuning."""
    if tables.configs is None:
        raise RuntimeError("layer points need the configuration tables (Options.layer_budgets)")
    ms = dc.Budget.parse(budget).resolve(tables.original_ms)
    fastest = min_latency_configs(tables.configs)
    plan = dc.Plan.from_dict(solve_configs(tables.configs, max(ms, fastest)).to_dict())
    net = planned_point(setup, tables, plan, where)
    extra = {"plan": plan.to_dict(), "pruned": sorted(plan.pruned)}
    return net, {**extra, "budget_ms": ms, "fastest": ms < fastest}


def planned_point(
    setup: Setup,
    tables: Tables,
    plan: dc.Plan,
    where: Path,
    *,
    epochs: int | None = None,
    folder: str = "finetune",
) -> nn.Module:
    """``plan`` applied to the original: linearized, fine-tuned (``epochs`` of the recipe where
    given, in ``where/folder``), merged (checked)."""
    lin = tune(
        setup, dc.linearize(setup.model, tables.chain, plan), where, epochs=epochs, folder=folder
    )
    return dc.merge(lin, tables.chain, plan, verify=True)


def whole_compress(
    setup: Setup, opts: Options, budget: str, where: Path, log: Log, what: str, **changes: Any
) -> dc.CompressResult:
    """One ``compress`` run of the joint methods in ``where/compress``: the one recipe, a budget
    of the whole latency (the fastest plan where it is below), channels rounded to
    ``opts.round_to``, ``changes`` on top (width, width search, layer pruning, tables)."""
    adopt = {k: changes.pop(k) for k in ("latency_from", "importance_from") if k in changes}
    settings = replace(
        setup.settings,
        budget=dc.Budget.parse(budget),
        budget_mode="whole",
        budget_or_fastest=True,
        width_round_to=opts.round_to,
        speedup_rule=opts.rule,
        **changes,
    )
    result = dc.compress(
        setup.model, setup.data, where / "compress", settings, test_data=setup.test,
        model_name=setup.name, log=log, **adopt,
    )  # fmt: skip
    if result is None:
        raise RuntimeError(f"compress of the {what} stopped before its end")
    return result


def joint_point(
    setup: Setup, opts: Options, setting: str, where: Path, log: Log, layers: bool = False
) -> tuple[nn.Module, dict]:
    """Width then depth at ``RATIO:BUDGET``: one ``compress --width`` run (same fine-tuning),
    with ``layers`` also ``--prune-layers``."""
    ratio, budget = setting.split(":")
    result = whole_compress(
        setup, opts, budget, where, log, f"joint point {setting}",
        width=float(ratio), prune_layers=layers,
    )  # fmt: skip
    extra = {"width": float(ratio), "budget": budget, "round_to": opts.round_to}
    split = {"width_speedup": result.evaluation["width"]["speedup"]}
    return result.merged, {**extra, **split, "plan": result.plan.to_dict()}


def auto_point(
    setup: Setup, opts: Options, budget: str, where: Path, log: Log, layers: bool = False
) -> tuple[nn.Module, dict]:
    """``compress --width auto --budget BUDGET`` (``layers``: with ``--prune-layers``): the width
    ratio chosen by compress's own search (the original's tables adopted from ``OUT/tables``,
    its configuration tables copied there, so every budget shares them)."""
    tables = where.parent.parent / "tables"
    search = where / "compress" / SEARCH_DIR
    for name in stage_files("latency_configs", "importance_configs") if layers else ():
        if (tables / name).is_file() and not (search / name).exists():
            search.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tables / name, search / name)
    result = whole_compress(
        setup, opts, budget, where, log, f"auto point {budget}",
        width_search=opts.auto_ratios or DEFAULT_RATIOS, prune_layers=layers,
        latency_from=tables / "latency.csv", importance_from=tables / "importance.csv",
    )  # fmt: skip
    width = result.evaluation.get("width") or {"ratio": 0.0, "speedup": 1.0}
    record = json.loads((where / "compress" / "width_search.json").read_text())
    extra = {"width": width["ratio"], "budget": budget, "round_to": opts.round_to}
    return result.merged, {
        **extra,
        "width_speedup": width["speedup"],
        "search": record["candidates"],
        "plan": result.plan.to_dict(),
    }


def tp_importance(kind: str) -> Any:
    """Torch-Pruning's importance criterion called ``kind``."""
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"unknown Torch-Pruning importance {kind!r}: one of {TP_IMPORTANCES}")


def accumulate_gradients(setup: Setup, net: nn.Module, batches: int) -> None:
    """The gradients a Taylor importance reads: cross-entropy on the first training batches."""
    size = setup.settings.finetune.batch_size
    net.zero_grad()
    for b in range(batches):
        x, y = fetch(setup.data.train, torch.arange(b * size, (b + 1) * size))
        nn.functional.cross_entropy(net(x), y).backward()


def pruned(setup: Setup, kind: str, ratio: float, round_to: int, batches: int) -> nn.Module:
    """A channel-pruned copy of the original (the classifier's outputs kept)."""
    import torch_pruning as tp

    net = copy.deepcopy(setup.model).eval()
    classes = num_classes(setup.data.train)
    keep = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    pruner = tp.pruner.MetaPruner(
        net, example(setup), importance=tp_importance(kind), pruning_ratio=ratio,
        ignored_layers=keep, round_to=round_to,
    )  # fmt: skip
    if kind == "taylor":
        accumulate_gradients(setup, net, batches)
    pruner.step()
    net.zero_grad(set_to_none=True)
    return net


def prune_point(setup: Setup, opts: Options, kind: str, ratio: float, where: Path) -> nn.Module:
    """The Torch-Pruning network at ``ratio``, fine-tuned."""
    return tune(setup, pruned(setup, kind, ratio, opts.round_to, opts.taylor_batches), where)


def measure(setup: Setup, net: nn.Module, timing: Timing, rule: Rule, name: str) -> dict:
    """The paired speed-up of ``net`` over the original at one timing setting."""
    shape = (timing.batch, *example(setup).shape[1:])
    original = setup.model.eval()
    res = paired_speedup(original, net, timing.get(), shape, rule, names=("original", name))
    return {
        "speedup": res.speedup,
        "low": res.low,
        "high": res.high,
        "converged": res.converged,
        "latency_ms": res.latency_b_ms,
        "original_ms": res.latency_a_ms,
        "rounds": res.rounds,
        "load": load(),
    }


def point_specs(opts: Options) -> Iterator[tuple[str, str, str]]:
    """(directory name, method, setting) of every point, the original first."""
    yield "original", "original", "-"
    if opts.control:
        yield "control", "control", "-"
    depth, layers = resolve_norm(opts.norm, False), resolve_norm(opts.norm, True)
    for b in opts.budgets:  # the paper's normalisation keeps the older folder names
        tag = "" if depth == "single" else f"{depth}-"
        yield f"depthcompress-{tag}{b}", "depthcompress", b
    for b in opts.layer_budgets:
        yield f"layers-{layers}-{b}", "layers", b
    for kind in opts.importances:
        for r in opts.ratios:
            yield f"tp-{kind}-{r:g}", f"torch-pruning {kind}", f"{r:g}"
    for pair in opts.joint:
        ratio, budget = pair.split(":")
        yield f"joint-{float(ratio):g}-{budget}", "joint", f"{float(ratio):g}:{budget}"
    for pair in opts.joint_layers:
        ratio, budget = pair.split(":")
        yield (
            f"joint-layers-{float(ratio):g}-{budget}",
            "joint+layers",
            f"{float(ratio):g}:{budget}",
        )
    for pair in opts.after:
        ratio, budget = pair.split(":")
        yield f"after-{float(ratio):g}-{budget}", "after", f"{float(ratio):g}:{budget}"
    for budget in opts.auto:
        yield f"auto-{budget}", "auto", budget
    for budget in opts.auto_layers:
        yield f"auto-layers-{budget}", "auto+layers", budget


def build_point(
    setup: Setup, opts: Options, tables: Tables, spec: tuple[str, str, str], where: Path, log: Log
) -> tuple[nn.Module, dict]:
    """Make one point's network (fine-tuned; the original as it is) and what describes it."""
    _, method, setting = spec
    if method == "original":
        return copy.deepcopy(setup.model).eval(), {}
    if method == "control":  # what the recipe alone does to the unmodified network
        return tune(setup, copy.deepcopy(setup.model), where), {}
    if method == "depthcompress":
        return depth_point(setup, tables, setting, where)
    if method == "layers":
        return layer_point(setup, tables, setting, where)
    if method in ("joint", "joint+layers"):
        return joint_point(setup, opts, setting, where, log, layers=method == "joint+layers")
    if method == "after":
        return after_point(setup, opts, tables, setting, where)
    if method in ("auto", "auto+layers"):
        return auto_point(setup, opts, setting, where, log, layers=method == "auto+layers")
    kind = method.split()[-1]
    return prune_point(setup, opts, kind, float(setting), where), {"round_to": opts.round_to}


def run_point(
    setup: Setup, opts: Options, tables: Tables, spec: tuple[str, str, str], out: Path, log: Log
) -> dict:
    """One point, made or loaded from ``out/points/NAME``, with every timing it still lacks;
    its network and record are written as soon as each is known."""
    name, method, setting = spec
    where = out / "points" / name
    record_path, net_path = where / "point.json", where / "net.pt"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        net = torch.load(net_path, weights_only=False).eval()
        again = [
            t.key for t in opts.timings if t.key in opts.retime and t.key in record["speedups"]
        ]
        if again and not record.get("retimed"):  # written first: a killed re-time resumes
            record["retimed"] = again
            write_json(record_path, record)
    else:
        where.mkdir(parents=True, exist_ok=True)
        net, extra = build_point(setup, opts, tables, spec, where, log)
        save_torch(net, net_path, example(setup))
        record = {"name": name, "method": method, "setting": setting, **extra}
        record.update(accuracy=evaluate(net, setup.test), params=params(net), convs=convs(net))
        record["speedups"] = {}
        write_json(record_path, record)
        log(f"{name}: {record['accuracy']:.2f} % test accuracy, {record['convs']} convs")
    for timing in opts.timings:
        if timing.key in record["speedups"] and timing.key not in record.get("retimed", []):
            continue
        record["speedups"][timing.key] = measure(setup, net, timing, opts.rule, name)
        record["retimed"] = [k for k in record.get("retimed", []) if k != timing.key]
        write_json(record_path, record)
        log(f"{name}, {timing.key}: {record['speedups'][timing.key]['speedup']:.3f}×")
    return record


def cell(s: dict) -> str:
    """A speed-up with its interval (``noisy`` where the interval missed the target)."""
    noisy = "" if s["converged"] else " noisy"
    return f"{s['speedup']:.2f}× [{s['low']:.2f}, {s['high']:.2f}]{noisy}"


def shown(point: dict) -> str:
    """A point's setting as the table shows it (an auto point with the width it chose)."""
    if point["method"] in ("auto", "auto+layers"):
        return f"{point['setting']} → width {point['width']:g}"
    return point["setting"]


def markdown(points: list[dict], timings: tuple[Timing, ...]) -> str:
    """One table per timing setting; Δ is against the original's accuracy."""
    base = points[0]["accuracy"]
    parts = []
    for t in timings:
        rows = [
            f"### {t.backend}, {t.threads} thread(s), batch {t.batch}",
            "",
            "| method | setting | convs | params | test acc. (%) | Δ (pp) | speed-up [95 %] |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for p in points:
            rows.append(
                f"| {p['method']} | {shown(p)} | {p['convs']} | {p['params']:,} | "
                f"{p['accuracy']:.2f} | {p['accuracy'] - base:+.2f} | "
                f"{cell(p['speedups'][t.key])} |"
            )
        parts.append("\n".join(rows))
    return "\n\n".join(parts + after_note(points)) + "\n"


def after_note(points: list[dict]) -> list[str]:
    """What an ``after`` point's setting means and how its epochs were split (none: no note)."""
    split = next((p["epochs"] for p in points if p["method"] == "after"), None)
    if split is None:
        return []
    return [
        f"*after* `R:B`: the depth network at budget B fine-tuned {split[0]} epoch(s), merged, "
        f"its merged network channel-pruned by R (L1) and fine-tuned {split[1]} epoch(s): "
        f"{sum(split)} in all, as every other method."
    ]


LABELS = {
    "depthcompress": "depthcompress (merging)",
    "layers": "depthcompress + layer pruning",
    "after": "depth, then width on the merged network",
    "control": "original, fine-tuned alike (control)",
    "auto": "compress --width auto",
    "auto+layers": "compress --width auto --prune-layers",
}
"""Legend names of the methods whose record name is short."""


def marker(method: str) -> dict[str, Any]:
    """The original as a large star (its control as a plus), joint points as squares, after
    points as diamonds, layer pruning as a line of triangles, ``--width auto`` as a line of
    crosses, each other method as a line of dots."""
    if method in ("original", "control"):
        return {
            "marker": "*" if method == "original" else "P",
            "markersize": 12,
            "linestyle": "none",
        }
    if method in ("joint", "joint+layers"):
        return {"marker": "s" if method == "joint" else "v", "linestyle": "none"}
    if method == "after":
        return {"marker": "D", "linestyle": "none"}
    if method == "layers":
        return {"marker": "^"}
    if method in ("auto", "auto+layers"):  # compress --width auto: large crosses
        return {"marker": "X", "markersize": 10}
    return {"marker": "o"}


def plot(points: list[dict], timing: Timing, title: str, path: Path) -> None:
    """Accuracy against measured speed-up for one timing setting, one series per method (the
    intervals as horizontal bars), the original marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.6, 4.6))
    ax = fig.subplots()
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted(
            (p for p in points if p["method"] == method),
            key=lambda p: p["speedups"][timing.key]["speedup"],
        )
        s = [p["speedups"][timing.key] for p in mine]
        x, y = [v["speedup"] for v in s], [p["accuracy"] for p in mine]
        err = [[v["speedup"] - v["low"] for v in s], [v["high"] - v["speedup"] for v in s]]
        label = LABELS.get(method, method)
        ax.errorbar(x, y, xerr=err, label=label, capsize=3, **marker(method))
        if method not in (
            "original",
            "control",
        ):  # each point labelled with its budget, ratio or width:budget
            for p, xi, yi in zip(mine, x, y, strict=True):
                ax.annotate(
                    shown(p), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    ax.set_xlabel(
        f"measured speed-up ({timing.backend}, {timing.threads} thread(s), batch {timing.batch})"
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12)  # room for the labels of the fastest points
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)  # never over a point
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(setup: Setup, opts: Options, points: list[dict], out: Path, meta: dict) -> None:
    """``points.json``, ``pareto.md`` and one PNG per timing setting."""
    write_json(out / "points.json", {"model": setup.name, **meta, "points": points})
    table = markdown(points, opts.timings)
    with atomic_open(out / "pareto.md") as fh:
        fh.write(f"## {setup.name}\n\n{table}")
    stem = setup.name.split(":")[-1]
    for t in opts.timings:
        plot(points, t, setup.name, out / f"{stem}-{t.key}.png")


def run(setup: Setup, opts: Options, out: Path, log: Log = print, command: str = "") -> list[dict]:
    """Every point (made, or loaded where an earlier run finished it) and the result files."""
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(setup, opts, out, log)
    points = [run_point(setup, opts, tables, spec, out, log) for spec in point_specs(opts)]
    cfg = setup.settings.finetune
    meta = {
        "command": command,
        "finetune": cfg.to_dict(),
        "round_to": opts.round_to,
        "load_at_end": load(),
        "machine": machine_info(),
    }
    write_outputs(setup, opts, points, out, meta)
    return points


MODELS = {  # --model: (data, held-out examples, modules kept out of the chain)
    "fashion_mbv2": ("fashion-mnist", 10000, ("stem", "head")),
    "resnet20": ("cifar10", 5000, ()),
    "cifar_mbv2": ("cifar10", 5000, ("stem", "head")),
}


def model_setup(args: argparse.Namespace) -> Setup:
    """A built-in network with its shipped weights (the demo network by default; the CIFAR-10
    model of record with ``--model resnet20``) and its data, at the demo's table settings."""
    from depthcompress.backends import Protocol
    from depthcompress.data import cifar10, fashion_mnist, load_split
    from depthcompress.importance import FinetuneSettings
    from depthcompress.models import get_model, trained_weights

    data, holdout, exclude = MODELS[args.model]
    model = get_model(args.model)
    model.load_state_dict(torch.load(trained_weights(args.model), weights_only=True))
    settings = dc.CompressSettings(
        budget=dc.Budget.parse("1x"),
        threads=1,
        batch=64,
        protocol=Protocol(),
        exclude=exclude,
        importance=FinetuneSettings(steps=args.importance_steps, lr=0.05),
        workers=args.workers,
        finetune=FinetuneConfig(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=128,
            distill=args.distill,
            steps_per_epoch=args.steps_per_epoch,
            seed=args.finetune_seed,
        ),
        budget_mode="chain",
        prune_subsets=args.prune_subsets,
        norm=args.norm,
    )
    split = load_split(data, holdout=holdout, seed=0)
    test = fashion_mnist("test") if data == "fashion-mnist" else cifar10("test")
    return Setup(f"depthcompress:{args.model}", model.eval(), split, test, settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="fashion_mbv2",
        help="a built-in network with shipped weights, and its data",
    )  # fmt: skip
    parser.add_argument(
        "--budgets", nargs="*", default=["0.5x", "0.6x", "0.7x", "0.8x"],
        help="depth-only budgets (none: no depth points)",
    )  # fmt: skip
    parser.add_argument(
        "--ratios", nargs="*", type=float, default=[0.1, 0.2, 0.3, 0.4],
        help="Torch-Pruning ratios (none: no pruning points)",
    )  # fmt: skip
    parser.add_argument(
        "--timings", nargs="+", default=["ort:1:1", "ort:1:64", "ort:2:1", "ort:2:64"],
        help="backend:threads:batch (ort = onnxruntime; torch: on the CPU; cuda: torch on the GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--joint", nargs="*", default=[],
        help="RATIO:BUDGET pairs: compress --width RATIO --budget BUDGET (whole latency)",
    )  # fmt: skip
    parser.add_argument(
        "--joint-layers", nargs="*", default=[],
        help="RATIO:BUDGET pairs: compress --width RATIO --prune-layers --budget BUDGET",
    )  # fmt: skip
    parser.add_argument(
        "--after", nargs="*", default=[],
        help="RATIO:BUDGET pairs: the depth network at BUDGET (chain latency), its merged "
        "network channel-pruned by RATIO; half the epochs before pruning, half after",
    )  # fmt: skip
    parser.add_argument(
        "--layers", action="store_true",
        help="also depthcompress with layer pruning (LayerMerge) at --budgets",
    )  # fmt: skip
    parser.add_argument(
        "--layer-budgets", nargs="*", default=None,
        help="the budgets of the layer-pruning points (default with --layers: --budgets)",
    )  # fmt: skip
    parser.add_argument("--round-to", type=int, default=16, help="16: ORT CPU; 8: a GPU")
    parser.add_argument(
        "--tp-importances", nargs="+", choices=TP_IMPORTANCES, default=list(TP_IMPORTANCES)
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="for a quick trial")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--distill", type=float, default=0.3)
    parser.add_argument(
        "--finetune-seed", type=int, default=0,
        help="seed of every fine-tuning (batch order, augmentation): another seed measures the "
        "spread of one fine-tune; use another --out",
    )  # fmt: skip
    parser.add_argument("--importance-steps", type=int, default=25)
    parser.add_argument(
        "--prune-subsets", type=int, default=2, help="layers: pruned subsets per configuration"
    )
    parser.add_argument(
        "--norm", choices=["auto", *NORMS], default="auto",
        help="stage 2's score normalisation (compress --norm): auto is delta for layer pruning",
    )  # fmt: skip
    parser.add_argument(
        "--control", action="store_true",
        help="also the original fine-tuned with the same recipe: what the recipe alone does",
    )  # fmt: skip
    parser.add_argument(
        "--train-threads", type=int, default=1,
        help="torch CPU threads of fine-tuning (1: more collapse when another process competes)",
    )  # fmt: skip
    parser.add_argument(
        "--auto", nargs="*", default=[],
        help="budgets of compress --width auto (compress chooses the width ratio itself)",
    )  # fmt: skip
    parser.add_argument(
        "--auto-ratios", nargs="*", type=float, default=[],
        help="the candidate ratios of --auto (default: widthsearch.DEFAULT_RATIOS)",
    )  # fmt: skip
    parser.add_argument(
        "--auto-layers", nargs="*", default=[],
        help="budgets of compress --width auto --prune-layers",
    )  # fmt: skip
    parser.add_argument(
        "--retime", nargs="*", default=[],
        help="timing settings (as in --timings) to measure again on points that have them, e.g. "
        "after a timing fix; the networks are kept",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds, at least")
    parser.add_argument("--max-time", type=float, default=30.0, help="seconds per speed-up")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pareto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.train_threads)
    layer_budgets = args.budgets if args.layers else []
    if args.layer_budgets is not None:
        layer_budgets = args.layer_budgets
    opts = Options(
        budgets=tuple(args.budgets),
        ratios=tuple(args.ratios),
        timings=tuple(Timing.parse(t) for t in args.timings),
        rule=Rule(min_rounds=args.rounds, max_time=args.max_time),
        round_to=args.round_to,
        importances=tuple(args.tp_importances),
        joint=tuple(args.joint),
        after=tuple(args.after),
        layer_budgets=tuple(layer_budgets),
        norm=args.norm,
        control=args.control,
        joint_layers=tuple(args.joint_layers),
        retime=tuple(Timing.parse(t).key for t in args.retime),
        auto=tuple(args.auto),
        auto_layers=tuple(args.auto_layers),
        auto_ratios=tuple(sorted({0.0, *args.auto_ratios})) if args.auto_ratios else (),
    )
    run(model_setup(args), opts, args.out, command=" ".join(["python", *sys.argv]))
    print((args.out / "pareto.md").read_text())
    print(f"load average at the end: {load()} (a shared machine)")


if __name__ == "__main__":
    main(sys.argv[1:])
