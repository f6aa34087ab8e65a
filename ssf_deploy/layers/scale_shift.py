"""The SSF-ADA operation ``y = scale * x + shift`` along one channel axis (paper Eq. 4).

Three ways to run the same maths:

* ``graph`` — a registered custom op, ``torch.ops.ssf_deploy.scale_shift``, so that a
  ``torch.export`` trace shows every SSF as one node whose producer the fuser can find.
* ``naive`` — ``x * scale + shift`` as separate autograd ops, exactly like the official code.
  The ``mul`` keeps ``x`` alive for backward although the next op usually keeps ``y`` too.
* ``lean`` (default for training) — no tensor is kept that the frozen network does not keep anyway:

  - after a last-dim LayerNorm (:func:`layer_norm_scale_shift`): the norm runs with weight
    ``scale*w`` and bias ``scale*b + shift``; its own backward yields the affine gradients, it
    keeps only what a frozen norm keeps (its input and statistics);
  - after a frozen Linear (:func:`linear_scale_shift`): ``F.linear(x, scale*W, scale*b + shift)``
    in one autograd function — no separate SSF tensor, no elementwise pass forward or backward;
    ``d scale = (sum g*y - shift * sum g) / scale`` from ``y``, which the consumer keeps anyway
    (attention's q/k/v, the MLP activation's input) or, where only a residual add reads it, from
    ``y = after - before``: the inputs of the two neighbouring norms (:class:`ResidualSlot`);
  - anywhere else (:func:`scale_shift`): a custom function keeping ``y`` (``x`` recovered as
    ``(y - shift) / scale``), the producer's input (the norm output recomputed), or ``x``.

  Recovering from ``y`` divides by ``scale``; a site whose ``|scale|`` has a value below
  :data:`RECOVER_MIN_ABS_SCALE` keeps ``x`` instead. That is decided once per training step for
  the whole model (:func:`scales_recoverable`, one device sync), not per site.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["scale_shift", "ssf_mode", "current_mode", "MODES", "LeanPolicy",
           "layer_norm_recompute", "linear_scale_shift", "layer_norm_scale_shift",
           "ResidualSlot", "scales_recoverable", "RECOVER_MIN_ABS_SCALE"]

MODES = ("lean", "naive", "graph")
_state = threading.local()

# |scale| below this makes recovering x from y ill-conditioned: keep x instead.
RECOVER_MIN_ABS_SCALE = 1e-3


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


def current_mode(default: Optional[str] = None) -> str:
    """The mode an SSF site runs in now: a forced :func:`ssf_mode`, else ``default``, else lean.

    Under ``torch.compile`` lean runs as naive: the compiler fuses the elementwise ops into their
    neighbours and its partitioner chooses what to keep, where the lean path's per-step Python
    state would only break the graph.
    """
    mode = getattr(_state, "mode", None) or default or "lean"
    if mode == "lean" and torch.compiler.is_compiling():
        return "naive"
    return mode


def scales_recoverable(scales: Sequence[torch.Tensor]) -> list[bool]:
    """Per scale tensor: are all its values at least :data:`RECOVER_MIN_ABS_SCALE` in magnitude?

    One device sync for the common case (all are), wherever the tensors live.
    """
    scales = [s.detach() for s in scales]
    if not scales:
        return []
    flat = torch.cat([s.reshape(-1).abs() for s in scales])
    if bool((flat >= RECOVER_MIN_ABS_SCALE).all()):
        return [True] * len(scales)
    return [bool((s.abs() >= RECOVER_MIN_ABS_SCALE).all()) for s in scales]


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
    (ResNet's ``x += shortcut``, in-place ReLU). The first training forward keeps ``x`` and
    watches ``y``; ``settle()`` — called once the whole model forward has run — decides from what
    it saw. ``step_ok`` is this step's verdict of :func:`scales_recoverable` for the site (set
    once per step by the model's forward pre-hook; ``None``: the site checks for itself).
    """
    __slots__ = ("recover", "step_ok", "shape", "_probe", "_version", "__weakref__")

    def __init__(self):
        self.recover: Optional[bool] = None
        self.step_ok: Optional[bool] = None
        self.shape: Optional[tuple] = None
        self._probe = None
        self._version = 0

    def watch(self, y: torch.Tensor) -> None:
        self._probe, self._version, self.shape = weakref.ref(y), y._version, tuple(y.shape)

    def settle(self) -> None:
        if self.recover is None and self._probe is not None:
            y = self._probe()
            self.recover = y is not None and y._version == self._version
            self._probe = None

    def scale_ok(self, scale: torch.Tensor) -> bool:
        if self.step_ok is not None:
            return self.step_ok
        return scales_recoverable([scale])[0]


