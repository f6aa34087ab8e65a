"""TensorRT engines: build from ONNX, run through torch CUDA tensors, time, refit by name.

TensorRT is optional and imported lazily (:func:`import_tensorrt`): without it every other
tool works and ``engine`` / ``refit x.plan`` fail with one line naming the extra to install.
I/O buffers are torch CUDA tensors and the stream is a ``torch.cuda.Stream`` (no pycuda, which
must be compiled against a CUDA toolkit). Builder, runtime and runner take an explicit CUDA
device (``cuda:N``); everything TensorRT does for them runs inside ``torch.cuda.device(N)``.

Supported: TensorRT 10.x and 11.x. What differs, checked against the Python bindings of the
NVIDIA/TensorRT repository (``python/src/infer/pyCore.cpp``, ``pyInt8.cpp`` and the docstrings in
``python/docstrings/infer/`` at the 10.0, 10.16 and 11.1 releases) and NVIDIA's 10.x -> 11.x
migration guide:

* ``BuilderFlag.TF32`` is "enabled by default" in both: FP32 engines clear it unless asked
  (otherwise an "fp32" engine multiplies with 10-bit mantissas and fails an fp32 comparison).
* ``BuilderFlag.FP16`` / ``INT8`` / ``FP8`` were deprecated in 10.12 and are gone in 11, with
  ``IBuilderConfig.int8_calibrator``, ``set_calibration_profile`` and the ``IInt8Calibrator``
  classes (deprecated since 10.1). 11 builds every network strongly typed:
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` still exists there but is ignored. So:

  - fp16: 10.x sets ``BuilderFlag.FP16`` (weakly typed); where the flag is missing (11.x) the ONNX
    is converted to fp16 with onnxruntime's ``float16.convert_float_to_float16(keep_io_types=True)``
    (I/O stay fp32) and built as a strongly typed network;
  - explicit INT8 (an ONNX with QuantizeLinear/DequantizeLinear nodes, TensorRT's recommended
    route): 10.x sets ``BuilderFlag.INT8`` on a weakly typed network (as Polygraphy 10.x does for
    Q/DQ networks); 11.x builds it strongly typed;
  - implicit INT8 with a calibrator (``IInt8EntropyCalibrator2``): 10.x only;
  - FP8: only from FP8 Q/DQ nodes (there is no FP8 calibration), strongly typed on both, on GPUs
    of compute capability 8.9 or newer.

* Logging goes through a ``trt.ILogger`` subclass that writes to stderr (the stock
  ``trt.Logger`` prints to std::cout, which would end up inside ``--json`` output).
* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache
  made on another device; ``create_timing_cache`` may return None for a blob it cannot read.
  Either way the build starts a fresh cache and says so.

Other calls: ``Builder(logger)``, ``create_network(flags)``, ``OnnxParser(network, logger).parse``
+ ``num_errors`` / ``get_error(i).desc()``, ``create_builder_config()``,
``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``, ``set_flag`` / ``clear_flag``,
``create_optimization_profile()`` + ``set_shape`` + ``add_optimization_profile``,
``build_serialized_network``, ``Runtime(logger).deserialize_cuda_engine``,
``create_execution_context``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3(stream_handle)``, ``Refitter(engine, logger)``, ``get_all_weights``,
``get_weights_prototype(name)`` (dtype of the engine's copy), ``set_named_weights(name,
Weights(ndarray))``, ``get_missing_weights``, ``refit_cuda_engine`` and
``OnnxParserRefitter(refitter, logger).refit_from_bytes`` for weights without ONNX names.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import onnx
import torch

from .errors import SSFDeployError, UsageError, first_line
from .fileio import OutputSet, check_manifest

__all__ = ["TRT_MISSING", "import_tensorrt", "trt_version", "require_cuda", "cuda_device",
           "make_logger", "BuildOptions", "Precision", "qdq_info", "check_precision_request",
           "plan_precision", "fp16_onnx", "CalibrationImages", "Calibration", "make_calibrator",
           "resolve_batches", "build_engine", "tolerances", "TrtRunner", "deserialize",
           "refit_engine", "refuse_quantized_refit", "sidecar_precision", "sidecar_path",
           "read_sidecar", "write_plan", "resolve_onnx_for_plan", "sha256_file", "parser_errors"]

TRT_MISSING = ('TensorRT is not installed: pip install "ssf-deploy[tensorrt]" '
               '(needs an NVIDIA GPU and driver)')
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
QUANTIZED = ("int8", "fp8")
REFIT_WHY = ("scales depend on the task's weights: quantize after the swap, then build "
             "(ssf-deploy refit model.onnx --pack ... --out task.onnx, quantize task.onnx, "
             "ssf-deploy engine)")
FP8_MIN_CAPABILITY = (8, 9)        # Ada / Hopper and newer have FP8 tensor cores
CALIB_MAX_IMAGES = 1024            # TensorRT's guide: ~500 images suffice for ImageNet
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def import_tensorrt():
    """``import tensorrt`` or one clear line (also when ``sys.modules['tensorrt'] is None``)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise SSFDeployError(TRT_MISSING) from None
    except Exception as e:   # a broken install, e.g. libnvinfer not found
        raise SSFDeployError(f"TensorRT is installed but cannot be imported ({first_line(e)}): "
                             f'reinstall with pip install "ssf-deploy[tensorrt]"') from None
    v = trt_version(trt)
    if v is not None and v[0] < 10:
        raise SSFDeployError(f"TensorRT {trt.__version__} is too old: ssf-deploy needs TensorRT "
                             f'10.x or 11.x (pip install "ssf-deploy[tensorrt]")')
    return trt


