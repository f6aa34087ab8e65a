"""A *task*: everything needed to rebuild one tuned model on top of its base weights.

Every reader (ours, official, plain state dict, pack) produces a :class:`Task`; :func:`build_model`
is the one place that turns it back into a model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..models import check_finite, create_base_model, creation_record
from ..runtime.keys import KeyDiff, key_diff
from ..tuners import apply_method, check_trainable_state, load_trainable_state
from .provenance import check_base, describe_base

__all__ = ["Task", "build_model", "num_classes_from", "provenance_of", "check_task"]

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
    edits: dict = field(default_factory=dict)   # graph edits the task's forward needs (models.py)

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


def _what(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return f"the {type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(v: Any, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def check_task(task: Task) -> Task:
    """Refuse, in one line, a task whose recorded values have the wrong type or shape.

    Every reader's result goes through here before a model is built, so a malformed file (a
    factor that is the number 1.0, options that are not a dict, a golden probe of the wrong
    size) is a :class:`~ssf_deploy.errors.CheckpointError` naming the field, never an
    ``AttributeError`` from deep inside the rebuild; so is a NaN or Inf in any tensor (named as
    the file spells it: ``extra["origin"]``), before anything is folded or exported. Shapes
    against the model are checked by :func:`build_model`.
    """
    where = task.path or "the checkpoint"

    def bad(field: str, value: Any, expected: str):
        raise CheckpointError(f"{where}: '{field}' is {_what(value)}, expected {expected}")

    if task.arch is not None and (not isinstance(task.arch, str) or not task.arch):
        bad("arch", task.arch, "a timm model name")
    if task.num_classes is not None and not _is_int(task.num_classes, 1):
        bad("num_classes", task.num_classes, "a positive integer")
    if not isinstance(task.method, str):
        bad("method", task.method, "a method name")
    for key in ("options", "model_kwargs", "edits"):
        value = getattr(task, key)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            bad(key, value, "a dict")
    if not isinstance(task.state, dict):
        bad("state", task.state, "a dict of tensors")
    for k, v in task.state.items():
        if not isinstance(k, str):
            bad("state", k, "tensor names (str)")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: checkpoint entry '{k}' is {_what(v)}, not a tensor")
    extra = task.extra
    if "image_size" in extra and extra["image_size"] is not None and \
            not _is_int(extra["image_size"], 1):
        bad("image_size", extra["image_size"], "a positive integer")
    if extra.get("epoch") is not None and not _is_int(extra["epoch"]):
        bad("epoch", extra["epoch"], "a number of epochs")
    metrics = extra.get("metrics")
    if metrics is not None and (not isinstance(metrics, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                        for x in v) for v in metrics.values())):
        bad("metrics", metrics, "a dict of lists of numbers")
    base = extra.get("base")
    if base is not None:
        if not isinstance(base, dict):
            bad("base", base, "a dict (the base record)")
        for field, ok, expected in (
                ("sha256", lambda v: isinstance(v, str) and v.startswith("sha256:"),
                 "'sha256:<hex>'"),
                ("init_seed", lambda v: v is None or _is_int(v), "an integer seed or null"),
                ("source", lambda v: v is None or isinstance(v, str), "a string"),
                ("arch", lambda v: isinstance(v, str), "a timm model name"),
                ("num_classes", lambda v: _is_int(v, 1), "a positive integer"),
                ("image_size", lambda v: _is_int(v, 1), "a positive integer"),
                ("tensors", lambda v: _is_int(v), "a count"),
                ("model_kwargs", lambda v: isinstance(v, dict), "a dict")):
            if field in base and not ok(base[field]):
                bad(f"base.{field}", base[field], expected)
    probe = extra.get("probe")
    if probe is not None:
        if not isinstance(probe, dict):
            bad("probe", probe, "a dict (the golden probe record)")
        shape = probe.get("shape")
        tokens = probe.get("kind") == "tokens"   # a text model's probe: [batch, length] ids
        if tokens and not _is_int(probe.get("vocab"), 1):
            bad("probe.vocab", probe.get("vocab"), "a positive integer (vocabulary size)")
        if not (isinstance(shape, list) and len(shape) == (2 if tokens else 4)
                and all(_is_int(s, 1) for s in shape)):
            bad("probe.shape", shape, "[batch, length]" if tokens else
                "[batch, channels, height, width]")
        if not _is_int(probe.get("seed")):
            bad("probe.seed", probe.get("seed"), "an integer seed")
        logits = probe.get("logits")
        classes = task.num_classes
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and
                logits.is_floating_point() and logits.shape[0] == shape[0] and
                (classes is None or logits.shape[1] == classes)):
            bad("probe.logits", logits, f"a float tensor of shape ({shape[0]}, "
                f"{classes if classes is not None else 'classes'})")
        for field in ("input_sha256", "recorded", "device", "dtype", "kind"):
            if field in probe and not isinstance(probe[field], str):
                bad(f"probe.{field}", probe[field], "a string")
        check_finite({"probe.logits": logits}, where)
    origin = extra.get("origin")
    check_finite(task.state, where, {k: f"'{v}' in the file" for k, v in origin.items()}
                 if isinstance(origin, dict) else None)
    return task


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
        raise UsageError("the checkpoint does not name its architecture: give `arch`")
    num_classes = num_classes or task.num_classes or num_classes_from(task.state)
    if not num_classes:
        raise UsageError("cannot tell the number of classes: give `num_classes`")
    record = task.base
    init_seed = None
    if task.complete or base_weights or pretrained:
        pass
    elif record and record.get("source") == "random-init" and record.get("init_seed") is not None:
        init_seed = int(record["init_seed"])
    elif record:
        hint = "`pretrained`" if str(record.get("source", "")).startswith(
            ("timm-hub:", "hf-hub:", "hf-folder:")) else "`base_weights`"
        raise UsageError(f"{task.path or 'the task'} was trained on {describe_base(record)}: "
                         f"pass {hint}")
    elif task.source == "pack":
        raise UsageError("a pack holds only the task: give its base in `base_weights` "
                         "(or `pretrained` to fetch it from the timm hub)")
    else:
        init_seed = _legacy_seed(task)
        if init_seed is None:
            raise UsageError(f"{task.path or 'the task'} needs its base weights: pass "
                             f"`base_weights` or `pretrained`")
    model = create_base_model(arch, num_classes, pretrained=pretrained, pretrained_file=base_weights,
                              init_seed=init_seed, edits=task.edits, **task.model_kwargs)
    apply_method(model, task.method, **task.options)
    if not task.complete:   # names, types, shapes: before hashing the base against its record
        check_trainable_state(model, task.state)
    if task.complete:
        own = model.state_dict()
        missing = key_diff(own, task.state, shapes=False).missing
        if missing:
            raise CheckpointError(f"checkpoint does not match {arch}: missing "
                                  f"{KeyDiff.listing(missing)}")
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
