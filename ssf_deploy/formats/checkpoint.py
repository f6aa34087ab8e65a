"""Our checkpoints (written by ``train``) and plain state dicts: written atomically, read safely.

* ours: ``{"format": FORMAT, "arch", "num_classes", "method", "options", "state",
  "model_kwargs", "base", "probe", ...}``. ``state`` holds only what the task changed (trainable
  parameters and buffers); the frozen rest comes from the base weights, which ``base`` identifies
  by content hash (see :mod:`ssf_deploy.formats.provenance`).
* a plain ``state_dict`` (needs ``--model``; the method is inferred from the keys).

Loading always uses ``torch.load(weights_only=True)``; only ``argparse.Namespace`` (the official
code stores its ``args`` that way) is allowlisted. Nothing ever falls back to full unpickling.
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import torch

from ..errors import CheckpointError, first_line
from ..fileio import atomic_path
from ..tuners import infer_method
from .task import Task

__all__ = ["FORMAT", "SAFE_GLOBALS", "save_checkpoint", "load_checkpoint", "is_ours",
           "read_ours", "is_state_dict", "read_state_dict"]

FORMAT = "ssf-deploy/checkpoint/1"
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(obj: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for every way it can fail."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text \
                or "Unsupported operand" in text:
            detail = next((ln.strip() for ln in text.splitlines()
                           if "Unsupported global" in ln or "Unsupported operand" in ln),
                          first_line(e))
            raise CheckpointError(f"refusing to load {path}: it holds objects outside the "
                                  f"weights-only allowlist ({detail})") from None
        raise CheckpointError(f"corrupt checkpoint {path}: {first_line(e)}") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {first_line(e)}") from None


# ------------------------------------------------------------------------------------------ ours

def is_ours(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_ours(obj: dict, path: str) -> Task:
    for key in ("arch", "num_classes", "method", "state"):
        if key not in obj:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    if not isinstance(obj["state"], dict):
        raise CheckpointError(f"checkpoint {path}: 'state' is not a dict of tensors")
    return Task(obj["arch"], int(obj["num_classes"]), obj["method"],
                dict(obj.get("options") or {}), dict(obj["state"]),
                extra={k: obj[k] for k in ("epoch", "metrics", "base", "probe", "image_size")
                       if k in obj},
                model_kwargs=dict(obj.get("model_kwargs") or {}), path=path)


# ------------------------------------------------------------------------------------ state dict

def _state_of(obj: Any):
    if not isinstance(obj, dict):
        return None
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return state


def is_state_dict(obj: Any) -> bool:
    return _state_of(obj) is not None


def read_state_dict(obj: dict, path: str) -> Task:
    state = {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in _state_of(obj).items()}
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    return Task(arch, None, infer_method(state), {}, state, source="state_dict", complete=True,
                path=path)
