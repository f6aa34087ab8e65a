"""Creating base models: timm names (old and new), hub weights or an offline weights file."""
from __future__ import annotations

import copy
import os
from typing import Optional

import timm
import torch
from torch import nn

from .errors import (BaseMismatchError, CheckpointError, SSFDeployError, UsageError,
                     first_line)
from .families import CREATE_RECORD, ModelFamily, family_for, family_of, register_family
from .fileio import check_manifest
from .runtime.keys import key_diff

__all__ = ["resolve_arch", "create_base_model", "load_base_weights", "creation_record",
           "input_size", "head_modules", "count_params", "example_input", "sized_kwargs",
           "ModelFamily", "register_family", "family_of", "family_for", "call_args", "call_model",
           "batch_len", "batch_slice", "inputs_to", "input_extent", "sample_shape", "logits_of",
           "token_batch", "check_finite", "ChannelAffine", "apply_edits", "plain_architecture",
           "edit_state", "plain_state", "edits_of", "describe_edit", "EDIT_KINDS"]


def check_finite(tensors, where: str, names: Optional[dict] = None) -> None:
    """Refuse, in one line, the first floating-point tensor holding a NaN or an Inf.

    Loaded values are bad input when they are not finite numbers: a NaN in one factor would
    otherwise fold into every weight it touches and surface only as a failed comparison after
    the work. ``tensors``: a dict or (name, tensor) pairs; ``names`` maps a name to how the
    file spells it (an official checkpoint's own key)."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, t in items:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if bool(torch.isfinite(t).all()):
            continue
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        spelled = (names or {}).get(name)
        label = f"'{name}'" + (f" ({spelled})" if spelled and spelled != name else "")
        raise CheckpointError(f"{where}: tensor {label} holds {what} of {t.numel()} value(s); "
                              f"refusing non-finite numbers")


def resolve_arch(arch: str) -> str:
    """Map a timm 0.6 name (e.g. ``vit_base_patch16_224_in21k``) to today's name.

    timm keeps that table itself (``register_model_deprecations``); we only read it so the name
    we store in checkpoints and packs is the current one and no deprecation warning repeats.
    """
    try:
        from timm.models._registry import _deprecated_models
    except ImportError:  # pragma: no cover - older/newer timm without the private table
        _deprecated_models = {}
    fam = family_for(arch)
    if fam is not None:
        return fam.resolve(arch)
    arch = _deprecated_models.get(arch, arch) or arch
    if not timm.is_model(arch.split(".")[0]) and not timm.is_model(arch):
        raise UsageError(f"unknown timm model '{arch}' (see timm.list_models())")
    return arch


def create_base_model(arch: str, num_classes: int, *, pretrained: bool = False,
                      pretrained_file: Optional[str] = None, init_seed: Optional[int] = None,
                      edits: Optional[dict] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with our error messages; ``pretrained_file`` works offline.

    A local weights file is loaded strictly (:func:`load_base_weights`): weights of another
    architecture, or a partial set, are refused in one line instead of timm's warning and a
    silently random base. ``init_seed`` draws the random init from ``torch.manual_seed(seed)``,
    which is how a base trained from scratch is rebuilt bit for bit. ``edits``: graph edits
    (:func:`apply_edits`), applied after the weights are loaded and kept in the record.
    """
    arch = resolve_arch(arch)
    if num_classes is None or int(num_classes) < 1:
        raise UsageError(f"`num_classes` must be a positive integer, got {num_classes!r}")
    if pretrained and pretrained_file is not None:
        raise UsageError("`pretrained` or `pretrained_file`, not both")
    if pretrained_file is not None and not os.path.isfile(pretrained_file):
        raise CheckpointError(f"weights file not found: {pretrained_file}")
    if init_seed is not None:
        torch.manual_seed(int(init_seed))
    fam = family_for(arch)
    try:
        if fam is not None:
            model = fam.create(arch, int(num_classes), pretrained=pretrained, **kwargs)
        else:
            model = timm.create_model(arch, pretrained=pretrained, num_classes=int(num_classes),
                                      **kwargs)
    except SSFDeployError:
        raise
    except Exception as e:
        if pretrained:
            raise CheckpointError(f"cannot fetch pretrained weights for {arch} "
                                  f"(offline? use a local weights file): {first_line(e)}") from e
        raise
    if pretrained_file is not None:
        load_base_weights(model, pretrained_file, arch=arch)
        source = f"file:{os.path.basename(pretrained_file)}"
    elif pretrained and fam is not None:
        check_finite(model.state_dict(), f"the {fam.name} weights of {arch}")
        source = fam.source(arch)
    elif pretrained:
        check_finite(model.state_dict(), f"the timm hub weights of {arch}")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = "timm-hub:" + (cfg.get("hf_hub_id") or f"{arch}.{cfg.get('tag') or ''}".rstrip("."))
    else:
        source = "random-init"
    # Remember how to build this architecture again: the fuser returns a fresh instance of it.
    model.__dict__[CREATE_RECORD] = {
        "arch": arch, "num_classes": int(num_classes), "kwargs": dict(kwargs),
        "source": source, "init_seed": None if init_seed is None else int(init_seed)}
    if edits:
        apply_edits(model, edits)
        model.__dict__[CREATE_RECORD]["edits"] = copy.deepcopy(dict(edits))
    return model


