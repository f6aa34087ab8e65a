"""Tuning methods (PEFT-style): ``apply_method(model, method, **options)``.

One file per method; they share the injection mechanism in ``base``. Every method freezes what
it must and keeps the classifier head trainable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..checkpoint import plain
from ..errors import SSFDeployError
from ..models import count_params
from . import full, linear, bias, adapter, vpt, ssf  # noqa: F401  (registration order = METHODS)
from .base import METHODS, freeze_backbone, get_tuner, unfreeze_head, unload

__all__ = ["apply_method", "count_params", "method_of", "trainable_state_dict",
           "load_trainable_state", "METHODS", "unload"]


def apply_method(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Insert ``method``'s modules into ``model`` in place, set trainability, return ``model``."""
    if method_of(model) is not None:
        raise SSFDeployError(f"model already carries method '{method_of(model)['method']}'")
    tuner = get_tuner(method)
    cfg = tuner.make_config(**options)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if tuner.freezes_backbone:
        freeze_backbone(model)
    try:
        tuner.inject(model, cfg)
    except BaseException:   # leave the model as it was given
        unload(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    unfreeze_head(model)
    object.__setattr__(model, "ssf_deploy_method",
                       {"method": method, "options": plain(dataclasses.asdict(cfg))})
    return model


def method_of(model: nn.Module) -> dict | None:
    """``{"method": ..., "options": {...}}`` for a model set up by ``apply_method``."""
    return getattr(model, "ssf_deploy_method", None)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a task changes: trainable parameters plus every buffer (BN statistics move too)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if b is not None})
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise SSFDeployError(f"checkpoint does not match the model: unknown key(s) "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise SSFDeployError(f"checkpoint does not match the model: {k} has shape "
                             f"{tuple(state[k].shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
