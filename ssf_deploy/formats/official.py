"""Checkpoints written by the official SSF code (github.com/dongzelian/SSF, built on timm 0.6.5).

Its ``train.py`` saves through timm's ``CheckpointSaver``: ``{"state_dict", "arch" (= ``args.model``, a
timm-0.6 name such as ``vit_base_patch16_224_in21k``), "epoch", "args" (argparse.Namespace),
"optimizer", "version", ["state_dict_ema", "metric", "amp_scaler"...]}``. Its models carry the SSF
factors as ``<module>.ssf_scale_N`` / ``<module>.ssf_shift_N`` on the *enclosing* module, numbered by
position inside that module's forward, e.g. ``blocks.3.attn.ssf_scale_1`` multiplies ``qkv``'s output.

ssf-deploy registers its factors on the module that *produces* the scaled feature
(``blocks.3.attn.qkv.ssf_scale``). :func:`task_from_official` maps every official factor onto that
producer in today's timm (the tables below, read from the official ``models/*.py``), adapts the base
weights the way timm's own ``checkpoint_filter_fn`` does, and checks that ``apply_method(model, "ssf",
**options)`` on the rebuilt architecture creates exactly the mapped parameters - no more, no fewer,
same shapes. Anything else is refused with an :class:`CheckpointError` naming the official key, never
loaded into a model that would compute something different.

Three quirks of the official forward are reproduced exactly, each declared in its family's table and
measured against dongzelian/SSF@e94e0e7 on timm 0.6.5 (224 px, 100 classes, every tensor perturbed):

* **No factors on downsample layers.** Swin's ``BasicLayer`` and ConvNeXt's ``ConvNeXtStage`` hand the
  per-block ``tuning_mode`` *list* to ``PatchMerging`` / ``Downsample``, so ``tuning_mode == 'ssf'`` is
  False there: real checkpoints have no ``downsample.ssf_*`` keys. Those sites (``absent``) get the
  identity factors - exact.
* **Unbiased variance.** The official ConvNeXt ``LayerNorm2d`` takes ``torch.var_mean`` (unbiased) when
  its input is not contiguous - the downsample norms, whose input is the channels-last residual stream
  (max abs logit error 3.3e-3..4.8e-3 if ignored). With k = sqrt((C-1)/C),
  ``LN_unbiased(x) = k * LN(x) + (1-k) * bias`` up to eps (eps/(2*C*var) relative, 7.9e-9 at logits in
  float64): the site's SSF factors absorb it, the base weights stay as trained (``unbiased``). A run
  with ``--channels-last`` (recorded in ``args``) also feeds the stem norm a non-contiguous tensor
  (4.4e-3 if ignored): then the stem norm is corrected too.
* **A factor after the last ConvNeXt stage.** With pool -> head.norm ordering (every ConvNeXt but
  ``*_hnf``) ``norm_pre`` is Identity and the top-level ``ssf_scale_1/ssf_shift_1`` (s, t) scales the
  last stage's residual output, where timm has no module. The rebuilt model computes exactly that:
  ``norm_pre`` becomes a per-channel affine holding (s, t) (a graph edit, ``ssf_deploy.models``) whose
  record says how it folds: through that stage's residual stream into the stream's own SSF sites,
  which ``ssf_deploy.fuse`` does in float64 and then verifies against this rebuilt model like every
  other fold. Where a channel cannot fold exactly the deployable keeps the fewest extra nodes.

``convnext_*_hnf``: the official ``forward_features`` applies ``norm_pre`` twice (``x = norm_pre(x);
x = ssf(norm_pre(x))``), which no timm architecture computes (0.37 max abs logit error if applied
once). It is rebuilt with ``norm_pre`` applied twice (a ``twice`` edit: the second copy carries the
factor); ``fuse`` deploys it only with ``--allow-extra-nodes``, as the base graph + one LayerNorm.
A global-average-pool ViT (``fc_norm``, final norm Identity) is refused.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from ..fileio import plain as _plain
from ..models import apply_edits, create_base_model, edit_state, resolve_arch
from ..tuners import apply_method, unload
from .task import Task

__all__ = ["is_official", "task_from_official", "family_of", "RULES", "FAMILIES", "SOURCE"]

SOURCE = "official-ssf"

# An official factor key: optional enclosing-module path, then ssf_scale_N / ssf_shift_N.
_SSF_KEY = re.compile(r"^(?:(?P<path>.+)\.)?ssf_(?P<kind>scale|shift)_(?P<idx>\d+)$")
# Keys of other official tuning modes (``ssffc``: SSF + extra Linear) or any other ssf-ish name.
_SSF_LIKE = re.compile(r"(^|\.)ssf")

@dataclass(frozen=True)
class EditParam:
    """The factor is the parameter of a graph edit at ``path`` (scale -> ``path.weight``, shift ->
    ``path.bias``), not an SSF site: the official code applies it where timm has no module."""
    path: str


# a template (``\1`` = the path's groups), or a function of (match, model) giving the producer module
# or an EditParam; None where ssf-deploy has no site for that feature
Target = Union[str, Callable[[re.Match, nn.Module], Union[Optional[str], EditParam]], None]


@dataclass(frozen=True)
class Rule:
    """Official factor ``<path>.ssf_*_<idx>`` -> the producer module in today's timm (None: no site)."""
    path: str          # regex for the enclosing module path in the official model ("" = top level)
    idx: int           # the factor's number in that module's forward
    target: Target     # see Target
    where: str         # where the official code applies it (for messages and docs)
    unsupported: str = ""   # why, when target gives None

    def resolve(self, path: str, idx: int, model: nn.Module):
        """None if the rule does not match, else (our site | EditParam | None, self)."""
        if idx != self.idx:
            return None
        m = re.fullmatch(self.path, path)
        if m is None:
            return None
        if self.target is None:
            return None, self
        if callable(self.target):
            return self.target(m, model), self
        return m.expand(self.target), self