def trt_version(trt) -> Optional[tuple]:
    """(major, minor) of the TensorRT module, None when its version string does not say."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(getattr(trt, "__version__", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _ver(trt) -> str:
    return str(getattr(trt, "__version__", "?"))


def has_flag(trt, name: str) -> bool:
    return hasattr(getattr(trt, "BuilderFlag", None), name)


# --------------------------------------------------------------------------------------------
# CUDA device


def cuda_device(device=None) -> torch.device:
    """``None``/``"cuda"`` (the current device), ``"cuda:N"``, ``N`` or a torch.device, as a
    torch.device.

    Checks the spelling only; :func:`require_cuda` checks that the device exists.
    """
    if device is None:
        return torch.device("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise UsageError(f"CUDA device index must be >= 0, got {device}")
        return torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}: use cuda or cuda:N") from None
    if dev.type != "cuda":
        raise UsageError(f"TensorRT runs on an NVIDIA GPU, not on '{device}': use cuda or cuda:N")
    return dev


def device_scope(device: Optional[torch.device]):
    """``torch.cuda.device(N)`` for an indexed device; otherwise the current device stays."""
    if device is None or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def require_cuda(device=None) -> torch.device:
    dev = cuda_device(device)
    if not torch.cuda.is_available():
        raise SSFDeployError("TensorRT needs an NVIDIA GPU with CUDA, and torch sees none "
                             "(torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SSFDeployError(f"device '{dev}' does not exist ({torch.cuda.device_count()} CUDA "
                             f"device(s))")
    return dev


# --------------------------------------------------------------------------------------------
# logging


_SEVERITY = {0: "internal error", 1: "error", 2: "warning", 3: "info", 4: "verbose"}


def make_logger(trt, verbose: bool = False, stream=None):
    """A ``trt.ILogger`` that writes to stderr (``stream``): warnings and errors, INFO with
    ``verbose``. It also keeps the error messages (``.errors``) for one-line failure reports.

    The documented way (ILogger docstring): subclass ``trt.ILogger``, call its ``__init__``,
    implement ``log(self, severity, msg)``. Severities are ordered INTERNAL_ERROR (0) < ERROR <
    WARNING < INFO < VERBOSE (4).
    """
    base = trt.ILogger

    class StderrLogger(base):
        def __init__(self):
            base.__init__(self)
            self.min_severity = base.INFO if verbose else base.WARNING
            self.errors: list = []
            self.stream = stream

        def log(self, severity, msg):
            level = int(severity)
            if level <= 1:
                self.errors.append(str(msg).strip())
            if level > int(self.min_severity):
                return
            out = self.stream or sys.stderr
            out.write(f"[TensorRT] {_SEVERITY.get(level, level)}: {str(msg).rstrip()}\n")
            out.flush()

    return StderrLogger()


def _last_error(logger) -> str:
    errors = [e for e in getattr(logger, "errors", []) if e]
    return f": {errors[-1].splitlines()[0]}" if errors else ""


# --------------------------------------------------------------------------------------------
# precision


def qdq_info(proto: onnx.ModelProto) -> dict:
    """Explicit quantization in an ONNX graph: QuantizeLinear/DequantizeLinear nodes and types.

    ``kind`` is ``None`` (no Q/DQ), ``"int8"`` or ``"fp8"``; ``types`` lists every quantized
    type seen; ``asymmetric`` names nodes whose zero point is not all zeros (TensorRT supports
    symmetric quantization only: "the zeroPt tensor must be a build-time constant containing only
    zeros", NvInfer.h IQuantizeLayer).
    """
    nodes = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return {"kind": None, "nodes": 0, "types": [], "asymmetric": []}
    tensors = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tensors[n.output[0]] = a.t
    T = onnx.TensorProto
    names = {T.INT8: "int8", T.UINT8: "uint8", T.INT4: "int4", T.UINT4: "uint4",
             T.FLOAT8E4M3FN: "fp8", T.FLOAT8E4M3FNUZ: "fp8", T.FLOAT8E5M2: "fp8",
             T.FLOAT8E5M2FNUZ: "fp8"}
    for extra in ("FLOAT4E2M1",):
        if hasattr(T, extra):
            names[getattr(T, extra)] = "fp4"
    types, asym = set(), []
    for n in nodes:
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        dtype = None
        if zp and zp in tensors:
            t = tensors[zp]
            dtype = t.data_type
            try:
                arr = onnx.numpy_helper.to_array(t)
                if np.any(np.asarray(arr, dtype=np.float32) != 0):
                    asym.append(n.name or n.output[0])
            except (TypeError, ValueError):
                pass
        elif n.op_type == "DequantizeLinear" and n.input[0] in tensors:
            dtype = tensors[n.input[0]].data_type       # pre-quantized weights
        elif n.op_type == "QuantizeLinear":
            attr = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
            dtype = attr or None     # no zero point: TensorRT treats the output as INT8
        if dtype is not None:
            types.add(names.get(dtype, T.DataType.Name(dtype).lower()))
    kind = "fp8" if "fp8" in types else "int8"
    return {"kind": kind, "nodes": len(nodes), "types": sorted(types), "asymmetric": asym}


def check_qdq_supported(info: dict, source: str = "the ONNX model") -> None:
    """One line for Q/DQ graphs TensorRT cannot build: unsigned or asymmetric, int32 (quantized
    biases), 4-bit."""
    if not info["kind"]:
        return
    if "uint8" in info["types"] or info["asymmetric"]:
        where = f" (e.g. node '{info['asymmetric'][0]}')" if info["asymmetric"] else ""
        raise SSFDeployError(f"{source} is quantized with unsigned or asymmetric Q/DQ{where}: "
                             f"TensorRT supports only signed, symmetric quantization (zero point "
                             f"0): quantize activations and weights as symmetric INT8")
    if "int32" in info["types"]:
        raise SSFDeployError(f"{source} dequantizes int32 tensors (quantized biases): TensorRT "
                             f"dequantizes only INT8/FP8 (onnx/onnx-tensorrt#850): quantize "
                             f"with the biases left in float (onnxruntime: extra_options "
                             f"QuantizeBias=False)")
    other = [t for t in info["types"] if t not in ("int8", "fp8")]
    if other:
        raise SSFDeployError(f"{source} holds {'/'.join(other)} Q/DQ nodes: ssf-deploy builds "
                             f"INT8 and FP8 Q/DQ graphs only")


@dataclass
class Precision:
    """How an engine gets its precision (recorded in the report, the JSON and the sidecar)."""
    name: str = "fp32"                     # fp32 | tf32 | fp16 | int8 | fp8
    quantization: Optional[str] = None     # None | "explicit" (Q/DQ) | "calibrated"
    strongly_typed: bool = False
    builder_flags: list = field(default_factory=list)   # BuilderFlag names set
    tf32: bool = False
    fp16_onnx: bool = False                # the ONNX was converted to fp16 before parsing
    fp16: bool = False                     # FP16 kernels allowed / used anywhere

    def describe(self) -> str:
        parts = []
        if self.quantization == "explicit":
            parts.append("explicit Q/DQ")
        elif self.quantization == "calibrated":
            parts.append("calibrated, IInt8EntropyCalibrator2")
        if self.fp16_onnx:
            parts.append("ONNX converted to fp16, fp32 I/O")
        parts.append("strongly typed network" if self.strongly_typed else "weakly typed network")
        if self.builder_flags:
            parts[-1] += " + " + " + ".join(f"BuilderFlag.{f}" for f in self.builder_flags)
        parts.append("TF32 on" if self.tf32 else "TF32 off")
        extra = "+fp16" if self.fp16 and self.name in QUANTIZED else ""
        return f"{self.name}{extra} ({'; '.join(parts)})"

    def as_dict(self) -> dict:
        return asdict(self)


def check_precision_request(*, fp16=False, tf32=False, int8=False, fp8=False, calibrate=False,
                            qdq: Optional[str] = None, refittable=False) -> None:
    """Contradictions that need no TensorRT to see (``qdq``: ``qdq_info(...)['kind']``)."""
    if fp8 and int8:
        raise UsageError("--int8 and --fp8 exclude each other")
    if calibrate and not int8:
        raise UsageError("--calib/--calib-cache calibrate INT8: add --int8")
    if qdq and calibrate:
        raise UsageError(f"the ONNX is already quantized ({qdq.upper()} Q/DQ nodes): --calib is "
                         f"for a float ONNX; build the Q/DQ ONNX without it")
    if qdq == "int8" and fp8:
        raise UsageError("--fp8 needs FP8 Q/DQ nodes, and the ONNX holds INT8 Q/DQ nodes")
    if qdq == "fp8" and int8:
        raise UsageError("--int8 given, but the ONNX holds FP8 Q/DQ nodes (drop --int8)")
    if fp8 and not qdq:
        raise UsageError("--fp8: TensorRT builds FP8 only from FP8 Q/DQ nodes (explicit "
                         "quantization; TensorRT 10 and 11 have no FP8 calibration): quantize the "
                         "ONNX to FP8 Q/DQ first")
    if int8 and not qdq and not calibrate:
        raise UsageError("--int8 needs an explicitly quantized ONNX (QuantizeLinear/"
                         "DequantizeLinear nodes, e.g. from ssf-deploy quantize) or --calib DIR")
    if qdq == "fp8" and fp16:
        raise UsageError("--fp16 with an FP8 Q/DQ ONNX: the build is strongly typed and takes "
                         "its precision from the ONNX; drop --fp16")
    if refittable and (int8 or fp8 or qdq):
        raise UsageError(f"--refittable with an INT8/FP8 engine: {REFIT_WHY}")


def plan_precision(trt, *, fp16=False, tf32=False, int8=False, fp8=False, calibrate=False,
                   qdq: Optional[str] = None) -> Precision:
    """The route to the requested precision on this TensorRT (10.x or 11.x), or one line naming
    the version where it is unavailable."""
    check_precision_request(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibrate=calibrate, qdq=qdq)
    v, vs = trt_version(trt), _ver(trt)
    always_strong = v is not None and v[0] >= 11
    p = Precision(tf32=tf32, strongly_typed=always_strong)
    if tf32 and not has_flag(trt, "TF32"):
        raise SSFDeployError(f"--tf32: TensorRT {vs} has no BuilderFlag.TF32")

    def strong():
        net = getattr(trt, "NetworkDefinitionCreationFlag", None)
        if not always_strong and not hasattr(net, "STRONGLY_TYPED"):
            raise SSFDeployError(f"TensorRT {vs} has neither the precision builder flags nor "
                                 f"NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        p.strongly_typed = True

    if qdq == "fp8":
        p.name, p.quantization = "fp8", "explicit"
        strong()
    elif qdq == "int8":
        p.name, p.quantization = "int8", "explicit"
        if has_flag(trt, "INT8"):            # 10.x: the INT8 flag enables Q/DQ processing
            p.builder_flags.append("INT8")
            if fp16:
                p.builder_flags.append("FP16")
                p.fp16 = True
        else:
            if fp16:
                raise SSFDeployError(f"--fp16 with an INT8 Q/DQ ONNX is not available in "
                                     f"TensorRT {vs}: BuilderFlag.FP16 was removed in 11.0 and "
                                     f"strongly typed builds take precision from the ONNX")
            strong()
    elif calibrate:
        missing = [n for n, ok in (("BuilderFlag.INT8", has_flag(trt, "INT8")),
                                   ("IInt8EntropyCalibrator2",
                                    hasattr(trt, "IInt8EntropyCalibrator2"))) if not ok]
        if missing:
            raise SSFDeployError(f"INT8 calibration (--calib) is not available in TensorRT {vs}: "
                                 f"{' and '.join(missing)} were removed in 11.0 (deprecated since "
                                 f"10.1); quantize the ONNX to Q/DQ (ssf-deploy quantize) and "
                                 f"build that")
        p.name, p.quantization = "int8", "calibrated"
        p.strongly_typed = False
        p.builder_flags.append("INT8")
        if fp16:
            if not has_flag(trt, "FP16"):
                raise SSFDeployError(f"--fp16 with --calib: TensorRT {vs} has no "
                                     f"BuilderFlag.FP16")
            p.builder_flags.append("FP16")
            p.fp16 = True
    elif fp16:
        p.name, p.fp16 = "fp16", True
        if has_flag(trt, "FP16"):            # 10.x (deprecated since 10.12, works to 10.x end)
            p.builder_flags.append("FP16")
        else:                                # 11.x: fp16 lives in the graph
            strong()
            p.fp16_onnx = True
    else:
        p.name = "tf32" if tf32 else "fp32"
    return p


def fp16_onnx(data: bytes) -> bytes:
    """The ONNX with float tensors converted to fp16 and fp32 inputs/outputs kept.

    onnxruntime's maintained fork of onnxconverter-common's converter
    (``onnxruntime.transformers.float16.convert_float_to_float16``, shipped in the onnxruntime
    wheel, no download) with ``keep_io_types=True``: Cast nodes at the graph's edges, so the
    engine's I/O stay fp32. Names of the converted initializers are unchanged (refit by name).
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except Exception as e:
        raise SSFDeployError(f"the fp16 conversion needs onnxruntime's float16 converter "
                             f"(onnxruntime.transformers.float16): {first_line(e)}") from None
    try:
        proto = convert_float_to_float16(onnx.load_from_string(data), keep_io_types=True)
    except Exception as e:
        raise SSFDeployError(f"converting the ONNX to fp16 failed: {first_line(e)}") from None
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------------
# calibration data


def image_files(folder: str) -> list:
    # followlinks: class folders are often symlinks (the main job's own data split is)
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder, followlinks=True)
                  for f in fs if f.lower().endswith(IMAGE_EXTS))


