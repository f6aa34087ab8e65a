"""Static INT8 post-training quantization with onnxruntime, checked before anything is written.

A fused SSF model *is* the base graph, so the standard onnxruntime recipe applies unchanged:
``quant_pre_process`` (shape inference + basic graph optimisation) -> ``quantize_static`` in QDQ
format with per-channel weights, calibrated on images taken through the model's own eval
transform (``timm.data.resolve_data_config`` + ``create_transform`` for the timm architecture
recorded in the ONNX metadata ``ssf_deploy.arch``, at the ONNX input size).

The result is checked against the fp32 model before it is written: top-1 agreement on held-out
images (never the calibration images), top-1 on labelled validation data when given, the largest
logit error, and int8 vs fp32 latency measured side by side in one process (interleaved runs,
median). :func:`quantize_onnx` raises :class:`~ssf_deploy.errors.VerificationError` (carrying the
report) when agreement is below ``min_agreement``; nothing is written then.

Default recipe (U8 activations, S8 per-channel weights, MinMax, nothing excluded) was chosen by
measurement; see ``benchmarks/quantize/README.md``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import SSFDeployError, UsageError, VerificationError, first_line
from .fileio import atomic_path
from .runtime import (data_config, eval_transform, graph_inputs, image_files, interleaved,
                      load_images, load_onnx, ort_session)

__all__ = ["QuantizeConfig", "QuantizeReport", "quantize_onnx", "measure_latency", "runtime_graph",
           "image_sets", "eval_transform", "data_config", "onnx_arch", "cpu_has_vnni", "CALIBRATION_METHODS", "TARGETS",
           "QUANT_TYPES",
           "META_ARCH", "META_QUANT"]

META_ARCH = "ssf_deploy.arch"          # written by export_onnx(metadata={"arch": ...})
META_QUANT = "ssf_deploy.quantize"     # the recipe, recorded in the int8 model
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("u8", "s8")
TARGETS = ("onnxruntime", "tensorrt")

Progress = Optional[Callable[[str], None]]


@dataclass
class QuantizeConfig:
    """The recipe and the checks. Percentages are in percent (``min_agreement=99`` = 99 %)."""
    calib: str = "builtin"                 # DIR (train/ + val/, or a folder of images) | builtin
    val: Optional[str] = None              # labelled ImageFolder DIR | builtin | None
    method: str = "minmax"                 # calibration: minmax | entropy | percentile
    target: str = "onnxruntime"            # onnxruntime | tensorrt (signed symmetric, float bias)
    activation_type: Optional[str] = None  # u8 | s8; None: u8 for onnxruntime, s8 for tensorrt
    weight_type: str = "s8"                # u8 | s8
    per_channel: bool = True
    reduce_range: Optional[bool] = None    # 7-bit weights; None: when this CPU lacks VNNI
    exclude_nodes: Sequence[str] = ()      # node names kept in float
    exclude_op_types: Sequence[str] = ()   # op types kept in float (e.g. Softmax)
    op_types: Sequence[str] = ()           # quantize only these op types (default: all onnxruntime can)
    keep_float: int = 0                    # keep the N most sensitive nodes in float (measured)
    percentile: float = 99.999             # for method="percentile"
    calib_images: int = 64
    eval_images: int = 256                 # held-out images for agreement (at most)
    val_images: Optional[int] = None       # labelled images (at most; None: all)
    min_agreement: float = 99.0            # percent; the gate
    arch: Optional[str] = None             # timm arch when the ONNX does not record one
    image_size: Optional[int] = None       # when the ONNX input size is dynamic
    latency_runs: int = 50                 # 0: no latency measurement
    latency_warmup: int = 5
    latency_batch: int = 1
    threads: Optional[int] = None          # onnxruntime intra-op threads (None: its default)
    seed: int = 0

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"unknown calibration method {self.method!r}; choose from "
                             f"{', '.join(CALIBRATION_METHODS)}")
        if self.target not in TARGETS:
            raise UsageError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        for name in ("activation_type", "weight_type"):
            v = getattr(self, name)
            if v is not None and v not in QUANT_TYPES:
                raise UsageError(f"`{name}` must be one of {', '.join(QUANT_TYPES)}, got {v!r}")
            if self.target == "tensorrt" and v == "u8":
                raise UsageError(f"`{name}` u8 cannot be built by TensorRT (signed symmetric "
                                 f"INT8 only): drop it or use `target` onnxruntime")
        if self.target == "tensorrt" and self.reduce_range:
            raise UsageError("`reduce_range` is an onnxruntime CPU workaround; TensorRT takes "
                             "full 8-bit weights (drop it with `target` tensorrt)")
        if not 0 <= self.min_agreement <= 100:
            raise UsageError(f"`min_agreement` is a percentage in [0, 100], got "
                             f"{self.min_agreement:g}")
        if 0 < self.min_agreement <= 1:
            raise UsageError(f"`min_agreement` is a percentage (e.g. 99), got "
                             f"{self.min_agreement:g}")
        if self.calib_images < 1 or self.eval_images < 1:
            raise UsageError("`calib_images` and `eval_images` must be >= 1")
        if self.val_images is not None and self.val_images < 1:
            raise UsageError("`val_images` must be >= 1")
        if self.latency_runs < 0 or self.latency_warmup < 0 or self.latency_batch < 1:
            raise UsageError("`latency_runs`/`latency_warmup` must be >= 0, `latency_batch` >= 1")
        if not 0 < self.percentile <= 100:
            raise UsageError(f"`percentile` must be in (0, 100], got {self.percentile:g}")
        if self.keep_float < 0:
            raise UsageError(f"`keep_float` must be >= 0, got {self.keep_float}")
        if self.threads is not None and self.threads < 1:
            raise UsageError("`threads` must be >= 1")

    def resolved_reduce_range(self) -> bool:
        if self.target == "tensorrt":
            return False
        if self.reduce_range is not None:
            return bool(self.reduce_range)
        return cpu_has_vnni() is False      # unknown CPU: onnxruntime's default (full 8 bits)

    def resolved_activation_type(self) -> str:
        return self.activation_type or ("s8" if self.target == "tensorrt" else "u8")

    def extra_options(self) -> dict:
        """onnxruntime ``extra_options`` the target needs beyond the calibration ones."""
        if self.target != "tensorrt":
            return {}
        # TensorRT builds explicit Q/DQ only when zero points are 0 and biases stay float
        return {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}

    def recipe(self) -> dict:
        r = {"format": "QDQ", "preprocess": "quant_pre_process",
             "target": self.target, "activation_type": self.resolved_activation_type(),
             "weight_type": self.weight_type, **self.extra_options(),
             "per_channel": self.per_channel, "reduce_range": self.resolved_reduce_range(),
             "cpu_vnni": cpu_has_vnni(),        # None: /proc/cpuinfo unreadable
             "calibration": self.method,
             "op_types": list(self.op_types) or "all",
             "exclude_nodes": list(self.exclude_nodes),
             "exclude_op_types": list(self.exclude_op_types)}
        if self.method == "percentile":
            r["percentile"] = self.percentile
        if self.keep_float:
            r["keep_float"] = self.keep_float
        return r


@dataclass
class QuantizeReport:
    """What quantization did and found; ``str()`` is the human report, ``as_dict()`` the JSON."""
    source: str
    arch: str
    input_size: list
    recipe: dict
    min_agreement: float
    calibration: dict = field(default_factory=dict)   # source, images
    holdout: dict = field(default_factory=dict)       # source, images, agreement, logit errors
    val: Optional[dict] = None                        # source, images, top-1 fp32/int8, drop
    latency: Optional[dict] = None
    nodes: dict = field(default_factory=dict)
    written: Optional[str] = None
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    failure: str = ""

    @property
    def agreement(self) -> float:
        """The gated agreement (percent): the lowest of held-out and validation agreement."""
        values = [self.holdout["agreement"]] if self.holdout else []
        if self.val:
            values.append(self.val["agreement"])
        return min(values) if values else 0.0

    @property
    def passed(self) -> bool:
        return not self.failure and bool(self.holdout) and self.agreement >= self.min_agreement

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(passed=self.passed, agreement=self.agreement, error=self.failure or None)
        d.pop("failure")
        return d

    def __str__(self) -> str:
        r = self.recipe
        bits = "7-bit (reduce_range) " if r.get("reduce_range") else ""
        excl = ", ".join(r["exclude_op_types"] + r["exclude_nodes"]
                         + [f"{n} (measured)" for n in r.get("kept_float_nodes", [])]) or "nothing"
        lines = [f"INT8 {self.arch} {self.input_size[1]}x{self.input_size[2]} from {self.source}: "
                 f"{r['format']}, {r['activation_type'].upper()} activations / "
                 f"{bits}{r['weight_type'].upper()} weights "
                 f"{'per channel' if r['per_channel'] else 'per tensor'}, {r['calibration']} "
                 f"calibration on {self.calibration.get('images', 0)} images "
                 f"({self.calibration.get('source', '?')}), kept in float: {excl}"]
        if self.nodes:
            n = self.nodes
            lines.append(f"  nodes: fp32 {n['fp32']}, int8 QDQ {n['int8']} ({n['quantize_linear']} "
                         f"QuantizeLinear, {n['dequantize_linear']} DequantizeLinear); as "
                         f"onnxruntime runs them: fp32 {n['runtime_fp32']}, int8 "
                         f"{n['runtime_int8']} = {n['int8_kernels']} int8 kernels + "
                         f"{n['conversions']} Q/DQ conversions + {n['float_ops']} float ops")
        if self.holdout:
            h = self.holdout
            lines.append(f"  held-out ({h['images']} images, {h['source']}): top-1 agreement "
                         f"{h['agreement']:.2f}%, max |logit error| {h['max_abs_logit_error']:.3g} "
                         f"(fp32 logits up to {h['max_abs_fp32_logit']:.3g}), mean "
                         f"{h['mean_abs_logit_error']:.3g}, logit SQNR {h['logit_sqnr_db']:.1f} dB"
                         + (f" (QDQ simulated in float: {h['qdq_simulated_sqnr_db']:.1f} dB)"
                            if "qdq_simulated_sqnr_db" in h else ""))
        if self.val:
            v = self.val
            lines.append(f"  val ({v['images']} labelled images, {v['source']}): top-1 fp32 "
                         f"{v['top1_fp32']:.2f}%, int8 {v['top1_int8']:.2f}% "
                         f"(drop {v['top1_drop']:+.2f} pt), agreement {v['agreement']:.2f}%")
        if self.latency:
            t = self.latency
            threads = f"{t['threads']} thread(s)" if isinstance(t["threads"], int) \
                else "default threads"
            lines.append(f"  latency (onnxruntime CPU, batch {t['batch']}, {threads}, "
                         f"{t['runs']} interleaved runs, median): fp32 "
                         f"{t['fp32_ms']:.2f} ms, int8 {t['int8_ms']:.2f} ms -> "
                         f"{t['ratio']:.2f}x")
        lines += [f"  note: {n}" for n in self.notes]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"  agreement {self.agreement:.2f}% vs --min-agreement "
                     f"{self.min_agreement:g}%: {verdict}")
        if self.written:
            lines.append(f"wrote int8 model: {self.written}")
        if self.failure:
            lines.append(f"FAIL: {self.failure}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the CPU

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8")


def cpu_has_vnni() -> Optional[bool]:
    """Whether this x86 CPU has a VNNI dot-product instruction (Linux ``/proc/cpuinfo`` flags);
    None when the flags cannot be read (the recipe then keeps onnxruntime's default and says so).

    Without it onnxruntime's u8 x s8 kernels (AVX2 ``vpmaddubsw``) add pairs of products in
    16 bits and can saturate with full 8-bit weights; 7-bit weights (``reduce_range``) avoid it.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & set(_VNNI_FLAGS))
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the model

