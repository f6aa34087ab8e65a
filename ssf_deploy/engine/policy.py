"""Our precision policy for TensorRT, as plain functions: no TensorRT object is touched here, so
all of it is tested on the CPU; :mod:`.build` hands the results to Polygraphy.

What TensorRT 10.x and 11.x differ in, checked against the Python bindings of the NVIDIA/TensorRT
repository (``python/src/infer/pyCore.cpp``, ``pyInt8.cpp`` and ``python/docstrings/infer/`` at
the 10.0, 10.16 and 11.1 releases) and NVIDIA's 10.x -> 11.x migration guide:

* ``BuilderFlag.TF32`` is "enabled by default" in both: fp32 engines clear it unless asked
  (otherwise an "fp32" engine multiplies with 10-bit mantissas and fails an fp32 comparison);
  Polygraphy's ``CreateConfig(tf32=False)`` clears it.
* ``BuilderFlag.FP16`` / ``INT8`` / ``FP8`` were deprecated in 10.12 and are gone in 11, with
  ``int8_calibrator`` and the ``IInt8Calibrator`` classes (deprecated since 10.1). 11 builds every
  network strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is ignored there). So:

  - fp16: 10.x sets ``BuilderFlag.FP16`` on a weakly typed network; where the flag is missing
    (11.x) the ONNX is converted to fp16 (:func:`fp16_onnx`, fp32 I/O kept) and built strongly
    typed;
  - explicit INT8 (Q/DQ nodes, TensorRT's recommended route): 10.x sets ``BuilderFlag.INT8`` on a
    weakly typed network (as Polygraphy 10.x does for Q/DQ networks); 11.x builds it strongly
    typed;
  - implicit INT8 with a calibrator (``IInt8EntropyCalibrator2``): 10.x only;
  - FP8: only from FP8 Q/DQ nodes, strongly typed, on GPUs of compute capability 8.9 or newer.

* Refit: SSF changes exactly the weights and biases of a graph, and TensorRT 11.3 documents that
  ``BuilderFlag.REFIT`` may drop a GEMM bias (treated as zero, not exposed to refit). A
  refittable engine is therefore compared with onnxruntime right after the build and after every
  refit, and :func:`unexposed_biases` names the biases its refitter does not list.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from ..errors import SSFDeployError, UsageError, first_line
from .trt import has_flag, trt_version, version_text

__all__ = ["QUANTIZED", "REFIT_WHY", "FP8_MIN_CAPABILITY", "qdq_info", "check_qdq_supported",
           "Precision", "check_precision_request", "plan_precision", "network_args",
           "config_args", "batch_profile", "input_profiles", "check_capability", "fp16_onnx",
           "tolerances", "sidecar_precision", "refuse_quantized_refit", "gemm_biases",
           "unexposed_biases"]

QUANTIZED = ("int8", "fp8")
REFIT_WHY = ("scales depend on the task's weights: quantize after the swap, then build (refit "
             "the ONNX with the task, quantize that ONNX, build its engine)")
FP8_MIN_CAPABILITY = (8, 9)        # Ada / Hopper and newer have FP8 tensor cores


# --------------------------------------------------------------------------------------------
# Q/DQ graphs


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
    if hasattr(T, "FLOAT4E2M1"):
        names[T.FLOAT4E2M1] = "fp4"
    types, asym = set(), []
    for n in nodes:
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        dtype = None
        if zp and zp in tensors:
            t = tensors[zp]
            dtype = t.data_type
            if names.get(dtype) != "fp8":   # numpy holds no fp8: an fp8 zero point is 0 by spec
                arr = onnx.numpy_helper.to_array(t)
                if np.any(np.asarray(arr, dtype=np.float64) != 0):
                    asym.append(n.name or n.output[0])
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


# --------------------------------------------------------------------------------------------
# precision


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
        raise UsageError("`int8` and `fp8` exclude each other")
    if calibrate and not int8:
        raise UsageError("`calib`/`calib_cache` calibrate INT8: add `int8`")
    if qdq and calibrate:
        raise UsageError(f"the ONNX is already quantized ({qdq.upper()} Q/DQ nodes): `calib` is "
                         f"for a float ONNX; build the Q/DQ ONNX without it")
    if qdq == "int8" and fp8:
        raise UsageError("`fp8` needs FP8 Q/DQ nodes, and the ONNX holds INT8 Q/DQ nodes")
    if qdq == "fp8" and int8:
        raise UsageError("`int8` given, but the ONNX holds FP8 Q/DQ nodes (drop `int8`)")
    if fp8 and not qdq:
        raise UsageError("`fp8`: TensorRT builds FP8 only from FP8 Q/DQ nodes (explicit "
                         "quantization; TensorRT 10 and 11 have no FP8 calibration): quantize the "
                         "ONNX to FP8 Q/DQ first")
    if int8 and not qdq and not calibrate:
        raise UsageError("`int8` needs an explicitly quantized ONNX (QuantizeLinear/"
                         "DequantizeLinear nodes, e.g. from quantize_onnx(target='tensorrt')) "
                         "or `calib` DIR")
    if qdq == "fp8" and fp16:
        raise UsageError("`fp16` with an FP8 Q/DQ ONNX: the build is strongly typed and takes "
                         "its precision from the ONNX; drop `fp16`")
    if refittable and (int8 or fp8 or qdq):
        raise UsageError(f"`refittable` with an INT8/FP8 engine: {REFIT_WHY}")


def plan_precision(trt, *, fp16=False, tf32=False, int8=False, fp8=False, calibrate=False,
                   qdq: Optional[str] = None) -> Precision:
    """The route to the requested precision on this TensorRT (10.x or 11.x), or one line naming
    the version where it is unavailable. ``trt`` needs only ``__version__``, ``BuilderFlag``,
    ``NetworkDefinitionCreationFlag`` and ``IInt8EntropyCalibrator2`` as attributes."""
    check_precision_request(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibrate=calibrate, qdq=qdq)
    v, vs = trt_version(trt), version_text(trt)
    always_strong = v is not None and v[0] >= 11
    p = Precision(tf32=tf32, strongly_typed=always_strong)
    if tf32 and not has_flag(trt, "TF32"):
        raise SSFDeployError(f"`tf32`: TensorRT {vs} has no BuilderFlag.TF32")

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
                raise SSFDeployError(f"`fp16` with an INT8 Q/DQ ONNX is not available in "
                                     f"TensorRT {vs}: BuilderFlag.FP16 was removed in 11.0 and "
                                     f"strongly typed builds take precision from the ONNX")
            strong()
    elif calibrate:
        missing = [n for n, ok in (("BuilderFlag.INT8", has_flag(trt, "INT8")),
                                   ("IInt8EntropyCalibrator2",
                                    hasattr(trt, "IInt8EntropyCalibrator2"))) if not ok]
        if missing:
            raise SSFDeployError(f"INT8 calibration (`calib`) is not available in TensorRT {vs}: "
                                 f"{' and '.join(missing)} were removed in 11.0 (deprecated since "
                                 f"10.1); quantize the ONNX to Q/DQ (quantize_onnx, target "
                                 f"'tensorrt') and build that")
        p.name, p.quantization = "int8", "calibrated"
        p.strongly_typed = False
        p.builder_flags.append("INT8")
        if fp16:
            if not has_flag(trt, "FP16"):
                raise SSFDeployError(f"`fp16` with `calib`: TensorRT {vs} has no "
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


def network_args(prec: Precision, trt) -> dict:
    """Keyword arguments of Polygraphy's ``network_from_onnx_bytes``: strongly typed where the
    precision needs it and the flag still means something (before 11, where every network is)."""
    v = trt_version(trt)
    return {"strongly_typed": bool(prec.strongly_typed and not (v is not None and v[0] >= 11))}


def config_args(prec: Precision, *, workspace_bytes: int, refittable: bool, profiles: list,
                calibrator=None, workspace_pool=None) -> dict:
    """Keyword arguments of Polygraphy's ``CreateConfig``: the builder flags of :class:`Precision`
    (``tf32=False`` clears TensorRT's default TF32), the workspace pool limit (``workspace_pool``:
    ``trt.MemoryPoolType.WORKSPACE``), REFIT, the optimization profiles and the calibrator."""
    if workspace_bytes <= 0:
        raise UsageError("`workspace_gb` must be > 0")
    args = {"tf32": bool(prec.tf32), "fp16": "FP16" in prec.builder_flags,
            "int8": "INT8" in prec.builder_flags, "refittable": bool(refittable),
            "profiles": list(profiles)}
    if workspace_pool is not None:
        args["memory_pool_limits"] = {workspace_pool: int(workspace_bytes)}
    if calibrator is not None:
        if prec.quantization != "calibrated":
            raise UsageError("a calibrator is for calibrated INT8 only (`int8` with `calib`)")
        args["calibrator"] = calibrator
    return args


def check_capability(capability: tuple, device_name: str, prec_name: str) -> None:
    """FP8 engines need compute capability 8.9 or newer."""
    if prec_name == "fp8" and tuple(capability) < FP8_MIN_CAPABILITY:
        raise SSFDeployError(f"FP8 engines need a GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper); {device_name} is {capability[0]}.{capability[1]}")


# --------------------------------------------------------------------------------------------
# optimization profiles: every input by name


def batch_profile(static_batch: Optional[int] = None, min_batch=None, opt_batch=None,
                  max_batch=None) -> tuple:
    """(min, opt, max) batch: the static batch of the graph, or the requested profile of a
    dynamic one (defaults 1 / 8 / 32)."""
    if static_batch is not None:
        given = {b for b in (min_batch, opt_batch, max_batch) if b is not None}
        if given and given != {int(static_batch)}:
            raise SSFDeployError(f"the ONNX input has a static batch of {static_batch}: re-export "
                                 f"it with a dynamic batch to use `min_batch`/`opt_batch`/"
                                 f"`max_batch`")
        return (int(static_batch),) * 3
    mx = max_batch or max(32, opt_batch or 0, min_batch or 0)
    mn = min_batch or 1
    op = opt_batch or min(max(mn, 8), mx)
    if not (1 <= mn <= op <= mx):
        raise SSFDeployError(f"need 1 <= `min_batch` <= `opt_batch` <= `max_batch`, got "
                             f"{mn}/{op}/{mx}")
    return mn, op, mx


def _triple(name: str, given) -> tuple:
    """A shape or a (min, opt, max) triple of shapes, as a triple."""
    given = tuple(given)
    if given and all(isinstance(g, (tuple, list)) for g in given):
        if len(given) != 3:
            raise UsageError(f"`shapes['{name}']` must be one shape or (min, opt, max) shapes")
        return tuple(tuple(int(v) for v in g) for g in given)
    s = tuple(int(v) for v in given)
    return s, s, s


def input_profiles(specs: Sequence, *, min_batch=None, opt_batch=None, max_batch=None,
                   shapes: Optional[Mapping] = None) -> dict:
    """``{input name: (min, opt, max) shape}`` for every graph input (``specs``: see
    :func:`ssf_deploy.runtime.graph_inputs`).

    Inputs whose only open dimension is the batch share one batch profile
    (:func:`batch_profile`): ``images`` (B, 3, H, W) and a ``task`` (B,) index move together.
    ``shapes`` gives any input its own shape or (min, opt, max) triple by name; an input with
    other open dimensions must be named there.
    """
    shapes = dict(shapes or {})
    unknown = [n for n in shapes if n not in {s.name for s in specs}]
    if unknown:
        raise UsageError(f"`shapes` names no input of the graph: {', '.join(unknown)} (inputs: "
                         f"{', '.join(s.name for s in specs)})")
    batched = [s for s in specs if s.name not in shapes and s.shape and s.shape[0] is None]
    statics = {s.shape[0] for s in specs if s.name not in shapes and s.shape
               and s.shape[0] is not None}
    static = next(iter(statics)) if not batched and len(statics) == 1 else None
    batch = batch_profile(static, min_batch, opt_batch, max_batch) if (batched or static) \
        else None
    out = {}
    for s in specs:
        if s.name in shapes:
            tri = _triple(s.name, shapes[s.name])
            for shape in tri:
                if len(shape) != len(s.shape) or any(d is not None and d != v
                                                     for d, v in zip(s.shape, shape)):
                    raise UsageError(f"`shapes['{s.name}']` {shape} does not fit input "
                                     f"{s.describe()}")
            if any(not (a <= b <= c) for a, b, c in zip(*tri)):
                raise UsageError(f"`shapes['{s.name}']` needs min <= opt <= max in every "
                                 f"dimension, got {tri}")
            out[s.name] = tri
            continue
        if any(d is None for d in s.shape[1:]):
            raise SSFDeployError(f"input {s.describe()} has dynamic dimensions beyond the batch: "
                                 f"export with a fixed image size, or give its `shapes`")
        if not s.shape:
            out[s.name] = ((), (), ())
        elif s.shape[0] is None:
            rest = tuple(s.shape[1:])
            out[s.name] = tuple((b, *rest) for b in batch)
        else:
            out[s.name] = (tuple(s.shape),) * 3
    return out


# --------------------------------------------------------------------------------------------
# fp16 graph (TensorRT 11)


def fp16_onnx(data: bytes) -> bytes:
    """The ONNX with float tensors converted to fp16 and fp32 inputs/outputs kept.

    onnxruntime's maintained fork of onnxconverter-common's converter
    (``onnxruntime.transformers.float16.convert_float_to_float16``, shipped in the onnxruntime
    wheel, no download) with ``keep_io_types=True``: Cast nodes at the graph's edges, so the
    engine's I/O stay fp32. Names of the converted initializers are unchanged (refit by name).
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise SSFDeployError(f"the fp16 conversion needs onnxruntime's float16 converter "
                             f"(onnxruntime.transformers.float16): {first_line(e)}") from e
    try:
        proto = convert_float_to_float16(onnx.load_from_string(data), keep_io_types=True)
    except Exception as e:   # the converter raises whatever its graph walk meets
        raise SSFDeployError(f"converting the ONNX to fp16 failed: {first_line(e)}") from e
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------------
# comparison


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
    from ..verify import resolve_tolerances
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
# refit


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


