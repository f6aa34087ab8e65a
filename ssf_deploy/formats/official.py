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
  last stage's residual output, where ssf-deploy has no site. It folds exactly through that stage's
  residual stream into the stream's own SSF sites (``stream``, see :func:`_fold_stream`).

``convnext_*_hnf`` is refused: the official ``forward_features`` applies ``norm_pre`` twice
(``x = norm_pre(x); x = ssf(norm_pre(x))``), which no timm architecture computes (0.37 max abs logit
error if applied once). A global-average-pool ViT (``fc_norm``, final norm Identity) is refused too.
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
from ..models import create_base_model, resolve_arch
from ..runtime.keys import KeyDiff, key_diff
from ..tuners import apply_method, unload
from .task import Task

__all__ = ["is_official", "task_from_official", "family_of", "RULES", "FAMILIES", "SOURCE"]

SOURCE = "official-ssf"

# An official factor key: optional enclosing-module path, then ssf_scale_N / ssf_shift_N.
_SSF_KEY = re.compile(r"^(?:(?P<path>.+)\.)?ssf_(?P<kind>scale|shift)_(?P<idx>\d+)$")
# Keys of other official tuning modes (``ssffc``: SSF + extra Linear) or any other ssf-ish name.
_SSF_LIKE = re.compile(r"(^|\.)ssf")

@dataclass(frozen=True)
class Stream:
    """A residual stream whose *output* the official code scales where ssf-deploy has no site.

    ``x_0 = entry(...)``; block j: ``x_j = x_{j-1} + layer_scale_j * writer_j(... reader_j(x_{j-1}) ...)``
    with ``reader_j`` a depthwise (per-channel) conv and nothing else reading the stream. Names are
    relative to the stream's container (``{last}`` = the model's last stage), ``{j}`` = block index.
    """
    container: str      # e.g. "stages.{last}"
    entry: str          # the SSF site whose output starts the stream
    blocks: str         # the container's residual blocks
    reader: str         # per block: depthwise conv reading the stream (an SSF site)
    writer: str         # per block: last producer of the branch (an SSF site), before the layer scale
    layer_scale: str    # per block: parameter multiplying the branch (absent = 1)
    where: str          # for messages


# a template (``\1`` = the path's groups), or a function of (match, model) giving the producer module
# or a Stream to fold through; None where ssf-deploy has no site for that feature
Target = Union[str, Callable[[re.Match, nn.Module], Union[Optional[str], Stream]], None]


@dataclass(frozen=True)
class Rule:
    """Official factor ``<path>.ssf_*_<idx>`` -> the producer module in today's timm (None: no site)."""
    path: str          # regex for the enclosing module path in the official model ("" = top level)
    idx: int           # the factor's number in that module's forward
    target: Target     # see Target
    where: str         # where the official code applies it (for messages and docs)
    unsupported: str = ""   # why, when target gives None

    def resolve(self, path: str, idx: int, model: nn.Module):
        """None if the rule does not match, else (our site | Stream | None, self)."""
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


def _next_stage(fmt: str) -> Callable[[re.Match, nn.Module], str]:
    # timm >= 0.9 moved Swin's PatchMerging from the end of stage i to the start of stage i+1
    return lambda m, model: fmt.format(int(m.group(1)) + 1)


def _if_norm(name: str, otherwise: Optional[Stream] = None):
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

# After the last ConvNeXt stage (norm_pre Identity): x_0 = downsample conv, blocks read the stream
# through their depthwise conv and write to it through fc2 * gamma.
_CONVNEXT_STREAM = Stream(container="stages.{last}", entry="downsample.1", blocks="blocks",
                          reader="conv_dw", writer="mlp.fc2", layer_scale="gamma",
                          where="after the last stage (norm_pre is Identity), before the head's "
                                "pooling and LayerNorm")