def _load(source) -> tuple:
    proto = load_onnx(source)
    return proto, ("<ModelProto>" if hasattr(source, "SerializeToString") else os.fspath(source))


def onnx_arch(proto, override: Optional[str] = None) -> str:
    """The timm architecture the ONNX was exported from (its ``ssf_deploy.arch`` metadata)."""
    if override:
        return override
    meta = {p.key: p.value for p in proto.metadata_props}
    arch = meta.get(META_ARCH, "")
    if not arch:
        raise UsageError("the ONNX model records no timm architecture (metadata "
                         f"'{META_ARCH}', written by fuse/export): give its timm name, `arch` ARCH")
    return arch


def _input_spec(proto, image_size: Optional[int]) -> tuple[str, object, tuple]:
    """(input name, batch dim (int or None), (C, H, W)) of the model's single image input."""
    specs = graph_inputs(proto)
    if len(specs) != 1:
        raise UsageError(f"expected one image input, the model has {len(specs)}")
    spec = specs[0]
    if len(spec.shape) != 4:
        raise UsageError(f"expected an NCHW image input, got rank {len(spec.shape)}")
    c, h, w = spec.shape[1:]
    if image_size:
        if h is not None and h != image_size:
            raise UsageError(f"the model's input is {h}x{w}, not `image_size` {image_size}")
        h = w = image_size
    if c is None or h is None or w is None:
        raise UsageError("the model's input size is dynamic: give `image_size`")
    return spec.name, spec.shape[0], (c, h, w)


