"""Engine build + check + write as one call: :func:`build_checked_engine`.

Cheap checks first (arguments, the ONNX file, its Q/DQ nodes, calibration images), then
TensorRT; the engine is compared with onnxruntime on the same inputs (and with the outputs a
task recorded at training, when given) within the tolerances of the precision that was built,
and nothing is written unless it passes. A refittable engine must also expose every
matrix-product bias to refit (TensorRT 11.3's documented REFIT issue drops some).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..anchor import GoldenProbe, check_golden
from ..errors import UsageError, VerificationError
from ..export import FP16_MAX, fp16_range_issues, graph_stats, read_metadata
from ..fileio import check_writable
from ..runtime import (ImageBatches, OrtRunner, eval_transform, graph_inputs, image_files,
                       load_onnx)
from ..verify import VerifyReport, compare, run_outputs
from .build import BuildOptions, Calibration, build_engine
from .files import PLAN_SUFFIXES, build_sidecar, sidecar_path, write_plan
from .policy import (Precision, check_capability, check_precision_request, check_qdq_supported,
                     input_profiles, qdq_info, sidecar_precision, tolerances, unexposed_biases)
from .refitter import refittable_names
from .runner import EngineRunner
from .trt import cuda_device, import_tensorrt, require_cuda

__all__ = ["EngineReport", "build_checked_engine", "random_feeds", "image_input"]

Inputs = Union[int, str, Sequence]


@dataclass
class EngineReport:
    """What a checked build did and found; ``str()`` is the human report, ``as_dict()`` the JSON."""
    onnx: str
    engine: Optional[str]
    precision: Precision
    build: dict
    tolerances: dict
    verify: VerifyReport
    latency: dict
    golden: Optional[VerifyReport] = None
    refit_exposure: Optional[dict] = None
    lines: list = field(default_factory=list)
    written: list = field(default_factory=list)
    plan: Optional[bytes] = field(default=None, repr=False)   # the engine, also when not written

    @property
    def passed(self) -> bool:
        return (self.verify.passed and (self.golden is None or self.golden.passed)
                and not (self.refit_exposure or {}).get("unexposed"))

    def as_dict(self) -> dict:
        return {"onnx": self.onnx, "engine": self.engine, "precision": self.precision.name,
                "build": self.build, "tolerances": self.tolerances, "verify": self.verify.as_dict(),
                "verify_recorded": self.golden.as_dict() if self.golden is not None else None,
                "refit_exposure": self.refit_exposure, "latency": self.latency,
                "written": list(self.written), "passed": self.passed}

    def __str__(self) -> str:
        return "\n".join(self.lines)


def image_input(specs) -> Optional[str]:
    """The graph's image input: its only input, or its only 4-D float input."""
    if len(specs) == 1:
        return specs[0].name
    images = [s.name for s in specs if len(s.shape) == 4 and s.dtype.kind == "f"]
    return images[0] if len(images) == 1 else None


def random_feeds(profiles: Mapping, specs, n: int, *, seed: int = 0,
                 value_ranges: Optional[Mapping] = None) -> list:
    """``n`` seeded random feeds (``{input name: tensor}``) at every input's opt shape, plus one
    at the min and one at the max batch. Float inputs are N(0, 1); integer inputs are drawn from
    ``value_ranges[name] = (low, high)`` (high excluded), zeros without one."""
    g = torch.Generator().manual_seed(seed)
    dtypes = {s.name: s.dtype for s in specs}
    first = next(iter(profiles.values()))
    sizes = [1] * max(1, n)
    if first[0]:
        mn, op, mx = (first[0][0], first[1][0], first[2][0])
        sizes = [op] * max(1, n) + [b for b in dict.fromkeys((mn, mx)) if b != op]
    feeds = []
    for b in sizes:
        feed = {}
        for name, (lo_shape, opt, hi_shape) in profiles.items():
            batched = bool(opt) and lo_shape[0] != hi_shape[0]
            shape = (b, *opt[1:]) if batched else tuple(opt)
            dt = dtypes[name]
            if dt.kind == "f":
                feed[name] = torch.randn(*shape, generator=g)
            else:
                lo, hi = (value_ranges or {}).get(name, (0, 1))
                feed[name] = torch.randint(int(lo), int(hi), shape, generator=g,
                                           dtype=torch.from_numpy(np.zeros(1, dt)).dtype)
        feeds.append(feed)
    return feeds


