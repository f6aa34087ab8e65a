"""``ssf-deploy verify``: the CI gate. Exit 0 only when the deployed model is the trained one.

``verify tasks.onnx`` on a task bundle re-runs its exactness gate (every task, mixed batches).

Options are parsed here; the work is :func:`ssf_deploy.gate.check_deployment` (every candidate
against the rebuilt unfused model and the recorded golden outputs) or, for a bundle,
:func:`ssf_deploy.bundle.verify_bundle`.
"""
from __future__ import annotations

import click

from ..errors import VerificationError
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL, FP16_ATOL, FP16_RTOL, resolve_tolerances
from ._common import (base_options, emit, image_size_for, load_task, make_inputs, tuned_model)


@click.command()
@click.argument("ckpt", required=False, type=click.Path(dir_okay=False))
@click.option("--pack", type=click.Path(dir_okay=False), help="Task pack instead of a checkpoint.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False),
              help="Also compare this ONNX model under onnxruntime.")
@click.option("--model", "arch", help="timm architecture (default: from the checkpoint).")
@click.option("--num-classes", type=int)
@base_options
@click.option("--atol", type=float, help=f"Absolute tolerance ({DEFAULT_ATOL:g}; fp16 {FP16_ATOL:g}).")
@click.option("--rtol", type=float, help=f"Relative tolerance ({DEFAULT_RTOL:g}; fp16 {FP16_RTOL:g}).")
@click.option("--fp16", is_flag=True, help="Run the fused model in float16, fp16 tolerances.")
@click.option("--allow-extra-nodes", is_flag=True,
              help="Fuse a checkpoint whose forward the base graph cannot compute with those "
                   "nodes added (as fuse --allow-extra-nodes does).")
@click.option("--inputs", "inputs_spec", default="2", show_default=True,
              help="N random batches, or a folder of images.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--image-size", type=int,
              help="Input resolution (default: the one the task was trained at).")
@click.option("--json", "as_json", is_flag=True)
def verify(ckpt, pack, onnx_path, arch, num_classes, base_weights, pretrained, allow_base_mismatch,
           atol, rtol, fp16, allow_extra_nodes, inputs_spec, batch_size, image_size, as_json):
    """Compare the fused model (and ONNX) with the trained one: exit 0 only if all pass."""
    from ..gate import check_deployment

    atol, rtol = resolve_tolerances(atol, rtol, fp16)
    if ckpt and not pack and ckpt.endswith(".onnx"):
        from ..bundle.files import is_bundle
        if is_bundle(ckpt):
            return _verify_bundle(ckpt, base_weights, pretrained, atol, rtol, as_json)
    task = load_task(ckpt, pack)
    model = tuned_model(task, arch, num_classes, base_weights, pretrained, allow_base_mismatch)
    inputs = make_inputs(inputs_spec, model, batch_size, image_size_for(task, image_size))
    try:
        report = check_deployment(model, inputs, onnx=onnx_path, atol=atol, rtol=rtol, fp16=fp16,
                                  allow_extra_nodes=allow_extra_nodes)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report) + "\nFAIL")
        raise
    emit(report.as_dict(), as_json, str(report) + "\nPASS")


def _verify_bundle(path, base_weights, pretrained, atol, rtol, as_json):
    """A bundle: every task's recorded outputs and own fused model, in mixed batches."""
    from ..bundle import verify_bundle
    try:
        report = verify_bundle(path, base_weights=base_weights, pretrained=pretrained, atol=atol,
                               rtol=rtol)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise
    emit(report.as_dict(), as_json, str(report) + "\nPASS")
