"""What a trained task looks like on disk, in every dialect we read, and how it becomes a model.

``read_task(path)`` asks each registered reader in turn (timm's ``checkpoint_filter_fn`` idea,
one reader per dialect): our training checkpoints, task packs, the official SSF code's
checkpoints, plain state dicts. All of them yield a :class:`Task`; :func:`build_model` rebuilds it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import CheckpointError, first_line
from ..fileio import check_manifest
from . import checkpoint, official, pack
from .task import Task, build_model, check_task, num_classes_from

__all__ = ["Task", "build_model", "read_task", "Reader", "READERS", "num_classes_from"]


@dataclass(frozen=True)
class Reader:
    """A checkpoint dialect: does an object loaded with ``torch.load`` belong to it, and its Task."""
    name: str
    accepts: Callable[[Any], bool]
    read: Callable[[Any, str], Task]


# order matters: the most specific dialect first, a plain state dict last
READERS = [
    Reader("ssf-deploy", checkpoint.is_ours, checkpoint.read_ours),
    Reader("official-ssf", official.is_official, official.task_from_official),
    Reader("state_dict", checkpoint.is_state_dict, checkpoint.read_state_dict),
]


def _sniff(path: str) -> str:
    """'safetensors', 'onnx' or 'torch' from the first bytes (extensions lie)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch"            # torch.save zip archive
    if len(head) >= 9 and head[8:9] == b"{" and \
            int.from_bytes(head[:8], "little") + 8 <= os.path.getsize(path):
        return "safetensors"      # u64 header length, then the JSON header
    if head[:1] == b"\x80":
        return "torch"            # a legacy pickle
    if head[:1] == b"\x08" or path.endswith(".onnx"):
        import onnx
        from google.protobuf.message import DecodeError
        try:
            proto = onnx.load(path, load_external_data=False)
        except (DecodeError, OSError, ValueError):   # not ONNX after all: the torch reader says
            return "torch"
        if proto.graph.node:
            return "onnx"
    return "torch"


def read_task(path: str) -> Task:
    """Read any supported checkpoint dialect (or a task pack) into a :class:`Task`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    check_manifest(path)
    try:
        kind = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {first_line(e)}") from None
    if kind == "onnx":
        raise CheckpointError(f"{path} is an ONNX model, not a checkpoint: pass the training "
                              f"checkpoint (.pt) or a task pack, and the ONNX as `onnx`")
    if kind == "safetensors":
        if pack.is_pack(path):
            return pack.read_pack(path)
        obj = pack.read_safetensors(path)[0]
    else:
        obj = checkpoint.load_checkpoint(path)
    for reader in READERS:
        if reader.accepts(obj):
            return check_task(reader.read(obj, path))
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if isinstance(state, dict) and any(isinstance(v, torch.Tensor) for v in state.values()):
        k = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{path}: state dict entry '{k}' is a {type(state[k]).__name__}, "
                              f"not a tensor")
    what = type(obj).__name__ if not isinstance(obj, dict) else "a dict without tensors"
    raise CheckpointError(f"{path} is neither an ssf-deploy checkpoint, an official SSF "
                          f"checkpoint nor a state dict (it holds {what})")