def _arch(proto, arch: Optional[str], why: str) -> str:
    arch = arch or (read_metadata(proto).get("ssf_deploy.arch") or "").strip().strip('"')
    if not arch:
        raise UsageError(f"`{why}` needs the model's timm architecture for its eval transform, "
                         f"and the ONNX has no 'ssf_deploy.arch' metadata (files written by "
                         f"fuse/export have it): give `arch`")
    return arch


def _image_batch(profiles: dict, image: str, folder: str) -> int:
    """Batch size for images from ``folder``: the static batch, else the opt batch (or fewer)."""
    mn, op, mx = (t[0] for t in profiles[image])
    if mn == mx:
        return op
    n = len(image_files(folder)) if os.path.isdir(folder) else 0
    return max(1, min(op, n)) if n else op


def _with(feed_image: torch.Tensor, image: str, profiles, specs, value_ranges, seed) -> dict:
    """A feed whose image input holds real images, the others seeded values of that batch."""
    b = feed_image.shape[0]
    other = {n: ((b, *p[1][1:]),) * 3 for n, p in profiles.items() if n != image}
    feed = random_feeds(other, [s for s in specs if s.name != image], 1, seed=seed,
                        value_ranges=value_ranges)[0] if other else {}
    return {image: feed_image, **feed}