def eval_transform(arch: str, chw: tuple):
    """timm's eval transform for ``arch`` at the ONNX input's size (no weights, no download)."""
    from timm.data import create_transform, resolve_data_config

    from .models import create_base_model
    try:
        with torch.device("meta"):
            model = create_base_model(arch, 2)
    except SSFDeployError:
        raise
    except Exception as e:
        raise SSFDeployError(f"cannot build timm model '{arch}' for its data config: "
                             f"{first_line(e)}") from None
    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = tuple(int(v) for v in chw)
    return create_transform(**cfg, is_training=False)


class CalibrationImages:
    """Batches of images from ``folder`` through the model's eval transform (timm), lazily:
    INT8 calibration data, and real inputs for ``engine --inputs DIR``.

    ``batch_size`` images per batch; a last partial batch is dropped (TensorRT calibrates with a
    fixed batch). At most ``limit`` images are used.
    """

    def __init__(self, folder: str, arch: str, chw: tuple, batch_size: int,
                 limit: int = CALIB_MAX_IMAGES, transform=None):
        if not os.path.isdir(folder):
            raise UsageError(f"{folder} is not a folder of images")
        files = image_files(folder)[: max(1, int(limit))]
        if not files:
            raise UsageError(f"no images ({'/'.join(IMAGE_EXTS)}) found under {folder}")
        if len(files) < batch_size:
            raise UsageError(f"{folder} has {len(files)} image(s), fewer than one batch of "
                             f"{batch_size}")
        self.folder, self.arch, self.chw = folder, arch, tuple(chw)
        self.batch_size = int(batch_size)
        self.files = files[: len(files) // self.batch_size * self.batch_size]
        self.transform = transform or eval_transform(arch, chw)

    def __len__(self) -> int:
        return len(self.files) // self.batch_size

    def __iter__(self):
        from PIL import Image
        for i in range(0, len(self.files), self.batch_size):
            batch = []
            for f in self.files[i:i + self.batch_size]:
                try:
                    with Image.open(f) as img:
                        batch.append(self.transform(img.convert("RGB")))
                except OSError as e:
                    raise SSFDeployError(f"cannot read image {f}: {first_line(e)}") from None
            yield torch.stack(batch).float()


@dataclass
class Calibration:
    """Implicit INT8 calibration: images (or None to rely on ``cache``) and a cache file.

    After the build, ``cache_out`` holds the calibration table TensorRT produced (written to
    ``cache`` by the caller once the engine passed its check) and ``info`` what happened.
    """
    images: Optional[CalibrationImages] = None
    cache: Optional[str] = None
    batch_size: int = 8
    cache_out: Optional[bytes] = None
    info: dict = field(default_factory=dict)


def make_calibrator(trt, calib: Calibration, device: Optional[torch.device] = None):
    """An ``IInt8EntropyCalibrator2`` feeding ``calib.images`` as torch CUDA tensors.

    Binding contract (pyInt8.cpp): ``get_batch(names)`` returns device pointers or None when
    done, ``read_calibration_cache()`` bytes or None, ``write_calibration_cache(memoryview)``;
    exceptions raised inside are only printed by TensorRT, so they are kept and re-raised after
    the build.
    """
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise SSFDeployError(f"TensorRT {_ver(trt)} has no IInt8EntropyCalibrator2 (removed in "
                             f"11.0): quantize the ONNX to Q/DQ and build that")
    dev = device or torch.device("cuda")

    class EntropyCalibrator(base):
        def __init__(self):
            base.__init__(self)
            self.error = None
            self.batches = 0
            self.cache_read = False
            self._iter = None
            self._keep = None

        def get_batch_size(self):
            # deprecated since 10.0 (implicit batch only): with explicit batch the calibration
            # profile fixes the batch; 1 as Polygraphy's calibrator returns by default
            return 1

        def get_batch(self, names):
            try:
                if calib.images is None:
                    raise SSFDeployError(f"TensorRT could not use the calibration cache "
                                         f"{calib.cache} and no --calib DIR was given")
                if self._iter is None:
                    self._iter = iter(calib.images)
                x = next(self._iter, None)
                if x is None:
                    return None
                self._keep = x.to(dev).contiguous()   # alive until the next call
                self.batches += 1
                return [int(self._keep.data_ptr())] * max(1, len(names))
            except Exception as e:
                self.error = e
                return None

        def read_calibration_cache(self):
            if calib.cache and os.path.isfile(calib.cache):
                with open(calib.cache, "rb") as f:
                    data = f.read()
                if data:
                    self.cache_read = True
                    return data
            return None

        def write_calibration_cache(self, cache):
            calib.cache_out = bytes(cache)

    return EntropyCalibrator()


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
    tf32: bool = False             # allow TF32 for fp32 layers (TensorRT's default; off here)
    int8: bool = False             # Q/DQ ONNX, or calibration (needs ``calibration``)
    fp8: bool = False              # FP8 Q/DQ ONNX
    calibration: Optional[Calibration] = None
    device: object = None          # None/"cuda" (current), "cuda:N", N or torch.device


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


def _attach_timing_cache(trt, config, path: str) -> tuple:
    """(cache, {"path", "status", "message"}); a cache TensorRT refuses is replaced by a new one."""
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    status, cache = ("reused" if blob else "new"), None
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception:
            cache = None
        if cache is None:
            status = "unreadable"
        elif not config.set_timing_cache(cache, False):
            status, cache = "mismatch", None
    if cache is None:
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise SSFDeployError("TensorRT could not create an empty timing cache")
    message = {
        "new": f"timing cache {path}: new",
        "reused": f"timing cache {path}: reused",
        "mismatch": f"timing cache {path} was made on another GPU or TensorRT version: started a "
                    f"fresh one (it replaces the file after this build)",
        "unreadable": f"timing cache {path} cannot be read by TensorRT {_ver(trt)} (corrupt or "
                      f"from another version): started a fresh one (it replaces the file after "
                      f"this build)",
    }[status]
    return cache, {"path": path, "status": status, "message": message}


def build_engine(onnx_data: bytes, opts: BuildOptions, settings: dict, *, source: str = "the model",
                 trt=None, qdq: Optional[str] = None) -> tuple[bytes, dict, Optional[bytes]]:
    """Parse + build; returns (serialized engine, info, serialized timing cache or None).

    ``qdq`` is the ONNX's explicit quantization (``qdq_info(proto)['kind']``); it is read from
    ``onnx_data`` when not given. ``info['precision']`` says how the precision was obtained.
    """
    trt = trt or import_tensorrt()
    if opts.workspace_gb <= 0:
        raise SSFDeployError("--workspace-gb must be > 0")
    if qdq is None:
        try:
            proto = onnx.load_from_string(bytes(onnx_data))
        except Exception:         # not ONNX: TensorRT's parser will say so in its own words
            proto = None
        if proto is not None:
            info_q = qdq_info(proto)
            check_qdq_supported(info_q, source)
            qdq = info_q["kind"]
    calibrate = opts.calibration is not None
    prec = plan_precision(trt, fp16=opts.fp16, tf32=opts.tf32, int8=opts.int8, fp8=opts.fp8,
                          calibrate=calibrate, qdq=qdq)
    if opts.refittable and prec.name in QUANTIZED:
        raise SSFDeployError(f"--refittable with an {prec.name.upper()} engine: {REFIT_WHY}")
    device = cuda_device(opts.device) if opts.device is not None else None
    mn, op, mx = resolve_batches(settings, opts.min_batch, opts.opt_batch, opts.max_batch)
    if prec.fp16_onnx:
        onnx_data = fp16_onnx(onnx_data)
    with device_scope(device):
        logger = make_logger(trt, opts.verbose)
        builder = trt.Builder(logger)
        flags = 0
        v = trt_version(trt)
        if prec.strongly_typed and not (v is not None and v[0] >= 11):   # ignored from 11 on
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_data):
            raise SSFDeployError(f"TensorRT's ONNX parser rejected {source}: "
                                 f"{parser_errors(parser)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(opts.workspace_gb * (1 << 30)))
        for name in prec.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        if has_flag(trt, "TF32"):
            if prec.tf32:
                config.set_flag(trt.BuilderFlag.TF32)
            else:
                config.clear_flag(trt.BuilderFlag.TF32)
        if opts.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        profile, dynamic = None, []
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise SSFDeployError(f"input '{tensor.name}' {shape} has dynamic dimensions "
                                     f"beyond the batch: export with a fixed image size")
            if shape and shape[0] < 0:
                profile = profile or builder.create_optimization_profile()
                rest = shape[1:]
                profile.set_shape(tensor.name, (mn, *rest), (op, *rest), (mx, *rest))
                dynamic.append((tensor.name, rest))
        if profile is not None:
            config.add_optimization_profile(profile)
        calibrator = None
        if calibrate:
            calib = opts.calibration
            calibrator = make_calibrator(trt, calib, device)
            config.int8_calibrator = calibrator
            if dynamic:   # "must be set ... for a network with runtime dimensions" (NvInfer.h)
                cprof = builder.create_optimization_profile()
                b = int(calib.batch_size)
                for name, rest in dynamic:
                    cprof.set_shape(name, (b, *rest), (b, *rest), (b, *rest))
                if not config.set_calibration_profile(cprof):
                    raise SSFDeployError(f"TensorRT refused the calibration profile (batch {b})")
        cache, cache_info = None, None
        if opts.timing_cache:
            cache, cache_info = _attach_timing_cache(trt, config, opts.timing_cache)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if calibrator is not None and calibrator.error is not None:
            err = calibrator.error
            raise SSFDeployError(str(err) if isinstance(err, SSFDeployError) else
                                 f"INT8 calibration failed: {first_line(err)}") from None
        if plan is None:
            raise SSFDeployError(f"TensorRT could not build an engine from {source}"
                                 f"{_last_error(logger) or ' (see the TensorRT log above)'}; try "
                                 f"a larger --workspace-gb or --verbose")
        cache_bytes = None
        if cache is not None:
            cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    info = {"build_seconds": round(seconds, 3), "precision": prec.as_dict(),
            "precision_text": prec.describe(), "fp16": prec.fp16,
            "refittable": opts.refittable, "workspace_gb": opts.workspace_gb,
            "batch": {"min": mn, "opt": op, "max": mx}, "layers": int(network.num_layers),
            "tensorrt": _ver(trt), "device": str(device) if device is not None else "cuda"}
    if cache_info is not None:
        info["timing_cache"] = cache_info
    if calibrator is not None:
        calib = opts.calibration
        calib.info = {"batch_size": int(calib.batch_size), "batches": calibrator.batches,
                      "images": calibrator.batches * int(calib.batch_size),
                      "folder": calib.images.folder if calib.images is not None else None,
                      "cache": calib.cache, "cache_read": calibrator.cache_read}
        info["calibration"] = calib.info
    return bytes(memoryview(plan)), info, cache_bytes


def tolerances(precision: Precision | str, reference: list, atol=None, rtol=None) -> tuple:
    """(atol, rtol, why) for comparing an engine of ``precision`` with its onnxruntime reference.

    * fp32 (TF32 off): 1e-4 / 1e-3, the fp32 policy of ``verify``;
    * tf32, fp16: 2e-2 / 2e-2 (10-bit mantissas: TF32 rounds GEMM inputs like fp16 does);
    * int8 against onnxruntime running the *same* Q/DQ graph: both use the same scales, so they
      differ only where a value sits on a rounding boundary and by accumulation order: atol = 4
      quantization steps of the output range (4 * max|ref| / 127, about 3 %), rtol 2e-2;
    * int8 calibrated, against the fp32 ONNX: quantization noise itself is measured, atol = 8
      steps (about 6 % of the output range), rtol 5e-2;
    * fp8 (e4m3, 3 mantissa bits): atol = max|ref| / 16, rtol 1/16.

    Top-1 agreement is reported with every comparison. Explicit ``atol``/``rtol`` win.
    """
    from .verify import resolve_tolerances
    p = precision if isinstance(precision, Precision) else Precision(name=str(precision))
    peak = max((float(np.max(np.abs(r))) for r in reference if np.size(r)), default=0.0)
    if p.name in ("fp32", "tf32", "fp16"):
        a, r = resolve_tolerances(None, None, p.name != "fp32")
        why = "fp32" if p.name == "fp32" else f"{p.name}: 10-bit mantissas"
    elif p.name == "int8" and p.quantization != "calibrated":
        a, r = 4 * peak / 127, 2e-2
        why = "int8 vs the same Q/DQ graph: 4 quantization steps of the output range"
    elif p.name == "int8":
        a, r = 8 * peak / 127, 5e-2
        why = "calibrated int8 vs fp32: 8 quantization steps of the output range"
    else:
        a, r = peak / 16, 1 / 16
        why = "fp8 e4m3: one step of 2^-4 of the output range"
    a, r = resolve_tolerances(a if atol is None else atol, r if rtol is None else rtol)
    if atol is not None or rtol is not None:
        why = "given"
    return a, r, why


# --------------------------------------------------------------------------------------------
# run


def deserialize(data: bytes, trt=None, logger=None, device=None):
    trt = trt or import_tensorrt()
    dev = cuda_device(device) if device is not None else None
    with device_scope(dev):
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
    """Run a TensorRT engine as a callable on torch tensors (like ``OrtRunner``), on ``device``.

    ``device``: ``None``/``"cuda"`` (the current CUDA device), ``"cuda:N"``, ``N`` or a
    torch.device; deserialization, context, buffers and stream all live on it.
    """

    def __init__(self, engine, label: str = "TensorRT", runtime=None, device=None, logger=None):
        self.trt = import_tensorrt()
        self.device = cuda_device(device)
        with device_scope(self.device):
            if isinstance(engine, (bytes, bytearray, memoryview)):
                engine, runtime = deserialize(engine, self.trt, logger, self.device)
            self.stream = torch.cuda.Stream(device=self.device)
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
        self._bound = None

    def profile(self) -> tuple:
        try:
            return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        except Exception:
            return ()

    # device memory (two seams, so the binding logic can be exercised without a GPU)
    def _to_device(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(self.device, dtype=dtype).contiguous()

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _bind(self, x: torch.Tensor):
        with device_scope(self.device):
            if self.context is None:
                self.context = self.engine.create_execution_context()
                if self.context is None:
                    raise SSFDeployError("TensorRT could not create an execution context "
                                         "(GPU memory?)")
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):      # buffers belong to the engine's stream
                x = self._to_device(x, self.dtypes[self.input])
                if not self.context.set_input_shape(self.input, tuple(x.shape)):
                    raise SSFDeployError(f"input shape {tuple(x.shape)} is outside the engine's "
                                         f"profile (min, opt, max) = {self.profile()}")
                self.context.set_tensor_address(self.input, x.data_ptr())
                outs = {}
                for name in self.outputs:
                    shape = tuple(self.context.get_tensor_shape(name))
                    t = self._empty(shape, self.dtypes[name])
                    self.context.set_tensor_address(name, t.data_ptr())
                    outs[name] = t
        self._bound = (x, outs)          # keep the buffers alive while TensorRT uses them
        return outs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise SSFDeployError("TensorRT execution failed (execute_async_v3 returned False)")

    def __call__(self, x: torch.Tensor):
        outs = self._bind(x)
        with device_scope(self.device):
            self._enqueue()
            self.stream.synchronize()
        return [outs[n].float().cpu() for n in self.outputs]

    def latency(self, x: torch.Tensor, warmup: int = 10, iters: int = 50) -> dict:
        """Median/mean/p90 milliseconds per batch from CUDA events on the engine's stream."""
        self._bind(x)
        times = []
        with device_scope(self.device):
            for _ in range(max(0, warmup)):
                self._enqueue()
            self.stream.synchronize()
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
                "warmup": warmup, "iters": len(times), "device": str(self.device),
                "images_per_s": round(1000.0 * int(x.shape[0]) / med, 1) if med > 0 else None}


