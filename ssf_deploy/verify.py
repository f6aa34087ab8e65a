"""Output comparison as a first-class object (Polygraphy-style): errors, verdict, report.

``verify(reference, candidate, inputs)`` runs both on the same inputs; either side may be an
``nn.Module`` or any callable (e.g. :class:`ssf_deploy.export.OrtRunner`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch

from .errors import UsageError
from .models import call_model, inputs_to

__all__ = ["OutputComparison", "VerifyReport", "compare", "verify", "run_outputs",
           "resolve_tolerances", "DEFAULT_ATOL", "DEFAULT_RTOL", "FP16_ATOL", "FP16_RTOL"]

DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-3
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2


def resolve_tolerances(atol: float | None, rtol: float | None, fp16: bool = False
                       ) -> tuple[float, float]:
    """The one tolerance policy: fp32 defaults, looser ones when fp16 kernels are allowed."""
    if atol is None:
        atol = FP16_ATOL if fp16 else DEFAULT_ATOL
    if rtol is None:
        rtol = FP16_RTOL if fp16 else DEFAULT_RTOL
    if atol < 0 or rtol < 0:
        raise UsageError("--atol and --rtol must be >= 0")
    return float(atol), float(rtol)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass
class OutputComparison:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    mean_abs: float
    top1_agree: float      # fraction of rows whose argmax matches (classifier logits)
    passed: bool

    def as_dict(self) -> dict:
        return dict(name=self.name, shape=list(self.shape), max_abs_error=self.max_abs,
                    max_rel_error=self.max_rel, mean_abs_error=self.mean_abs,
                    top1_agreement=self.top1_agree, allclose=self.passed)


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    atol: float
    rtol: float
    outputs: list = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.outputs) and all(o.passed for o in self.outputs)

    def as_dict(self) -> dict:
        return dict(reference=self.reference, candidate=self.candidate, atol=self.atol,
                    rtol=self.rtol, passed=self.passed, error=self.error or None,
                    outputs=[o.as_dict() for o in self.outputs])

    def __str__(self) -> str:
        head = f"{self.candidate} vs {self.reference} (atol={self.atol:g}, rtol={self.rtol:g}): " \
               f"{'PASS' if self.passed else 'FAIL'}"
        if self.error:
            return head + f"\n  {self.error}"
        rows = [head]
        for o in self.outputs:
            rows.append(f"  {o.name} {tuple(o.shape)}: max abs {o.max_abs:.3e}, max rel "
                        f"{o.max_rel:.3e}, mean abs {o.mean_abs:.3e}, top-1 agree "
                        f"{100 * o.top1_agree:.1f}% -> {'ok' if o.passed else 'MISMATCH'}")
        return "\n".join(rows)


def _as_list(out) -> list:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def compare(reference: Sequence, candidate: Sequence, *, atol: float = DEFAULT_ATOL,
            rtol: float = DEFAULT_RTOL, names: Sequence[str] | None = None,
            ref_name: str = "reference", cand_name: str = "candidate") -> VerifyReport:
    """Compare already-computed outputs (lists of arrays, one entry per output)."""
    report = VerifyReport(ref_name, cand_name, atol, rtol)
    reference, candidate = _as_list(reference), _as_list(candidate)
    if len(reference) != len(candidate):
        report.error = f"{len(reference)} reference outputs vs {len(candidate)} candidate outputs"
        return report
    for i, (a, b) in enumerate(zip(reference, candidate)):
        a, b = _np(a), _np(b)
        name = names[i] if names and i < len(names) else f"output{i}"
        if a.shape != b.shape:
            report.error = f"{name}: shape {a.shape} vs {b.shape}"
            return report
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        rel = diff / np.maximum(np.abs(a.astype(np.float64)), 1e-12)
        top1 = float((a.reshape(a.shape[0], -1).argmax(-1) == b.reshape(b.shape[0], -1).argmax(-1))
                     .mean()) if a.ndim >= 2 and a.shape[0] else 1.0
        passed = finite and bool(np.all(diff <= atol + rtol * np.abs(a)))
        report.outputs.append(OutputComparison(
            name, a.shape, float(diff.max()) if diff.size else 0.0,
            float(rel.max()) if rel.size else 0.0, float(diff.mean()) if diff.size else 0.0,
            top1, passed))
    return report


def _describe(x) -> str:
    return getattr(x, "label", None) or type(x).__name__


def run_outputs(fn: Union[torch.nn.Module, Callable], batches: Iterable[torch.Tensor]
                ) -> list[np.ndarray]:
    """Every output of ``fn`` over ``batches``, concatenated along the batch (eval, no grad).

    Computing a reference once and comparing several candidates against it is what keeps a
    deploy run fast: the unfused model is the expensive side.
    """
    module = fn if isinstance(fn, torch.nn.Module) else None
    mode = module.training if module is not None else None
    outs = []
    try:
        if module is not None:      # dropout / batch statistics would make any comparison noise
            module.eval()
        with torch.inference_mode():
            for x in batches:
                outs.append([_np(o) for o in _as_list(_call(fn, x))])
    finally:
        if module is not None:
            module.train(mode)
    if not outs:
        raise UsageError("no inputs to compare on")
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def verify(reference: Union[torch.nn.Module, Callable], candidate: Union[torch.nn.Module, Callable],
           inputs: Union[torch.Tensor, Iterable[torch.Tensor]], *, atol: float = DEFAULT_ATOL,
           rtol: float = DEFAULT_RTOL, names: Sequence[str] | None = None) -> VerifyReport:
    """Run both on every input batch and compare all outputs, concatenated over batches."""
    batches = [inputs] if isinstance(inputs, (torch.Tensor, dict)) else list(inputs)
    return compare(run_outputs(reference, batches), run_outputs(candidate, batches), atol=atol,
                   rtol=rtol, names=names, ref_name=_describe(reference),
                   cand_name=_describe(candidate))


def _call(fn, x):
    if isinstance(fn, torch.nn.Module):
        ref = next(fn.parameters(), None)
        if ref is not None:
            x = inputs_to(x, ref.device, ref.dtype)
        return call_model(fn, x)   # named inputs (text) as keyword arguments
    return fn(x)