def _head_norm_first(model: nn.Module) -> Optional[str]:
    pre = getattr(model, "norm_pre", None)
    if isinstance(pre, nn.Module) and not isinstance(pre, nn.Identity):
        return ("head-norm-first ConvNeXt: the official forward_features applies norm_pre twice "
                "(x = norm_pre(x); x = ssf_ada(norm_pre(x), ...)), which no timm architecture "
                "computes (it changes the logits by 0.37 max abs on convnext_tiny_hnf at 224 px)")
    return None


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
        # forward_features: x = ssf(norm_pre(norm_pre(stages(x)))). With head_norm_first norm_pre is
        # a LayerNorm2d (refused, see _head_norm_first); otherwise it is Identity and the factor scales
        # the last stage's residual output: folded through that stream.
        Rule(r"", 1, _if_norm("norm_pre", _CONVNEXT_STREAM), "at the end of forward_features"),
    ),
    # ConvNeXtStage passes tuning_mode (a per-block list) to Downsample: never == 'ssf', no factors;
    # the head's own LayerNorm (pool -> norm -> fc ordering) has none in the official code either
    absent=(r"stages\.\d+\.downsample\.[01]", r"head\.norm"),
    # the downsample norm's input is the residual stream, channels-last in memory after the first
    # block's permute: the official LayerNorm2d takes torch.var_mean there (the stem norm's input
    # is a contiguous conv output and the head norm's a pooled (N, C, 1, 1): biased, like timm)
    unbiased=(r"stages\.\d+\.downsample\.0",),
    # model.to(memory_format=channels_last) makes the stem conv's output non-contiguous too
    unbiased_channels_last=(r"stem\.1",),
    refuse=_head_norm_first,
)

FAMILIES = {"vit": _VIT, "swin": _SWIN, "convnext": _CONVNEXT}
RULES = {name: fam.rules for name, fam in FAMILIES.items()}

# |s| below this is refused when the last stage's stream must carry s * x: exact in float32 far
# below it (measured to 1e-12), but an fp16 engine would see the stream underflow
MIN_STREAM_SCALE = 1e-4


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
    """Official factors -> ({our key: tensor}, {our key: official key}, {Stream: {kind: (key, tensor)}}).

    Refuses unknown/unsupported keys."""
    rules = FAMILIES[family].rules
    out, origin, streams = {}, {}, {}
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
        if isinstance(target, Stream):
            streams.setdefault(target, {})[kind] = (key, ssf[key])
            continue
        ours = f"{target}.ssf_{kind}"
        if ours in out:
            raise CheckpointError(f"official SSF checkpoint for '{arch}': '{key}' and '{origin[ours]}' "
                                 f"both map to {ours}")
        out[ours] = ssf[key]
        origin[ours] = key
    return out, origin, streams


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