@dataclass(frozen=True)
class Family:
    """How the official code of one family differs from ssf-deploy's sites on today's timm."""
    rules: tuple            # official factor -> our site (Rule)
    absent: tuple = ()      # regexes of our sites the official forward never scales: identity factors
    unbiased: tuple = ()    # regexes of our LayerNorm2d sites the official code normalises with the
                            # UNBIASED variance (its LayerNorm2d on a non-contiguous input)
    unbiased_channels_last: tuple = ()   # ... and in addition when it ran with --channels-last
    refuse: Optional[Callable[[nn.Module], Optional[str]]] = None   # model -> why not, or None
    # (model, official factor keys) -> the graph edits the official forward needs on this model
    edits: Optional[Callable[[nn.Module, dict], dict]] = None


def _next_stage(fmt: str) -> Callable[[re.Match, nn.Module], str]:
    # timm >= 0.9 moved Swin's PatchMerging from the end of stage i to the start of stage i+1
    return lambda m, model: fmt.format(int(m.group(1)) + 1)


def _if_norm(name: str, otherwise=None):
    """``name`` when the model has a real norm there (not Identity), else ``otherwise``."""
    def target(m, model):
        mod = getattr(model, name, None)
        real = isinstance(mod, nn.Module) and not isinstance(mod, nn.Identity)
        return name if real else otherwise
    return target


