"""SSF: a learnable per-channel scale and shift after every operation with a linear coefficient.

Sites are found by module type, not by architecture: Linear, Conv (incl. depthwise/grouped),
LayerNorm (channels-last and timm's channels-first ``LayerNorm2d``), BatchNorm, GroupNorm; for
timm's fused norm+activation layers (``BatchNormAct2d``...) the factors go between norm and
activation. The classifier head is excluded (it trains fully). Parameters are registered on the
producing module as ``ssf_scale``/``ssf_shift``, so base parameter names never change.
Options reproduce the ablations of the paper's Table 6.

Training (``impl="lean"``) keeps no tensor the frozen network does not keep: a frozen Linear or a
last-dim LayerNorm computes its SSF folded in (see :mod:`ssf_deploy.layers.scale_shift`); a
Linear whose output only a residual add reads gets ``y`` back as the difference of the inputs of
the two norms around that add. Which sites qualify is learned from the autograd graph of the
first training step (:func:`_find_links`), not from module names; :func:`lean_report` says
what each site keeps.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..layers.scale_shift import (LeanPolicy, ResidualSlot, current_mode, layer_norm_recompute,
                                  layer_norm_scale_shift, linear_scale_shift, scale_shift,
                                  scales_recoverable)
from ..models import family_of, head_modules
from .base import (Tuner, add_forward, add_hook, add_params, base_forward, owner_of, register,
                   set_owner)

ROLES = ("embed", "attn", "mlp", "norm", "final", "other")
INITS = ("normal", "trunc_normal", "uniform", "constant", "random")
_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_BLOCK_RE = re.compile(r"^(.*?(?:blocks|layer\d+)\.\d+)(?:\.|$)")
_EMBED_ROOTS = ("patch_embed", "stem", "conv_stem", "stem_conv")


@dataclass(frozen=True)
class Site:
    """Where one SSF-ADA goes: its module, channel count and channel axis."""
    name: str
    module: nn.Module
    channels: int
    dim: int
    role: str
    block: Optional[str]
    before_act: bool = False   # norm+act layer: apply between norm and activation


def _channel_dim_of_norm(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):   # timm's LayerNorm2d; transformers' data_format flag
        channels_first = type(m).__name__.endswith("2d") or \
            getattr(m, "data_format", None) == "channels_first"
        return 1 if channels_first else -1
    return 1


def site_of(name: str, m: nn.Module) -> Optional[tuple[int, int, bool]]:
    """(channels, channel axis, before_act) for a module SSF follows, else None."""
    if isinstance(m, nn.Linear):
        return m.out_features, -1, False
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return m.out_channels, 1, False
    if isinstance(m, _NORMS):
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                return None
            c = m.normalized_shape[0]
        elif isinstance(m, nn.GroupNorm):
            c = m.num_channels
        else:
            c = m.num_features
        return c, _channel_dim_of_norm(m), isinstance(getattr(m, "act", None), nn.Module)
    return None


def _role(name: str, m: nn.Module, block: Optional[str]) -> str:
    parts = name.split(".")
    if parts[0] in _EMBED_ROOTS:
        return "embed"
    if block is None:
        return "final" if isinstance(m, _NORMS) else "other"
    if any(p == "attn" or p.startswith("attn_") for p in parts):
        return "attn"
    if any(p.startswith("mlp") for p in parts):
        return "mlp"
    if isinstance(m, _NORMS):
        return "norm"
    return "other"


def _bias_free(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is None


def find_sites(model: nn.Module, bias_free: bool = False) -> list[Site]:
    """Every SSF site in module order, head excluded.

    Bias-less Linear/Conv are skipped unless ``bias_free``: their shift has nowhere to go at fuse
    time (the base graph would gain an Add), and where a norm follows (ResNet, EfficientNet) the
    norm's own SSF already covers the same per-channel affine.
    """
    excluded = {id(x) for h in head_modules(model) for x in h.modules()}
    family = family_of(model)   # another family's module names (transformers) place its sites
    sites = []
    for name, m in model.named_modules():
        if not name or id(m) in excluded:
            continue
        spec = site_of(name, m)
        if spec is None or (_bias_free(m) and not bias_free):
            continue
        place = family.site_place(name, m) if family is not None else None
        if place is None:
            match = _BLOCK_RE.match(name)
            block = match.group(1) if match else None
            place = block, _role(name, m, block)
        c, dim, before_act = spec
        sites.append(Site(name, m, c, dim, place[1], place[0], before_act))
    return sites


def _init_(t: torch.Tensor, how: str, mean: float, std: float) -> None:
    with torch.no_grad():
        if how == "normal":
            nn.init.normal_(t, mean, std)
        elif how == "trunc_normal":
            nn.init.trunc_normal_(t, mean, std, a=mean - 2 * std, b=mean + 2 * std)
        elif how == "uniform":
            nn.init.uniform_(t, mean - std, mean + std)
        elif how == "constant":
            nn.init.constant_(t, mean)
        elif how == "random":   # Table 6c "random": both factors centred at zero
            nn.init.normal_(t, 0.0, std)


@register
class SSF(Tuner):
    name = "ssf"
    key_pattern = r"(^|\.)ssf_(scale|shift)$"

    @dataclass
    class Config:
        blocks: Optional[int] = field(default=None, metadata={
            "cli": "--ssf-blocks", "help": "SSF only in the first N blocks (Table 6a)."})
        exclude: tuple = field(default=(), metadata={
            "cli": "--ssf-exclude", "csv": True,
            "help": "Comma list of roles without SSF: embed,attn,mlp,norm,final (Table 6b)."})
        only: tuple = field(default=(), metadata={
            "cli": "--ssf-only", "csv": True, "help": "Comma list of roles that keep SSF (6d)."})
        scale: bool = field(default=True, metadata={
            "cli": "--ssf-no-scale", "flag": False, "help": "Shift only (Table 6d)."})
        shift: bool = field(default=True, metadata={
            "cli": "--ssf-no-shift", "flag": False, "help": "Scale only (Table 6d)."})
        scalar_scale: bool = field(default=False, metadata={
            "cli": "--ssf-scalar-scale", "flag": True, "help": "One scale per site (Table 6d)."})
        init: str = field(default="normal", metadata={
            "cli": "--ssf-init", "choices": INITS,
            "help": "Factor initialisation (Table 6c, default normal)."})
        init_std: float = 0.02
        impl: str = field(default="lean", metadata={
            "cli": "--ssf-impl", "choices": ("lean", "naive"),
            "help": "SSF autograd: lean (default, saves memory) or naive (x*scale+shift)."})
        bias_free: bool = field(default=False, metadata={
            "cli": "--ssf-bias-free", "flag": True,
            "help": "Also after bias-less Linear/Conv (fusing may then add a bias)."})

        def validate(self):
            object.__setattr__(self, "exclude", tuple(self.exclude or ()))
            object.__setattr__(self, "only", tuple(self.only or ()))
            bad = [r for r in (*self.exclude, *self.only) if r not in ROLES]
            if bad:
                raise UsageError(f"unknown SSF role(s) {bad}; choose from {', '.join(ROLES)}")
            if self.init not in INITS:
                raise UsageError(f"unknown SSF init {self.init!r}; choose from {', '.join(INITS)}")
            if self.impl not in ("lean", "naive"):
                raise UsageError(f"SSF impl must be lean or naive, got {self.impl!r}")
            if not (self.scale or self.shift):
                raise UsageError("SSF needs at least one of scale and shift")
            if self.blocks is not None and int(self.blocks) < 0:
                raise UsageError(f"blocks must be >= 0, got {self.blocks}")

    @classmethod
    def select(cls, model: nn.Module, cfg) -> list[Site]:
        sites = find_sites(model, bias_free=cfg.bias_free)
        if cfg.blocks is not None:
            order = list(dict.fromkeys(s.block for s in sites if s.block is not None))
            keep = set(order[: int(cfg.blocks)])
            sites = [s for s in sites if s.block is None or s.block in keep]
        if cfg.only:
            sites = [s for s in sites if s.role in cfg.only]
        if cfg.exclude:
            sites = [s for s in sites if s.role not in cfg.exclude]
        return sites

    @classmethod
    def inject(cls, model, cfg):
        sites = cls.select(model, cfg)
        if not sites:
            raise UsageError(f"no SSF site found in {type(model).__name__} with these options")
        for s in sites:
            ref = next(s.module.parameters(), None)
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
            device = ref.device if ref is not None else None
            if cfg.scale:
                scale = nn.Parameter(torch.empty(1 if cfg.scalar_scale else s.channels,
                                                 dtype=dtype, device=device))
                _init_(scale, cfg.init, 1.0, cfg.init_std)
                add_params(s.module, "ssf_scale", scale)
            if cfg.shift:
                shift = nn.Parameter(torch.empty(s.channels, dtype=dtype, device=device))
                _init_(shift, cfg.init, 0.0, cfg.init_std)
                add_params(s.module, "ssf_shift", shift)
            cls._attach(s, cfg.impl)
        add_hook(model, _begin_step, pre=True)
        add_hook(model, _settle)

    @staticmethod
    def _attach(s: Site, impl: str) -> None:
        # Hooks read everything per call from the module they are called with (or its owner):
        # a deepcopy (timm's ModelEmaV2) then runs on its own factors and its own lean state.
        kind = "linear" if _foldable_linear(s) else "norm" if _foldable_norm(s) else "hook"
        add_params(s.module, "ssf_state", _SiteState(kind, impl))
        dim = s.dim
        if s.before_act:
            # norm + activation in one module: the factors go on the activation's input
            set_owner(s.module.act, s.module)

            def pre(act, args):
                owner = owner_of(act)
                return (scale_shift(args[0], getattr(owner, "ssf_scale", None),
                                    getattr(owner, "ssf_shift", None), dim, mode=impl,
                                    policy=owner.ssf_state.policy), *args[1:])
            add_hook(s.module.act, pre, pre=True)
            return
        if kind == "linear":
            add_forward(s.module, _linear_forward)
            return
        if kind == "norm":
            add_forward(s.module, _norm_forward)
            return
        # A channels-last LayerNorm keeps its own input for backward: recompute from it.
        recompute = isinstance(s.module, nn.LayerNorm) and s.dim == -1

        def post(module, args, out):
            return scale_shift(out, getattr(module, "ssf_scale", None),
                               getattr(module, "ssf_shift", None), dim, mode=impl,
                               recompute=layer_norm_recompute(module) if recompute else None,
                               recompute_input=args[0] if recompute else None,
                               policy=module.ssf_state.policy)
        add_hook(s.module, post)


# ------------------------------------------------------------------------------------------
# lean training: SSF folded into frozen Linear / LayerNorm producers


def _foldable_linear(s: Site) -> bool:
    return type(s.module) is nn.Linear and s.dim == -1 and not s.before_act


def _foldable_norm(s: Site) -> bool:
    """A last-dim LayerNorm whose forward is exactly ``F.layer_norm`` with its own parameters."""
    if s.dim != -1 or s.before_act:
        return False
    if type(s.module) is nn.LayerNorm:
        return True
    from timm.layers import LayerNorm as TimmLayerNorm
    return type(s.module) is TimmLayerNorm and not getattr(s.module, "_fast_norm", False)


class _SiteState(nn.Module):
    """One site's lean-training state, as a submodule: no parameters, no state_dict entry,
    copied along with the model and dropped by ``unload``.

    Per model lifetime: the :class:`LeanPolicy` (keep ``y``?), and for a folded Linear whose
    output only a residual add reads, ``link = (before, after)``: the norm sites whose inputs are
    that add's operand and result. Per training step (set by the model's forward pre-hook,
    cleared by its post-hook): ``fresh``, the aliases a publishing norm hands out (``current``)
    and the slots waiting for a norm's input (``waiting``).
    """

    def __init__(self, kind: str, impl: str):
        super().__init__()
        self.kind, self.impl = kind, impl     # kind: "linear" | "norm" | "hook"
        self.policy = LeanPolicy()
        self.settled = False
        self.fresh = self.probing = False
        self.calls = 0
        self.publish = False                  # a linear site reads this norm's input
        self.keeps_input = False              # the folded norm keeps its input (no cast copy)
        self.current: Optional[torch.Tensor] = None
        self.waiting: list = []
        self.probe_input = None               # weakref to the input during the probe step
        object.__setattr__(self, "link", None)   # (before, after) _SiteState, not submodules

    def set_link(self, before: "_SiteState", after: "_SiteState") -> None:
        object.__setattr__(self, "link", (before, after))

    def end_step(self) -> None:
        self.fresh = self.probing = False
        self.current, self.waiting, self.probe_input = None, [], None
        self.policy.step_ok = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in (module.weight, module.bias) if p is not None)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    st = module.ssf_state
    scale, shift = getattr(module, "ssf_scale", None), getattr(module, "ssf_shift", None)
    if current_mode(st.impl) == "lean" and torch.is_grad_enabled() and _frozen(module):
        if st.fresh:
            st.calls += 1
        if scale is None:   # shift only: b' = b + shift, nothing to keep
            return linear_scale_shift(x, module.weight, module.bias, None, shift)
        if st.settled and st.policy.scale_ok(scale):
            link = st.link if st.fresh else None
            if link is not None and link[0].current is not None:
                slot = ResidualSlot(link[0].current)
                link[1].waiting.append(slot)
                return linear_scale_shift(x, module.weight, module.bias, scale, shift, slot)
            if st.policy.recover:
                return linear_scale_shift(x, module.weight, module.bias, scale, shift)
    out = F.linear(x, module.weight, module.bias)
    return scale_shift(out, scale, shift, -1, mode=st.impl, policy=st.policy)


def _norm_forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    st = module.ssf_state
    scale, shift = getattr(module, "ssf_scale", None), getattr(module, "ssf_shift", None)
    if current_mode(st.impl) != "lean" or not torch.is_grad_enabled():
        return scale_shift(base_forward(module, x), scale, shift, -1, mode=st.impl,
                           policy=st.policy)
    y = layer_norm_scale_shift(x, module.normalized_shape, module.weight, module.bias,
                               module.eps, scale, shift)
    if st.fresh:
        st.calls += 1
        if st.publish or st.waiting:
            alias = x.detach()
            if st.publish:
                st.current = alias
            for slot in st.waiting:
                slot.deliver(alias)
            st.waiting = []
        if st.probing:
            st.probe_input = weakref.ref(x)
            kept = getattr(y.grad_fn, "_saved_input", None)
            st.keeps_input = kept is not None and kept.data_ptr() == x.data_ptr()
    return y


def _states(model: nn.Module) -> list[_SiteState]:
    return [m for m in model.modules() if isinstance(m, _SiteState)]


def _begin_step(model, args):
    """Before a training forward: one device sync decides for every site whether its scale
    allows recovering ``x`` from ``y`` this step; open the step for residual links."""
    if not (model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    owners = [m for m in model.modules() if isinstance(m._modules.get("ssf_state"), _SiteState)]
    if not owners:
        return
    states = [m.ssf_state for m in owners]
    probing = not all(st.settled for st in states)
    with_scale = [(m.ssf_state, m.ssf_scale) for m in owners
                  if isinstance(getattr(m, "ssf_scale", None), torch.Tensor)]
    for (st, _), ok in zip(with_scale, scales_recoverable([sc for _, sc in with_scale])):
        st.policy.step_ok = ok
    for st in states:
        st.fresh, st.probing, st.calls = True, probing, 0
        st.current, st.waiting = None, []


def _settle(model, args, out):
    """After a whole training forward: the first one decides per site whether it may keep ``y``
    (see LeanPolicy) and which residual links exist; every one closes the step."""
    if not (model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    states = _states(model)
    if any(st.probing for st in states):
        for st in states:
            st.policy.settle()
        if all(st.calls <= 1 for st in states):   # a module run twice per step: no links
            _find_links(states)
        for st in states:
            st.settled = True
    for st in states:
        st.end_step()


def _find_links(states: list[_SiteState]) -> None:
    """Find folded Linear sites whose ``y`` only an ``after = before + y`` add reads, where a
    folded norm keeps ``before`` and another keeps ``after`` (a pre-norm residual block).

    Read from the probe step's autograd graph: the norm input ``after`` was made by an
    ``AddBackward0`` (alpha 1) whose two inputs are the site's output and the very value (same
    node and output index) another norm received as ``before``.
    """
    norms = []
    for st in states:
        x = st.probe_input() if (st.kind == "norm" and st.probe_input is not None) else None
        if x is not None and st.keeps_input:
            norms.append((st, x))
    by_value = {(id(x.grad_fn), x.output_nr): (st, x) for st, x in norms if x.grad_fn is not None}
    sites = {id(st.policy): st for st in states if st.kind == "linear"}
    for after, xa in norms:
        add = xa.grad_fn
        if add is None or add.name() != "AddBackward0" or getattr(add, "_saved_alpha", None) != 1:
            continue
        edges = add.next_functions
        if len(edges) != 2:
            continue
        for i in (0, 1):
            node, nr = edges[i]
            policy = getattr(node, "ssf_policy", None)
            site = sites.get(id(policy)) if policy is not None else None
            if site is None or nr != 0 or site.policy.recover:
                continue
            other, other_nr = edges[1 - i]
            hit = by_value.get((id(other), other_nr)) if other is not None else None
            if hit is None:
                continue
            before, xb = hit
            if before is after or tuple(xb.shape) != tuple(xa.shape) \
                    or site.policy.shape != tuple(xa.shape):
                continue
            site.set_link(before, after)
            before.publish = True


# what a lean site keeps for backward -> the sentence lean_report prints for it
KEEPS = {
    "norm": "nothing of its own: the norm's input and statistics, as a frozen norm",
    "shift-only": "nothing (shift folded into the bias)",
    "residual": "nothing: y = input({after}) - input({before}), both kept by those norms",
    "y-shared": "y, which its consumer keeps too (shared storage)",
    "recompute": "nothing of its own: the norm's input (its output recomputed)",
    "x": "x (its own copy: no consumer keeps y)",
    "naive": "x (naive: the mul keeps its input)",
    "unsettled": "not known before the first training step",
}


def lean_report(model: nn.Module) -> list[dict]:
    """What each SSF site keeps for backward in lean training (after the first training step).

    Rows ``{"site", "kind", "keeps", "detail"}``: ``keeps`` is a key of :data:`KEEPS`,
    ``detail`` its sentence for this site.
    """
    names = {id(m.ssf_state): n for n, m in model.named_modules()
             if isinstance(m._modules.get("ssf_state"), _SiteState)}
    rows = []
    for n, m in model.named_modules():
        st = m._modules.get("ssf_state")
        if not isinstance(st, _SiteState):
            continue
        has_scale = getattr(m, "ssf_scale", None) is not None
        fmt = {}
        if st.impl != "lean":
            keeps = "naive" if has_scale else "shift-only"
        elif st.kind == "norm":
            keeps = "norm"
        elif st.kind == "linear" and not has_scale:
            keeps = "shift-only"
        elif st.kind == "linear" and st.link is not None:
            keeps = "residual"
            fmt = {"before": names.get(id(st.link[0]), "?"), "after": names.get(id(st.link[1]), "?")}
        elif not st.settled:
            keeps = "unsettled"
        elif st.policy.recover:
            keeps = "y-shared"
        elif st.kind == "hook" and isinstance(m, nn.LayerNorm) and _channel_dim_of_norm(m) == -1:
            keeps = "recompute"
        else:
            keeps = "x"
        rows.append({"site": n, "kind": st.kind, "keeps": keeps,
                     "detail": KEEPS[keeps].format(**fmt)})
    return rows
