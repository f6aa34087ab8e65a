"""The SSF-ADA operation ``y = scale * x + shift`` along one channel axis (paper Eq. 4).

Three ways to run the same maths:

* ``graph`` — a registered custom op, ``torch.ops.ssf_deploy.scale_shift``, so that a
  ``torch.export`` trace shows every SSF as one node whose producer the fuser can find.
* ``naive`` — ``x * scale + shift`` as separate autograd ops, exactly like the official code.
  The ``mul`` keeps ``x`` alive for backward although the next op usually keeps ``y`` too.
* ``lean`` (default for training) — a custom autograd function that keeps what the surrounding
  graph keeps anyway: ``y`` (``x`` is recovered as ``(y - shift) / scale``) or, after a LayerNorm,
  the norm's own input (the norm output is recomputed in backward).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["scale_shift", "ssf_mode", "MODES", "LeanPolicy", "layer_norm_recompute"]

MODES = ("lean", "naive", "graph")
_state = threading.local()

# |scale| below this makes recovering x from y ill-conditioned: keep x instead.
_RECOVER_MIN_ABS_SCALE = 1e-3


@contextlib.contextmanager
def ssf_mode(mode: str):
    """Force every SSF in this thread to run as ``mode`` (the fuser traces with ``graph``)."""
    if mode not in MODES:
        raise ValueError(f"unknown SSF mode {mode!r}; choose from {MODES}")
    old = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = old


def _bshape(x: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * x.dim()
    shape[dim] = -1
    return shape


def _reference(x, scale, shift, dim):
    """Separate mul and add, exactly as the official code computes it (and autograd sees it)."""
    shape = _bshape(x, dim)
    y = x
    if scale is not None:
        y = y * scale.to(x.dtype).reshape(shape)
    if shift is not None:
        y = y + shift.to(x.dtype).reshape(shape)
    return y


def _inference(x, scale, shift, dim):
    """No autograd: one fused pass (addcmul) instead of a mul and an add over the activation."""
    if scale is None or shift is None:
        return _reference(x, scale, shift, dim)
    shape = _bshape(x, dim)
    return torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


@torch.library.custom_op("ssf_deploy::scale_shift", mutates_args=())
def _graph_op(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
              dim: int) -> torch.Tensor:
    return _reference(x, scale, shift, dim).clone()


@_graph_op.register_fake
def _(x, scale, shift, dim):
    return torch.empty_like(x)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulate reductions in at least float32 (fp16/bf16 AMP), float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _reduce_dims(t: torch.Tensor, dim: int) -> list[int]:
    dim = dim % t.dim()
    return [d for d in range(t.dim()) if d != dim]


class LeanPolicy:
    """Per-site memory: may this site keep ``y`` instead of ``x``?

    Keeping ``y`` is free only when a later op keeps it too and nothing changes it in place
    (ResNet's ``x += shortcut``, in-place ReLU). The first forward keeps ``x`` and watches ``y``;
    ``settle()`` — called once the whole model forward has run — decides from what it saw.
    """
    __slots__ = ("recover", "_probe", "_version")

    def __init__(self):
        self.recover: Optional[bool] = None
        self._probe = None
        self._version = 0

    def watch(self, y: torch.Tensor) -> None:
        self._probe, self._version = weakref.ref(y), y._version

    def settle(self) -> None:
        if self.recover is None and self._probe is not None:
            y = self._probe()
            self.recover = y is not None and y._version == self._version
            self._probe = None


class _LeanScaleShift(torch.autograd.Function):
    """Saves ``y`` (shared with the consumer) or the producer's input, never an extra ``x``."""

    @staticmethod
    def forward(ctx, x, scale, shift, dim, recompute: Optional[Callable], recompute_input,
                policy: Optional[LeanPolicy]):
        shape = _bshape(x, dim)
        if shift is not None:
            y = torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))
        else:
            y = x * scale.to(x.dtype).reshape(shape)
        ctx.dim, ctx.has_shift = dim, shift is not None
        ctx.recompute = None
        if recompute is not None and recompute_input is not None:
            ctx.how = "recompute"
            ctx.recompute = recompute
            ctx.save_for_backward(recompute_input, scale, shift)
        elif policy is not None and policy.recover and \
                bool((scale.detach().abs() >= _RECOVER_MIN_ABS_SCALE).all()):
            ctx.how = "recover"
            ctx.save_for_backward(y, scale, shift)
        else:
            ctx.how = "keep"
            ctx.save_for_backward(x, scale, shift)
            if policy is not None and policy.recover is None:
                policy.watch(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        saved, scale, shift = ctx.saved_tensors
        shape = _bshape(grad, ctx.dim)
        gx = grad * scale.to(grad.dtype).reshape(shape) if ctx.needs_input_grad[0] else None
        gscale = gshift = None
        dims = _reduce_dims(grad, ctx.dim)
        acc = _acc(grad)
        g = grad.to(acc)
        with torch.no_grad():
            gsum = g.sum(dims) if (ctx.has_shift or ctx.how == "recover") else None
            if ctx.needs_input_grad[1]:
                if ctx.how == "recover":
                    # sum(g * x) with x = (y - shift) / scale, without materialising x:
                    # (sum(g * y) - shift * sum(g)) / scale, one pass over y like the naive path
                    per_c = (g * saved.to(acc)).sum(dims)
                    if shift is not None:
                        per_c = per_c - shift.to(acc) * gsum
                    per_c = per_c / scale.to(acc)
                else:
                    x = ctx.recompute(saved) if ctx.how == "recompute" else saved
                    per_c = (g * x.to(acc)).sum(dims)
                gscale = (per_c.sum() if scale.numel() == 1 else per_c).reshape(scale.shape)
                gscale = gscale.to(scale.dtype)
            if ctx.has_shift and ctx.needs_input_grad[2]:
                gshift = gsum.to(shift.dtype)
        return gx, gscale, gshift, None, None, None, None


def scale_shift(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                dim: int, *, mode: Optional[str] = None, recompute: Optional[Callable] = None,
                recompute_input: Optional[torch.Tensor] = None,
                policy: Optional[LeanPolicy] = None) -> torch.Tensor:
    """Apply SSF-ADA. ``recompute(recompute_input)`` must return ``x`` again (used by ``lean``)."""
    mode = getattr(_state, "mode", None) or mode or "lean"
    if mode == "graph":
        return torch.ops.ssf_deploy.scale_shift(x, scale, shift, dim)
    if not torch.is_grad_enabled():
        return _inference(x, scale, shift, dim)
    if mode == "naive" or scale is None:
        return _reference(x, scale, shift, dim)
    return _LeanScaleShift.apply(x, scale, shift, dim, recompute, recompute_input, policy)


def layer_norm_recompute(module: torch.nn.LayerNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """Recompute a last-dim LayerNorm's output from its (already saved) input."""
    def run(inp: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(inp, module.normalized_shape, module.weight, module.bias, module.eps)
    return run