# Read from dongzelian/SSF models/vision_transformer.py (Block, Attention, Mlp, PatchEmbed, top level).
_VIT = Family(rules=(
    Rule(r"patch_embed", 1, "patch_embed.proj", "after the patch projection (flattened to tokens)"),
    Rule(r"patch_embed", 2, "patch_embed.norm", "after the patch-embedding norm"),
    Rule(r"blocks\.(\d+)", 1, r"blocks.\1.norm1", "after norm1"),
    Rule(r"blocks\.(\d+)", 2, r"blocks.\1.norm2", "after norm2"),
    Rule(r"blocks\.(\d+)\.attn", 1, r"blocks.\1.attn.qkv", "after qkv, before the head split"),
    Rule(r"blocks\.(\d+)\.attn", 2, r"blocks.\1.attn.proj", "after the attention output proj"),
    Rule(r"blocks\.(\d+)\.mlp", 1, r"blocks.\1.mlp.fc1", "after fc1, before the activation"),
    Rule(r"blocks\.(\d+)\.mlp", 2, r"blocks.\1.mlp.fc2", "after fc2"),
    Rule(r"", 1, _if_norm("norm"), "after the final norm, before pooling",
         "global-average-pool ViT: the official final norm is Identity, so the factor scales the last "
         "block's output before pooling and fc_norm, where ssf-deploy has no SSF site"),
))

# Read from dongzelian/SSF models/swin_transformer.py (timm 0.6.5 layout: downsample ends a stage).
_SWIN = Family(
    rules=(
        Rule(r"patch_embed", 1, "patch_embed.proj", "after the patch projection, before its norm"),
        Rule(r"patch_embed", 2, "patch_embed.norm", "after the patch-embedding norm"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)", 1, r"layers.\1.blocks.\2.norm1", "after norm1"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)", 2, r"layers.\1.blocks.\2.norm2", "after norm2"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)\.attn", 1, r"layers.\1.blocks.\2.attn.qkv", "after qkv"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)\.attn", 2, r"layers.\1.blocks.\2.attn.proj",
             "after attn proj"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)\.mlp", 1, r"layers.\1.blocks.\2.mlp.fc1",
             "after fc1, before the activation"),
        Rule(r"layers\.(\d+)\.blocks\.(\d+)\.mlp", 2, r"layers.\1.blocks.\2.mlp.fc2", "after fc2"),
        # PatchMerging: 2x2 concat -> norm(4C) -> SSF -> bias-free reduction. Today's timm concatenates
        # in the same channel order (w-major, then h, then C) and still normalises before reducing.
        # (Only a fork that hands PatchMerging a string tuning_mode writes this factor; see absent.)
        Rule(r"layers\.(\d+)\.downsample", 1, _next_stage("layers.{}.downsample.norm"),
             "after PatchMerging's norm, before its bias-free reduction"),
        Rule(r"", 1, "norm", "after the final norm, before pooling"),
    ),
    # BasicLayer passes tuning_mode (a per-block list) to PatchMerging: never == 'ssf', no factors
    absent=(r"layers\.\d+\.downsample\.norm",),
)

def _convnext_edits(model: nn.Module, ssf: dict) -> dict:
    """The official forward_features ends with ``x = ssf(norm_pre(norm_pre(stages(x))))``.

    With head_norm_first norm_pre is a LayerNorm2d applied twice: a ``twice`` edit, whose second
    copy carries the factor (it has no fold: deployable only with extra nodes). Otherwise norm_pre
    is Identity and the factor scales the last stage's residual output: an ``affine`` edit holding
    (s, t), with how it folds through that stream (x_0 = the downsample conv; every block reads
    the stream through its depthwise conv and writes to it through fc2 * gamma)."""
    if not any(k in ssf for k in ("ssf_scale_1", "ssf_shift_1")):
        return {}
    if not isinstance(getattr(model, "norm_pre", None), nn.Identity):
        return {"norm_pre": {"kind": "twice", "why": "the official ConvNeXt-hnf forward applies "
                             "norm_pre twice (x = norm_pre(x); x = ssf(norm_pre(x)))"}}
    last = len(model.stages) - 1
    return {"norm_pre": {
        "kind": "affine", "channels": int(model.num_features),
        "why": "the official SSF ConvNeXt scales the last stage's output (ssf_scale_1, "
               "ssf_shift_1), where timm has no module",
        "fold": {"kind": "residual-stream", "container": f"stages.{last}",
                 "entry": "downsample.1", "blocks": "blocks", "reader": "conv_dw",
                 "writer": "mlp.fc2", "layer_scale": "gamma"}}}


