"""``ssf-deploy engine``: ONNX -> TensorRT engine, checked against onnxruntime, timed.

Cheap checks first (arguments, the ONNX file, its Q/DQ nodes, calibration images), then
TensorRT; nothing is written unless the engine's outputs match onnxruntime within the
tolerances of the precision that was built. TensorRT's own log goes to stderr.
"""
from __future__ import annotations

import itertools
import json
import os

import click
import torch

from ..errors import SSFDeployError, UsageError, VerificationError
from ._common import emit


def make_batches(chw, batches, n: int, seed: int = 0) -> list:
    """``n`` seeded random batches at the profile's opt batch, plus one at min and at max."""
    mn, op, mx = batches
    sizes = [op] * max(1, n) + [b for b in dict.fromkeys((mn, mx)) if b != op]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *chw, generator=g) for b in sizes]


def _arch(proto, why: str) -> str:
    from ..export import read_metadata
    arch = (read_metadata(proto).get("ssf_deploy.arch") or "").strip().strip('"')
    if not arch:
        raise UsageError(f"{why} needs the model's timm architecture for its eval transform, and "
                         f"the ONNX has no 'ssf_deploy.arch' metadata (files written by "
                         f"ssf-deploy fuse/export have it)")
    return arch


def _image_batch(settings, batches, folder) -> int:
    """Batch size for images from ``folder``: the static batch, else the opt batch (or fewer)."""
    from .. import engine as E
    if not settings["dynamic_batch"]:
        return int(settings["batch_size"])
    n = len(E.image_files(folder)) if os.path.isdir(folder) else 0
    return max(1, min(batches[1], n)) if n else batches[1]


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Engine file to write (.plan/.engine); a .plan.json sidecar goes next to it.")
@click.option("--fp16", is_flag=True,
              help="FP16 engine (TensorRT 10: BuilderFlag.FP16; 11: the ONNX converted to fp16, "
                   "strongly typed). FP16 tolerances.")
@click.option("--tf32", is_flag=True,
              help="Let fp32 layers use TF32 (TensorRT's default, off here so an fp32 engine is "
                   "fp32). FP16 tolerances.")
@click.option("--int8", is_flag=True,
              help="INT8 engine: from an explicitly quantized ONNX (Q/DQ nodes; detected and "
                   "built as INT8 even without this flag) or with --calib (TensorRT 10 only).")
@click.option("--calib", "calib", type=click.Path(file_okay=False),
              help="With --int8 on a float ONNX: folder of calibration images (the model's timm "
                   "eval transform; IInt8EntropyCalibrator2, TensorRT 10 only).")
@click.option("--calib-cache", type=click.Path(dir_okay=False),
              help="Calibration cache: read if present (skips --calib), written after a passing "
                   "build.")
@click.option("--fp8", is_flag=True,
              help="Require an FP8 engine: the ONNX must hold FP8 Q/DQ nodes; GPU of compute "
                   "capability 8.9+.")
@click.option("--device", default="cuda", show_default=True,
              help="CUDA device to build and run on: cuda or cuda:N.")
@click.option("--workspace-gb", default=4.0, show_default=True, type=float,
              help="Builder workspace memory pool limit.")