# ----------------------------------------------------------------------------- images

def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=True)
                  and not e.name.startswith("."))


def _builtin() -> str:
    from .data import builtin_dataset
    return builtin_dataset()


def _subset(files: list, n: Optional[int], seed: int, salt: int) -> list:
    if n is None or len(files) <= n:
        return list(files)
    rng = np.random.RandomState([seed, salt])
    return sorted(files[i] for i in rng.choice(len(files), n, replace=False))


def image_sets(cfg: QuantizeConfig) -> dict:
    """Calibration, held-out and (optional) labelled validation file lists.

    ``calib``: ``builtin`` or a DIR with ``train/`` and ``val/`` -> calibrate on train, hold out
    val; any other DIR -> its images split by a seeded shuffle (calibration first, the rest held
    out). ``val``: ``builtin`` (its val split) or an ImageFolder DIR (``DIR/<class>/<image>`` or
    ``DIR/val/<class>/<image>``); labels are the sorted class folder names' indices.
    """
    spec = cfg.calib
    if spec == "builtin":
        root = _builtin()
        pool, held = image_files(os.path.join(root, "train")), \
            image_files(os.path.join(root, "val"))
        calib_src, held_src = "builtin train split", "builtin val split"
    else:
        if not spec or not os.path.isdir(spec):
            raise UsageError(f"`calib` must be a folder of images or 'builtin': {spec!r} is "
                             f"neither")
        if os.path.isdir(os.path.join(spec, "train")) and os.path.isdir(os.path.join(spec, "val")):
            pool = image_files(os.path.join(spec, "train"))
            held = image_files(os.path.join(spec, "val"))
            calib_src, held_src = f"{spec}/train", f"{spec}/val"
        else:
            files = image_files(spec)
            if len(files) < 2:
                raise UsageError(f"`calib` {spec}: need at least 2 images (calibration and "
                                 f"held-out), found {len(files)}")
            order = np.random.RandomState([cfg.seed, 1]).permutation(len(files))
            n_cal = min(cfg.calib_images, len(files) - 1)
            pool = sorted(files[i] for i in order[:n_cal])
            held = sorted(files[i] for i in order[n_cal:])
            calib_src, held_src = f"{spec} (seeded split)", f"{spec} (seeded split, rest)"
    if not pool:
        raise UsageError(f"no calibration images found in {calib_src}")
    if not held:
        raise UsageError(f"no held-out images found in {held_src}")
    out = {"calib": _subset(pool, cfg.calib_images, cfg.seed, 2), "calib_source": calib_src,
           "holdout": _subset(held, cfg.eval_images, cfg.seed, 3), "holdout_source": held_src,
           "val": None, "val_labels": None, "val_source": None, "classes": None}
    if cfg.val:
        if cfg.val == "builtin":
            vroot, vsrc = os.path.join(_builtin(), "val"), "builtin val split"
        else:
            if not os.path.isdir(cfg.val):
                raise UsageError(f"`val` must be an ImageFolder folder or 'builtin': "
                                 f"{cfg.val!r} is neither")
            sub = os.path.join(cfg.val, "val")
            vroot = sub if os.path.isdir(sub) and _class_dirs(sub) else cfg.val
            vsrc = vroot
        classes = _class_dirs(vroot)
        if not classes:
            raise UsageError(f"`val` {vroot} has no class folders (expected <class>/<image>)")
        labelled = [(f, i) for i, c in enumerate(classes)
                    for f in image_files(os.path.join(vroot, c))]
        if not labelled:
            raise UsageError(f"no images found under {vroot}")
        labelled = _subset(labelled, cfg.val_images, cfg.seed, 4)
        real = {os.path.realpath(f) for f in out["calib"]}
        overlap = sum(os.path.realpath(f) in real for f, _ in labelled)
        if overlap:
            raise UsageError(f"{overlap} validation image(s) are also calibration images: give "
                             f"`val` a split separate from `calib`")
        out.update(val=[f for f, _ in labelled], val_labels=np.array([y for _, y in labelled]),
                   val_source=vsrc, classes=classes)
    return out