def _fold_stream(stream: Stream, factors: dict, state: dict, model: nn.Module, arch: str) -> str:
    """Fold the official ``y = s * x_n + t`` at the end of ``stream`` into the stream's SSF sites.

    The stream ``x_0 = entry(u)``, ``x_j = x_{j-1} + g_j * m_j`` (``m_j`` ends with the writer's SSF,
    the branch starts with the reader, a depthwise conv with bias c) carries ``s * x_j`` instead;
    nothing constant enters it before the end, so the readers' zero padding stays exact:

    * entry SSF (a, b) -> (s a, s b), so ``x'_0 = s x_0``;
    * reader: ``r(s x) = s r(x) + (1 - s) c`` per channel, so its SSF (a, b) -> (a / s, b - a (1-s) c / s)
      gives the branch exactly what it had;
    * writer: ``s (g m) = g (s m)``: its SSF (a, b) -> (s a, s b), and the last one's shift + t / g.

    The layer scales and all base weights stay as trained. Measured against the official code: 1.6e-15
    (float64) / 8.1e-7 (float32) max abs logit error on convnext_tiny at 224 px. Refused when
    |s| < MIN_STREAM_SCALE (the stream would carry s * x) or a layer scale is ~0 where t is not.
    """
    (s_key, s), (t_key, t) = (factors.get(kind, (None, None)) for kind in ("scale", "shift"))
    last = str(len(getattr(model, "stages", ())) - 1)
    root = stream.container.format(last=last)
    where = f"'{s_key or t_key}' ({stream.where})"
    try:
        container = model.get_submodule(root)
        blocks = list(container.get_submodule(stream.blocks))
    except (AttributeError, TypeError):
        blocks = []
    if not blocks:
        raise CheckpointError(f"official SSF checkpoint for '{arch}': {where} folds through {root}'s "
                              f"residual stream, which this model does not have") from None
    c = int(blocks[0].get_submodule(stream.reader).out_channels)
    s = s.double() if s is not None else torch.ones(c, dtype=torch.float64)
    t = t.double() if t is not None else torch.zeros(c, dtype=torch.float64)
    small = (s.abs() < MIN_STREAM_SCALE).nonzero().flatten()
    if len(small):
        ch = int(small[0])
        raise CheckpointError(
            f"official SSF checkpoint for '{arch}': {where} has |scale| = {abs(float(s[ch])):.3g} < "
            f"{MIN_STREAM_SCALE:g} at channel {ch}; folding it through {root}'s residual stream would "
            f"make the stream carry scale * x there; refusing")
    entry = f"{root}.{stream.entry}"
    a, b = _factors(state, entry)
    _set_factors(state, entry, s * a, s * b)
    for j, blk in enumerate(blocks):
        prefix = f"{root}.{stream.blocks}.{j}"
        reader = blk.get_submodule(stream.reader)
        shortcut = getattr(blk, "shortcut", nn.Identity())
        if not (isinstance(reader, nn.Conv2d) and reader.groups == reader.in_channels ==
                reader.out_channels == c) or not isinstance(shortcut, nn.Identity):
            raise CheckpointError(f"official SSF checkpoint for '{arch}': {where} folds through "
                                  f"{root}'s residual stream, but {prefix} is not a depthwise-conv "
                                  f"block with an identity shortcut")
        bias = state.get(f"{prefix}.{stream.reader}.bias")
        bias = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64)
        a, b = _factors(state, f"{prefix}.{stream.reader}")
        _set_factors(state, f"{prefix}.{stream.reader}", a / s, b - a * (1 - s) * bias / s)
        a, b = _factors(state, f"{prefix}.{stream.writer}")
        shift = s * b
        if j == len(blocks) - 1:
            g_key = f"{prefix}.{stream.layer_scale}"
            g = state[g_key].double() if g_key in state else torch.ones(c, dtype=torch.float64)
            bad = ((g.abs() < MIN_STREAM_SCALE * t.abs()) & (t != 0)).nonzero().flatten()
            if len(bad):
                ch = int(bad[0])
                raise CheckpointError(
                    f"official SSF checkpoint for '{arch}': the shift of {where} enters "
                    f"{root}'s residual stream through {g_key}, which is {float(g[ch]):.3g} at channel "
                    f"{ch} (shift {float(t[ch]):.3g}); refusing")
            shift = shift + t / g
        _set_factors(state, f"{prefix}.{stream.writer}", s * a, shift)
    return root


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

    mapped, origin, streams = _map_ssf(family, ssf, official_arch, model)
    _fill_absent(family, mapped, origin, _ssf_keys(model, {}))
    try:
        converted = _convert_base(family, base, model)
    except CheckpointError:
        raise
    except Exception as e:  # a filter fn tripping over keys it does not expect
        raise CheckpointError(f"cannot adapt the base weights of {path} to {arch}: "
                              f"{first_line(e)}") from None

    diff = key_diff(model.state_dict(), converted)
    if diff.unexpected:
        raise CheckpointError(f"official SSF checkpoint does not match {arch}: unexpected key(s) "
                             f"{KeyDiff.listing(sorted(diff.unexpected))}")
    if diff.missing:
        raise CheckpointError(f"official SSF checkpoint does not match {arch}: missing "
                             f"{KeyDiff.listing(sorted(diff.missing))}")
    if diff.wrong_shape:
        k, shape, got = diff.wrong_shape[0]
        raise CheckpointError(f"official SSF checkpoint does not match {arch}: {k} has shape "
                             f"{got}, model expects {shape}")

    options, expected = _choose_options(mapped, origin, arch, model)
    for k, shape in expected.items():
        if tuple(mapped[k].shape) != shape:
            raise CheckpointError(f"official SSF checkpoint for '{official_arch}': '{origin[k]}' has shape "
                                 f"{tuple(mapped[k].shape)}, {k} expects {shape}")

    full = dict(converted)
    full.update(mapped)
    quirks = []
    absent = sorted({k.rsplit(".", 1)[0] for k, v in origin.items() if v.startswith("<none")})
    if absent:
        quirks.append(f"identity SSF at {len(absent)} site(s) the official code leaves unscaled: "
                      f"{', '.join(absent)}")
    unbiased = _correct_unbiased(family, full, model, official_arch,
                                 channels_last=bool(args.get("channels_last")))
    if unbiased:
        quirks.append(f"unbiased-variance LayerNorm2d reproduced at {', '.join(unbiased)}")
    for stream, factors in streams.items():
        root = _fold_stream(stream, factors, full, model, official_arch)
        quirks.append(f"top-level ssf_scale_1/ssf_shift_1 folded through {root}'s residual stream")
    extra = {"epoch": _plain(obj.get("epoch")), "args": args, "official_arch": official_arch,
             "official_quirks": quirks}
    if isinstance(obj.get("metric"), (int, float)):
        extra["metric"] = float(obj["metric"])
    if isinstance(obj.get("state_dict_ema"), dict):
        extra["has_ema"] = True   # we deploy state_dict; the EMA copy is ignored
    return Task(arch=arch, num_classes=num_classes, method="ssf", options=options, state=full,
                source=SOURCE, extra=extra, complete=True, model_kwargs=model_kwargs, path=path)