def _keep_graph() -> bool:
    """Is the running backward asked to keep the graph (``retain_graph=True``)?"""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(get()) if get is not None else False


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
        elif policy is not None and policy.recover and policy.scale_ok(scale):
            ctx.how = "recover"
            ctx.save_for_backward(y, scale, shift)
        else:
            ctx.how = "keep"
            ctx.save_for_backward(x, scale, shift)
            if policy is not None and policy.recover is None:
                policy.watch(y)
                ctx.ssf_policy = policy   # lets the settle step find this site in the graph
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


class ResidualSlot:
    """Where a folded Linear site whose output only a residual add reads finds ``y`` in backward.

    ``before`` and ``after`` are the inputs of the norms on either side of that add (``after =
    before + y``); both norms keep them for their own backward, so they are aliases, not copies.
    ``y`` is the site's own output, held only until ``after`` arrives: if the step never
    delivers it, backward still has the exact value.
    """
    __slots__ = ("before", "after", "y")

    def __init__(self, before: torch.Tensor):
        self.before: Optional[torch.Tensor] = before
        self.after: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None

    def deliver(self, after: torch.Tensor) -> None:
        self.after, self.y = after, None

    def value(self) -> Optional[torch.Tensor]:
        if self.after is not None and self.before is not None:
            return self.after - self.before
        return self.y

    def release(self) -> None:
        self.before = self.after = self.y = None


def _channel_sums(g: torch.Tensor, y: torch.Tensor, acc: torch.dtype):
    """Per channel (last axis of 2-D ``g``, ``y``): ``(sum g*y, sum g)``, reduced in ``acc``.

    One fused pass where the backend has it: batch-norm's backward reduction with mean 0 and
    inverse std 1 computes exactly these two sums (its ``grad_weight`` and ``grad_bias``) without
    materialising ``g*y``; about twice as fast as a multiply and two sums on a CPU.
    """
    if g.dtype == y.dtype and g.dtype in (torch.float32, torch.float64):
        c = g.shape[-1]
        ones = torch.ones(c, dtype=acc, device=g.device)
        zeros = torch.zeros(c, dtype=acc, device=g.device)
        try:
            _, gy, gsum = torch.ops.aten.native_batch_norm_backward(
                g, y, ones, None, None, zeros, ones, True, 0.0, [False, True, True])
            return gy, gsum
        except (RuntimeError, NotImplementedError):   # pragma: no cover - backend without it
            pass
    ga = g if g.dtype == acc else g.to(acc)
    return (ga * y).sum(0), ga.sum(0)


def _folded(weight, bias, scale, shift, dtype=None):
    """``scale * W`` and ``scale * b + shift`` (either factor may be absent, ``b`` too)."""
    w = weight if scale is None else weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bias
    if scale is not None and b is not None:
        b = b * scale
    if shift is not None:
        b = shift if b is None else b + shift
    if dtype is not None:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    return w, b


