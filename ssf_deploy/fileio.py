"""Writing outputs so that a failure never leaves a half-written file at an output path.

Every file ssf-deploy writes goes to a temp file next to its target and is renamed into place
only when the whole job succeeded (:func:`atomic_path`). :func:`plain` reduces metadata to the
containers both ``torch.load(weights_only=True)`` and JSON accept.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

__all__ = ["atomic_path", "plain", "save_safetensors", "write_json", "TMP_PREFIX"]

TMP_PREFIX = ".tmp-"


def plain(x: Any) -> Any:
    """Reduce to containers ``torch.load(weights_only=True)`` and JSON both accept.

    Tuples become lists, dict keys strings, one-element tensors numbers, anything else its str().
    """
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temp path in the target's folder; rename onto ``path`` only if the block succeeds.

    The result gets the permissions ``open()`` would give it, whatever wrote the temp file
    (``mkstemp`` makes 0600, and some writers replace the file they are given).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=folder,
                               suffix=suffix if suffix is not None else os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp + ".data"):
            if os.path.exists(p):
                os.unlink(p)
        raise


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_path`, contiguous CPU tensors."""
    from safetensors.torch import save_file
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, tmp, metadata=metadata)


def write_json(obj: Any, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