def _convnext_top(m: re.Match, model: nn.Module):
    """The top-level factor: on the second norm_pre (hnf) or the affine edit (plain)."""
    pre = getattr(model, "norm_pre", None)
    if isinstance(pre, nn.Sequential):
        return "norm_pre.1"
    return EditParam("norm_pre")


# Read from dongzelian/SSF models/convnext.py (its own PatchEmbed stem and Downsample modules).
_CONVNEXT = Family(
    rules=(
        Rule(r"stem", 1, "stem.0", "after the stem conv"),
        Rule(r"stem", 2, "stem.1", "after the stem norm"),
        # (only a fork that hands Downsample a string tuning_mode writes these two; see absent)
        Rule(r"stages\.(\d+)\.downsample", 1, r"stages.\1.downsample.0", "after the downsample norm"),
        Rule(r"stages\.(\d+)\.downsample", 2, r"stages.\1.downsample.1", "after the downsample conv"),
        Rule(r"stages\.(\d+)\.blocks\.(\d+)", 1, r"stages.\1.blocks.\2.conv_dw",
             "after the depthwise conv"),
        Rule(r"stages\.(\d+)\.blocks\.(\d+)", 2, r"stages.\1.blocks.\2.norm", "after the block norm"),
        Rule(r"stages\.(\d+)\.blocks\.(\d+)\.mlp", 1, r"stages.\1.blocks.\2.mlp.fc1",
             "after fc1, before the activation"),
        Rule(r"stages\.(\d+)\.blocks\.(\d+)\.mlp", 2, r"stages.\1.blocks.\2.mlp.fc2", "after fc2"),
        # forward_features: x = ssf(norm_pre(norm_pre(stages(x)))): see _convnext_edits
        Rule(r"", 1, _convnext_top, "at the end of forward_features"),
    ),
    # ConvNeXtStage passes tuning_mode (a per-block list) to Downsample: never == 'ssf', no factors;
    # the head's own LayerNorm (pool -> norm -> fc ordering) has none in the official code either,
    # nor has the first of hnf's two norm_pre applications
    absent=(r"stages\.\d+\.downsample\.[01]", r"head\.norm", r"norm_pre\.0"),
    # the downsample norm's input is the residual stream, channels-last in memory after the first
    # block's permute: the official LayerNorm2d takes torch.var_mean there (the stem norm's input
    # is a contiguous conv output and the head norm's a pooled (N, C, 1, 1): biased, like timm);
    # so does hnf's norm_pre, on the stream and again on its own (channels-last) output
    unbiased=(r"stages\.\d+\.downsample\.0", r"norm_pre\.[01]"),
    # model.to(memory_format=channels_last) makes the stem conv's output non-contiguous too
    unbiased_channels_last=(r"stem\.1",),
    edits=_convnext_edits,
)

FAMILIES = {"vit": _VIT, "swin": _SWIN, "convnext": _CONVNEXT}
RULES = {name: fam.rules for name, fam in FAMILIES.items()}


# ----------------------------------------------------------------------------------------- detection

def _state_of(obj: Any) -> Optional[dict]:
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return state if isinstance(state, dict) else None


def _arch_of(obj: dict) -> Optional[str]:
    arch = obj.get("arch")
    if isinstance(arch, str) and arch:
        return arch
    args = obj.get("args")
    model = getattr(args, "model", None) if not isinstance(args, dict) else args.get("model")
    return model if isinstance(model, str) and model else None


def is_official(obj: Any) -> bool:
    """An official SSF checkpoint: ``state_dict`` with ``ssf_scale_N``/``ssf_shift_N`` keys, plus ``arch``."""
    state = _state_of(obj)
    if not state or _arch_of(obj) is None:
        return False
    return any(isinstance(k, str) and ("ssf_scale_" in k or "ssf_shift_" in k or "ssffc_" in k)
               for k in state)