def _load_images(files: Sequence[str], transform) -> np.ndarray:
    return load_images(files, transform).numpy()


def _batches(x: np.ndarray, batch, dynamic_size: int = 32) -> list[tuple[np.ndarray, int]]:
    """``(batch, valid rows)``; a fixed batch size is padded by repeating the last image."""
    size = batch if isinstance(batch, int) and batch > 0 else dynamic_size
    out = []
    for i in range(0, len(x), size):
        b = x[i:i + size]
        n = len(b)
        if isinstance(batch, int) and batch > 0 and n < size:
            b = np.concatenate([b, np.repeat(b[-1:], size - n, axis=0)])
        out.append((np.ascontiguousarray(b), n))
    return out


# ----------------------------------------------------------------------------- onnxruntime

def _session(model, threads: Optional[int] = None, level: str = "all"):
    """A CPU session as quantize measures them: no spin-waiting after a run (with several
    sessions timed in turn, one session's spinning threads would steal the cores the next one
    runs on; measured: +60 % on ViT-S/16, 2 cores)."""
    return ort_session(model, providers=["CPUExecutionProvider"], threads=threads,
                       optimization=level, spinning=False)


def _logits(session, x: np.ndarray, batch) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: b})[0][:n] for b, n in _batches(x, batch)]
    return np.concatenate(outs).reshape(len(x), -1).astype(np.float64)