def build_checked_engine(onnx: str, out: Optional[str] = None, *, fp16=False, tf32=False,
                         int8=False, fp8=False, calib: Optional[str] = None,
                         calib_cache: Optional[str] = None, device="cuda",
                         workspace_gb: float = 4.0, min_batch=None, opt_batch=None,
                         max_batch=None, shapes: Optional[Mapping] = None, refittable=False,
                         timing_cache: Optional[str] = None, atol=None, rtol=None,
                         inputs: Inputs = 2, value_ranges: Optional[Mapping] = None,
                         arch: Optional[str] = None, golden: Optional[GoldenProbe] = None,
                         warmup: int = 10, iters: int = 50, verbose: bool = False
                         ) -> EngineReport:
    """Build an engine from the ONNX file ``onnx``, check it, time it, write ``out``.

    Inputs are addressed by graph name: ``shapes`` gives an input its own shape or (min, opt,
    max) triple, the batch profile (``min_batch``/``opt_batch``/``max_batch``) applies to every
    input whose only open dimension is the batch. ``inputs``: N seeded random feeds, a folder of
    images for the image input (the model's eval transform, up to 8 batches), or a list of
    feeds (tensors for a single-input graph, ``{name: tensor}`` otherwise); integer inputs of
    random feeds are drawn from ``value_ranges[name] = (low, high)``. ``golden``: a task's
    recorded outputs, compared as well. Returns the report; raises
    :class:`~ssf_deploy.errors.VerificationError` (with ``.report``) when a check fails, and
    nothing is written then.
    """
    if out and not out.endswith(PLAN_SUFFIXES):
        raise UsageError(f"`out` must end with {'/'.join(PLAN_SUFFIXES)}: {out}")
    if workspace_gb <= 0:
        raise UsageError("`workspace_gb` must be > 0")
    n_random = int(inputs) if isinstance(inputs, int) or str(inputs).isdigit() else None
    if (n_random is not None and n_random < 1) or iters < 1 or warmup < 0:
        raise UsageError("`inputs` and `iters` must be >= 1, `warmup` >= 0")
    if isinstance(inputs, str) and n_random is None and not os.path.isdir(inputs):
        raise UsageError(f"`inputs` must be a number of random batches or a folder of images: "
                         f"{inputs!r} is neither")
    cuda_device(device)                                  # spelling; existence after the import
    check_writable(out, sidecar_path(out) if out else None, timing_cache, calib_cache)
    proto = load_onnx(onnx)
    specs = graph_inputs(proto)
    profiles = input_profiles(specs, min_batch=min_batch, opt_batch=opt_batch,
                              max_batch=max_batch, shapes=shapes)
    image = image_input(specs)
    quant = qdq_info(proto)
    check_qdq_supported(quant, str(onnx))
    calibrate = bool(calib or calib_cache)
    check_precision_request(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibrate=calibrate,
                            qdq=quant["kind"], refittable=refittable)
    big = fp16_range_issues(proto) if fp16 else []
    if big:     # an fp16 engine would turn them into inf; its own check would catch it later
        raise UsageError(f"`fp16`: {onnx} holds weights beyond float16's range ({FP16_MAX:g}): "
                         f"'{big[0][0]}' up to {big[0][1]:.3g}"
                         + (f" (and {len(big) - 1} more)" if len(big) > 1 else "")
                         + "; build it in fp32")
    if calib_cache and not calib and not os.path.isfile(calib_cache):
        raise UsageError(f"`calib_cache` {calib_cache} does not exist yet: give `calib` DIR to "
                         f"make it")
    if (calib or (n_random is None and isinstance(inputs, str))) and image is None:
        raise UsageError(f"images need one image input, and the graph has "
                         f"{', '.join(s.describe() for s in specs)}: give `inputs` as feeds")
    calibration = None
    if calibrate:
        cb = _image_batch(profiles, image, calib) if calib else profiles[image][1][0]
        data = None
        if calib:
            tf = eval_transform(_arch(proto, arch, "calib"), chw=profiles[image][1][1:])
            data = ImageBatches(calib, tf, cb, limit=1024)   # TensorRT: ~500 images suffice
        calibration = Calibration(data=data, cache=calib_cache, batch_size=cb, folder=calib)
    if n_random is not None:
        feeds = random_feeds(profiles, specs, n_random, value_ranges=value_ranges)
    elif isinstance(inputs, str):
        b = _image_batch(profiles, image, inputs)
        tf = eval_transform(_arch(proto, arch, "inputs"), chw=profiles[image][1][1:])
        imgs = ImageBatches(inputs, tf, b, limit=8 * b)
        feeds = [_with(x, image, profiles, specs, value_ranges, i)
                 for i, x in enumerate(itertools.islice(iter(imgs), 8))]
    else:
        feeds = [x if isinstance(x, Mapping) else {image or specs[0].name: x} for x in inputs]
        if not feeds:
            raise UsageError("`inputs` holds no feed")

    trt = import_tensorrt()
    dev = require_cuda(device)
    opts = BuildOptions(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibration=calibration,
                        workspace_gb=workspace_gb, min_batch=min_batch, opt_batch=opt_batch,
                        max_batch=max_batch, shapes=dict(shapes or {}), refittable=refittable,
                        timing_cache=timing_cache, verbose=verbose, device=dev)
    if quant["kind"] == "fp8":
        check_capability(torch.cuda.get_device_capability(dev), torch.cuda.get_device_name(dev),
                         "fp8")
    built = build_engine(proto, opts, source=str(onnx), qdq=quant["kind"], trt=trt)
    info, prec = built.info, sidecar_precision(built.info)
    stats = graph_stats(proto)
    shape_text = "; ".join(f"{n} min/opt/max = " + " / ".join("x".join(map(str, s)) for s in t)
                           for n, t in profiles.items())
    lines = [f"parsed {onnx}: {stats['nodes']} ONNX nodes"
             + (f" ({quant['nodes']} Q/DQ)" if quant["kind"] else "")
             + f" -> {info['layers']} TensorRT layers; profile {shape_text}",
             f"precision: {info['precision_text']}",
             f"built in {info['build_seconds']:.2f} s on {dev} through Polygraphy (TensorRT "
             f"{info['tensorrt']}{', refittable' if refittable else ''}, workspace "
             f"{workspace_gb:g} GiB); engine {len(built.plan) / 1e6:.2f} MB"]
    if info.get("timing_cache"):
        lines.append(info["timing_cache"]["message"])
    if info.get("calibration"):
        c = info["calibration"]
        lines.append(f"calibration: {c['batches']} batch(es) of {c['batch_size']} from "
                     f"{c['folder']}" if c["batches"] else f"calibration: read from {c['cache']}")

    with EngineRunner(built.plan, label=f"TensorRT ({prec.name})", device=dev,
                      verbose=verbose) as runner:
        ref = OrtRunner(onnx, providers=["CPUExecutionProvider"],
                        label="onnxruntime (CPU, the same Q/DQ graph)" if quant["kind"] else
                        "onnxruntime (CPU, fp32)")
        reference = run_outputs(ref, feeds)
        a, r, why = tolerances(prec, reference, atol, rtol)
        report_v = compare(reference, run_outputs(runner, feeds), atol=a, rtol=r,
                           names=runner.outputs, ref_name=ref.label, cand_name=runner.label)
        gold = None
        if golden is not None and len(specs) == 1:
            static = profiles[image][0][0] == profiles[image][2][0]
            gold = check_golden(golden, runner, runner.label, chw=profiles[image][1][1:],
                                atol=a, rtol=r, per_sample=static)
        lat = runner.latency(feeds[0], warmup=warmup, iters=iters)
        exposure = None
        if refittable:
            unexposed = unexposed_biases(proto, refittable_names(runner.engine, device=dev))
            exposure = {"checked": unexposed is not None, "unexposed": unexposed or []}
    lines.append(f"tolerances: atol={a:.3g}, rtol={r:.3g} ({why})")
    lines.append(str(report_v))
    if gold is not None:
        lines.append(str(gold))
    if exposure is not None:
        lines.append("refit: every matrix-product bias is exposed to refit" if exposure["checked"]
                     and not exposure["unexposed"] else
                     f"refit: {len(exposure['unexposed'])} matrix-product bias(es) NOT exposed to "
                     f"refit (TensorRT's REFIT known issue), e.g. '{exposure['unexposed'][0]}'"
                     if exposure["unexposed"] else
                     "refit: the engine names some weights itself; checked by comparison only")
    lines.append(f"latency (batch {lat['batch']}, CUDA events, median of {lat['iters']} after "
                 f"{lat['warmup']} warm-up): {lat['median_ms']:.3f} ms "
                 f"(p90 {lat['p90_ms']:.3f} ms, {lat['images_per_s']} img/s)")
    report = EngineReport(onnx=str(onnx), engine=out, precision=prec, build=info,
                          tolerances={"atol": a, "rtol": r, "why": why}, verify=report_v,
                          latency=lat, golden=gold, refit_exposure=exposure, lines=lines,
                          plan=built.plan)
    if not report.passed:
        what = ("onnxruntime" if not report_v.passed else
                "the outputs recorded at training" if gold is not None and not gold.passed else
                "refit (a bias is not refittable)")
        raise VerificationError(f"TensorRT ({prec.name}) output does not match {what} "
                                f"(atol={a:.3g}, rtol={r:.3g}) — nothing written", report)
    if out:
        sidecar = build_sidecar(onnx, out, {
            **info, "latency": lat, "tolerances": report.tolerances,
            "verify_max_abs": [o.max_abs for o in report_v.outputs],
            "top1_agreement": [o.top1_agree for o in report_v.outputs],
            "refit_exposure": exposure})
        caches = {}
        if built.timing_cache is not None:
            caches[timing_cache] = built.timing_cache
        if built.calibration_cache and calib_cache:
            caches[calib_cache] = built.calibration_cache
        write_plan(out, built.plan, sidecar, caches=caches)
        if built.timing_cache is not None:
            lines.append(f"wrote timing cache {timing_cache} "
                         f"({len(built.timing_cache) / 1e3:.1f} kB)")
        if built.calibration_cache and calib_cache:
            lines.append(f"wrote calibration cache {calib_cache} "
                         f"({len(built.calibration_cache)} bytes)")
        lines.append(f"wrote {out} (+ {os.path.basename(sidecar_path(out))})")
        report.written = [out, sidecar_path(out), *caches]
    return report
