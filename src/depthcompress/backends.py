"""Latency backends behind one interface: ``measure(module_or_onnx, input_shape) -> Timing``.

ONNX Runtime on CPU is the default (the fastest CPU runtime measured here); torch eager (CPU or
CUDA), OpenVINO and TensorRT are the alternatives. Optional runtimes are imported inside methods,
so a missing one only fails when it is used, with a message naming the extra to install.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import io
import os
import platform
import statistics
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .devices import device_name, resolve_device
from .errors import BackendError, ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

ModelLike: TypeAlias = "nn.Module | bytes | str | Path"

BACKENDS = ("onnxruntime", "torch", "openvino", "tensorrt")
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "ov": "openvino"}
GPU_BACKENDS = ("torch", "tensorrt")  # the backends that time on a --device; the others on the CPU
ONNX_OPSET = 17
WARMUP_SHARE = 0.25
STATISTICS = ("median", "mean", "min", "p10", "p25")


@dataclass(frozen=True)
class Timing:
    """Latency of one model in milliseconds: median and population stdev over ``reps`` timed
    runs (the mean is kept too; the reference tables report the mean of GPU runs)."""

    median: float
    stdev: float
    reps: int
    mean: float
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        """Summarise per-run times (ms)."""
        if not samples_ms:
            raise BackendError("no timed run finished")
        return cls(
            median=statistics.median(samples_ms),
            stdev=statistics.pstdev(samples_ms),
            reps=len(samples_ms),
            mean=statistics.fmean(samples_ms),
            samples=tuple(samples_ms),
        )

    def statistic(self, name: str) -> float:
        """One of STATISTICS: ``median``, ``mean``, ``min`` or the ``p10``/``p25`` quantile."""
        if name == "median":
            return self.median
        if name == "mean":
            return self.mean
        if not self.samples:
            raise BackendError(f"statistic {name!r} needs the samples, which were not kept")
        if name == "min":
            return min(self.samples)
        if name in ("p10", "p25"):
            if len(self.samples) == 1:
                return self.samples[0]
            cuts = statistics.quantiles(self.samples, n=100, method="inclusive")
            return cuts[int(name[1:]) - 1]
        raise BackendError(f"unknown statistic {name!r}: choose one of {', '.join(STATISTICS)}")


@dataclass(frozen=True)
class Protocol:
    """How a model is timed: ``warmup`` untimed runs, then up to ``reps`` timed runs.

    ``max_time`` (seconds) caps one measurement: timing stops once it is spent and at least
    ``min_reps`` runs are done, and warm-up stops after a quarter of it. Small models therefore get
    all ``reps``, large ones fewer; this is what keeps a whole table within minutes on a CPU.
    ``statistic`` is what a latency table stores as ``time`` (median by default; a low quantile
    such as ``p10`` is far more reproducible on a machine shared with other jobs).
    """

    warmup: int = 10
    reps: int = 100
    min_reps: int = 10
    max_time: float = 1.0
    statistic: str = "median"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.reps < 1 or self.min_reps < 1 or self.max_time <= 0:
            raise BackendError(
                f"invalid timing protocol {self}: warmup ≥ 0, reps ≥ 1, min_reps ≥ 1 and "
                "max_time > 0 are required"
            )
        if self.statistic not in STATISTICS:
            raise BackendError(
                f"unknown statistic {self.statistic!r}: choose one of {', '.join(STATISTICS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for sidecars."""
        return asdict(self)


@dataclass(frozen=True)
class Runner:
    """A model prepared once on a backend, ready to be timed many times: ``call`` runs it on a
    fixed input, ``timer`` times one call in ms; ``output_shape`` is that of the check run."""

    call: Callable[[], object]
    timer: Callable[[Callable[[], object]], float]
    output_shape: tuple[int, ...]

    def time(self) -> float:
        """Milliseconds of one run."""
        return self.timer(self.call)


def wall_timer(call: Callable[[], object]) -> float:
    """Milliseconds one call takes on the wall clock (synchronous runtimes)."""
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) / 1e6


def time_calls(
    call: Callable[[], object],
    protocol: Protocol,
    timer: Callable[[Callable[[], object]], float] = wall_timer,
) -> Timing:
    """Time ``call`` under ``protocol``; ``timer`` runs it once and returns milliseconds."""
    budget = protocol.max_time
    start = time.perf_counter()
    for _ in range(protocol.warmup):
        timer(call)
        if time.perf_counter() - start > budget * WARMUP_SHARE:
            break
    samples: list[float] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(samples) < protocol.reps:
            samples.append(timer(call))
            if len(samples) >= protocol.min_reps and time.perf_counter() - start > budget:
                break
    finally:
        if enabled:
            gc.enable()
    return Timing.from_samples(samples)


