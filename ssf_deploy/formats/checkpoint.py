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
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CheckpointError, UsageError, first_line
from ..fileio import atomic_path, check_manifest, plain
from ..models import creation_record, input_size
from ..tuners import infer_method, method_of, trainable_state_dict
from .provenance import base_record, record_probe
from .task import Task

__all__ = ["FORMAT", "SAFE_GLOBALS", "save_checkpoint", "load_checkpoint", "is_ours",
           "read_ours", "is_state_dict", "read_state_dict", "task_record", "save_task",
           "serialized_size"]

FORMAT = "ssf-deploy/checkpoint/1"
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(obj: dict, path: str) -> None:
    """``torch.save`` through :func:`~ssf_deploy.fileio.atomic_path`, into a file object: the
    zip records are then named ``archive/...`` whatever the temp file is called (same content,
    same bytes), and a full disk raises the operating system's error instead of torch's
    "unexpected pos"."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class _Counter:
    """A file object that keeps only the number of bytes written to it."""

    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.bytes += n
        return n

    def flush(self) -> None:
        pass


def serialized_size(obj: Any) -> int:
    """The size ``save_checkpoint(obj, ...)`` would write, without writing anything."""
    sink = _Counter()
    torch.save(obj, sink)
    return sink.bytes


def task_record(model: nn.Module, *, image_size: Optional[int] = None,
                base: Optional[dict] = None) -> dict:
    """The part of a checkpoint that makes it a deployable task: architecture, method, the
    task's tensors, the base it was trained on (content hash) and golden probe outputs.

    ``model`` must come from :func:`~ssf_deploy.models.create_base_model` + ``apply_method``;
    its frozen tensors must still be the base's (they are, when the method froze them).
    """
    rec = creation_record(model)
    meta = method_of(model)
    if rec is None or meta is None:
        raise UsageError("save a task from a model made by ssf_deploy.create_base_model + "
                         "apply_method (its architecture and method must be known)")
    size = int(image_size or input_size(model)[1])
    state = trainable_state_dict(model)
    if base is None:
        base = base_record(model, state, arch=rec["arch"], num_classes=rec["num_classes"],
                           model_kwargs=rec["kwargs"], image_size=size,
                           source=rec.get("source", "?"), init_seed=rec.get("init_seed"))
    return {"format": FORMAT, "arch": rec["arch"], "num_classes": rec["num_classes"],
            "method": meta["method"], "options": plain(meta["options"]),
            "model_kwargs": plain(rec["kwargs"]), "image_size": size, "state": state,
            "base": base, "probe": record_probe(model, size)}


def save_task(model: nn.Module, path: str, *, image_size: Optional[int] = None,
              extra: Optional[dict] = None) -> None:
    """Save a tuned model (trained with your own loop) as a checkpoint ``fuse``/``verify`` read."""
    save_checkpoint(dict(task_record(model, image_size=image_size), **(extra or {})), path)


def load_checkpoint(path: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for every way it can fail."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    check_manifest(path)
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
    options, kwargs = obj.get("options"), obj.get("model_kwargs")
    return Task(   # checked by read_task (check_task), like every reader's result
        obj["arch"], obj["num_classes"], obj["method"],
        dict(options) if isinstance(options, dict) else ({} if options is None else options),
        dict(obj["state"]),
        extra={k: obj[k] for k in ("epoch", "metrics", "base", "probe", "image_size") if k in obj},
        model_kwargs=dict(kwargs) if isinstance(kwargs, dict) else ({} if kwargs is None else
                                                                      kwargs),
        path=path)


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