class _LinearScaleShift(torch.autograd.Function):
    """``F.linear(x, scale*W, scale*b + shift)`` for a frozen ``W``/``b``: SSF folded into its
    producer while training. Keeps ``y`` (shared with a consumer that keeps it anyway), or
    nothing but a :class:`ResidualSlot`; never ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, slot: Optional[ResidualSlot]):
        w, b = _folded(weight, bias, scale, shift)
        y = F.linear(x, w, b)
        ctx.x_dtype = x.dtype
        ctx.slot = None
        keep_y = scale is not None and slot is None
        ctx.save_for_backward(weight, scale, shift, y if keep_y else None)
        if scale is not None and slot is not None:
            slot.y = y.detach()
            ctx.slot = slot
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, scale, shift, y = ctx.saved_tensors
        gx = gscale = gshift = None
        if ctx.needs_input_grad[0]:
            w, _ = _folded(weight, None, scale, None, dtype=grad.dtype)
            gx = F.linear(grad, w.t()).to(ctx.x_dtype)
        acc = _acc(grad)
        c = grad.shape[-1]
        g = grad.reshape(-1, c)
        gsum = None
        with torch.no_grad():
            if scale is not None and ctx.needs_input_grad[3]:
                slot = ctx.slot
                if slot is not None:
                    y = slot.value()
                    if y is None:
                        raise RuntimeError(
                            "lean SSF: this graph was already back-propagated and released its "
                            "residual values; backward twice through it with "
                            "apply_method(..., impl='naive') or retain_graph=True on the first")
                    if not _keep_graph():
                        slot.release()
                        ctx.slot = None
                # sum(g * x) with x = (y - shift) / scale, x never materialised
                per_c, gsum = _channel_sums(g, y.reshape(-1, c), acc)
                if shift is not None:
                    per_c = per_c - shift.to(acc) * gsum
                per_c = per_c / scale.to(acc)
                gscale = (per_c.sum() if scale.numel() == 1 else per_c).reshape(scale.shape)
                gscale = gscale.to(scale.dtype)
            if shift is not None and ctx.needs_input_grad[4]:
                if gsum is None:
                    gsum = g.sum(0, dtype=acc)
                gshift = gsum.to(shift.dtype)
        return gx, None, None, gscale, gshift, None


def linear_scale_shift(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                       slot: Optional[ResidualSlot] = None) -> torch.Tensor:
    """SSF after a frozen Linear, folded into it (lean training; see the module docstring).

    Without ``slot`` it keeps ``y``, so use it where a consumer keeps ``y`` anyway and every
    ``|scale|`` is at least :data:`RECOVER_MIN_ABS_SCALE`; with ``slot`` it keeps nothing.
    """
    return _LinearScaleShift.apply(x, weight, bias, scale, shift, slot)


def layer_norm_scale_shift(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float,
                           scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]
                           ) -> torch.Tensor:
    """SSF after a last-dim LayerNorm, folded into it: ``layer_norm(x, scale*w, scale*b+shift)``.

    Plain autograd: the norm's backward gives ``d w'`` and ``d b'`` and the chain rule through the
    two d-vectors gives ``d scale = d w' * w + d b' * b``, ``d shift = d b'``. It keeps what a
    frozen norm keeps, and the folded weight (d values).
    """
    if scale is not None:
        n = int(normalized_shape[-1])
        w = scale.expand(n) if weight is None else weight * scale
        b = None if bias is None else bias * scale
    else:
        w, b = weight, bias
    if shift is not None:
        b = shift if b is None else b + shift
    return F.layer_norm(x, normalized_shape, w, b, eps)


def scale_shift(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                dim: int, *, mode: Optional[str] = None, recompute: Optional[Callable] = None,
                recompute_input: Optional[torch.Tensor] = None,
                policy: Optional[LeanPolicy] = None) -> torch.Tensor:
    """Apply SSF-ADA. ``recompute(recompute_input)`` must return ``x`` again (used by ``lean``)."""
    mode = current_mode(mode)
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
