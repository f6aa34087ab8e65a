"""``ssf-deploy engine``: ONNX -> TensorRT engine, checked against onnxruntime, timed.

Options are parsed here; the work is :func:`ssf_deploy.engine.build_checked_engine`. Nothing is
written unless the engine's outputs match onnxruntime within the tolerances of the precision
that was built. Polygraphy's and TensorRT's log go to stderr.
"""
from __future__ import annotations

import click

from ..errors import UsageError, VerificationError
from ._common import emit


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
                   "(not for INT8/FP8 engines); every bias must be exposed to refit.")
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
@click.option("--capacity", type=int,
              help="A task bundle (ssf-deploy bundle): task slots in the engine; spare ones "
                   "take tasks added later by `ssf-deploy refit ENGINE --bundle` (default: the "
                   "bundle's own).")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--iters", default=50, show_default=True, type=int, help="Timed runs (median).")
@click.option("--verbose", is_flag=True, help="TensorRT INFO log (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def engine(onnx_path, out, fp16, tf32, int8, calib, calib_cache, fp8, device, workspace_gb,
           min_batch, opt_batch, max_batch, refittable, timing_cache, atol, rtol, inputs_spec,
           capacity, warmup, iters, verbose, as_json):
    """Build a TensorRT engine from ONNX, compare it with onnxruntime, time it."""
    from ..bundle.files import is_bundle
    from ..engine import build_checked_engine

    try:
        if is_bundle(onnx_path):     # every task, mixed batches; refittable by default
            from ..bundle.engine import build_bundle_engine
            if int8 or fp8 or calib or calib_cache:
                raise UsageError("a task bundle builds as an fp32/tf32/fp16 engine")
            report = build_bundle_engine(
                onnx_path, out, capacity=capacity, fp16=fp16, tf32=tf32, device=device,
                min_batch=min_batch or 1, opt_batch=opt_batch or 8, max_batch=max_batch or 32,
                workspace_gb=workspace_gb, timing_cache=timing_cache, atol=atol, rtol=rtol,
                warmup=warmup, iters=iters, verbose=verbose)
            emit(report.as_dict(), as_json, str(report) + "\nPASS")
            return
        if capacity is not None:
            raise UsageError("--capacity is for a task bundle (ssf-deploy bundle)")
        report = build_checked_engine(
            onnx_path, out, fp16=fp16, tf32=tf32, int8=int8, fp8=fp8, calib=calib,
            calib_cache=calib_cache, device=device, workspace_gb=workspace_gb,
            min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, refittable=refittable,
            timing_cache=timing_cache, atol=atol, rtol=rtol, inputs=inputs_spec, warmup=warmup,
            iters=iters, verbose=verbose)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise
    emit(report.as_dict(), as_json, str(report) + "\nPASS")