@click.option("--min-batch", type=int, help="Optimization profile min batch (dynamic ONNX; 1).")
@click.option("--opt-batch", type=int, help="Profile opt batch: the one timed (8).")
@click.option("--max-batch", type=int, help="Profile max batch (32).")
@click.option("--refittable", is_flag=True,
              help="Build with BuilderFlag.REFIT so `ssf-deploy refit` can swap in other tasks "
                   "(not for INT8/FP8 engines).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="Timing cache file: read if present (a cache from another GPU or TensorRT "
                   "is replaced), written after the build.")
@click.option("--atol", type=float,
              help="Absolute tolerance (default by precision: fp32 1e-4, tf32/fp16 2e-2, int8 4 "
                   "quantization steps of the output range, fp8 1/16 of it).")
@click.option("--rtol", type=float,
              help="Relative tolerance (default by precision: fp32 1e-3, tf32/fp16/int8 2e-2, "
                   "fp8 1/16).")
@click.option("--inputs", "inputs_spec", default="2", show_default=True,
              help="N seeded random batches at the opt batch (plus one at min and max), or a "
                   "folder of images (the model's eval transform; up to 8 batches).")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--iters", default=50, show_default=True, type=int, help="Timed runs (median).")
@click.option("--verbose", is_flag=True, help="TensorRT INFO log (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def engine(onnx_path, out, fp16, tf32, int8, calib, calib_cache, fp8, device, workspace_gb,
           min_batch, opt_batch, max_batch, refittable, timing_cache, atol, rtol, inputs_spec,
           warmup, iters, verbose, as_json):
    """Build a TensorRT engine from ONNX, compare it with onnxruntime, time it."""
    from .. import engine as E
    from ..export import FP16_MAX, OrtRunner, fp16_range_issues, graph_stats
    from ..fileio import OutputSet, check_writable
    from ..refit import export_settings, load_onnx
    from ..verify import compare, run_outputs

    if not out.endswith(E.PLAN_SUFFIXES):
        raise UsageError(f"--out must end with {'/'.join(E.PLAN_SUFFIXES)}: {out}")
    if workspace_gb <= 0:
        raise UsageError("--workspace-gb must be > 0")
    n_inputs = int(inputs_spec) if str(inputs_spec).isdigit() else None
    if (n_inputs is not None and n_inputs < 1) or iters < 1 or warmup < 0:
        raise UsageError("--inputs and --iters must be >= 1, --warmup >= 0")
    if n_inputs is None and not os.path.isdir(inputs_spec):
        raise UsageError(f"--inputs must be a number of random batches or a folder of images: "
                         f"{inputs_spec!r} is neither")
    E.cuda_device(device)                               # spelling; existence after the import
    check_writable(out, E.sidecar_path(out), timing_cache, calib_cache)
    proto = load_onnx(onnx_path)
    settings = export_settings(proto)
    batches = E.resolve_batches(settings, min_batch, opt_batch, max_batch)
    quant = E.qdq_info(proto)
    E.check_qdq_supported(quant, onnx_path)
    calibrate = bool(calib or calib_cache)
    E.check_precision_request(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibrate=calibrate,
                              qdq=quant["kind"], refittable=refittable)
    big = fp16_range_issues(proto) if fp16 else []
    if big:
        raise UsageError(f"--fp16: {onnx_path} holds weights beyond float16's range ({FP16_MAX:g}): "
                         f"'{big[0][0]}' up to {big[0][1]:.3g}" + (f" (and {len(big) - 1} more)" if
                         len(big) > 1 else "") + "; an fp16 engine would make them inf: build fp32")
    if calib_cache and not calib and not os.path.isfile(calib_cache):
        raise UsageError(f"--calib-cache {calib_cache} does not exist yet: give --calib DIR to "
                         f"make it")
    calibration = None
    if calibrate:
        cb = _image_batch(settings, batches, calib) if calib else batches[1]
        images = E.CalibrationImages(calib, _arch(proto, "--calib"), settings["chw"], cb) \
            if calib else None
        calibration = E.Calibration(images=images, cache=calib_cache, batch_size=cb)
    if n_inputs is None:
        b = _image_batch(settings, batches, inputs_spec)
        imgs = E.CalibrationImages(inputs_spec, _arch(proto, "--inputs DIR"), settings["chw"], b,
                                   limit=8 * b)
        inputs = list(itertools.islice(iter(imgs), 8))
    else:
        inputs = make_batches(settings["chw"], batches, n_inputs)

    trt = E.import_tensorrt()
    dev = E.require_cuda(device)
    if quant["kind"] == "fp8":
        cap = tuple(torch.cuda.get_device_capability(dev))
        if cap < E.FP8_MIN_CAPABILITY:
            raise SSFDeployError(f"FP8 engines need a GPU of compute capability 8.9 or newer "
                                 f"(Ada, Hopper); {torch.cuda.get_device_name(dev)} is "
                                 f"{cap[0]}.{cap[1]}")
    opts = E.BuildOptions(fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calibration=calibration,
                          workspace_gb=workspace_gb, min_batch=min_batch, opt_batch=opt_batch,
                          max_batch=max_batch, refittable=refittable, timing_cache=timing_cache,
                          verbose=verbose, device=dev)
    with open(onnx_path, "rb") as f:
        data = f.read()
    plan, info, cache = E.build_engine(data, opts, settings, source=onnx_path, trt=trt,
                                       qdq=quant["kind"])
    prec = E.sidecar_precision(info)
    stats = graph_stats(proto)
    lines = [f"parsed {onnx_path}: {stats['nodes']} ONNX nodes"
             + (f" ({quant['nodes']} Q/DQ)" if quant["kind"] else "")
             + f" -> {info['layers']} TensorRT layers; batch profile min/opt/max = "
             f"{'/'.join(map(str, batches))}",
             f"precision: {info['precision_text']}",
             f"built in {info['build_seconds']:.2f} s on {dev} (TensorRT {info['tensorrt']}"
             f"{', refittable' if refittable else ''}, workspace {workspace_gb:g} GiB); engine "
             f"{len(plan) / 1e6:.2f} MB"]
    if info.get("timing_cache"):
        lines.append(info["timing_cache"]["message"])
    if info.get("calibration"):
        c = info["calibration"]
        lines.append(f"calibration: {c['batches']} batch(es) of {c['batch_size']} from "
                     f"{c['folder']}" if c["batches"] else
                     f"calibration: read from {c['cache']}")

    runner = E.TrtRunner(plan, label=f"TensorRT ({prec.name})", device=dev)
    ref_label = ("onnxruntime (CPU, the same Q/DQ graph)" if quant["kind"] else
                 "onnxruntime (CPU, fp32)")
    ref = OrtRunner(onnx_path, providers=["CPUExecutionProvider"], label=ref_label)
    reference = run_outputs(ref, inputs)
    atol, rtol, why = E.tolerances(prec, reference, atol, rtol)
    report = compare(reference, run_outputs(runner, inputs), atol=atol, rtol=rtol,
                     names=runner.outputs, ref_name=ref.label, cand_name=runner.label)
    lat = runner.latency(inputs[0], warmup=warmup, iters=iters)
    lines.append(f"tolerances: atol={atol:.3g}, rtol={rtol:.3g} ({why})")
    lines.append(str(report))
    lines.append(f"latency (batch {lat['batch']}, CUDA events, median of {lat['iters']} after "
                 f"{lat['warmup']} warm-up): {lat['median_ms']:.3f} ms "
                 f"(p90 {lat['p90_ms']:.3f} ms, {lat['images_per_s']} img/s)")
    result = {"onnx": onnx_path, "engine": out, "precision": prec.name, "build": info,
              "tolerances": {"atol": atol, "rtol": rtol, "why": why},
              "verify": report.as_dict(), "latency": lat, "passed": report.passed}
    if not report.passed:
        emit(result, as_json, "\n".join(lines))
        raise VerificationError(f"TensorRT ({prec.name}) output does not match onnxruntime "
                                f"(atol={atol:.3g}, rtol={rtol:.3g}) — nothing written")
    sidecar = E.build_sidecar(onnx_path, out, {
        **info, "latency": lat, "tolerances": result["tolerances"],
        "verify_max_abs": [o.max_abs for o in report.outputs],
        "top1_agreement": [o.top1_agree for o in report.outputs]})
    calib_out = calibration.cache_out if calibration is not None and calib_cache else None
    # every output at once: temp files renamed only when all of them were written, then the
    # manifest of the engine and its sidecar (the caches are shared between builds: not listed)
    with OutputSet() as outs:
        writes = [(out, plan, True), (E.sidecar_path(out),
                                      json.dumps(sidecar, indent=2, default=str).encode(), True)]
        if cache is not None:
            writes.append((timing_cache, cache, False))
        if calib_out:
            writes.append((calib_cache, calib_out, False))
        for path, blob, record in writes:
            with open(outs.add(path, record=record), "wb") as f:
                f.write(blob)
    if cache is not None:
        lines.append(f"wrote timing cache {timing_cache} ({len(cache) / 1e3:.1f} kB)")
    if calib_out:
        lines.append(f"wrote calibration cache {calib_cache} ({len(calib_out)} bytes)")
    lines.append(f"wrote {out} (+ {os.path.basename(E.sidecar_path(out))})")
    emit(result, as_json, "\n".join(lines) + "\nPASS")
