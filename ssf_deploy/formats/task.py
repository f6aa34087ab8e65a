"""A *task*: everything needed to rebuild one tuned model on top of its base weights.

Every reader (ours, official, plain state dict, pack) produces a :class:`Task`; :func:`build_model`
is the one place that turns it back into a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..errors import CheckpointError, UsageError
from ..models import create_base_model
from ..tuners import apply_method, load_trainable_state

__all__ = ["Task", "build_model", "num_classes_from"]


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
    path: str = ""


def num_classes_from(state: dict) -> Optional[int]:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight"):
        if key in state and getattr(state[key], "dim", lambda: 0)() == 2:
            return int(state[key].shape[0])
    return None


def build_model(task: Task, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                base_weights: Optional[str] = None, pretrained: bool = False) -> nn.Module:
    """Rebuild the tuned (unfused) model: base architecture + method + the task's tensors."""
    arch = arch or task.arch
    if not arch:
        raise UsageError("the checkpoint does not name its architecture: pass --model ARCH")
    num_classes = num_classes or task.num_classes or num_classes_from(task.state)
    if not num_classes:
        raise UsageError("cannot tell the number of classes: pass --num-classes C")
    if task.source == "pack" and not base_weights and not pretrained:
        raise UsageError("a pack holds only the task: pass --base-weights FILE "
                         "(or --pretrained to fetch the base from the timm hub)")
    model = create_base_model(arch, num_classes, pretrained=pretrained, pretrained_file=base_weights,
                              **task.model_kwargs)
    apply_method(model, task.method, **task.options)
    if task.complete:
        own = model.state_dict()
        missing = [k for k in own if k not in task.state]
        if missing:
            raise CheckpointError(f"checkpoint does not match {arch}: missing "
                                  f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    load_trainable_state(model, task.state)
    return model.eval()