def family_of(arch: str) -> str:
    """vit / swin / convnext for a timm-0.6 (or current) architecture name, else an error."""
    name = arch.split(".")[0].lower()
    if name.startswith(("vit_", "deit_")):
        return "vit"
    if name.startswith("swin_"):
        return "swin"
    if name.startswith("convnext_") and not name.startswith("convnextv2"):
        return "convnext"
    raise CheckpointError(f"official SSF checkpoint for '{arch}': unsupported architecture family "
                         f"(supported: vit, deit, swin, convnext)")


# ---------------------------------------------------------------------------------------- conversion

def _args_dict(args: Any) -> dict:
    if isinstance(args, argparse.Namespace):
        return _plain(vars(args))
    if isinstance(args, dict):
        return _plain(args)
    return {}


def _num_classes(state: dict, args: dict, arch: str) -> int:
    for key in ("head.weight", "head.fc.weight"):
        w = state.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    n = args.get("num_classes")
    if isinstance(n, int) and n > 0:
        return n
    raise CheckpointError(f"official SSF checkpoint for '{arch}' has no classifier head weight "
                         f"and no args.num_classes: cannot tell the number of classes")


def _meta_model(arch: str, num_classes: int, model_kwargs: dict):
    """The architecture on the meta device: shapes and names only, no memory, no weights."""
    with torch.device("meta"):
        return create_base_model(arch, num_classes, **model_kwargs)


def _ssf_keys(model, options: dict) -> dict:
    """{key: shape} of the parameters ``apply_method(model, "ssf", **options)`` creates (then undone)."""
    apply_method(model, "ssf", **options)
    try:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k.endswith((".ssf_scale", ".ssf_shift"))}
    finally:
        unload(model)


def _check_class(model, family: str, arch: str) -> None:
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    cls = {"vit": VisionTransformer, "swin": SwinTransformer, "convnext": ConvNeXt}[family]
    if not isinstance(model, cls):
        raise CheckpointError(f"official SSF checkpoint for '{arch}': {type(model).__name__} is not a "
                             f"{cls.__name__}, whose layout the official SSF code uses")


def _vit_model_kwargs(state: dict, model) -> dict:
    """ViTs fine-tuned at another resolution carry a longer/shorter ``pos_embed``: rebuild at that size
    instead of letting the filter resample it (which would change the model)."""
    pos = state.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or getattr(model, "pos_embed", None) is None:
        return {}
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n = pos.shape[1] - prefix
    grid = int(round(math.sqrt(n)))
    if n <= 0 or grid * grid != n:
        return {}
    patch, img = getattr(model.patch_embed, "patch_size", None), getattr(model.patch_embed, "img_size", None)
    if patch is None or img is None:
        return {}
    size = (grid * patch[0], grid * patch[1])
    if tuple(img) == size:
        return {}
    return {"img_size": size[0] if size[0] == size[1] else size}


