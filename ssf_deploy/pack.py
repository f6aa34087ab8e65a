"""Task packs: one task's SSF factors + head + metadata in a safetensors file (~1 MB for ViT-B).

The paper's storage argument made real: ship the shared base weights once, then one small pack
per task; ``fuse --pack`` and ``refit --pack`` rebuild the deployed weights from the two.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from .checkpoint import Task, atomic_path
from .errors import SSFDeployError
from .models import creation_record, head_modules
from .tuners import method_of

__all__ = ["PACK_FORMAT", "pack_state", "save_pack", "read_pack", "is_pack"]

PACK_FORMAT = "ssf-deploy/pack/1"


def pack_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make a task: SSF factors, the head, and buffers (BN statistics)."""
    head_prefixes = []
    names = {id(m): n for n, m in model.named_modules()}
    for h in head_modules(model):
        if id(h) in names:
            head_prefixes.append(names[id(h)] + ".")
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(("ssf_scale", "ssf_shift")) or any(k.startswith(p) for p in head_prefixes):
            out[k] = v
    for k, v in model.named_buffers():
        if v is not None and k in model.state_dict():
            out[k] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_pack(model: nn.Module, path: str, *, arch: Optional[str] = None,
              num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
              extra: Optional[dict] = None) -> int:
    """Write the pack atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    meta = method_of(model)
    if not meta or meta["method"] != "ssf":
        raise SSFDeployError("a task pack holds SSF factors: the model must carry method 'ssf'")
    rec = creation_record(model) or {}
    arch = arch or rec.get("arch")
    if not arch:
        raise SSFDeployError("cannot write a pack without the architecture name (pass --model)")
    metadata = {
        "format": PACK_FORMAT, "arch": arch,
        "num_classes": str(num_classes or rec.get("num_classes") or ""),
        "method": "ssf", "options": json.dumps(meta["options"]),
        "model_kwargs": json.dumps(model_kwargs if model_kwargs is not None
                                   else rec.get("kwargs", {})),
        "extra": json.dumps(extra or {}),
    }
    with atomic_path(path) as tmp:
        save_file(pack_state(model), tmp, metadata=metadata)
    import os
    return os.path.getsize(path)


def is_pack(path: str) -> bool:
    if not str(path).endswith(".safetensors"):
        return False
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format") == PACK_FORMAT
    except Exception:
        return False


def read_pack(path: str) -> Task:
    from safetensors import SafetensorError, safe_open
    import os
    if not os.path.isfile(path):
        raise SSFDeployError(f"pack not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SSFDeployError(f"corrupt pack {path}: {str(e)[:160]}") from None
    if meta.get("format") != PACK_FORMAT:
        raise SSFDeployError(f"{path} is not an ssf-deploy task pack")
    try:
        options = json.loads(meta.get("options") or "{}")
        kwargs = json.loads(meta.get("model_kwargs") or "{}")
        extra = json.loads(meta.get("extra") or "{}")
    except json.JSONDecodeError as e:
        raise SSFDeployError(f"corrupt pack metadata in {path}: {e}") from None
    nc = meta.get("num_classes")
    return Task(meta.get("arch"), int(nc) if nc else None, meta.get("method", "ssf"), options,
                state, source="pack", extra=extra, model_kwargs=kwargs)