# --------------------------------------------------------------------------------------------
# refit


def _np_dtype(trt, dt):
    try:
        return np.dtype(trt.nptype(dt))
    except (TypeError, AttributeError):
        return None


def refit_engine(engine, weights_for, *, onnx_fallback=None, trt=None, logger=None,
                 device=None) -> dict:
    """Refit ``engine`` in place with a task's weights, by name.

    ``weights_for(names) -> {name: ndarray}`` gets the engine's refittable weight names (the
    ONNX parser names them after the ONNX initializers) and returns the task's values, cast to
    the dtype of the engine's copy (``Refitter.get_weights_prototype``: fp16 for an engine built
    from an fp16 ONNX). Names it cannot resolve (left out of the dict) are TensorRT-internal;
    then ``onnx_fallback() -> bytes`` (the ONNX holding the task's weights) is refitted through
    ``OnnxParserRefitter`` instead, which maps the weights itself. Times set + refit with
    ``time.perf_counter``.
    """
    trt = trt or import_tensorrt()
    if not getattr(engine, "refittable", True):
        raise SSFDeployError("the engine was built without --refittable: rebuild it with "
                             "ssf-deploy engine --refittable")
    dev = cuda_device(device) if device is not None else None
    with device_scope(dev):
        return _refit(trt, engine, weights_for, onnx_fallback, logger or make_logger(trt))


