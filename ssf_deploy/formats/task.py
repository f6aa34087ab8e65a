"""A *task*: everything needed to rebuild one tuned model on top of its base weights.

Every reader (ours, official, plain state dict, pack) produces a :class:`Task`; :func:`build_model`
is the one place that turns it back into a model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..errors import CheckpointError, UsageError
from ..models import create_base_model, creation_record
from ..tuners import apply_method, load_trainable_state
from .provenance import check_base, describe_base

__all__ = ["Task", "build_model", "num_classes_from", "provenance_of"]

PROVENANCE = "ssf_deploy_provenance"


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

    @property
    def base(self) -> Optional[dict]:
        """The recorded base (arch, source, content hash...), when the task has one."""
        base = self.extra.get("base")
        return base if isinstance(base, dict) and base.get("sha256") else None

    @property
    def probe(self) -> Optional[dict]:
        """Golden outputs recorded when the task was trained or packed."""
        probe = self.extra.get("probe")
        return probe if isinstance(probe, dict) and "logits" in probe else None

    @property
    def image_size(self) -> Optional[int]:
        """The resolution the task was trained at."""
        size = self.extra.get("image_size") or (self.base or {}).get("image_size")
        return int(size) if size else None


def num_classes_from(state: dict) -> Optional[int]:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight"):
        if key in state and getattr(state[key], "dim", lambda: 0)() == 2:
            return int(state[key].shape[0])
    return None


def _legacy_seed(task: Task) -> Optional[int]:
    """ssf-deploy 0.1 recorded ``base: {pretrained, pretrained_file, init_seed}`` and no hash."""
    base = task.extra.get("base") or {}
    if not base.get("pretrained") and base.get("init_seed") is not None:
        return int(base["init_seed"])
    return None


def build_model(task: Task, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                base_weights: Optional[str] = None, pretrained: bool = False,
                allow_base_mismatch: bool = False) -> nn.Module:
    """Rebuild the tuned (unfused) model: base architecture + method + the task's tensors.

    The base comes from ``base_weights`` / ``pretrained`` or, for a task trained from a random
    init, from the recorded seed; either way its content hash must equal the one recorded at
    training time (:func:`~ssf_deploy.formats.provenance.check_base`). The outcome is attached to
    the model (:func:`provenance_of`) so every report can say what its PASS is anchored to.
    """
    arch = arch or task.arch
    if not arch:
        raise UsageError("the checkpoint does not name its architecture: pass --model ARCH")
    num_classes = num_classes or task.num_classes or num_classes_from(task.state)
    if not num_classes:
        raise UsageError("cannot tell the number of classes: pass --num-classes C")
    record = task.base
    init_seed = None
    if task.complete or base_weights or pretrained:
        pass
    elif record and record.get("source") == "random-init" and record.get("init_seed") is not None:
        init_seed = int(record["init_seed"])
    elif record:
        hint = "--pretrained" if str(record.get("source", "")).startswith("timm-hub:") else \
            "--base-weights FILE"
        raise UsageError(f"{task.path or 'the task'} was trained on {describe_base(record)}: "
                         f"pass {hint}")
    elif task.source == "pack":
        raise UsageError("a pack holds only the task: pass --base-weights FILE "
                         "(or --pretrained to fetch the base from the timm hub)")
    else:
        init_seed = _legacy_seed(task)
        if init_seed is None:
            raise UsageError(f"{task.path or 'the task'} needs its base weights: pass "
                             f"--base-weights FILE or --pretrained")
    model = create_base_model(arch, num_classes, pretrained=pretrained, pretrained_file=base_weights,
                              init_seed=init_seed, **task.model_kwargs)
    apply_method(model, task.method, **task.options)
    if task.complete:
        own = model.state_dict()
        missing = [k for k in own if k not in task.state]
        if missing:
            raise CheckpointError(f"checkpoint does not match {arch}: missing "
                                  f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        base_check = {"status": "complete", "note": "the file holds every tensor of the model"}
        rec = creation_record(model)
        if rec is not None:   # the base of a pack written from it is this file, not a random init
            rec.update(source=f"{task.source}:{os.path.basename(task.path) or '?'}",
                       init_seed=None)
    else:
        what = f"the base weights {base_weights}" if base_weights else \
            ("the timm hub weights" if pretrained else "the rebuilt random-init base")
        base_check = check_base(model, task.state, record, allow_mismatch=allow_base_mismatch,
                                what=what)
    load_trainable_state(model, task.state)
    model.__dict__[PROVENANCE] = {"source": task.source, "base": record, "base_check": base_check,
                                  "probe": task.probe, "image_size": task.image_size}
    return model.eval()


def provenance_of(model: nn.Module) -> Optional[dict]:
    """What :func:`build_model` checked: ``{"source", "base", "base_check", "probe",
    "image_size"}`` (``None`` for a model it did not build)."""
    return model.__dict__.get(PROVENANCE)
