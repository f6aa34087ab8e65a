"""Tuning methods (PEFT-style): ``apply_method(model, method, **options)``.

One file per method; they share the injection mechanism in ``base``. Every method freezes what
it must and keeps the classifier head trainable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..fileio import plain
from ..runtime.keys import KeyDiff, key_diff
from . import full, linear, bias, adapter, vpt, ssf  # noqa: F401  (registration order = METHODS)
from .base import METHODS, freeze_backbone, get_tuner, infer_method, tuners, unfreeze_head, unload

__all__ = ["apply_method", "method_of", "trainable_state_dict", "load_trainable_state",
           "check_trainable_state", "METHODS",
           "unload", "get_tuner", "tuners", "infer_method"]


def apply_method(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Insert ``method``'s modules into ``model`` in place, set trainability, return ``model``."""
    if method_of(model) is not None:
        raise UsageError(f"model already carries method '{method_of(model)['method']}'")
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
    """What a task changes: trainable parameters plus every buffer (BN statistics move too).

    This is the one definition of "the task": checkpoints and packs both store exactly it.
    """
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    own = model.state_dict(keep_vars=True)
    state.update({n: b for n, b in own.items() if n not in state and not isinstance(b, nn.Parameter)})
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    check_trainable_state(model, state)
    model.load_state_dict(state, strict=False)


def check_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse (:class:`CheckpointError`, one line) a task state that does not fit ``model``:
    unknown names, values that are not tensors, other shapes, float vs integer."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state is a {type(state).__name__}, not a dict of "
                              f"tensors")
    own = model.state_dict()
    unknown = key_diff(own, state, shapes=False).unexpected
    if unknown:
        raise CheckpointError(f"checkpoint does not match the model: unknown key(s) "
                              f"{KeyDiff.listing(unknown)}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entry '{bad[0]}' is a {type(state[bad[0]]).__name__}, "
                              f"not a tensor")
    wrong = key_diff(state, {k: own[k] for k in state}).wrong_shape
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"checkpoint does not match the model: {k} has shape {got}, "
                              f"model expects {want}")
    bad = [k for k, v in state.items() if v.is_floating_point() != own[k].is_floating_point()]
    if bad:
        k = bad[0]
        raise CheckpointError(f"checkpoint does not match the model: {k} is {state[k].dtype}, "
                              f"model expects {own[k].dtype}")