# ------------------------------------------------------------------------------- graph edits
#
# A checkpoint's own forward can compute what no timm architecture does (the official SSF code
# scales the output of ConvNeXt's last stage, where timm has no module, and its head-norm-first
# ConvNeXt applies norm_pre twice). Such a model is rebuilt as the timm architecture plus a
# recorded *edit* at one module path, so the unfused model computes exactly what was trained and
# every report can say how the deployed graph differs from the base. ``edits`` is
# ``{module path: {"kind": ..., "why": ..., ...}}`` (plain JSON, kept in the creation record):
#
# * ``twice``: the module applied twice, the second copy with its own weights (``path.0``,
#   ``path.1``): +1 node of its kind;
# * ``affine`` / ``shift``: an ``nn.Identity`` replaced by a per-channel ``weight * x + bias``
#   (or ``x + bias``) on axis 1 (``path.weight``, ``path.bias``): +2 / +1 nodes. An optional
#   ``fold`` entry tells the fuse pass how to fold it away exactly (see ``ssf_deploy.fuse``).

EDIT_KINDS = ("twice", "affine", "shift")


class ChannelAffine(nn.Module):
    """``weight * x + bias`` per channel (axis 1): a per-channel affine the base lacks."""

    def __init__(self, channels: int, scale: bool = True, shift: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        if self.bias is not None:
            x = x + self.bias.view(shape)
        return x


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_edits(model: nn.Module, edits: Optional[dict]) -> nn.Module:
    """Apply recorded graph edits in place (new modules on the model's device)."""
    for path, spec in sorted((edits or {}).items()):
        kind = spec.get("kind") if isinstance(spec, dict) else None
        try:
            old = model.get_submodule(path)
        except AttributeError:
            raise UsageError(f"graph edit at '{path}': {type(model).__name__} has no such "
                             f"module") from None
        if kind == "twice":
            new = nn.Sequential(old, copy.deepcopy(old))
        elif kind in ("affine", "shift"):
            if not isinstance(old, nn.Identity):
                raise UsageError(f"graph edit '{kind}' at '{path}' replaces an nn.Identity, "
                                 f"not a {type(old).__name__}")
            ref = next(model.parameters(), None)
            new = ChannelAffine(int(spec["channels"]), scale=kind == "affine")
            if ref is not None:
                new = new.to(ref.device) if not ref.is_meta else new.to("meta")
        else:
            raise UsageError(f"unknown graph edit {kind!r} at '{path}' (known: "
                             f"{', '.join(EDIT_KINDS)})")
        _replace(model, path, new)
    return model


def plain_architecture(model: nn.Module) -> nn.Module:
    """Undo the edits recorded for ``model``, in place: the timm architecture it was built from
    (the base export every deployed graph is compared with)."""
    for path, spec in sorted(edits_of(model).items()):
        mod = model.get_submodule(path)
        _replace(model, path, mod[0] if spec["kind"] == "twice" else nn.Identity())
    return model


def edit_state(state: dict, edits: Optional[dict]) -> dict:
    """A state dict of the plain architecture -> the edited one (``twice``: both copies start
    from the one module's tensors; ``affine``/``shift``: identity values)."""
    out = dict(state)
    for path, spec in sorted((edits or {}).items()):
        if spec["kind"] == "twice":
            for k in [k for k in out if k.startswith(path + ".")]:
                v = out.pop(k)
                rest = k[len(path) + 1:]
                out[f"{path}.0.{rest}"] = v
                out[f"{path}.1.{rest}"] = v.clone()
        else:
            c = int(spec["channels"])
            if spec["kind"] == "affine":
                out[f"{path}.weight"] = torch.ones(c)
            out[f"{path}.bias"] = torch.zeros(c)
    return out


def plain_state(state: dict, edits: Optional[dict]) -> dict:
    """The inverse of :func:`edit_state`: an edited model's tensors as the plain architecture
    names them (``twice``: the first copy; the edit's own tensors dropped)."""
    out = dict(state)
    for path, spec in sorted((edits or {}).items()):
        for k in [k for k in out if k.startswith(path + ".")]:
            v = out.pop(k)
            if spec["kind"] == "twice" and k.startswith(path + ".0."):
                out[f"{path}.{k[len(path) + 3:]}"] = v
    return out


def edits_of(model: nn.Module) -> dict:
    """The graph edits ``model`` was built with (``{}`` for a plain timm model)."""
    return dict((creation_record(model) or {}).get("edits") or {})


def describe_edit(path: str, spec: dict) -> str:
    """One line: what the edit adds to the base graph, and why."""
    what = {"twice": f"{path} applied a second time, with its own weights (+1 node)",
            "affine": f"a per-channel affine at {path} (+2 nodes: Mul, Add)",
            "shift": f"a per-channel shift at {path} (+1 node: Add)"}.get(spec.get("kind"),
                                                                          f"{spec} at {path}")
    return what + (f" - {spec['why']}" if spec.get("why") else "")


def _read_weights(path: str) -> dict:
    check_manifest(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt weights file {path}: {first_line(e)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle / zip / unsupported global: all mean "not loadable safely"
        raise CheckpointError(f"cannot read weights file {path} safely: {first_line(e)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _head_keys(model: nn.Module) -> set:
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(h)] + "." for h in head_modules(model) if id(h) in names]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def load_base_weights(model: nn.Module, path: str, arch: Optional[str] = None) -> None:
    """Load base weights strictly: every key the model has (its classifier head excepted, which a
    task replaces), no key it lacks, every shape equal. Foreign layouts (the original release of
    a timm model) go through the family's own ``checkpoint_filter_fn`` first, as timm does."""
    arch = arch or (model.__dict__.get(CREATE_RECORD) or {}).get("arch") or type(model).__name__
    if path.endswith(".npz"):   # original JAX ViT releases: timm's own strict loader
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"{arch} cannot read .npz weights: convert them to .safetensors")
        try:
            model.load_pretrained(path)
        except Exception as e:
            raise BaseMismatchError(f"base weights {path} do not fit {arch}: {first_line(e)}") from None
        check_finite(model.state_dict(), f"base weights {path}")
        return
    state = _read_weights(path)
    check_finite(state, f"base weights {path}")
    own = model.state_dict()
    if set(state) != set(own):
        import sys
        fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if fn is not None:
            try:
                state = dict(fn(state, model))
            except Exception as e:
                raise BaseMismatchError(f"base weights {path} do not fit {arch}: "
                                        f"{first_line(e)}") from None
    head = _head_keys(model)
    diff = key_diff(own, state, ignore=head)
    if diff:
        raise BaseMismatchError(f"base weights {path} do not fit {arch}: {diff.summary()}")
    for k in head:
        if k in state and tuple(state[k].shape) != tuple(own[k].shape):
            del state[k]   # a head of another size: the task brings its own
    model.load_state_dict(state, strict=False)


def creation_record(model: nn.Module) -> Optional[dict]:
    """``{"arch", "num_classes", "kwargs"}`` for models made by :func:`create_base_model`."""
    return model.__dict__.get(CREATE_RECORD)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects; a patch embedding's own size wins over the default config."""
    fam = family_of(model)
    if fam is not None:
        return fam.input_size(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    from timm.layers import PatchEmbed
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    img = getattr(embed, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        h, w = img
    return c, h, w


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier module(s): always trainable, never carrying tuning modules."""
    fam = family_of(model)
    if fam is not None:
        return fam.head_modules(model)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        heads = list(head) if isinstance(head, (tuple, list)) else [head]
        return [h for h in heads if isinstance(h, nn.Module)]
    return []


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; shared parameters are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def example_input(model: nn.Module, batch: int = 2, image_size: Optional[int] = None,
                  seed: int = 0) -> torch.Tensor:
    fam = family_of(model)
    if fam is not None:   # e.g. text: {"input_ids", "attention_mask"}
        return fam.example_input(model, batch, image_size, seed)
    c, h, w = input_size(model)
    if image_size:
        h = w = int(image_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, h, w, generator=g)


def _meta_model(arch: str, kwargs: dict) -> nn.Module:
    with torch.device("meta"):
        return create_base_model(arch, 2, **kwargs)


def sized_kwargs(arch: str, model_kwargs: dict, image_size: Optional[int]) -> tuple[dict, int]:
    """(create_model kwargs, image size): models with a fixed grid (ViT, Swin) get ``img_size``.

    Convolutional models run at any size and reject ``img_size``; we find out by building the
    model on the meta device, which costs no memory and downloads nothing.
    """
    fam = family_for(arch)
    if fam is not None:
        return fam.sized_kwargs(arch, dict(model_kwargs or {}), image_size)
    kwargs = dict(model_kwargs or {})
    try:
        model = _meta_model(arch, kwargs)
    except SSFDeployError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f"cannot build {arch} with {kwargs}: {first_line(e)}") from None
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        default = int(size if isinstance(size, int) else size[0])
    else:
        default = int(input_size(model)[1])
    size = int(image_size or default)
    if size != default and "img_size" not in kwargs:
        try:
            _meta_model(arch, dict(kwargs, img_size=size))
            kwargs["img_size"] = size
        except TypeError:
            pass   # size-agnostic (convolutional) model
        except (ValueError, AssertionError, RuntimeError) as e:
            raise UsageError(f"{arch} cannot run at `image_size` {size}: {first_line(e)}") from None
    return kwargs, size


# A model input ("batch") is a tensor (one image input) or a mapping of named tensors (text:
# input_ids/attention_mask); the pipeline slices, moves and feeds both through these helpers. The
# model-family registry itself is :mod:`ssf_deploy.families` (re-exported here).


def token_batch(batch: int, length: int, vocab: int, seed: int) -> dict:
    """Random text inputs drawn from ``seed``: ids uniform in ``[0, vocab)``, each row's mask one
    for a random length in ``[length/2, length]`` (so padding is exercised)."""
    g = torch.Generator().manual_seed(int(seed))
    ids = torch.randint(0, int(vocab), (int(batch), int(length)), generator=g)
    lengths = torch.randint((int(length) + 1) // 2, int(length) + 1, (int(batch),), generator=g)
    mask = (torch.arange(int(length))[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def call_args(x) -> tuple[tuple, dict]:
    """(args, kwargs) that feed a batch to a model."""
    from collections.abc import Mapping
    return ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})


def call_model(model, x):
    args, kwargs = call_args(x)
    return model(*args, **kwargs)


def _first(x) -> torch.Tensor:
    from collections.abc import Mapping
    return next(iter(x.values())) if isinstance(x, Mapping) else x


def batch_len(x) -> int:
    return int(_first(x).shape[0])


def batch_slice(x, start: int, stop: int):
    from collections.abc import Mapping
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def inputs_to(x, device=None, dtype: Optional[torch.dtype] = None):
    """Move a batch; only floating tensors take ``dtype`` (token ids stay integers)."""
    from collections.abc import Mapping

    def move(t):
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point()
                    else t.dtype)
    return {k: move(v) for k, v in x.items()} if isinstance(x, Mapping) else move(x)


def input_extent(x) -> int:
    """Image size (last spatial dim) or sequence length of a batch."""
    return int(_first(x).shape[-1])


def sample_shape(x):
    """Per-sample shape(s) of a batch (a key for cached graph statistics)."""
    from collections.abc import Mapping
    if isinstance(x, Mapping):
        return {k: list(v.shape[1:]) for k, v in sorted(x.items())}
    return list(x.shape[1:])


def logits_of(out) -> torch.Tensor:
    """The classifier output of a forward: a tensor, a model output's ``logits`` (or its first
    field), or the first element of a tuple."""
    from collections.abc import Mapping
    if isinstance(out, Mapping):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