def default_threads() -> int:
    """All cores this process may run on (the default thread count of every CPU backend)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model as the OS reports it (``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a latency depends on besides the backend: CPU model, core count, OS."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": platform.system(),
        "hostname": platform.node(),
    }


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _require(module: str, what: str, extra: str) -> Any:
    """Import an optional runtime, or raise a BackendError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendError(
            f"the {what} backend needs the '{module}' package, which is not installed: "
            f"pip install 'depthcompress[{extra}]'"
        ) from None


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], opset: int = ONNX_OPSET) -> bytes:
    """Export an eval-mode module to ONNX bytes with a fixed input shape (float32, on CPU).

    Uses torch's TorchScript-based exporter (fast, no extra dependency); if a future torch drops
    it, falls back to the torch.export-based one, which needs ``onnxscript``.
    """
    import copy

    import torch

    _require_onnx()
    module = copy.deepcopy(model).cpu().eval()
    x = torch.randn(input_shape)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x,),
                buf,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=False,
                input_names=["input"],
                output_names=["output"],
            )
        return buf.getvalue()
    except (TypeError, NotImplementedError, AttributeError, RuntimeError) as legacy_exc:
        if importlib.util.find_spec("onnxscript") is None:
            raise BackendError(
                f"exporting {type(model).__name__} to ONNX failed ({type(legacy_exc).__name__}: "
                f"{legacy_exc}); the newer exporter needs onnxscript: pip install onnxscript"
            ) from None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset)
        return program.model_proto.SerializeToString()
    except Exception as exc:
        raise BackendError(
            f"exporting {type(model).__name__} to ONNX failed: {type(exc).__name__}: {exc}"
        ) from None


def _require_onnx() -> None:
    """Exporting a module to ONNX needs the ``onnx`` package."""
    try:
        importlib.import_module("onnx")
    except ImportError:
        raise BackendError(
            "exporting a PyTorch module to ONNX needs the 'onnx' package, which is not "
            "installed: pip install 'depthcompress[onnx]'"
        ) from None


