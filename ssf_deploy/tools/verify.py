"""``ssf-deploy verify``: the CI gate. Exit 0 only when the deployed model is the trained one.

Every candidate (fused PyTorch, optionally an ONNX file) is compared with two references: the
unfused model rebuilt from the checkpoint, and — when the task recorded them at training — the
golden probe outputs, which the rebuild itself must also reproduce. The base the rebuild uses is
hash-checked against the one recorded at training.
"""
from __future__ import annotations

import click
import torch

from ..errors import UsageError, VerificationError
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL, FP16_ATOL, FP16_RTOL, compare, resolve_tolerances, run_outputs
from ._common import (base_options, emit, image_size_for, load_task, make_inputs, tuned_model)


class _Half(torch.nn.Module):
    """The fused model run in float16 (on CUDA when present), for fp16 deployment tolerances."""

    def __init__(self, model):
        super().__init__()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).half()
        self.label = f"fused fp16 ({self.device})"

    def forward(self, x):
        return self.model(x.to(self.device).half()).float().cpu()


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
@click.option("--inputs", "inputs_spec", default="2", show_default=True,
              help="N random batches, or a folder of images.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--image-size", type=int,
              help="Input resolution (default: the one the task was trained at).")
@click.option("--json", "as_json", is_flag=True)
def verify(ckpt, pack, onnx_path, arch, num_classes, base_weights, pretrained, allow_base_mismatch,
           atol, rtol, fp16, inputs_spec, batch_size, image_size, as_json):
    """Compare the fused model (and ONNX) with the trained one: exit 0 only if all pass."""
    from ..deploy import GoldenProbe, anchor_of
    from ..export import OrtRunner
    from ..formats.task import provenance_of
    from ..fuse import fuse
    from ..models import batch_len, batch_slice, input_extent

    atol, rtol = resolve_tolerances(atol, rtol, fp16)
    task = load_task(ckpt, pack)
    model = tuned_model(task, arch, num_classes, base_weights, pretrained, allow_base_mismatch)
    inputs = make_inputs(inputs_spec, model, batch_size, image_size_for(task, image_size))
    probe = (provenance_of(model) or {}).get("probe")
    golden = GoldenProbe(probe) if probe is not None else None
    fused = fuse(model, batch_slice(inputs[0], 0, 2))
    candidates = [("fused (PyTorch)", _Half(fused) if fp16 else fused, False)]
    if onnx_path:
        runner = OrtRunner(onnx_path)
        shape = runner.session.get_inputs()[0].shape
        static = isinstance(shape[0], int)
        if static and shape[0] != batch_len(inputs[0]):
            inputs = [batch_slice(x, i, i + shape[0]) for x in inputs
                      for i in range(0, batch_len(x), shape[0])]
        if len(shape) == 4 and isinstance(shape[2], int) and shape[2] != inputs[0].shape[2]:
            raise UsageError(f"{onnx_path} expects {shape[2]}x{shape[3]} inputs, the model "
                             f"{inputs[0].shape[2]}x{inputs[0].shape[3]}: pass --image-size")
        candidates.append(("fused (onnxruntime)", runner, static))

    reference = run_outputs(model, inputs)     # once, for every candidate
    reports = []
    if golden is not None:
        reports.append(golden.check(model, "unfused (rebuilt)", atol=atol, rtol=rtol))
    for label, cand, static in candidates:
        label = getattr(cand, "label", label) if fp16 and "onnx" not in label else label
        reports.append(compare(reference, run_outputs(cand, inputs), atol=atol, rtol=rtol,
                               names=["logits"], ref_name="unfused (PyTorch)", cand_name=label))
        if golden is not None and golden.image_size == input_extent(inputs[0]):
            reports.append(golden.check(cand, label, atol=atol, rtol=rtol, per_sample=static))
    ok = all(r.passed for r in reports)
    anchor = anchor_of(model)
    text = [f"base: {anchor['base']}", f"golden probe: {anchor['probe']}"]
    text += [str(r) for r in reports]
    failed = [f"{r.candidate} vs {r.reference}" for r in reports if not r.passed]
    emit({"passed": ok, "anchor": anchor, "reports": [r.as_dict() for r in reports]}, as_json,
         "\n".join(text) + f"\n{'PASS' if ok else 'FAIL'}")
    if not ok:
        raise VerificationError(f"the deployed model does not match the trained one: "
                                f"{'; '.join(failed)}")