def measure_latency(sessions: dict, x: np.ndarray, *, runs: int = 50, warmup: int = 5) -> dict:
    """Median milliseconds per ``session.run`` of each session on ``x``, measured interleaved
    (:func:`ssf_deploy.runtime.interleaved`: drift in machine load affects all alike)."""
    runs_ = {k: (lambda s=s, feed={s.get_inputs()[0].name: x}: s.run(None, feed))
             for k, s in sessions.items()}
    out = {}
    for k, t in interleaved(runs_, runs, warmup=warmup).items():
        summary = t.summary(digits=6)
        out[k] = {"median_ms": summary["median_ms"], "min_ms": summary["min_ms"],
                  "mean_ms": summary["mean_ms"]}
    return out


CALIB_BATCH = 4     # images per calibration run (dynamic-batch models)


class _Reader:
    """``CalibrationDataReader`` over preprocessed images, one small batch at a time.

    ``__len__``/``set_range`` let ``quantize_static`` calibrate in strides
    (``CalibStridedMinMax``, honoured by every calibrator): each stride's intermediate tensors
    are reduced to ranges/histograms and freed, so memory is one batch's activations (a ViT-S/16
    keeps ~150 MB per image), not the whole calibration set's.
    """

    def __init__(self, name: str, x: np.ndarray, batch):
        fixed = isinstance(batch, int) and batch > 0
        self._items = [{name: b} for b, _ in _batches(x, batch if fixed else None, CALIB_BATCH)]
        self._lo, self._hi, self._i = 0, len(self._items), 0

    def __len__(self):
        return len(self._items)

    def set_range(self, start_index: int, end_index: int):
        self._lo, self._hi = start_index, min(end_index, len(self._items))
        self._i = self._lo

    def get_next(self):
        if self._i >= self._hi:
            return None
        self._i += 1
        return self._items[self._i - 1]


@contextlib.contextmanager
def _quiet_ort_logging():
    """onnxruntime.quantization logs through ``logging``, warnings and ``print`` (the histogram
    calibrators): keep stdout clean (``--json``) and stderr to our own messages."""
    import io
    import warnings
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_INT8_KERNELS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize",
                 "QAttention", "QEmbedLayerNormalization")


def runtime_graph(model, threads: Optional[int] = None) -> dict:
    """The graph onnxruntime's CPU provider actually runs (after its QDQ fusions).

    Saved at the EXTENDED level, where DequantizeLinear -> op -> QuantizeLinear groups become
    int8 kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...); what is left as
    Quantize/DequantizeLinear are conversions between int8 and float regions.
    """
    import onnx
    with tempfile.TemporaryDirectory(prefix="ssf-ortopt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        ort_session(model, providers=["CPUExecutionProvider"], threads=threads,
                    optimization="extended", optimized_path=path)
        nodes = list(onnx.load(path).graph.node)
    ops: dict = {}
    for n in nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    int8 = {k: v for k, v in ops.items() if k.startswith(_INT8_KERNELS)}
    convert = {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")}
    return {"nodes": len(nodes), "int8_kernels": sum(int8.values()),
            "conversions": sum(convert.values()),
            "float_ops": len(nodes) - sum(int8.values()) - sum(convert.values()),
            "int8_ops": dict(sorted(int8.items())), "ops": dict(sorted(ops.items()))}


def _node_stats(fp32, int8, threads: Optional[int] = None) -> dict:
    nodes = list(int8.graph.node)
    rt32, rt8 = runtime_graph(fp32, threads), runtime_graph(int8, threads)
    return {"fp32": len(fp32.graph.node), "int8": len(nodes),
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in nodes),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in nodes),
            "runtime_fp32": rt32["nodes"], "runtime_int8": rt8["nodes"],
            "int8_kernels": rt8["int8_kernels"], "conversions": rt8["conversions"],
            "float_ops": rt8["float_ops"], "int8_ops": rt8["int8_ops"],
            "runtime_float_op_types": {k: v for k, v in rt8["ops"].items()
                                       if k not in rt8["int8_ops"]
                                       and k not in ("QuantizeLinear", "DequantizeLinear")}}