def onnx_bytes(model: ModelLike, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of a module (exported), of ONNX bytes, or of an ``.onnx`` file."""
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"ONNX file {path} does not exist")
        return path.read_bytes()
    return to_onnx(model, input_shape)


def _random_input(input_shape: tuple[int, ...], seed: int = 0) -> Any:
    import numpy as np

    return np.random.default_rng(seed).standard_normal(input_shape, dtype=np.float32)


class Backend(ABC):
    """A runtime that times models; ``info()`` is what a latency table records about it."""

    name: str = ""
    extra: str = ""
    device: str = "cpu"  # where it times: cpu, or cuda:N for the GPU backends

    def __init__(self, *, threads: int | None = None, protocol: Protocol | None = None) -> None:
        if threads is not None and threads < 1:
            raise BackendError(f"threads must be ≥ 1, got {threads}")
        self.threads = threads or default_threads()
        self.protocol = protocol or Protocol()

    @abstractmethod
    def measure(self, model: ModelLike, input_shape: tuple[int, ...]) -> Timing:
        """Latency of ``model`` (a module, ONNX bytes or an ``.onnx`` path) on a random input."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Backend name, versions, device and settings that a timing depends on."""

    def check(self) -> None:
        """Raise BackendError now if this backend cannot run here (missing package or device)."""
        self.info()
        if self.name != "torch":
            _require_onnx()

    def prepare(self, model: ModelLike, input_shape: tuple[int, ...]) -> Runner:
        """``model`` loaded once and run once on the seeded random input of ``input_shape``, for
        repeated timing (paired speed-ups); call it inside ``timing_scope()``."""
        raise BackendError(f"the {self.name} backend cannot prepare a model for repeated timing")

    @property
    def pairs_in_child(self) -> bool:
        """Whether ``speedup`` times two networks on this backend in a child process (only ONNX
        Runtime above one thread: ``OnnxRuntimeBackend.pairs_in_child``)."""
        return False

    def timing_scope(self) -> contextlib.AbstractContextManager[None]:
        """The settings a prepared runner must be timed under (threads, the current GPU)."""
        return contextlib.nullcontext()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPU execution provider, one session per model: ``intra_op_num_threads`` =
    threads, sequential execution, every graph optimisation enabled.

    With ``shared_pool`` its sessions use the process's global intra-op pool instead, which the
    caller has created (``ort.set_global_thread_pool_sizes``) before any session of the process:
    ``speedup`` times two networks that way in a child process (see ``pairs_in_child``)."""

    name = "onnxruntime"
    extra = "ort"

    def __init__(
        self,
        *,
        threads: int | None = None,
        protocol: Protocol | None = None,
        shared_pool: bool = False,
    ) -> None:
        super().__init__(threads=threads, protocol=protocol)
        self.shared_pool = shared_pool

    def _ort(self) -> Any:
        return _require("onnxruntime", self.name, self.extra)

    @property
    def pairs_in_child(self) -> bool:
        """Whether two networks are timed against each other in a child process.

        Two live sessions of more than one thread, each with a pool of its own, interfere: a
        finished session's workers spin while the other runs. On this 2-core VM (2 threads,
        batch 64) the demo network against a second session of itself read 0.56x to 1.13x, with
        quartiles 0.95 to 1.86, and 1.00 [0.999, 1.003] from one session or one shared pool. A
        process creates ORT's shared pool once, at one size, and then every session must use it,
        so the pair is timed in a fresh process of its own."""
        return self.threads > 1 and not self.shared_pool

    def session(self, onnx: bytes) -> Any:
        """A CPU InferenceSession for ONNX bytes under this backend's thread settings."""
        ort = self._ort()
        opts = ort.SessionOptions()
        if self.shared_pool:
            opts.use_per_session_threads = False
        else:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {exc}") from None

    def measure(self, model: ModelLike, input_shape: tuple[int, ...]) -> Timing:
        """Latency of one ``session.run`` on a random float32 input of ``input_shape``."""
        return time_calls(self.prepare(model, input_shape).call, self.protocol)

    def prepare(self, model: ModelLike, input_shape: tuple[int, ...]) -> Runner:
        """One session and one feed, checked by one run."""
        self._ort()
        sess = self.session(onnx_bytes(model, input_shape))
        feed = {sess.get_inputs()[0].name: _random_input(input_shape)}
        try:
            out = sess.run(None, feed)
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime cannot run the model on {input_shape}: {exc}"
            ) from None
        return Runner(lambda: sess.run(None, feed), wall_timer, tuple(out[0].shape))

    def info(self) -> dict[str, Any]:
        """Backend name, versions, device and settings that a timing depends on."""
        ort = self._ort()
        return {
            "name": self.name,
            "version": ort.__version__,
            "device": "cpu",
            "provider": "CPUExecutionProvider",
            "threads": self.threads,
            **({"thread_pool": "shared"} if self.shared_pool else {}),
            "opset": ONNX_OPSET,
        }


