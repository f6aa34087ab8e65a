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
        raise UsageError("`atol` and `rtol` must be >= 0")
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
    # NaN/Inf values on each side and the rows holding any: such a comparison always fails, its
    # errors are over the values finite on both sides, and a row with one never "agrees"
    non_finite: dict = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        return not self.non_finite

    def as_dict(self) -> dict:
        def num(v):
            return v if v == v else None     # JSON has no NaN
        return dict(name=self.name, shape=list(self.shape), max_abs_error=num(self.max_abs),
                    max_rel_error=num(self.max_rel), mean_abs_error=num(self.mean_abs),
                    top1_agreement=self.top1_agree, allclose=self.passed,
                    non_finite=dict(self.non_finite) or None)

    def __str__(self) -> str:
        errors = (f"max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e}, mean abs "
                  f"{self.mean_abs:.3e}")
        verdict = "ok" if self.passed else "MISMATCH"
        if not self.non_finite:
            return (f"{self.name} {tuple(self.shape)}: {errors}, top-1 agree "
                    f"{100 * self.top1_agree:.1f}% -> {verdict}")
        nf = self.non_finite
        sides = "; ".join(f"the {side} holds {n} NaN/Inf value(s)"
                          for side, n in (("reference", nf["reference"]),
                                          ("candidate", nf["candidate"])) if n)
        finite = errors if nf["rows"] < self.shape[0] else "no row finite on both sides"
        return (f"{self.name} {tuple(self.shape)}: NON-FINITE OUTPUT: {sides} ({nf['rows']} of "
                f"{self.shape[0]} rows); such a comparison fails. Finite values: {finite}; top-1 "
                f"agree {100 * self.top1_agree:.1f}% (a row with NaN/Inf never agrees) -> "
                f"{verdict}")


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

    @property
    def non_finite(self) -> bool:
        """Some output held a NaN or an Inf (on either side)."""
        return any(o.non_finite for o in self.outputs)

    def why(self) -> str:
        """Why it failed, in a few words ('' when it passed)."""
        if self.passed:
            return ""
        if self.error:
            return self.error
        if self.non_finite:
            sides = sorted({side for o in self.outputs for side in ("reference", "candidate")
                            if o.non_finite.get(side)})
            return f"NaN/Inf in the {' and the '.join(sides)} output"
        return "outputs differ beyond tolerance"

    def as_dict(self) -> dict:
        return dict(reference=self.reference, candidate=self.candidate, atol=self.atol,
                    rtol=self.rtol, passed=self.passed, error=self.error or None,
                    outputs=[o.as_dict() for o in self.outputs])

    def __str__(self) -> str:
        head = f"{self.candidate} vs {self.reference} (atol={self.atol:g}, rtol={self.rtol:g}): " \
               f"{'PASS' if self.passed else 'FAIL'}"
        if self.error:
            return head + f"\n  {self.error}"
        return "\n".join([head] + [f"  {o}" for o in self.outputs])


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
        report.outputs.append(_compare_one(name, a, b, atol, rtol))
    return report


def _compare_one(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float
                 ) -> OutputComparison:
    """Errors over the values finite on both sides; any NaN/Inf fails the comparison."""
    bad_a, bad_b = ~np.isfinite(a), ~np.isfinite(b)
    both = ~(bad_a | bad_b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(np.where(both, a64, 0.0) - np.where(both, b64, 0.0))
    rel = diff / np.maximum(np.abs(np.where(both, a64, 0.0)), 1e-12)
    kept = diff[both]
    if a.ndim >= 1 and a.shape[0]:
        rows_bad = (bad_a | bad_b).reshape(a.shape[0], -1).any(-1)
    else:
        rows_bad = np.zeros(0, dtype=bool)
    non_finite = {}
    if bad_a.any() or bad_b.any():
        non_finite = {"reference": int(bad_a.sum()), "candidate": int(bad_b.sum()),
                      "rows": int(rows_bad.sum()) if rows_bad.size else 1}
    if a.ndim >= 2 and a.shape[0]:
        same = a.reshape(a.shape[0], -1).argmax(-1) == b.reshape(b.shape[0], -1).argmax(-1)
        top1 = float((same & ~rows_bad).mean())   # all-NaN rows all argmax to 0: not agreement
    else:
        top1 = 0.0 if non_finite else 1.0
    passed = not non_finite and bool(np.all(diff <= atol + rtol * np.abs(a64)))
    nan = float("nan")
    return OutputComparison(
        name, a.shape, float(kept.max()) if kept.size else (nan if non_finite else 0.0),
        float(rel[both].max()) if kept.size else (nan if non_finite else 0.0),
        float(kept.mean()) if kept.size else (nan if non_finite else 0.0),
        top1, passed, non_finite)


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
