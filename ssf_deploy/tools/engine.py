"""``ssf-deploy engine``: ONNX -> TensorRT engine, checked against onnxruntime, timed.

Cheap checks first (arguments, the ONNX file), then TensorRT; nothing is written unless the
engine's outputs match onnxruntime within the tolerances.
"""
from __future__ import annotations

import os

import click
import torch

from ..errors import UsageError, VerificationError
from ._common import emit


def make_batches(chw, batches, n: int, seed: int = 0) -> list:
    """``n`` seeded random batches at the profile's opt batch, plus one at min and at max."""
    mn, op, mx = batches
    sizes = [op] * max(1, n) + [b for b in dict.fromkeys((mn, mx)) if b != op]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *chw, generator=g) for b in sizes]


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Engine file to write (.plan/.engine); a .plan.json sidecar goes next to it.")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels (FP16 tolerances by default).")
@click.option("--workspace-gb", default=4.0, show_default=True, type=float,
              help="Builder workspace memory pool limit.")
@click.option("--min-batch", type=int, help="Optimization profile min batch (dynamic ONNX; 1).")
@click.option("--opt-batch", type=int, help="Profile opt batch: the one timed (8).")
@click.option("--max-batch", type=int, help="Profile max batch (32).")
@click.option("--refittable", is_flag=True,
              help="Build with BuilderFlag.REFIT so `ssf-deploy refit` can swap in other tasks.")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="Timing cache file: read if present, updated after the build.")
@click.option("--atol", type=float, help="Absolute tolerance (1e-4; 2e-2 with --fp16).")
@click.option("--rtol", type=float, help="Relative tolerance (1e-3; 2e-2 with --fp16).")
@click.option("--inputs", "n_inputs", default=2, show_default=True, type=int,
              help="Random batches compared at the opt batch (plus one at min and max).")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--iters", default=50, show_default=True, type=int, help="Timed runs (median).")
@click.option("--verbose", is_flag=True, help="TensorRT INFO log.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def engine(onnx_path, out, fp16, workspace_gb, min_batch, opt_batch, max_batch, refittable,
           timing_cache, atol, rtol, n_inputs, warmup, iters, verbose, as_json):
    """Build a TensorRT engine from ONNX, compare it with onnxruntime, time it."""
    from .. import engine as E
    from ..export import OrtRunner, graph_stats
    from ..refit import export_settings, load_onnx
    from ..verify import resolve_tolerances, verify

    if not out.endswith(E.PLAN_SUFFIXES):
        raise UsageError(f"--out must end with {'/'.join(E.PLAN_SUFFIXES)}: {out}")
    if workspace_gb <= 0:
        raise UsageError("--workspace-gb must be > 0")
    if n_inputs < 1 or iters < 1 or warmup < 0:
        raise UsageError("--inputs and --iters must be >= 1, --warmup >= 0")
    proto = load_onnx(onnx_path)
    settings = export_settings(proto)
    batches = E.resolve_batches(settings, min_batch, opt_batch, max_batch)
    atol, rtol = resolve_tolerances(atol, rtol, fp16)

    trt = E.import_tensorrt()
    E.require_cuda()
    opts = E.BuildOptions(fp16=fp16, workspace_gb=workspace_gb, min_batch=min_batch,
                          opt_batch=opt_batch, max_batch=max_batch, refittable=refittable,
                          timing_cache=timing_cache, verbose=verbose)
    with open(onnx_path, "rb") as f:
        data = f.read()
    plan, info, cache = E.build_engine(data, opts, settings, source=onnx_path, trt=trt)
    stats = graph_stats(proto)
    lines = [f"parsed {onnx_path}: {stats['nodes']} ONNX nodes -> {info['layers']} TensorRT "
             f"layers; batch profile min/opt/max = {'/'.join(map(str, batches))}",
             f"built in {info['build_seconds']:.2f} s (TensorRT {info['tensorrt']}, "
             f"{'fp16' if fp16 else 'fp32'}{', refittable' if refittable else ''}, workspace "
             f"{workspace_gb:g} GiB); engine {len(plan) / 1e6:.2f} MB"]

    runner = E.TrtRunner(plan, label=f"TensorRT ({'fp16' if fp16 else 'fp32'})")
    ref = OrtRunner(onnx_path, providers=["CPUExecutionProvider"], label="onnxruntime (CPU)")
    inputs = make_batches(settings["chw"], batches, n_inputs)
    report = verify(ref, runner, inputs, atol=atol, rtol=rtol, names=runner.outputs)
    lat = runner.latency(inputs[0], warmup=warmup, iters=iters)
    lines.append(str(report))
    lines.append(f"latency (batch {lat['batch']}, CUDA events, median of {lat['iters']} after "
                 f"{lat['warmup']} warm-up): {lat['median_ms']:.3f} ms "
                 f"(p90 {lat['p90_ms']:.3f} ms, {lat['images_per_s']} img/s)")
    result = {"onnx": onnx_path, "engine": out, "build": info, "verify": report.as_dict(),
              "latency": lat, "passed": report.passed}
    if not report.passed:
        emit(result, as_json, "\n".join(lines))
        raise VerificationError(f"TensorRT output does not match onnxruntime (atol={atol:g}, "
                             f"rtol={rtol:g}) — nothing written")
    sidecar = E.build_sidecar(onnx_path, out, {**info, "latency": lat,
                                               "verify_max_abs": [o.max_abs for o in
                                                                  report.outputs]})
    E.write_plan(out, plan, sidecar)
    if cache is not None:
        from ..fileio import atomic_path
        with atomic_path(timing_cache) as tmp:
            with open(tmp, "wb") as f:
                f.write(cache)
        lines.append(f"timing cache {timing_cache}: {len(cache) / 1e3:.1f} kB")
    lines.append(f"wrote {out} (+ {os.path.basename(E.sidecar_path(out))})")
    emit(result, as_json, "\n".join(lines) + "\nPASS")
