"""``ssf-deploy quantize``: static INT8 with onnxruntime, checked against fp32 before it is written.

Options are parsed here; the work is :func:`ssf_deploy.quantize.quantize_onnx`. Exit 0 when
top-1 agreement with the fp32 model reaches ``--min-agreement``, 1 when it does not (nothing
written), 2 on bad input.
"""
from __future__ import annotations

import click

from ..errors import UsageError, VerificationError
from ._common import emit, progress_printer


def _csv(value: str | None) -> tuple:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration images: 'builtin', a DIR with train/ and val/ (calibrate on "
                   "train, check on val), or a folder of images (split by a seeded shuffle).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="INT8 ONNX file to write (only if the check passes).")
@click.option("--val", help="Labelled validation data for top-1: an ImageFolder DIR "
                            "(<class>/<image>, or val/<class>/<image>) or 'builtin'.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]),
              default="minmax", show_default=True, help="Calibration method.")
@click.option("--percentile", default=99.999, show_default=True, type=float,
              help="Percentile for --method percentile.")
@click.option("--for", "target", type=click.Choice(["onnxruntime", "tensorrt"]),
              default="onnxruntime", show_default=True,
              help="Runtime the INT8 model is for. tensorrt: signed symmetric INT8 with float "
                   "biases, which `ssf-deploy engine model.int8.onnx` builds; onnxruntime: U8 "
                   "activations, fastest on its CPU kernels.")
@click.option("--activation-type", type=click.Choice(["u8", "s8"]), default=None,
              help="Default: u8 for onnxruntime, s8 for tensorrt.")
@click.option("--weight-type", type=click.Choice(["u8", "s8"]), default="s8", show_default=True)
@click.option("--per-tensor", is_flag=True, help="Per-tensor weights (default: per channel).")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights. Default: on when this CPU has no VNNI (onnxruntime's u8 x s8 "
                   "kernels saturate there with full 8-bit weights), off otherwise.")
@click.option("--op-types", help="Comma list: quantize only these op types (default: all "
                                 "onnxruntime can), e.g. Conv,Gemm,MatMul.")
@click.option("--keep-float", default=0, show_default=True, type=int,
              help="Keep the N Conv/Gemm/MatMul nodes whose quantization hurts most in float, "
                   "measured leave-one-out on the calibration images (one quantization per node).")
@click.option("--exclude-nodes", help="Comma list of node names kept in float.")
@click.option("--exclude-op-types", help="Comma list of op types kept in float, "
                                         "e.g. Softmax,LayerNormalization.")
@click.option("--calib-images", default=64, show_default=True, type=int)
@click.option("--eval-images", default=256, show_default=True, type=int,
              help="Held-out images for the agreement check (at most).")
@click.option("--val-images", type=int, help="Labelled images used (at most; default all).")
@click.option("--min-agreement", default=99.0, show_default=True, type=float,
              help="Gate: top-1 agreement with fp32, in percent.")
@click.option("--model", "arch", help="timm architecture, when the ONNX does not record one.")
@click.option("--image-size", type=int, help="Input size, when the ONNX input is dynamic.")
@click.option("--latency-runs", default=50, show_default=True, type=int,
              help="Interleaved fp32/int8 timing rounds (0: skip).")
@click.option("--latency-batch", default=1, show_default=True, type=int)
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: its own).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No per-stage progress on stderr.")
def quantize(model, calib, out, val, method, percentile, target, activation_type, weight_type, per_tensor,
             reduce_range, op_types, keep_float, exclude_nodes, exclude_op_types, calib_images,
             eval_images, val_images,
             min_agreement, arch, image_size, latency_runs, latency_batch, threads, seed,
             as_json, quiet):
    """Quantize an fp32 ONNX classifier to INT8 (QDQ), check it, write it only if it passes."""
    from ..fileio import check_writable
    from ..quantize import QuantizeConfig, quantize_onnx

    if out and not out.endswith(".onnx"):
        raise UsageError(f"--out must end with .onnx: {out}")
    check_writable(out)   # before calibration: a bad --out costs nothing
    cfg = QuantizeConfig(calib=calib, val=val, method=method, percentile=percentile, target=target,
                         activation_type=activation_type, weight_type=weight_type,
                         per_channel=not per_tensor, reduce_range=reduce_range,
                         op_types=_csv(op_types), keep_float=keep_float,
                         exclude_nodes=_csv(exclude_nodes),
                         exclude_op_types=_csv(exclude_op_types), calib_images=calib_images,
                         eval_images=eval_images, val_images=val_images,
                         min_agreement=min_agreement, arch=arch, image_size=image_size,
                         latency_runs=latency_runs, latency_batch=latency_batch,
                         threads=threads, seed=seed)
    try:
        report = quantize_onnx(model, out, cfg, progress=progress_printer(not (quiet or as_json)))
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise VerificationError(f"{e} — nothing written") from e
    note = "" if out else "\nnote: no --out given, so no INT8 model was written (checked only)"
    emit(report.as_dict(), as_json, str(report) + note + "\nPASS")
