"""The CI gate as one call: is what gets deployed the model that was trained?

:func:`check_deployment` (what ``ssf-deploy verify`` runs) compares every candidate — the fused
model in PyTorch (optionally in fp16), and an ONNX file under onnxruntime — with two references:
the unfused model rebuilt from the checkpoint, and, when the task recorded them at training, the
golden probe outputs, which the rebuild itself must also reproduce. The rebuild's base was
hash-checked against the recorded one by :func:`~ssf_deploy.formats.build_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .anchor import anchor_of, golden_of
from .errors import UsageError, VerificationError
from .fuse import fuse
from .models import (batch_len, batch_slice, call_model, input_extent, inputs_to, logits_of,
                     sample_shape)
from .runtime import OrtRunner
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, VerifyReport, compare, run_outputs

__all__ = ["DeploymentCheck", "check_deployment", "HalfModel"]


class HalfModel(nn.Module):
    """A model run in float16 (on CUDA when present) behind fp32 inputs and outputs: what an
    fp16 deployment computes, for fp16 tolerances."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).half()
        self.label = f"fused fp16 ({self.device})"

    def forward(self, x):   # an image batch, or named inputs (token ids stay integers)
        return logits_of(call_model(self.model, inputs_to(x, self.device, torch.float16))
                         ).float().cpu()


@dataclass
class DeploymentCheck:
    """Every comparison the gate ran and what its PASS rests on."""
    anchor: dict
    reports: list = field(default_factory=list)     # VerifyReport

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports)

    @property
    def failed(self) -> list:
        return [f"{r.candidate} vs {r.reference}" + (f" ({r.why()})" if r.non_finite else "")
                for r in self.reports if not r.passed]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "anchor": self.anchor,
                "reports": [r.as_dict() for r in self.reports]}

    def __str__(self) -> str:
        text = [f"base: {self.anchor['base']}", f"golden probe: {self.anchor['probe']}"]
        return "\n".join(text + [str(r) for r in self.reports])


def _onnx_candidate(path: str, inputs: list) -> tuple:
    """The ONNX under onnxruntime, and the inputs split to its static batch if it has one."""
    runner = OrtRunner(path)
    shape = runner.session.get_inputs()[0].shape
    static = isinstance(shape[0], int)
    if static and shape[0] != batch_len(inputs[0]):
        inputs = [batch_slice(x, i, i + shape[0]) for x in inputs
                  for i in range(0, batch_len(x), shape[0])]
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] != inputs[0].shape[2]:
        raise UsageError(f"{path} expects {shape[2]}x{shape[3]} inputs, the model "
                         f"{inputs[0].shape[2]}x{inputs[0].shape[3]}: give `image_size`")
    return runner, static, inputs


def check_deployment(model: nn.Module, inputs: Sequence[torch.Tensor], *,
                     onnx: Optional[str] = None, atol: float = DEFAULT_ATOL,
                     rtol: float = DEFAULT_RTOL, fp16: bool = False,
                     allow_extra_nodes: bool = False) -> DeploymentCheck:
    """Fuse ``model`` (a tuned model, ideally from :func:`~ssf_deploy.formats.build_model`) and
    check the fused model, and ``onnx`` when given, against the unfused model and the recorded
    golden outputs. ``allow_extra_nodes``: as for :func:`~ssf_deploy.fuse.fuse` (a forward the
    base graph cannot compute deploys with those nodes added). Returns the report; raises :class:`VerificationError` (with ``.report``)
    when any comparison fails."""
    inputs = list(inputs)
    golden = golden_of(model)
    fused = fuse(model, batch_slice(inputs[0], 0, 2), allow_extra_nodes=allow_extra_nodes)
    candidates = [("fused (PyTorch)", HalfModel(fused) if fp16 else fused, False, inputs)]
    if onnx:
        runner, static, onnx_inputs = _onnx_candidate(onnx, inputs)
        candidates.append(("fused (onnxruntime)", runner, static, onnx_inputs))
    report = DeploymentCheck(anchor=anchor_of(model))
    if golden is not None:
        report.reports.append(golden.check(model, "unfused (rebuilt)", atol=atol, rtol=rtol))
    references: dict = {}
    for label, cand, static, batches in candidates:
        key = tuple((batch_len(x), repr(sample_shape(x))) for x in batches)
        if key not in references:        # the unfused model runs once per input split
            references[key] = run_outputs(model, batches)
        label = getattr(cand, "label", label) if fp16 and "onnx" not in label else label
        r: VerifyReport = compare(references[key], run_outputs(cand, batches), atol=atol,
                                  rtol=rtol, names=["logits"], ref_name="unfused (PyTorch)",
                                  cand_name=label)
        report.reports.append(r)
        if golden is not None and golden.image_size == input_extent(batches[0]):
            report.reports.append(golden.check(cand, label, atol=atol, rtol=rtol,
                                               per_sample=static))
    if not report.passed:
        raise VerificationError(f"the deployed model does not match the trained one: "
                                f"{'; '.join(report.failed)}", report)
    return report