def _refit(trt, engine, weights_for, onnx_fallback, logger) -> dict:
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
        prototype = getattr(refitter, "get_weights_prototype", None)
        t0 = time.perf_counter()
        for name in names:
            arr = np.ascontiguousarray(values[name])
            if prototype is not None:
                want = _np_dtype(trt, prototype(name).dtype)
                if want is not None and arr.dtype != want:
                    arr = np.ascontiguousarray(arr.astype(want))
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
        raise SSFDeployError(f"TensorRT refit_cuda_engine() failed{_last_error(logger)}")
    seconds = time.perf_counter() - t0
    return {"refit_seconds": round(seconds, 4), "weights": len(names), "method": how,
            "unnamed_weights": len(unknown)}


def sidecar_precision(side: dict) -> Precision:
    """The precision an engine was built with, from its sidecar.

    Sidecars from before precision was recorded hold only ``fp16``; those fp32 engines were
    built with TensorRT's default TF32 on.
    """
    rec = side.get("precision")
    if isinstance(rec, dict):
        known = {k: v for k, v in rec.items() if k in Precision.__dataclass_fields__}
        return Precision(**known)
    if side.get("fp16"):
        return Precision(name="fp16", fp16=True, builder_flags=["FP16"], tf32=True)
    return Precision(name="tf32", tf32=True)


def refuse_quantized_refit(side: dict, proto: Optional[onnx.ModelProto] = None,
                           source: str = "the engine") -> None:
    """One line when an INT8/FP8 engine (sidecar) or a Q/DQ graph would be refitted."""
    name = sidecar_precision(side).name if side else None
    kind = qdq_info(proto)["kind"] if proto is not None else None
    if name in QUANTIZED or kind:
        what = (name or kind).upper()
        raise SSFDeployError(f"cannot refit {source} ({what}): {REFIT_WHY}")


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
    check_manifest(path)     # a sidecar of another build next to this engine is refused
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SSFDeployError(f"corrupt engine sidecar {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def write_plan(plan: str, data: bytes, sidecar: dict) -> None:
    """Engine and its sidecar JSON as one set (neither exists if one fails; a manifest of both
    is written last, see :class:`~ssf_deploy.fileio.OutputSet`)."""
    with OutputSet() as outs:
        with open(outs.add(plan), "wb") as f:
            f.write(data)
        with open(outs.add(sidecar_path(plan)), "w") as f:
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
