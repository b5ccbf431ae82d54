"""Paired speed-up of network B over network A on one backend: rounds alternate A and B, the
ratio is taken per round, and the median ratio comes with a bootstrap interval.

Timing both networks in the same short round and taking the ratio there makes the speed-up
robust to a shared machine: a slow phase slows both sides of a round alike. The order of the
two inside a round alternates (AB, BA, ...) so a drift does not favour one network. Rounds go on
until the interval is narrow enough (``Rule.target``) or the time is spent; a result that did
not reach the target says so (``converged``, ``message``) instead of passing for a number.

On ONNX Runtime above one thread the pair is timed in a spawned child process whose two sessions
share ORT's global thread pool (``OnnxRuntimeBackend.pairs_in_child``): two sessions with pools of
their own interfere, and the ratio came out bimodal.
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import (
    Backend,
    ModelLike,
    OnnxRuntimeBackend,
    Protocol,
    Runner,
    machine_info,
    onnx_bytes,
)
from .errors import BackendError, DepthCompressError, ModelLoadError
from .progress import Reporter, tell

Clock = Callable[[], float]


@dataclass(frozen=True)
class Rule:
    """When the rounds stop: after ``min_rounds`` at least, once the bootstrap interval's
    half-width is at most ``target`` of the median ratio, or when ``max_rounds`` or
    ``max_time`` seconds are reached. Each network runs ``block`` times per round (the block's
    median is its time) after ``warmup`` untimed runs at the start."""

    min_rounds: int = 10
    max_rounds: int = 1000
    max_time: float = 60.0
    target: float = 0.02
    block: int = 5
    warmup: int = 5
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (
            2 <= self.min_rounds <= self.max_rounds
            and self.max_time > 0
            and self.target > 0
            and self.block >= 1
            and self.warmup >= 0
            and 0 < self.confidence < 1
            and self.resamples >= 100
        ):
            raise DepthCompressError(
                f"invalid speed-up rule {self}: 2 ≤ min_rounds ≤ max_rounds, max_time > 0, "
                "target > 0, block ≥ 1, warmup ≥ 0, 0 < confidence < 1, resamples ≥ 100"
            )


@dataclass(frozen=True)
class RatioStats:
    """Median of per-round ratios, its bootstrap interval (``low``, ``high``) and quartiles."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Half the interval's width as a fraction of the median."""
        return (self.high - self.low) / 2 / self.median