def _convert_base(family: str, base: dict, model) -> dict:
    """Official base weights -> today's timm names, through the family's own ``checkpoint_filter_fn``."""
    if family == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn
        return dict(checkpoint_filter_fn(base, model))
    if family == "swin":
        # same names as timm 0.6.5; the filter moves layers.i.downsample -> layers.{i+1}.downsample,
        # head -> head.fc, and drops the relative_position_index / attn_mask buffers
        from timm.models.swin_transformer import checkpoint_filter_fn
        return dict(checkpoint_filter_fn(base, model))
    # convnext: the official code's own stem / Downsample modules -> timm's Sequentials
    from timm.models.convnext import checkpoint_filter_fn
    renamed = {}
    for k, v in base.items():
        k = re.sub(r"^stem\.proj\.", "stem.0.", k)
        k = re.sub(r"^stem\.norm\.", "stem.1.", k)
        k = re.sub(r"^(stages\.\d+\.downsample)\.norm\.", r"\1.0.", k)
        k = re.sub(r"^(stages\.\d+\.downsample)\.proj\.", r"\1.1.", k)
        renamed[k] = v
    out = dict(checkpoint_filter_fn(renamed, model))
    # The official Block always uses a Linear MLP on channels-last features; timm's conv_mlp variants
    # (e.g. convnext_tiny_hnf) use 1x1 convs: the same weights, reshaped (as timm's FB filter does).
    own = model.state_dict()
    for k, v in out.items():
        t = own.get(k)
        if t is not None and v.dim() == 2 and t.dim() == 4 and tuple(t.shape) == (*v.shape, 1, 1):
            out[k] = v.reshape(t.shape)
    return out


def _map_ssf(family: str, ssf: dict, arch: str, model: nn.Module) -> tuple[dict, dict, dict]:
    """Official factors -> ({our SSF key: tensor}, {our key: official key}, {edit parameter key:
    tensor}).

    Refuses unknown/unsupported keys."""
    rules = FAMILIES[family].rules
    out, origin, params = {}, {}, {}
    for key in sorted(ssf):
        m = _SSF_KEY.match(key)
        path, kind, idx = m.group("path") or "", m.group("kind"), int(m.group("idx"))
        hit = next((r for r in (rule.resolve(path, idx, model) for rule in rules) if r is not None),
                   None)
        if hit is None:
            raise CheckpointError(f"official SSF checkpoint for '{arch}': unknown SSF key '{key}' "
                                 f"(no {family} module applies ssf_{kind}_{idx} there)")
        target, rule = hit
        if target is None:
            raise CheckpointError(f"official SSF checkpoint for '{arch}': unsupported SSF key '{key}' "
                                 f"({rule.unsupported or rule.where}); refusing rather than building "
                                 f"a different model")
        if isinstance(target, EditParam):
            ours = f"{target.path}.{'weight' if kind == 'scale' else 'bias'}"
            params[ours] = ssf[key]
            origin[ours] = key
            continue
        ours = f"{target}.ssf_{kind}"
        if ours in out:
            raise CheckpointError(f"official SSF checkpoint for '{arch}': '{key}' and '{origin[ours]}' "
                                 f"both map to {ours}")
        out[ours] = ssf[key]
        origin[ours] = key
    return out, origin, params


def _fill_absent(family: str, mapped: dict, origin: dict, default: dict) -> None:
    """Identity factors for our sites the official forward never scales (``Family.absent``), in place.

    Only where the checkpoint has no factor for that site at all."""
    patterns = FAMILIES[family].absent
    have = {k.rsplit(".", 1)[0] for k in mapped}
    for key, shape in default.items():
        site, leaf = key.rsplit(".", 1)
        if key in mapped or site in have or not any(re.fullmatch(p, site) for p in patterns):
            continue
        mapped[key] = torch.ones(shape) if leaf == "ssf_scale" else torch.zeros(shape)
        origin[key] = f"<none: the official code has no factor at {site}>"


def _choose_options(mapped: dict, origin: dict, arch: str, model) -> tuple[dict, dict]:
    """(options, {key: shape}) under which ``apply_method`` creates exactly the mapped parameters."""
    default = _ssf_keys(model, {})
    if set(default) == set(mapped):
        return {}, default
    with_bias_free = _ssf_keys(model, {"bias_free": True})
    if set(with_bias_free) == set(mapped):
        return {"bias_free": True}, with_bias_free
    outside = sorted(k for k in mapped if k not in default)
    if outside:
        k = outside[0]
        site = k.rsplit(".", 1)[0]
        if k in with_bias_free:
            extra = sorted({x.rsplit(".", 1)[0] for x in with_bias_free if x not in mapped})
            raise CheckpointError(
                f"official SSF checkpoint for '{arch}': '{origin[k]}' scales the output of the bias-free "
                f"module {site}; bias_free=True would put SSF there but also after "
                f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which the checkpoint lacks")
        raise CheckpointError(f"official SSF checkpoint for '{arch}': unsupported SSF key '{origin[k]}' "
                             f"(maps to {site}, which is not an SSF site of this architecture)")
    lacking = sorted({k.rsplit(".", 1)[0] for k in default if k not in mapped})
    raise CheckpointError(f"official SSF checkpoint for '{arch}' lacks SSF factors for "
                         f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} "
                         f"(ssf-deploy puts SSF there); refusing to guess them")