class TorchBackend(Backend):
    """PyTorch eager, ``torch.inference_mode``; on CPU with ``torch.set_num_threads(threads)``,
    on CUDA timed with CUDA events around each forward (the reference's protocol). ``device`` is
    ``cpu``, ``cuda`` (the current or LOCAL_RANK GPU) or ``cuda:N``."""

    name = "torch"
    extra = "torch"

    def __init__(
        self,
        *,
        threads: int | None = None,
        protocol: Protocol | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(threads=threads, protocol=protocol)
        self._torch()
        self.device = str(resolve_device(device))

    def _torch(self) -> Any:
        return _require("torch", self.name, self.extra)

    def measure(self, model: ModelLike, input_shape: tuple[int, ...]) -> Timing:
        """Latency of one forward of ``model`` on a random input of ``input_shape``."""
        runner = self.prepare(model, input_shape)
        with self.timing_scope():
            return time_calls(runner.call, self.protocol, runner.timer)

    def prepare(self, model: ModelLike, input_shape: tuple[int, ...]) -> Runner:
        """An eval-mode copy on ``device`` and an input there, checked by one forward."""
        torch = self._torch()
        if not isinstance(model, torch.nn.Module):
            raise BackendError(
                "the torch backend times torch modules, not ONNX files: pass the PyTorch model, "
                "or use the onnxruntime backend for an ONNX file"
            )
        import copy

        module = copy.deepcopy(model).to(self.device).eval()
        x = torch.from_numpy(_random_input(input_shape)).to(self.device)

        def call() -> object:
            with torch.inference_mode():
                return module(x)

        with self.timing_scope():
            try:
                out = call()
            except Exception as exc:
                raise BackendError(
                    f"the model fails on an input of shape {input_shape}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        timer = wall_timer if self.device == "cpu" else _cuda_timer(torch)
        return Runner(call, timer, tuple(getattr(out, "shape", ())))

    @contextlib.contextmanager
    def timing_scope(self) -> Iterator[None]:
        """``threads`` torch threads, and on CUDA this backend's GPU as the current one."""
        torch = self._torch()
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with contextlib.ExitStack() as stack:
                if self.device != "cpu":
                    stack.enter_context(torch.cuda.device(torch.device(self.device)))
                yield
        finally:
            torch.set_num_threads(old_threads)

    def info(self) -> dict[str, Any]:
        """Backend name, versions, device and settings that a timing depends on."""
        torch = self._torch()
        return {
            "name": self.name,
            "version": torch.__version__,
            "device": device_name(torch.device(self.device)),
            "threads": self.threads,
        }


def _cuda_timer(torch: Any) -> Callable[[Callable[[], object]], float]:
    """CUDA-event timing of one call, synchronising after it (ALGORITHM.md §4)."""

    def timer(call: Callable[[], object]) -> float:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)

    return timer


class OpenVinoBackend(Backend):
    """OpenVINO on CPU from ONNX, LATENCY hint, one stream, ``INFERENCE_NUM_THREADS`` = threads.

    Precision is fp32 unless asked otherwise: OpenVINO's own CPU default may be bf16, which is
    faster but not the model's arithmetic; the table records which was used.
    """

    name = "openvino"
    extra = "openvino"

    def __init__(
        self,
        *,
        threads: int | None = None,
        protocol: Protocol | None = None,
        precision: str = "f32",
    ) -> None:
        super().__init__(threads=threads, protocol=protocol)
        if precision not in ("f32", "bf16", "f16"):
            raise BackendError(f"openvino precision must be f32, bf16 or f16, got {precision!r}")
        self.precision = precision

    def _ov(self) -> Any:
        return _require("openvino", self.name, self.extra)

    def measure(self, model: ModelLike, input_shape: tuple[int, ...]) -> Timing:
        """Latency of one synchronous ``infer()`` on a random input of ``input_shape``."""
        request = self._request(onnx_bytes(model, input_shape), input_shape)
        return time_calls(request.infer, self.protocol)

    def prepare(self, model: ModelLike, input_shape: tuple[int, ...]) -> Runner:
        """One compiled model and infer request, checked by one ``infer()``."""
        request = self._request(onnx_bytes(model, input_shape), input_shape)
        shape = tuple(int(d) for d in request.get_output_tensor(0).shape)
        return Runner(request.infer, wall_timer, shape)

    def _request(self, onnx: bytes, input_shape: tuple[int, ...]) -> Any:
        """A compiled infer request holding the seeded random input, run once."""
        import tempfile

        ov = self._ov()
        core = ov.Core()
        try:
            with tempfile.TemporaryDirectory() as tmp:  # read_model takes a file in every version
                file = Path(tmp) / "model.onnx"
                file.write_bytes(onnx)
                graph = core.read_model(str(file))
            compiled = core.compile_model(
                graph,
                "CPU",
                {
                    "INFERENCE_NUM_THREADS": self.threads,
                    "INFERENCE_PRECISION_HINT": self.precision,
                    "PERFORMANCE_HINT": "LATENCY",
                    "NUM_STREAMS": 1,
                },
            )
            request = compiled.create_infer_request()
            request.set_input_tensor(ov.Tensor(_random_input(input_shape)))
            request.infer()
        except Exception as exc:
            raise BackendError(f"OpenVINO cannot run the model on {input_shape}: {exc}") from None
        return request

    def info(self) -> dict[str, Any]:
        """Backend name, versions, device and settings that a timing depends on."""
        self._ov()
        return {
            "name": self.name,
            "version": package_version("openvino"),
            "device": "cpu",
            "threads": self.threads,
            "precision": self.precision,
            "opset": ONNX_OPSET,
        }


class TensorRTBackend(Backend):
    """TensorRT on a CUDA GPU (``device``: ``cuda``, the current or LOCAL_RANK one, or
    ``cuda:N``): ONNX → serialized engine (fp32, or fp16 with ``fp16=True``), timed with CUDA
    events around ``execute_async_v3``. Needs ``tensorrt`` ≥ 10 and CUDA torch."""

    name = "tensorrt"
    extra = "tensorrt"

    def __init__(
        self,
        *,
        threads: int | None = None,
        protocol: Protocol | None = None,
        fp16: bool = False,
        workspace_gib: float = 2.0,
        device: str | torch.device = "cuda",
    ) -> None:
        super().__init__(threads=threads, protocol=protocol)
        if str(device).strip().lower() == "cpu":
            raise BackendError(
                "the tensorrt backend times on a CUDA GPU, not on the CPU: name a GPU (--device "
                "cuda or cuda:N), or time on the CPU with --backend onnxruntime or torch"
            )
        self.fp16 = fp16
        self.workspace_gib = workspace_gib
        self._modules()
        self.device = str(resolve_device(device))

    def _modules(self) -> tuple[Any, Any]:
        trt = _require("tensorrt", self.name, self.extra)
        torch = _require("torch", self.name, self.extra)
        return trt, torch

    def engine(self, onnx: bytes) -> Any:
        """Build and deserialize a TensorRT engine for ONNX bytes."""
        trt, _ = self._modules()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
        if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
            flags = 1 << int(explicit)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx):
            errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * 2**30))
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError("TensorRT failed to build an engine for the model")
        return trt.Runtime(logger).deserialize_cuda_engine(serialized)

    def measure(self, model: ModelLike, input_shape: tuple[int, ...]) -> Timing:
        """Latency of one engine execution on a random input of ``input_shape``."""
        trt, torch = self._modules()
        onnx = onnx_bytes(model, input_shape)
        with torch.cuda.device(torch.device(self.device)):
            return self._measure(trt, torch, onnx, input_shape)

    def _measure(self, trt: Any, torch: Any, onnx: bytes, input_shape: tuple[int, ...]) -> Timing:
        """``measure`` with ``self.device`` the current CUDA device."""
        import numpy as np

        engine = self.engine(onnx)
        context = engine.create_execution_context()
        buffers = []
        for k in range(engine.num_io_tensors):
            name = engine.get_tensor_name(k)
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if -1 in shape:
                    context.set_input_shape(name, input_shape)
                    shape = input_shape
                buf = torch.randn(shape, device=self.device).to(dtype)
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.device)
            buffers.append(buf)
            context.set_tensor_address(name, buf.data_ptr())
        stream = torch.cuda.current_stream()

        def call() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise BackendError("TensorRT execution failed")

        return time_calls(call, self.protocol, _cuda_timer(torch))

    def info(self) -> dict[str, Any]:
        """Backend name, versions, device and settings that a timing depends on."""
        trt, torch = self._modules()
        return {
            "name": self.name,
            "version": trt.__version__,
            "device": device_name(torch.device(self.device)),
            "precision": "fp16" if self.fp16 else "fp32",
            "opset": ONNX_OPSET,
        }


