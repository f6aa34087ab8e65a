"""TensorRT engines: build from ONNX, run through torch CUDA tensors, time, refit by name.

TensorRT is optional and imported lazily (:func:`import_tensorrt`): without it every other
tool works and ``engine`` / ``refit x.plan`` fail with one line naming the extra to install.
I/O buffers are torch CUDA tensors and the stream is a ``torch.cuda.Stream`` (no pycuda, which
must be compiled against a CUDA toolkit).

TensorRT 10 Python API used here (checked against the TensorRT 10 Python/C++ API reference):
``Builder(logger)``, ``create_network(0)`` (explicit batch is the only mode in TRT 10),
``OnnxParser(network, logger).parse(bytes)`` + ``num_errors`` / ``get_error(i).desc()``,
``create_builder_config()``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``,
``set_flag(BuilderFlag.FP16 / REFIT)``, ``create_optimization_profile()`` +
``set_shape(name, min, opt, max)`` + ``add_optimization_profile``, ``create_timing_cache(blob)``
/ ``set_timing_cache(cache, ignore_mismatch)`` / ``get_timing_cache().serialize()``,
``build_serialized_network``, ``Runtime(logger).deserialize_cuda_engine``,
``create_execution_context``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3(stream_handle)``, ``Refitter(engine, logger)``, ``get_all_weights``,
``set_named_weights(name, Weights(ndarray))``, ``get_missing_weights``, ``refit_cuda_engine``
(and ``OnnxParserRefitter(refitter, logger).refit_from_bytes`` for weights without ONNX names).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .errors import SSFDeployError, first_line
from .fileio import atomic_path

__all__ = ["TRT_MISSING", "import_tensorrt", "require_cuda", "BuildOptions", "resolve_batches",
           "build_engine", "TrtRunner", "deserialize", "refit_engine", "sidecar_path",
           "read_sidecar", "write_plan", "resolve_onnx_for_plan", "sha256_file", "parser_errors"]

TRT_MISSING = ('TensorRT is not installed: pip install "ssf-deploy[tensorrt]" '
               '(needs an NVIDIA GPU and driver)')
PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def import_tensorrt():
    """``import tensorrt`` or one clear line (also when ``sys.modules['tensorrt'] is None``)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise SSFDeployError(TRT_MISSING) from None
    except Exception as e:   # a broken install, e.g. libnvinfer not found
        raise SSFDeployError(f"TensorRT is installed but cannot be imported ({first_line(e)}): "
                             f'reinstall with pip install "ssf-deploy[tensorrt]"') from None
    return trt


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SSFDeployError("TensorRT needs an NVIDIA GPU with CUDA, and torch sees none "
                             "(torch.cuda.is_available() is False)")


def make_logger(trt, verbose: bool = False):
    return trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)


# --------------------------------------------------------------------------------------------
# build


@dataclass
class BuildOptions:
    fp16: bool = False
    workspace_gb: float = 4.0
    min_batch: Optional[int] = None
    opt_batch: Optional[int] = None
    max_batch: Optional[int] = None
    refittable: bool = False
    timing_cache: Optional[str] = None
    verbose: bool = False