def _factors(state: dict, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state[f"{site}.ssf_scale"].double(), state[f"{site}.ssf_shift"].double()


def _set_factors(state: dict, site: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
    for leaf, value in (("ssf_scale", scale), ("ssf_shift", shift)):
        key = f"{site}.{leaf}"
        state[key] = value.to(state[key].dtype)


def _correct_unbiased(family: str, state: dict, model: nn.Module, arch: str,
                      channels_last: bool = False) -> list:
    """Make our (biased) LayerNorm2d sites compute the official unbiased-variance norm, in place.

    Official: ``(x - m) / sqrt(var_u + eps)`` with ``var_u = var * C / (C-1)``, i.e.
    ``k * (x - m) / sqrt(var + eps * k^2)`` for ``k = sqrt((C-1)/C)``. So ``LN_u(x) = k * LN(x) +
    (1 - k) * bias`` but for eps (relative error eps*(1-k^2)/(2 var) = eps/(2 C var): 1e-9 at the
    activation scales of a ConvNeXt; timm's eps is a constructor argument, not a weight, so it stays).
    The site's SSF (a, b) after it becomes (a k, a (1 - k) bias + b); the base weights stay as trained.
    """
    patterns = FAMILIES[family].unbiased + (FAMILIES[family].unbiased_channels_last
                                            if channels_last else ())
    done = []
    for site in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".ssf_scale")}):
        if not any(re.fullmatch(p, site) for p in patterns):
            continue
        norm = model.get_submodule(site)
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise CheckpointError(f"official SSF checkpoint for '{arch}': {site} is a "
                                  f"{type(norm).__name__}, not the LayerNorm2d the official code "
                                  f"normalises with the unbiased variance there")
        c = int(norm.normalized_shape[0])
        k = math.sqrt((c - 1) / c)
        bias = state.get(f"{site}.bias")
        bias = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64)
        a, b = _factors(state, site)
        _set_factors(state, site, a * k, a * (1 - k) * bias + b)
        done.append(site)
    return done