def get_backend(
    name: str = "onnxruntime",
    *,
    threads: int | None = None,
    protocol: Protocol | None = None,
    device: str | torch.device | None = None,
    precision: str = "f32",
    fp16: bool = False,
) -> Backend:
    """The backend called ``name`` (onnxruntime/ort, torch, openvino, tensorrt), checked to run.

    ``device`` is where torch and TensorRT time (``cpu``, ``cuda``, ``cuda:N``; default: the CPU
    for torch, the current GPU for TensorRT; see ``devices.resolve_device``); ONNX Runtime and
    OpenVINO time on the CPU only. ``precision`` applies to OpenVINO, ``fp16`` to TensorRT.
    Raises BackendError naming the extra to install when the runtime is missing.
    """
    key = backend_key(name)
    if key in ("onnxruntime", "openvino") and device is not None and str(device) != "cpu":
        raise BackendError(
            f"the {key} backend times on the CPU; --device {device} is for the "
            f"{' and '.join(GPU_BACKENDS)} backends"
        )
    backend: Backend
    if key == "onnxruntime":
        backend = OnnxRuntimeBackend(threads=threads, protocol=protocol)
    elif key == "torch":
        backend = TorchBackend(threads=threads, protocol=protocol, device=device or "cpu")
    elif key == "openvino":
        backend = OpenVinoBackend(threads=threads, protocol=protocol, precision=precision)
    else:
        backend = TensorRTBackend(
            threads=threads, protocol=protocol, fp16=fp16, device=device or "cuda"
        )
    backend.check()
    return backend


def backend_key(name: str) -> str:
    """The canonical name of a backend or alias (``ort`` → ``onnxruntime``); BackendError if it
    names none."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return key


def available_backends() -> list[str]:
    """Backends whose runtime (and device) is usable on this machine."""
    out = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendError:
            continue
        out.append(name)
    return out