def ratio_stats(
    ratios: list[float] | tuple[float, ...],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioStats:
    """Median ratio with a seeded percentile-bootstrap interval of the median, and the IQR."""
    values = np.asarray(ratios, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DepthCompressError(f"a speed-up needs ≥ 2 finite positive ratios, got {ratios}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(resamples, values.size))
    medians = np.median(values[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return RatioStats(
        median=float(med),
        low=float(min(low, med)),
        high=float(max(high, med)),
        q1=float(q1),
        q3=float(q3),
        rounds=int(values.size),
    )


@dataclass(frozen=True)
class Rounds:
    """What the paired rounds measured: per-round block medians (ms) of A and B, their ratios,
    the statistics after the last round, and the seconds spent."""

    times_a: tuple[float, ...]
    times_b: tuple[float, ...]
    stats: RatioStats
    elapsed: float

    @property
    def ratios(self) -> tuple[float, ...]:
        """A time / B time per round: the speed-up of B over A in that round."""
        return tuple(a / b for a, b in zip(self.times_a, self.times_b, strict=True))


def _block(time_one: Callable[[], float], runs: int) -> float:
    return statistics.median(time_one() for _ in range(runs))


def paired_rounds(
    time_a: Callable[[], float],
    time_b: Callable[[], float],
    rule: Rule = Rule(),
    *,
    clock: Clock = time.perf_counter,
    reporter: Reporter | None = None,
) -> Rounds:
    """Alternate rounds (AB, BA, AB, ...) of ``rule.block`` runs each until ``rule`` stops them;
    ``time_a``/``time_b`` run a network once and return milliseconds."""
    for _ in range(rule.warmup):
        time_a()
        time_b()
    start = clock()
    times: tuple[list[float], list[float]] = ([], [])
    stats: RatioStats | None = None
    for k in range(rule.max_rounds):
        order = (0, 1) if k % 2 == 0 else (1, 0)
        pair = [0.0, 0.0]
        for side in order:
            pair[side] = _block((time_a, time_b)[side], rule.block)
        times[0].append(pair[0])
        times[1].append(pair[1])
        if k + 1 < rule.min_rounds:
            continue
        ratios = [a / b for a, b in zip(*times, strict=True)]
        stats = ratio_stats(
            ratios, confidence=rule.confidence, resamples=rule.resamples, seed=rule.seed
        )
        tell(reporter, "speed-up rounds", k + 1, rule.max_rounds, f"±{stats.half_width:.1%}")
        if stats.half_width <= rule.target or clock() - start >= rule.max_time:
            break
    assert stats is not None  # max_rounds ≥ min_rounds ≥ 2
    return Rounds(tuple(times[0]), tuple(times[1]), stats, clock() - start)


@dataclass(frozen=True)
class SpeedupResult:
    """The speed-up of B over A (A time / B time, median of per-round ratios) with its interval,
    whether the interval reached the target, and what the timing depended on."""

    speedup: float
    low: float
    high: float
    q1: float
    q3: float
    rounds: int
    converged: bool
    message: str
    latency_a_ms: float
    latency_b_ms: float
    names: tuple[str, str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    batch: int
    threads: int
    backend: dict[str, Any]
    machine: dict[str, Any]
    rule: dict[str, Any]
    elapsed_s: float
    ratios: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (lists for tuples)."""
        out = asdict(self)
        for key in ("names", "input_shape", "output_shape", "ratios"):
            out[key] = list(out[key])
        return out


def summary_message(stats: RatioStats, rule: Rule, elapsed: float, converged: bool) -> str:
    """One line: the speed-up with its interval, or why it is not to be trusted."""
    span = (
        f"{stats.median:.3f}× (95 % interval {stats.low:.3f}–{stats.high:.3f}, "
        f"±{stats.half_width:.1%}, {stats.rounds} rounds in {elapsed:.1f} s)"
    )
    if converged:
        return f"speed-up {span}"
    return (
        f"the machine is too noisy for a trustworthy speed-up: after {stats.rounds} rounds in "
        f"{elapsed:.0f} s the interval is still ±{stats.half_width:.1%} (target "
        f"±{rule.target:.1%}); measured {span}. Quiet the machine, or allow more time"
    )


def onnx_input_shape(path: Path) -> tuple[int, ...] | None:
    """The fixed input shape an ONNX file declares (None if a dimension is symbolic); an error
    naming the file and the loader's reason if it does not load."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        dims = model.graph.input[0].type.tensor_type.shape.dim
    except Exception as exc:
        raise BackendError(f"{path} is not a loadable ONNX file: {_one_line(exc)}") from None
    shape = tuple(d.dim_value for d in dims)
    return shape if shape and all(shape) else None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _named(exc: BackendError, name: str) -> BackendError:
    """``exc`` (of its own class) on one line, naming the network it is about."""
    return type(exc)(f"{name}: {_one_line(exc)}")


def _prepare(backend: Backend, model: ModelLike, shape: tuple[int, ...], name: str) -> Runner:
    """The backend's runner for one network, errors naming the network on one line."""
    try:
        return backend.prepare(model, shape)
    except BackendError as exc:
        raise _named(exc, name) from None


def prepare_pair(
    a: ModelLike,
    b: ModelLike,
    backend: Backend,
    input_shape: tuple[int, ...],
    names: tuple[str, str] = ("A", "B"),
) -> tuple[Runner, Runner]:
    """Both networks prepared on ``backend`` and run once on the same random input; refuses a
    pair that does not take that input or gives outputs of different shapes."""
    run_a = _prepare(backend, a, input_shape, names[0])
    try:
        run_b = backend.prepare(b, input_shape)
    except ModelLoadError as exc:
        raise _named(exc, names[1]) from None
    except BackendError as exc:
        raise BackendError(
            f"the two networks take different inputs: {names[0]} runs on {input_shape} but "
            f"{names[1]} does not: {_one_line(exc)}"
        ) from None
    if run_a.output_shape != run_b.output_shape:
        raise BackendError(
            f"the two networks give outputs of different shapes on {input_shape}: "
            f"{names[0]} gives {run_a.output_shape}, {names[1]} gives {run_b.output_shape}; "
            "a speed-up compares two networks that do the same job"
        )
    return run_a, run_b


def _timed_rounds(run_a: Runner, run_b: Runner, rule: Rule, reporter: Reporter | None) -> Rounds:
    """``paired_rounds`` of two prepared runners with garbage collection off."""
    enabled = gc.isenabled()
    gc.disable()  # no collection pause inside a timed block
    try:
        return paired_rounds(run_a.time, run_b.time, rule, reporter=reporter)
    finally:
        if enabled:
            gc.enable()


def _child_rounds(
    onnx_a: bytes,
    onnx_b: bytes,
    threads: int,
    protocol: Protocol,
    input_shape: tuple[int, ...],
    rule: Rule,
    names: tuple[str, str],
) -> tuple[Rounds, tuple[int, ...], dict[str, Any]]:
    """In a fresh process: ORT's shared pool of ``threads``, both sessions on it, paired
    rounds; the rounds, the output shape and the backend's info."""
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(threads, 1)
    shared = OnnxRuntimeBackend(threads=threads, protocol=protocol, shared_pool=True)
    run_a, run_b = prepare_pair(onnx_a, onnx_b, shared, input_shape, names)
    return _timed_rounds(run_a, run_b, rule, None), run_a.output_shape, shared.info()


def _rounds_in_child(
    backend: Backend,
    a: ModelLike,
    b: ModelLike,
    input_shape: tuple[int, ...],
    rule: Rule,
    names: tuple[str, str],
) -> tuple[Rounds, tuple[int, ...], dict[str, Any]]:
    """``_child_rounds`` in a spawned process (ORT's shared pool is made once per process);
    the networks are exported here, so an error names the network that did not export."""
    nets = []
    for model, name in zip((a, b), names, strict=True):
        try:
            nets.append(onnx_bytes(model, input_shape))
        except BackendError as exc:
            raise _named(exc, name) from None
    args = (*nets, backend.threads, backend.protocol, input_shape, rule, names)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_rounds, *args).result()


def paired_speedup(
    a: ModelLike,
    b: ModelLike,
    backend: Backend,
    input_shape: tuple[int, ...],
    rule: Rule = Rule(),
    *,
    names: tuple[str, str] = ("A", "B"),
    reporter: Reporter | None = None,
) -> SpeedupResult:
    """Speed-up of ``b`` over ``a`` (modules, ONNX bytes or ``.onnx`` paths) on ``backend`` at
    ``input_shape``, in paired rounds until ``rule`` stops them; a result whose interval missed
    the target has ``converged=False`` and says why in ``message`` (the caller decides)."""
    info = backend.info()
    if backend.pairs_in_child:
        tell(reporter, "speed-up rounds", 0, 1, "in a child process with one shared thread pool")
        rounds, output_shape, info = _rounds_in_child(backend, a, b, input_shape, rule, names)
        tell(reporter, "speed-up rounds", 1, 1, f"±{rounds.stats.half_width:.1%}")
    else:
        with backend.timing_scope():
            run_a, run_b = prepare_pair(a, b, backend, input_shape, names)
            rounds = _timed_rounds(run_a, run_b, rule, reporter)
        output_shape = run_a.output_shape
    stats = rounds.stats
    converged = stats.half_width <= rule.target
    message = summary_message(stats, rule, rounds.elapsed, converged)
    return SpeedupResult(
        speedup=stats.median,
        low=stats.low,
        high=stats.high,
        q1=stats.q1,
        q3=stats.q3,
        rounds=stats.rounds,
        converged=converged,
        message=message,
        latency_a_ms=statistics.median(rounds.times_a),
        latency_b_ms=statistics.median(rounds.times_b),
        names=names,
        input_shape=tuple(input_shape),
        output_shape=output_shape,
        batch=input_shape[0],
        threads=backend.threads,
        backend=info,
        machine=machine_info(),
        rule=asdict(rule),
        elapsed_s=rounds.elapsed,
        ratios=rounds.ratios,
    )