def _float_inputs(qproto, excluded: set) -> int:
    """Feed excluded nodes the float tensor instead of its QuantizeLinear->DequantizeLinear copy.

    ``quantize_static`` leaves an excluded node unquantized but still quantizes the tensors it
    shares with quantized neighbours (a MatMul's output is quantized whoever reads it), and
    onnxruntime then fuses DequantizeLinear -> node -> QuantizeLinear into an int8 kernel anyway
    (an "excluded" Softmax still runs as QLinearSoftmax). Bypassing the activation Q/DQ pair on
    the node's inputs makes it compute in float on exact inputs; its outputs are still quantized
    where a quantized consumer needs them. Returns the number of inputs rewired.
    """
    nodes = list(qproto.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    inits = {i.name for i in qproto.graph.initializer}
    rewired = 0
    for n in nodes:
        if n.name not in excluded:
            continue
        for k, name in enumerate(n.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            n.input[k] = q.input[0]
            rewired += 1
    # drop Q/DQ nodes nobody reads any more (graph outputs count as readers)
    while True:
        used = {i for n in qproto.graph.node for i in n.input} | \
            {o.name for o in qproto.graph.output}
        dead = [n for n in qproto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return rewired
        for n in dead:
            qproto.graph.node.remove(n)


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of the logits in dB (row-centred: argmax-relevant)."""
    ref = ref - ref.mean(1, keepdims=True)
    noise = (got - got.mean(1, keepdims=True)) - ref
    return float(10 * np.log10(max((ref ** 2).sum(), 1e-30) / max((noise ** 2).sum(), 1e-30)))


SENSITIVITY_OPS = ("Conv", "Gemm", "MatMul")


def _keep_float_search(pre, excluded: list, keep: int, quantized, base, fp32, x_cal, batch,
                       threads, say) -> tuple[list, dict]:
    """The ``keep`` nodes whose quantization hurts most, measured leave-one-out.

    Every Conv/Gemm/MatMul is in turn kept in float (calibration reused) and the int8 model's
    logit SQNR against fp32 is measured on the *calibration* images, so the held-out and
    validation checks stay unbiased. The ``keep`` nodes whose exclusion gains most are chosen.
    """
    ref = _logits(fp32, x_cal, batch)
    base_db = _sqnr_db(ref, _logits(_session(base, threads), x_cal, batch))
    gains = {}
    candidates = [n.name for n in pre.graph.node
                  if n.op_type in SENSITIVITY_OPS and n.name and n.name not in excluded]
    for i, name in enumerate(candidates):
        q, _ = quantized(sorted(set(excluded) | {name}))
        gains[name] = _sqnr_db(ref, _logits(_session(q, threads), x_cal, batch)) - base_db
        if (i + 1) % 10 == 0:
            say(f"  sensitivity: {i + 1}/{len(candidates)} nodes")
    ranked = sorted(gains, key=lambda n: -gains[n])
    chosen = [n for n in ranked[:keep] if gains[n] > 0]
    return chosen, {"metric": "logit SQNR gain (dB) on the calibration images when kept in float",
                    "base_sqnr_db": base_db, "candidates": len(candidates),
                    "top": {n: gains[n] for n in ranked[:max(keep, 5)]}}


def _check_exclusions(proto, cfg: QuantizeConfig) -> None:
    """Names and op types to exclude must exist in the model the user gave (checked up front)."""
    names = {n.name for n in proto.graph.node}
    unknown = [n for n in cfg.exclude_nodes if n not in names]
    if unknown:
        raise UsageError(f"no node named {unknown[0]!r} in the model"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    ops = {n.op_type for n in proto.graph.node}
    missing = [t for t in tuple(cfg.exclude_op_types) + tuple(cfg.op_types) if t not in ops]
    if missing:
        raise UsageError(f"no {missing[0]} node in the model (op types present: "
                         f"{', '.join(sorted(ops))})")


def _resolve_exclusions(pre, cfg: QuantizeConfig) -> list[str]:
    """Node names to exclude in the pre-processed graph (what ``quantize_static`` sees)."""
    names = {n.name for n in pre.graph.node}
    gone = [n for n in cfg.exclude_nodes if n not in names]
    if gone:
        raise UsageError(f"node {gone[0]!r} was merged into another node by quant_pre_process; "
                         f"exclude the node it became (see the pre-processed graph) instead")
    excl = set(cfg.exclude_op_types)
    return sorted(set(cfg.exclude_nodes) | {n.name for n in pre.graph.node if n.op_type in excl})


# ----------------------------------------------------------------------------- the pipeline

def quantize_onnx(model, out: Optional[str] = None, config: Optional[QuantizeConfig] = None,
                  *, progress: Progress = None, **overrides) -> QuantizeReport:
    """Quantize an fp32 ONNX classifier to INT8, check it, write ``out`` only if it passes.

    ``model`` is a path or ``onnx.ModelProto``; ``config`` (or keyword overrides of its fields)
    gives the recipe and the checks. Returns the report; raises :class:`VerificationError` with
    ``.report`` when agreement is below ``config.min_agreement`` (nothing written), and
    :class:`UsageError`/:class:`CheckpointError` for bad input.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    cfg = QuantizeConfig(**{**asdict(config or QuantizeConfig()), **overrides})
    cfg.validate()
    say = progress or (lambda msg: None)
    t_all = time.perf_counter()
    proto, source = _load(model)
    arch = onnx_arch(proto, cfg.arch)
    input_name, batch_dim, chw = _input_spec(proto, cfg.image_size)
    if chw[0] != 3:
        raise UsageError(f"expected a 3-channel image input, the model takes {chw[0]} channels")
    transform = eval_transform(arch, chw=chw)
    _check_exclusions(proto, cfg)
    report = QuantizeReport(source=source, arch=arch, input_size=list(chw), recipe=cfg.recipe(),
                            min_agreement=cfg.min_agreement)
    seconds = report.seconds

    @contextlib.contextmanager
    def stage(name):
        t0 = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - t0, 3)
        say(f"{name}: {seconds[name]:.1f} s")

    with stage("images"):
        sets = image_sets(cfg)
        x_cal = _load_images(sets["calib"], transform)
        # held-out and validation images are evaluated once, even where the two sets overlap
        files = list(sets["holdout"])
        index = {f: i for i, f in enumerate(files)}
        for f in sets["val"] or ():
            if f not in index:
                index[f] = len(files)
                files.append(f)
        x_eval = _load_images(files, transform)
    report.calibration = {"source": sets["calib_source"], "images": len(x_cal)}

    fp32 = _session(proto, cfg.threads)
    n_out = fp32.get_outputs()[0].shape[-1]
    if sets["classes"] and isinstance(n_out, int) and len(sets["classes"]) > n_out:
        raise UsageError(f"`val` has {len(sets['classes'])} classes but the model outputs "
                         f"{n_out} logits")

    with tempfile.TemporaryDirectory(prefix="ssf-quantize-") as tmp:
        src = os.path.join(tmp, "fp32.onnx")
        pre_path = os.path.join(tmp, "pre.onnx")
        q_path = os.path.join(tmp, "int8.onnx")
        onnx.save(proto, src)
        with stage("quant_pre_process"), _quiet_ort_logging():
            try:
                quant_pre_process(src, pre_path)
            except Exception as e:
                raise SSFDeployError(f"quant_pre_process failed: {first_line(e)}") from e
        pre = onnx.load(pre_path)
        exclude = _resolve_exclusions(pre, cfg)
        extra = {"CalibStridedMinMax": 1,      # calibrate batch by batch (see _Reader)
                 **cfg.extra_options()}
        if cfg.method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[cfg.method]
        calib_cache = os.path.join(tmp, "calibration.json")

        def quantized(excluded: list):
            """The QDQ model with ``excluded`` in float; calibration runs once, then is cached."""
            with _quiet_ort_logging():
                try:
                    quantize_static(pre_path, q_path, _Reader(input_name, x_cal, batch_dim),
                                    quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                                    reduce_range=cfg.resolved_reduce_range(),
                                    activation_type=qtype[cfg.resolved_activation_type()],
                                    weight_type=qtype[cfg.weight_type],
                                    nodes_to_exclude=excluded or None, calibrate_method=method,
                                    op_types_to_quantize=list(cfg.op_types) or None,
                                    extra_options=extra, calibration_cache_path=calib_cache)
                except Exception as e:
                    raise SSFDeployError(f"onnxruntime quantize_static failed: "
                                         f"{first_line(e)}") from e
            q = onnx.load(q_path)
            return q, _float_inputs(q, set(excluded))

        with stage("calibrate + quantize_static"):
            qproto, rewired = quantized(exclude)
        if cfg.keep_float:
            with stage("sensitivity search"):
                chosen, sensitivity = _keep_float_search(
                    pre, exclude, cfg.keep_float, quantized, qproto,
                    fp32, x_cal, batch_dim, cfg.threads, say)
            report.recipe["kept_float_nodes"] = chosen
            report.recipe["sensitivity"] = sensitivity
            exclude = sorted(set(exclude) | set(chosen))
            qproto, rewired = quantized(exclude)
    report.recipe["excluded_nodes_resolved"] = len(exclude)
    report.recipe["excluded_inputs_kept_float"] = rewired
    try:
        onnx.checker.check_model(qproto)
    except Exception as e:
        raise SSFDeployError(f"onnx.checker rejected the int8 model: {first_line(e)}") from e
    report.nodes = _node_stats(proto, qproto, cfg.threads)
    del qproto.metadata_props[:]
    for p in proto.metadata_props:
        if p.key != META_QUANT:
            qproto.metadata_props.add(key=p.key, value=p.value)
    qproto.metadata_props.add(key=META_QUANT, value=json.dumps(
        dict(report.recipe, calibration_images=len(x_cal), calibration_source=sets["calib_source"])))
    int8 = _session(qproto, cfg.threads)

    with stage("check"):
        a, b = _logits(fp32, x_eval, batch_dim), _logits(int8, x_eval, batch_dim)
        held = [index[f] for f in sets["holdout"]]
        ha, hb = a[held], b[held]
        err = np.abs(ha - hb)
        report.holdout = {"source": sets["holdout_source"], "images": len(held),
                          "agreement": 100.0 * float((ha.argmax(1) == hb.argmax(1)).mean()),
                          "max_abs_logit_error": float(err.max()),
                          "mean_abs_logit_error": float(err.mean()),
                          "max_abs_fp32_logit": float(np.abs(ha).max()),
                          "logit_sqnr_db": _sqnr_db(ha, hb)}
        # the same QDQ model with no graph optimisation: DequantizeLinear -> float op, i.e. the
        # quantization grid without onnxruntime's int8 kernels. A kernel SQNR far below this
        # one is the kernels' own error (16-bit saturation on CPUs without VNNI)
        sim = _logits(_session(qproto, cfg.threads, level="disable"), x_eval[held], batch_dim)
        report.holdout["qdq_simulated_sqnr_db"] = _sqnr_db(ha, sim)
        loss = report.holdout["qdq_simulated_sqnr_db"] - report.holdout["logit_sqnr_db"]
        if loss > 6:
            report.notes.append(
                f"onnxruntime's int8 kernels lose {loss:.0f} dB of logit SQNR against the same "
                f"QDQ model simulated in float: saturation"
                + ("" if report.recipe["reduce_range"] else "; try --reduce-range (7-bit "
                   "weights), which avoids it on CPUs without VNNI"))
        if sets["val"]:
            y = sets["val_labels"]
            rows = [index[f] for f in sets["val"]]
            va, vb = a[rows], b[rows]
            t32 = 100.0 * float((va.argmax(1) == y).mean())
            t8 = 100.0 * float((vb.argmax(1) == y).mean())
            report.val = {"source": sets["val_source"], "images": len(rows),
                          "classes": len(sets["classes"]), "top1_fp32": t32, "top1_int8": t8,
                          "top1_drop": t32 - t8,
                          "agreement": 100.0 * float((va.argmax(1) == vb.argmax(1)).mean()),
                          "max_abs_logit_error": float(np.abs(va - vb).max())}
    if cfg.latency_runs:
        with stage("latency"):
            batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 \
                else cfg.latency_batch
            x = np.ascontiguousarray(np.resize(x_eval[held], (batch,) + x_eval.shape[1:]))
            lat = measure_latency({"fp32": fp32, "int8": int8}, x, runs=cfg.latency_runs,
                                  warmup=cfg.latency_warmup)
            report.latency = {"batch": batch, "runs": cfg.latency_runs,
                              "warmup": cfg.latency_warmup,
                              "threads": cfg.threads or "onnxruntime default",
                              "method": "interleaved session.run, median",
                              "fp32_ms": lat["fp32"]["median_ms"],
                              "int8_ms": lat["int8"]["median_ms"],
                              "ratio": lat["int8"]["median_ms"] / lat["fp32"]["median_ms"],
                              "detail": lat}
    seconds["total"] = round(time.perf_counter() - t_all, 3)
    if not report.passed:
        report.failure = (f"int8 top-1 agreement with fp32 {report.agreement:.2f}% is below "
                          f"`min_agreement` {cfg.min_agreement:g}%")
        raise VerificationError(report.failure, report)
    if out:
        with atomic_path(out) as tmp:
            onnx.save(qproto, tmp)
        report.written = os.fspath(out)
    return report
