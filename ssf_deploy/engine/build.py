"""Build a TensorRT engine from ONNX through Polygraphy, with our precision policy.

Polygraphy does the TensorRT plumbing: ``network_from_onnx_bytes`` (builder, network, ONNX
parser), ``CreateConfig`` (profiles, precision flags, workspace, REFIT, calibrator),
``Calibrator`` (``IInt8EntropyCalibrator2`` fed from a data loader) and
``engine_bytes_from_network``. What stays ours: the arguments (:mod:`.policy`), the timing cache
(attached through ``PostprocessConfig`` so a cache from another GPU is reported and replaced, and
written by the caller only once the engine passed its check) and the calibration profile at the
calibration batch. Every input is addressed by name: one image input, or several (``images``
plus a ``task`` index) with their own shapes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from ..errors import SSFDeployError, UsageError
from ..runtime import graph_inputs, load_onnx
from .policy import (QUANTIZED, REFIT_WHY, check_qdq_supported, config_args,
                     fp16_onnx, input_profiles, network_args, plan_precision, qdq_info)
from .trt import (cuda_device, device_scope, import_polygraphy, import_tensorrt,
                  polygraphy_scope, version_text)

__all__ = ["BuildOptions", "Calibration", "BuiltEngine", "build_engine", "attach_timing_cache"]


@dataclass
class Calibration:
    """Implicit INT8 calibration (TensorRT 10 only): ``data`` yields batches, each a tensor for
    the image input or ``{input name: tensor}``; ``cache`` is a calibration cache file, read when
    present (``data`` may then be None). ``batch_size`` is the batch of every calibration step."""
    data: Optional[Iterable] = None
    cache: Optional[str] = None
    batch_size: int = 8
    folder: Optional[str] = None          # where the images came from (reported)


@dataclass
class BuildOptions:
    fp16: bool = False
    tf32: bool = False             # allow TF32 for fp32 layers (TensorRT's default; off here)
    int8: bool = False             # Q/DQ ONNX, or calibration (needs ``calibration``)
    fp8: bool = False              # FP8 Q/DQ ONNX
    workspace_gb: float = 4.0
    min_batch: Optional[int] = None
    opt_batch: Optional[int] = None
    max_batch: Optional[int] = None
    shapes: dict = field(default_factory=dict)   # input name -> shape or (min, opt, max)
    refittable: bool = False
    timing_cache: Optional[str] = None
    calibration: Optional[Calibration] = None
    verbose: bool = False
    device: object = None          # None/"cuda" (current), "cuda:N", N or torch.device


@dataclass
class BuiltEngine:
    """A serialized engine and what its build did (``info``: precision, profiles, seconds ...)."""
    plan: bytes
    info: dict
    timing_cache: Optional[bytes] = None       # to be written once the engine passed its check
    calibration_cache: Optional[bytes] = None  # likewise (a fresh calibration only)


def attach_timing_cache(trt, config, path: str) -> tuple:
    """(cache, {"path", "status", "message"}); a cache TensorRT refuses is replaced by a new one.

    ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache
    made on another device; ``create_timing_cache`` may return None (or raise) for a blob it
    cannot read. Either way the build starts a fresh cache and says so.
    """
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    status, cache = ("reused" if blob else "new"), None
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except (RuntimeError, TypeError, ValueError):   # the bindings' ways of saying "corrupt"
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
        "unreadable": f"timing cache {path} cannot be read by TensorRT {version_text(trt)} "
                      f"(corrupt or from another version): started a fresh one (it replaces the "
                      f"file after this build)",
    }[status]
    return cache, {"path": path, "status": status, "message": message}


class _Feed:
    """Polygraphy's calibrator data loader over our batches. Anything raised while reading them
    (an unreadable image) would only be printed by TensorRT: it is kept and raised after the
    build instead."""

    def __init__(self, calib: Calibration, image_input: str):
        self.calib, self.image_input, self.error, self.batches = calib, image_input, None, 0

    def __iter__(self):
        if self.calib.data is None:
            self.error = SSFDeployError(f"TensorRT could not use the calibration cache "
                                        f"{self.calib.cache} and no `calib` DIR was given")
            return
        try:
            for b in self.calib.data:
                self.batches += 1
                yield dict(b) if isinstance(b, Mapping) else {self.image_input: b}
        except Exception as e:   # noqa: BLE001 - kept, and raised after the build
            self.error = e


def _profile(poly, profiles: dict):
    p = poly.Profile()
    for name, (mn, op, mx) in profiles.items():
        p.add(name, min=mn, opt=op, max=mx)
    return p


def build_engine(onnx_model, opts: Optional[BuildOptions] = None, *, source: str = "the model",
                 qdq: Optional[str] = None, trt=None) -> BuiltEngine:
    """Parse + build ``onnx_model`` (a path, bytes or ModelProto) with ``opts``.

    ``qdq`` is the ONNX's explicit quantization (``qdq_info(proto)['kind']``), read from the
    graph when not given. ``info['precision']`` says how the precision was obtained,
    ``info['profiles']`` the (min, opt, max) shape of every input by name.
    """
    opts = opts or BuildOptions()
    proto = load_onnx(onnx_model)
    if qdq is None:
        q = qdq_info(proto)
        check_qdq_supported(q, source)
        qdq = q["kind"]
    calibrate = opts.calibration is not None
    specs = graph_inputs(proto)
    profiles = input_profiles(specs, min_batch=opts.min_batch, opt_batch=opts.opt_batch,
                              max_batch=opts.max_batch, shapes=opts.shapes)
    trt = trt or import_tensorrt()
    poly = import_polygraphy()
    prec = plan_precision(trt, fp16=opts.fp16, tf32=opts.tf32, int8=opts.int8, fp8=opts.fp8,
                          calibrate=calibrate, qdq=qdq)
    if opts.refittable and prec.name in QUANTIZED:
        raise UsageError(f"`refittable` with an {prec.name.upper()} engine: {REFIT_WHY}")
    device = cuda_device(opts.device) if opts.device is not None else None
    data = proto.SerializeToString()
    if prec.fp16_onnx:
        data = fp16_onnx(data)
    with tempfile.TemporaryDirectory(prefix="ssf-engine-") as tmp, device_scope(device):
        with polygraphy_scope(f"TensorRT's ONNX parser rejected {source}", verbose=opts.verbose):
            network = poly.network_from_onnx_bytes(data, **network_args(prec, trt))
        feed = calibrator = None
        if calibrate:
            calib = opts.calibration
            cache_copy = os.path.join(tmp, "calibration.cache")
            if calib.cache and os.path.isfile(calib.cache):
                shutil.copyfile(calib.cache, cache_copy)
            image = next((s.name for s in specs if len(s.shape) == 4), specs[0].name)
            feed = _Feed(calib, image)
            with polygraphy_scope("Polygraphy could not create the INT8 calibrator"):
                calibrator = poly.Calibrator(feed, cache=cache_copy,
                                             BaseClass=trt.IInt8EntropyCalibrator2)
        holder: dict = {}

        def finish_config(builder, net, config):
            holder["config"] = config          # kept alive: its timing cache is read after
            if opts.timing_cache:
                holder["cache"], holder["cache_info"] = attach_timing_cache(
                    trt, config, opts.timing_cache)
            if calibrate and any(s.shape and s.shape[0] is None for s in specs):
                # the calibration runs at its own batch (the images may be fewer than opt)
                b = int(opts.calibration.batch_size)
                cprof = builder.create_optimization_profile()
                for name, (_, op, _) in profiles.items():
                    shape = (b, *op[1:]) if op else op
                    cprof.set_shape(name, shape, shape, shape)
                if not config.set_calibration_profile(cprof):
                    raise SSFDeployError(f"TensorRT refused the calibration profile (batch {b})")

        args = config_args(prec, workspace_bytes=int(opts.workspace_gb * (1 << 30)),
                           refittable=opts.refittable, profiles=[_profile(poly, profiles)],
                           calibrator=calibrator, workspace_pool=trt.MemoryPoolType.WORKSPACE)
        t0 = time.perf_counter()
        try:
            with polygraphy_scope(f"TensorRT could not build an engine from {source} (try a "
                                  f"larger `workspace_gb` or `verbose`)", verbose=opts.verbose):
                config = poly.PostprocessConfig(poly.CreateConfig(**args), finish_config)
                plan = poly.engine_bytes_from_network(network, config=config)
        except SSFDeployError:
            if feed is None or feed.error is None:
                raise
        seconds = time.perf_counter() - t0
        if feed is not None and feed.error is not None:   # the cause, not the failed build
            if isinstance(feed.error, SSFDeployError):
                raise feed.error
            raise SSFDeployError(f"INT8 calibration failed: {feed.error}") from feed.error
        cache_bytes = None
        if opts.timing_cache:
            cache_bytes = bytes(memoryview(holder["config"].get_timing_cache().serialize()))
        layers = int(network[1].num_layers)
        calib_info = calib_out = None
        if calibrator is not None:
            cache_read = feed.batches == 0 and bool(calibrator.cache_contents)
            if feed.batches == 0 and not cache_read:
                raise SSFDeployError("INT8 calibration read no batch and no cache")
            calib_out = None if cache_read else bytes(calibrator.cache_contents or b"") or None
            b = int(opts.calibration.batch_size)
            calib_info = {"batch_size": b, "batches": feed.batches, "images": feed.batches * b,
                          "folder": opts.calibration.folder, "cache": opts.calibration.cache,
                          "cache_read": cache_read}
    info = {"build_seconds": round(seconds, 3), "precision": prec.as_dict(),
            "precision_text": prec.describe(), "fp16": prec.fp16,
            "refittable": opts.refittable, "workspace_gb": opts.workspace_gb,
            "profiles": {n: [list(s) for s in tri] for n, tri in profiles.items()},
            "layers": layers, "tensorrt": version_text(trt), "builder": "polygraphy",
            "device": str(device) if device is not None else "cuda"}
    batched = [tri for n, tri in profiles.items() if tri[0] and tri[0] != tri[2]] or \
        list(profiles.values())
    if batched and batched[0][0]:
        info["batch"] = {"min": batched[0][0][0], "opt": batched[0][1][0],
                         "max": batched[0][2][0]}
    if opts.timing_cache:
        info["timing_cache"] = holder["cache_info"]
    if calib_info is not None:
        info["calibration"] = calib_info
    return BuiltEngine(bytes(memoryview(plan)), info, cache_bytes, calib_out)
