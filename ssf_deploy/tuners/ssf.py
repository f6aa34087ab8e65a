"""SSF: a learnable per-channel scale and shift after every operation with a linear coefficient.

Sites are found by module type, not by architecture: Linear, Conv (incl. depthwise/grouped),
LayerNorm (channels-last and timm's channels-first ``LayerNorm2d``), BatchNorm, GroupNorm; for
timm's fused norm+activation layers (``BatchNormAct2d``...) the factors go between norm and
activation. The classifier head is excluded (it trains fully). Parameters are registered on the
producing module as ``ssf_scale``/``ssf_shift``, so base parameter names never change.
Options reproduce the ablations of the paper's Table 6.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import UsageError
from ..layers.scale_shift import LeanPolicy, layer_norm_recompute, scale_shift
from ..models import head_modules
from .base import Tuner, add_hook, add_params, owner_of, register, set_owner

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
    if isinstance(m, nn.LayerNorm):
        return 1 if type(m).__name__.endswith("2d") else -1
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
    sites = []
    for name, m in model.named_modules():
        if not name or id(m) in excluded:
            continue
        spec = site_of(name, m)
        if spec is None or (_bias_free(m) and not bias_free):
            continue
        match = _BLOCK_RE.match(name)
        block = match.group(1) if match else None
        c, dim, before_act = spec
        sites.append(Site(name, m, c, dim, _role(name, m, block), block, before_act))
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
        add_hook(model, _settle)

    @staticmethod
    def _attach(s: Site, impl: str) -> None:
        # Hooks read everything per call from the module they are called with (or its owner):
        # a deepcopy (timm's ModelEmaV2) then runs on its own factors and its own lean policy.
        add_params(s.module, "ssf_policy", _PolicyHolder())
        dim = s.dim
        if s.before_act:
            # norm + activation in one module: the factors go on the activation's input
            set_owner(s.module.act, s.module)

            def pre(act, args):
                owner = owner_of(act)
                return (scale_shift(args[0], getattr(owner, "ssf_scale", None),
                                    getattr(owner, "ssf_shift", None), dim, mode=impl,
                                    policy=owner.ssf_policy.policy), *args[1:])
            add_hook(s.module.act, pre, pre=True)
            return
        # A channels-last LayerNorm keeps its own input for backward: recompute from it.
        recompute = isinstance(s.module, nn.LayerNorm) and s.dim == -1

        def post(module, args, out):
            return scale_shift(out, getattr(module, "ssf_scale", None),
                               getattr(module, "ssf_shift", None), dim, mode=impl,
                               recompute=layer_norm_recompute(module) if recompute else None,
                               recompute_input=args[0] if recompute else None,
                               policy=module.ssf_policy.policy)
        add_hook(s.module, post)


class _PolicyHolder(nn.Module):
    """Carries a site's :class:`LeanPolicy` as a submodule: no parameters, no state_dict entry,
    copied along with the model and dropped by ``unload``."""

    def __init__(self):
        super().__init__()
        self.policy = LeanPolicy()


def _settle(model, args, out):
    """After a whole training forward: decide per site whether it may keep ``y`` (see LeanPolicy)."""
    if model.training and torch.is_grad_enabled():
        for m in model.modules():
            if isinstance(m, _PolicyHolder):
                m.policy.settle()
