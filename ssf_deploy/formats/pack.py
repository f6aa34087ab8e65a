"""Task packs: one task's SSF factors + head + metadata in a safetensors file (~1 MB for ViT-B).

The paper's storage argument made real: ship the shared base weights once, then one small pack
per task; ``fuse --pack`` and ``refit --pack`` rebuild the deployed weights from the two. A pack
carries the same provenance as a checkpoint (the base's content hash, golden probe outputs), so
the base it is combined with is checked, not trusted.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..errors import CheckpointError, UsageError, first_line
from ..fileio import check_manifest, save_safetensors
from ..models import creation_record, edits_of, input_size
from ..tuners import method_of, trainable_state_dict
from .provenance import base_record, record_probe
from .task import Task, check_task, provenance_of

__all__ = ["PACK_FORMAT", "save_pack", "read_pack", "is_pack", "read_safetensors"]

PACK_FORMAT = "ssf-deploy/pack/1"


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def save_pack(model: nn.Module, path: str, *, arch: Optional[str] = None,
              num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
              extra: Optional[dict] = None) -> int:
    """Write the pack atomically; returns its size in bytes. Same content, same bytes."""
    meta = method_of(model)
    if not meta or meta["method"] != "ssf":
        raise UsageError("a task pack holds SSF factors: the model must carry method 'ssf'")
    rec = creation_record(model) or {}
    if edits_of(model):
        raise UsageError("a task pack rebuilds the task on the plain timm architecture, and this "
                         "model's forward needs graph edits (" + ", ".join(edits_of(model)) + ")")
    arch = arch or rec.get("arch")
    if not arch:
        raise UsageError("cannot write a pack without the architecture name: give `arch`")
    kwargs = model_kwargs if model_kwargs is not None else rec.get("kwargs", {})
    prov = provenance_of(model) or {}
    image_size = prov.get("image_size") or input_size(model)[1]
    probe = prov.get("probe")
    if probe is None:   # nothing recorded at training (official / plain checkpoints): record now
        probe = dict(record_probe(model, image_size), recorded="when the pack was written")
    state = trainable_state_dict(model)
    base = prov.get("base")
    if base is None:
        src = rec.get("source", "?")
        base = base_record(model, state, arch=arch, num_classes=num_classes or rec["num_classes"],
                           model_kwargs=kwargs, image_size=image_size, source=src,
                           init_seed=rec.get("init_seed"))
    info = dict(extra or {}, base=base, image_size=int(image_size),
                probe={k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                       for k, v in probe.items()})
    metadata = {
        "format": PACK_FORMAT, "arch": arch,
        "num_classes": str(num_classes or rec.get("num_classes") or ""),
        "method": "ssf", "options": _dumps(meta["options"]),
        "model_kwargs": _dumps(kwargs), "extra": _dumps(info),
    }
    save_safetensors(state, path, metadata=metadata)
    return os.path.getsize(path)


def is_pack(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format") == PACK_FORMAT
    except (SafetensorError, OSError, ValueError):   # unreadable: read_safetensors says why
        return False


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a one-line error when it is corrupt."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"file not found: {path}")
    check_manifest(path)
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {first_line(e)}") from None
    return state, meta


def read_pack(path: str) -> Task:
    state, meta = read_safetensors(path)
    if meta.get("format") != PACK_FORMAT:
        raise CheckpointError(f"{path} is not an ssf-deploy task pack")
    try:
        options = json.loads(meta.get("options") or "{}")
        kwargs = json.loads(meta.get("model_kwargs") or "{}")
        extra = json.loads(meta.get("extra") or "{}")
        nc = int(meta["num_classes"]) if meta.get("num_classes") else None
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"corrupt pack metadata in {path}: {first_line(e)}") from None
    for name, value in (("options", options), ("model_kwargs", kwargs), ("extra", extra)):
        if not isinstance(value, dict):
            raise CheckpointError(f"corrupt pack metadata in {path}: '{name}' is not a JSON "
                                  f"object")
    probe = extra.get("probe")
    if isinstance(probe, dict) and "logits" in probe:
        try:
            probe["logits"] = torch.tensor(probe["logits"], dtype=torch.float32)
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"corrupt pack metadata in {path}: probe logits: "
                                  f"{first_line(e)}") from None
    return check_task(Task(meta.get("arch"), nc, meta.get("method", "ssf"), options, state,
                           source="pack", extra=extra, model_kwargs=kwargs, path=path))