def gemm_biases(proto: onnx.ModelProto) -> list:
    """Initializer names that are biases of a matrix product: ``Gemm``'s C, and the constant of
    an ``Add`` fed by a ``MatMul`` (how exporters write Linear layers)."""
    inits = {i.name for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for n in proto.graph.node:
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits:
            out.append(n.input[2])
        elif n.op_type == "Add" and len(n.input) == 2:
            for mine, other in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                src = producer.get(other)
                if mine in inits and src is not None and src.op_type == "MatMul":
                    out.append(mine)
    return list(dict.fromkeys(out))


def unexposed_biases(proto: onnx.ModelProto, refittable: Sequence[str]) -> Optional[list]:
    """The matrix-product biases of ``proto`` a refitter does not list (``refittable``: its
    ``get_all_weights()``): TensorRT 11.3's documented REFIT issue drops such a bias (treated as
    zero) and refit cannot change it. ``None`` when the refitter also lists names that are not
    the graph's (TensorRT-internal): then the names say nothing and only the comparison does."""
    names = set(refittable)
    graph = {i.name for i in proto.graph.initializer} | {
        n.output[0] for n in proto.graph.node if n.op_type == "Constant" and n.output}
    if names - graph:
        return None
    return [b for b in gemm_biases(proto) if b not in names]
