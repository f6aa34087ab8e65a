"""Creating base models: timm names (old and new), hub weights or an offline weights file."""
from __future__ import annotations

import os
from typing import Optional

import timm
import torch
from torch import nn

from .errors import SSFDeployError

__all__ = ["resolve_arch", "create_base_model", "creation_record", "input_size", "head_modules",
           "count_params", "example_input", "sized_kwargs"]

CREATE_RECORD = "ssf_deploy_create"


def resolve_arch(arch: str) -> str:
    """Map a timm 0.6 name (e.g. ``vit_base_patch16_224_in21k``) to today's name.

    timm keeps that table itself (``register_model_deprecations``); we only read it so the name
    we store in checkpoints and packs is the current one and no deprecation warning repeats.
    """
    try:
        from timm.models._registry import _deprecated_models
    except ImportError:  # pragma: no cover - older/newer timm without the private table
        _deprecated_models = {}
    arch = _deprecated_models.get(arch, arch) or arch
    if not timm.is_model(arch.split(".")[0]) and not timm.is_model(arch):
        raise SSFDeployError(f"unknown timm model '{arch}' (see timm.list_models())")
    return arch


def create_base_model(arch: str, num_classes: int, *, pretrained: bool = False,
                      pretrained_file: Optional[str] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with our error messages; ``pretrained_file`` works offline.

    A local file goes through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so the
    model family's ``checkpoint_filter_fn`` adapts it and a head of another size is dropped.
    """
    arch = resolve_arch(arch)
    if num_classes is None or int(num_classes) < 1:
        raise SSFDeployError(f"--num-classes must be a positive integer, got {num_classes!r}")
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise SSFDeployError(f"weights file not found: {pretrained_file}")
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained_file))
        pretrained = True
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=int(num_classes), **kwargs)
    except SSFDeployError:
        raise
    except RuntimeError as e:
        if pretrained_file is not None:
            raise SSFDeployError(f"cannot load weights {pretrained_file} into {arch}: "
                                 f"{str(e).splitlines()[0]}") from e
        raise
    except Exception as e:
        if pretrained and pretrained_file is None:
            raise SSFDeployError(f"cannot fetch pretrained weights for {arch} "
                                 f"(offline? use --pretrained-file): {str(e).splitlines()[0]}") from e
        raise
    # Remember how to build this architecture again: the fuser returns a fresh instance of it.
    model.__dict__[CREATE_RECORD] = {
        "arch": arch, "num_classes": int(num_classes),
        "kwargs": {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}}
    return model


def creation_record(model: nn.Module) -> Optional[dict]:
    """``{"arch", "num_classes", "kwargs"}`` for models made by :func:`create_base_model`."""
    return model.__dict__.get(CREATE_RECORD)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects; a patch embedding's own size wins over the default config."""
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
    kwargs = dict(model_kwargs or {})
    try:
        model = _meta_model(arch, kwargs)
    except SSFDeployError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise SSFDeployError(f"cannot build {arch} with {kwargs}: {str(e).splitlines()[0][:160]}") \
            from None
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
            raise SSFDeployError(f"{arch} cannot run at --image-size {size}: "
                                 f"{str(e).splitlines()[0][:160]}") from None
    return kwargs, size