def resolve_batches(settings: dict, min_batch=None, opt_batch=None, max_batch=None) -> tuple:
    """(min, opt, max) batch of the optimization profile, checked against the ONNX input."""
    if not settings["dynamic_batch"]:
        static = int(settings["batch_size"])
        given = {b for b in (min_batch, opt_batch, max_batch) if b is not None}
        if given and given != {static}:
            raise SSFDeployError(f"the ONNX input has a static batch of {static}: re-export with "
                                 f"--dynamic-batch to use --min/--opt/--max-batch")
        return static, static, static
    mx = max_batch or max(32, opt_batch or 0, min_batch or 0)
    mn = min_batch or 1
    op = opt_batch or min(max(mn, 8), mx)
    if not (1 <= mn <= op <= mx):
        raise SSFDeployError(f"need 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                             f"{mn}/{op}/{mx}")
    return mn, op, mx


def parser_errors(parser, limit: int = 3) -> str:
    """TensorRT ONNX parser errors as one line: 'node N (Op 'name'): description; ...'."""
    rows = []
    n = int(getattr(parser, "num_errors", 0) or 0)
    for i in range(min(n, limit)):
        err = parser.get_error(i)
        where = []
        for attr in ("node", "node_operator", "node_name"):
            fn = getattr(err, attr, None)
            try:
                v = fn() if callable(fn) else None
            except Exception:
                v = None
            if v not in (None, "", -1):
                where.append(f"{v}" if attr != "node_name" else f"'{v}'")
        desc = str(err.desc()).strip().replace("\n", " ")
        rows.append((f"node {' '.join(where)}: " if where else "") + desc)
    if n > limit:
        rows.append(f"... {n - limit} more")
    return "; ".join(rows) or "no error details (try --verbose)"


def build_engine(onnx_data: bytes, opts: BuildOptions, settings: dict, *, source: str = "the model",
                 trt=None) -> tuple[bytes, dict, Optional[bytes]]:
    """Parse + build; returns (serialized engine, info, serialized timing cache or None)."""
    trt = trt or import_tensorrt()
    logger = make_logger(trt, opts.verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_data):
        raise SSFDeployError(f"TensorRT's ONNX parser rejected {source}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    if opts.workspace_gb <= 0:
        raise SSFDeployError("--workspace-gb must be > 0")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    if opts.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if opts.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    mn, op, mx = resolve_batches(settings, opts.min_batch, opts.opt_batch, opts.max_batch)
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise SSFDeployError(f"input '{tensor.name}' {shape} has dynamic dimensions beyond "
                                 f"the batch: export with a fixed image size")
        if shape and shape[0] < 0:
            profile = profile or builder.create_optimization_profile()
            rest = shape[1:]
            profile.set_shape(tensor.name, (mn, *rest), (op, *rest), (mx, *rest))
    if profile is not None:
        config.add_optimization_profile(profile)
    cache = None
    if opts.timing_cache:
        blob = b""
        if os.path.isfile(opts.timing_cache):
            with open(opts.timing_cache, "rb") as f:
                blob = f.read()
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise SSFDeployError(f"TensorRT could not build an engine from {source} (see the TensorRT "
                             f"log above; try a larger --workspace-gb or --verbose)")
    cache_bytes = None
    if cache is not None:
        cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    info = {"build_seconds": round(seconds, 3), "fp16": opts.fp16, "refittable": opts.refittable,
            "workspace_gb": opts.workspace_gb, "batch": {"min": mn, "opt": op, "max": mx},
            "layers": int(network.num_layers), "tensorrt": getattr(trt, "__version__", "?")}
    return bytes(memoryview(plan)), info, cache_bytes


# --------------------------------------------------------------------------------------------
# run


def deserialize(data: bytes, trt=None, logger=None):
    trt = trt or import_tensorrt()
    runtime = trt.Runtime(logger or make_logger(trt))
    engine = runtime.deserialize_cuda_engine(bytes(data))
    if engine is None:
        raise SSFDeployError("TensorRT cannot deserialize the engine (built by another TensorRT "
                             "version or for another GPU?)")
    return engine, runtime           # keep the runtime alive as long as the engine


def _torch_dtype(trt, dt) -> torch.dtype:
    try:
        return torch.from_numpy(np.zeros(0, dtype=trt.nptype(dt))).dtype
    except TypeError:
        if dt == getattr(trt, "bfloat16", None):
            return torch.bfloat16
        raise SSFDeployError(f"unsupported TensorRT I/O dtype {dt}") from None


class TrtRunner:
    """Run a TensorRT engine as a callable on torch tensors (like ``OrtRunner``)."""

    def __init__(self, engine, label: str = "TensorRT", runtime=None):
        self.trt = import_tensorrt()
        if isinstance(engine, (bytes, bytearray, memoryview)):
            engine, runtime = deserialize(engine, self.trt)
        self.engine, self._runtime, self.label = engine, runtime, label
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1:
            raise SSFDeployError(f"expected an engine with one input, found {self.inputs}")
        self.input = self.inputs[0]
        self.dtypes = {n: _torch_dtype(self.trt, engine.get_tensor_dtype(n)) for n in names}
        self.context = None
        self.stream = torch.cuda.Stream()
        self._bound = None

    def profile(self) -> tuple:
        try:
            return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        except Exception:
            return ()

    def _bind(self, x: torch.Tensor):
        if self.context is None:
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise SSFDeployError("TensorRT could not create an execution context (GPU memory?)")
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):      # buffers belong to the engine's stream
            x = x.to("cuda", dtype=self.dtypes[self.input]).contiguous()
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise SSFDeployError(f"input shape {tuple(x.shape)} is outside the engine's "
                                     f"profile (min, opt, max) = {self.profile()}")
            self.context.set_tensor_address(self.input, x.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                t = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                self.context.set_tensor_address(name, t.data_ptr())
                outs[name] = t
        self._bound = (x, outs)          # keep the buffers alive while TensorRT uses them
        return outs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise SSFDeployError("TensorRT execution failed (execute_async_v3 returned False)")

    def __call__(self, x: torch.Tensor):
        outs = self._bind(x)
        self._enqueue()
        self.stream.synchronize()
        return [outs[n].float().cpu() for n in self.outputs]

    def latency(self, x: torch.Tensor, warmup: int = 10, iters: int = 50) -> dict:
        """Median/mean/p90 milliseconds per batch from CUDA events on the engine's stream."""
        self._bind(x)
        for _ in range(max(0, warmup)):
            self._enqueue()
        self.stream.synchronize()
        times = []
        for _ in range(max(1, iters)):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._enqueue()
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        med = statistics.median(times)
        return {"batch": int(x.shape[0]), "median_ms": round(med, 4),
                "mean_ms": round(statistics.fmean(times), 4),
                "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
                "warmup": warmup, "iters": len(times),
                "images_per_s": round(1000.0 * int(x.shape[0]) / med, 1) if med > 0 else None}


# --------------------------------------------------------------------------------------------
# refit


def refit_engine(engine, weights_for, *, onnx_fallback=None, trt=None, logger=None) -> dict:
    """Refit ``engine`` in place with a task's weights, by name.

    ``weights_for(names) -> {name: ndarray}`` gets the engine's refittable weight names (the
    ONNX parser names them after the ONNX initializers) and returns the task's values. Names it
    cannot resolve (left out of the dict) are TensorRT-internal; then ``onnx_fallback() -> bytes``
    (the ONNX holding the task's weights) is refitted through ``OnnxParserRefitter`` instead,
    which maps the weights itself. Times set + refit with ``time.perf_counter``.
    """
    trt = trt or import_tensorrt()
    if not getattr(engine, "refittable", True):
        raise SSFDeployError("the engine was built without --refittable: rebuild it with "
                             "ssf-deploy engine --refittable")
    logger = logger or make_logger(trt)
    refitter = trt.Refitter(engine, logger)
    names = list(refitter.get_all_weights())
    if not names:
        raise SSFDeployError("the engine has no refittable weights (built without --refittable?)")
    values = weights_for(names)
    unknown = [n for n in names if n not in values]
    keep = []
    if unknown and onnx_fallback is None:
        raise SSFDeployError(f"{len(unknown)} refittable weight(s) have no ONNX name, e.g. "
                             f"'{unknown[0]}'")
    if unknown:
        data = onnx_fallback()
        t0 = time.perf_counter()
        parser_refitter = trt.OnnxParserRefitter(refitter, logger)
        if not parser_refitter.refit_from_bytes(data):
            raise SSFDeployError(f"TensorRT's ONNX refitter failed: {parser_errors(parser_refitter)}")
        how = "OnnxParserRefitter.refit_from_bytes"
    else:
        t0 = time.perf_counter()
        for name in names:
            arr = np.ascontiguousarray(values[name])
            keep.append(arr)                  # host memory must live until refit_cuda_engine
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise SSFDeployError(f"TensorRT rejected the weights '{name}' {arr.shape} "
                                     f"{arr.dtype} (wrong element count or type)")
        how = "set_named_weights"
    missing = list(refitter.get_missing_weights())
    if missing:
        raise SSFDeployError(f"TensorRT still misses {len(missing)} weight(s) after refit, "
                             f"e.g. '{missing[0]}'")
    if not refitter.refit_cuda_engine():
        raise SSFDeployError("TensorRT refit_cuda_engine() failed (see the TensorRT log)")
    seconds = time.perf_counter() - t0
    return {"refit_seconds": round(seconds, 4), "weights": len(names), "method": how,
            "unnamed_weights": len(unknown)}


# --------------------------------------------------------------------------------------------
# files


def sidecar_path(plan: str) -> str:
    return os.fspath(plan) + ".json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(plan: str) -> dict:
    path = sidecar_path(plan)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SSFDeployError(f"corrupt engine sidecar {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def write_plan(plan: str, data: bytes, sidecar: dict) -> None:
    """Engine and its sidecar JSON, both atomically (neither exists if one fails)."""
    with atomic_path(plan) as tmp_plan, atomic_path(sidecar_path(plan)) as tmp_side:
        with open(tmp_plan, "wb") as f:
            f.write(data)
        with open(tmp_side, "w") as f:
            json.dump(sidecar, f, indent=2, default=str)


def resolve_onnx_for_plan(plan: str, onnx_path: Optional[str] = None) -> str:
    """The ONNX an engine was built from: --onnx, else the sidecar's, else ``<stem>.onnx``.

    The engine holds no graph names for derived weights, so refit needs that ONNX; a sidecar's
    sha256 guards against refitting with an ONNX that changed since the build.
    """
    side = read_sidecar(plan)
    if onnx_path is None:
        cands = []
        if side.get("onnx"):
            rec = side["onnx"]
            cands += [rec if os.path.isabs(rec) else
                      os.path.join(os.path.dirname(os.path.abspath(plan)), rec)]
            if side.get("onnx_abs"):
                cands.append(side["onnx_abs"])
        cands.append(os.path.splitext(plan)[0] + ".onnx")
        onnx_path = next((c for c in cands if os.path.isfile(c)), cands[0])
    if not os.path.isfile(onnx_path):
        raise SSFDeployError(f"refit needs the ONNX the engine was built from: {onnx_path} not "
                             f"found (pass --onnx model.onnx)")
    want = side.get("onnx_sha256")
    if want and sha256_file(onnx_path) != want:
        raise SSFDeployError(f"{onnx_path} is not the ONNX {plan} was built from (sha256 differs "
                             f"from {sidecar_path(plan)}): pass --onnx with the original file")
    return onnx_path


def build_sidecar(onnx_path: str, plan: str, info: dict) -> dict:
    folder = os.path.dirname(os.path.abspath(plan))
    try:
        rel = os.path.relpath(os.path.abspath(onnx_path), folder)
    except ValueError:   # another drive (Windows)
        rel = os.path.abspath(onnx_path)
    return {"format": "ssf-deploy/engine/1", "onnx": rel, "onnx_abs": os.path.abspath(onnx_path),
            "onnx_sha256": sha256_file(onnx_path), **info}

