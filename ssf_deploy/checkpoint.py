"""Checkpoints: written atomically, read safely, understood in three dialects.

Dialects read by :func:`read_task`:

* ours (``train`` writes it): ``{"format": FORMAT, "arch", "num_classes", "method", "options",
  "state", "model_kwargs", ...}`` where ``state`` holds only what the task changed (trainable parameters and
  buffers), so the base weights come from timm / ``--base-weights``;
* a plain ``state_dict`` (needs ``--model``; the method is inferred from the keys);
* the official SSF code's checkpoints (see :mod:`ssf_deploy.official`).

Loading always uses ``torch.load(weights_only=True)``; only ``argparse.Namespace`` (the official
code stores its ``args`` that way) is allowlisted. Nothing ever falls back to full unpickling.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from .errors import SSFDeployError

FORMAT = "ssf-deploy/checkpoint/1"
SAFE_GLOBALS = [argparse.Namespace]

__all__ = ["FORMAT", "Task", "atomic_path", "save_checkpoint", "load_checkpoint", "read_task",
           "plain"]


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


@contextmanager
def atomic_path(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temp path in the target's folder; rename onto ``path`` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder,
                               suffix=suffix if suffix is not None else os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; the result should look like open()'s
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp + ".data"):
            if os.path.exists(p):
                os.unlink(p)
        raise


def save_checkpoint(obj: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for every way it can fail."""
    if not os.path.isfile(path):
        raise SSFDeployError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(e) \
                or "Unsupported operand" in str(e):
            detail = next((ln.strip() for ln in str(e).splitlines()
                           if "Unsupported global" in ln or "Unsupported operand" in ln), first)
            raise SSFDeployError(f"refusing to load {path}: it holds objects outside the "
                                 f"weights-only allowlist ({detail[:160]})") from None
        raise SSFDeployError(f"corrupt checkpoint {path}: {first[:160]}") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SSFDeployError(f"corrupt or unreadable checkpoint {path}: {msg[:160]}") from None


def _load_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SSFDeployError(f"corrupt safetensors file {path}: {str(e)[:160]}") from None


@dataclass
class Task:
    """Everything needed to rebuild a tuned model on top of base weights."""
    arch: Optional[str]
    num_classes: Optional[int]
    method: str
    options: dict
    state: dict            # tensors in ssf-deploy naming (base names + ssf_scale/ssf_shift ...)
    source: str = "ssf-deploy"
    extra: dict = field(default_factory=dict)
    complete: bool = False  # state holds the full model (plain/official dialects), not a delta
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (img_size...)


def read_task(path: str) -> Task:
    """Read any supported checkpoint dialect into a :class:`Task`."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise SSFDeployError(f"{path} is not a checkpoint (top level is {type(obj).__name__})")
    if obj.get("format") == FORMAT:
        for key in ("arch", "num_classes", "method", "state"):
            if key not in obj:
                raise SSFDeployError(f"checkpoint {path} lacks '{key}'")
        return Task(obj["arch"], int(obj["num_classes"]), obj["method"],
                    dict(obj.get("options") or {}), dict(obj["state"]),
                    extra={k: obj[k] for k in ("epoch", "metrics", "base") if k in obj},
                    model_kwargs=dict(obj.get("model_kwargs") or {}))
    from .official import is_official, task_from_official
    if is_official(obj):
        return task_from_official(obj, path)
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SSFDeployError(f"{path} is neither an ssf-deploy checkpoint nor a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return Task(obj.get("arch") if isinstance(obj.get("arch"), str) else None, None,
                _infer_method(state), {}, state, source="state_dict", complete=True)


def _infer_method(state: dict) -> str:
    if any(k.endswith(("ssf_scale", "ssf_shift")) for k in state):
        return "ssf"
    if "vpt_prompts" in state:
        return "vpt-deep" if state["vpt_prompts"].shape[0] > 1 else "vpt-shallow"
    if any(".adapter." in k for k in state):
        return "adapter"
    return "full"


def _num_classes_from(state: dict) -> Optional[int]:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def build_model(task: Task, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                base_weights: Optional[str] = None, pretrained: bool = False):
    """Rebuild the tuned (unfused) model: base architecture + method + the task's tensors."""
    from .models import create_base_model
    from .tuners import apply_method, load_trainable_state

    arch = arch or task.arch
    if not arch:
        raise SSFDeployError("the checkpoint does not name its architecture: pass --model ARCH")
    num_classes = num_classes or task.num_classes or _num_classes_from(task.state)
    if not num_classes:
        raise SSFDeployError("cannot tell the number of classes: pass --num-classes C")
    model = create_base_model(arch, num_classes, pretrained=pretrained, pretrained_file=base_weights,
                              **task.model_kwargs)
    apply_method(model, task.method, **task.options)
    if task.complete:
        own = model.state_dict()
        missing = [k for k in own if k not in task.state]
        if missing:
            raise SSFDeployError(f"checkpoint does not match {arch}: missing {', '.join(missing[:3])}"
                                 f"{' ...' if len(missing) > 3 else ''}")
    load_trainable_state(model, task.state)
    return model.eval()