def task_from_official(obj: dict, path: str = "<checkpoint>"):
    """Turn an official SSF checkpoint into a complete :class:`~ssf_deploy.formats.Task`."""
    state = _state_of(obj)
    official_arch = _arch_of(obj)
    if not state or official_arch is None:
        raise CheckpointError(f"{path} is not an official SSF checkpoint (needs 'state_dict' and 'arch')")
    family = family_of(official_arch)
    arch = resolve_arch(official_arch)
    args = _args_dict(obj.get("args"))

    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry '{bad[0]}' is not a tensor")
    ssf, base = {}, {}
    for k, v in state.items():
        if _SSF_KEY.match(k):
            ssf[k] = v
        elif _SSF_LIKE.search(k):
            raise CheckpointError(f"official SSF checkpoint for '{official_arch}': unsupported key '{k}' "
                                 f"(only tuning_mode 'ssf' checkpoints are supported)")
        else:
            base[k] = v
    if not ssf:
        raise CheckpointError(f"{path}: official checkpoint without any ssf_scale_N/ssf_shift_N factor")

    num_classes = _num_classes(base, args, official_arch)
    model_kwargs: dict = {}
    model = _meta_model(arch, num_classes, model_kwargs)
    _check_class(model, family, official_arch)
    if family == "vit":
        model_kwargs = _vit_model_kwargs(base, model)
        if model_kwargs:
            model = _meta_model(arch, num_classes, model_kwargs)

    why = FAMILIES[family].refuse(model) if FAMILIES[family].refuse else None
    if why:
        raise CheckpointError(f"official SSF checkpoint for '{official_arch}': {why}; refusing")
    edits = FAMILIES[family].edits(model, ssf) if FAMILIES[family].edits else {}
    plain = model
    if edits:   # the official forward computes more than the timm architecture: rebuilt with it
        model = apply_edits(_meta_model(arch, num_classes, model_kwargs), edits)

    mapped, origin, params = _map_ssf(family, ssf, official_arch, model)
    _fill_absent(family, mapped, origin, _ssf_keys(model, {}))
    try:
        converted = edit_state(_convert_base(family, base, plain), edits)
    except CheckpointError:
        raise
    except Exception as e:  # a filter fn tripping over keys it does not expect
        raise CheckpointError(f"cannot adapt the base weights of {path} to {arch}: "
                              f"{first_line(e)}") from None

    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = sorted(k for k in converted if k not in own)
    if unexpected:
        raise CheckpointError(f"official SSF checkpoint does not match {arch}: unexpected key(s) "
                             f"{', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    missing = sorted(k for k in own if k not in converted)
    if missing:
        raise CheckpointError(f"official SSF checkpoint does not match {arch}: missing "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for k, shape in own.items():
        if tuple(converted[k].shape) != shape:
            raise CheckpointError(f"official SSF checkpoint does not match {arch}: {k} has shape "
                                 f"{tuple(converted[k].shape)}, model expects {shape}")

    options, expected = _choose_options(mapped, origin, arch, model)
    for k, shape in expected.items():
        if tuple(mapped[k].shape) != shape:
            raise CheckpointError(f"official SSF checkpoint for '{official_arch}': '{origin[k]}' has shape "
                                 f"{tuple(mapped[k].shape)}, {k} expects {shape}")

    full = dict(converted)
    full.update(mapped)
    full.update(params)
    quirks = []
    absent = sorted({k.rsplit(".", 1)[0] for k, v in origin.items() if v.startswith("<none")})
    if absent:
        quirks.append(f"identity SSF at {len(absent)} site(s) the official code leaves unscaled: "
                      f"{', '.join(absent)}")
    unbiased = _correct_unbiased(family, full, model, official_arch,
                                 channels_last=bool(args.get("channels_last")))
    if unbiased:
        quirks.append(f"unbiased-variance LayerNorm2d reproduced at {', '.join(unbiased)}")
    for where, spec in sorted(edits.items()):
        if spec["kind"] == "twice":
            quirks.append(f"{where} applied twice, as the official forward does; the second "
                          f"application carries ssf_scale_1/ssf_shift_1 (fuse deploys it with "
                          f"--allow-extra-nodes: +1 node)")
        else:
            quirks.append(f"top-level ssf_scale_1/ssf_shift_1 kept as a per-channel affine at "
                          f"{where}, as the official forward applies it; fuse folds it through "
                          f"{spec['fold']['container']}'s residual stream")
    extra = {"epoch": _plain(obj.get("epoch")), "args": args, "official_arch": official_arch,
             "official_quirks": quirks,
             "origin": {k: v for k, v in origin.items() if not v.startswith("<none")}}
    if isinstance(obj.get("metric"), (int, float)):
        extra["metric"] = float(obj["metric"])
    if isinstance(obj.get("state_dict_ema"), dict):
        extra["has_ema"] = True   # we deploy state_dict; the EMA copy is ignored
    return Task(arch=arch, num_classes=num_classes, method="ssf", options=options, state=full,
                source=SOURCE, extra=extra, complete=True, model_kwargs=model_kwargs, path=path,
                edits=edits)
