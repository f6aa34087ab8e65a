"""What a task records about how it was trained, so a rebuild can be *checked*, not trusted.

Two anchors, both written when the model is trained (checkpoints) or packed (packs):

* **the base** (:func:`base_record`): architecture, kwargs, classes, image size, where the frozen
  weights came from (hub tag, file, or a random init and the seed that redraws it) and a content
  hash over exactly the tensors a rebuild takes from the base — the base ``state_dict`` minus the
  task's own tensors, keys in sorted order, each with its dtype and shape. Loading recomputes it;
  another base is refused (:class:`~ssf_deploy.errors.BaseMismatchError`).
* **a golden probe** (:func:`record_probe`): the trained model's logits on a few inputs drawn from
  a fixed seed at the trained image size, computed on the CPU in float32 (a few KB). Whatever is
  deployed later is compared with these *recorded* outputs, not only with our reconstruction of
  the trained model — so a wrong reconstruction cannot hide behind itself.
"""
from __future__ import annotations

import copy
import hashlib
import time
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import BaseMismatchError, CheckpointError
from ..models import ModelFamily, batch_len, call_model, family_of, logits_of, token_batch

__all__ = ["hash_tensors", "base_keys", "base_record", "check_base", "record_probe",
           "probe_inputs", "PROBE_SEED", "PROBE_BATCH", "describe_base", "describe_source"]

PROBE_SEED = 20221122      # fixed; the inputs are regenerated from it, never stored
PROBE_BATCH = 4


def hash_tensors(state: dict, keys: Iterable[str]) -> str:
    """sha256 over (key, dtype, shape, bytes) of ``keys`` in sorted order: ``"sha256:<hex>"``."""
    h = hashlib.sha256()
    for k in sorted(keys):
        t = state[k].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{k}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def base_keys(model: nn.Module, task_state: dict) -> list[str]:
    """The tensors a rebuild takes from the base: everything the task does not carry itself."""
    return sorted(k for k in model.state_dict() if k not in task_state)


def base_record(model: nn.Module, task_state: dict, *, arch: str, num_classes: int,
                model_kwargs: dict, image_size: int, source: str,
                init_seed: Optional[int] = None) -> dict:
    """The ``base`` entry of a checkpoint or pack (see the module docstring)."""
    import timm
    keys = base_keys(model, task_state)
    return {"arch": arch, "num_classes": int(num_classes), "model_kwargs": dict(model_kwargs),
            "image_size": int(image_size), "source": source,
            "init_seed": None if init_seed is None else int(init_seed),
            "sha256": hash_tensors(model.state_dict(), keys), "tensors": len(keys),
            "torch": torch.__version__.split("+")[0], "timm": timm.__version__}


def describe_source(record: Optional[dict]) -> str:
    if not record:
        return "an unrecorded base"
    src = record.get("source") or "?"
    if src == "random-init":
        src = f"random init (seed {record.get('init_seed')})"
    return src


def describe_base(record: Optional[dict]) -> str:
    return f"{describe_source(record)} ({(record or {}).get('sha256', 'no hash')})"


def check_base(model: nn.Module, task_state: dict, record: Optional[dict], *,
               allow_mismatch: bool = False, what: str = "the base weights") -> dict:
    """Recompute the base hash of ``model`` (base + task method, before the task's tensors are
    loaded) and compare it with ``record``. Returns ``{"status", "expected", "actual", "seconds"}``.

    status: ``verified`` | ``mismatch-overridden`` | ``unrecorded-overridden``. Without
    ``allow_mismatch`` a mismatch or a missing record raises :class:`BaseMismatchError`.
    """
    t0 = time.perf_counter()
    keys = base_keys(model, task_state)
    actual = hash_tensors(model.state_dict(), keys)
    seconds = time.perf_counter() - t0
    expected = (record or {}).get("sha256")
    out = {"expected": expected, "actual": actual, "seconds": round(seconds, 3),
           "tensors": len(keys)}
    if expected is None:
        if not allow_mismatch:
            raise BaseMismatchError(
                f"the checkpoint records no base hash (written before ssf-deploy 0.2), so "
                f"{what} cannot be checked against the base it was trained on; pass "
                f"`allow_base_mismatch` to deploy it anyway (the report will say so)")
        out["status"] = "unrecorded-overridden"
    elif expected != actual:
        if not allow_mismatch:
            raise BaseMismatchError(
                f"{what} are not the base this task was trained on: expected {expected} "
                f"({describe_source(record)}, {record.get('tensors', '?')} tensors), got {actual} "
                f"({len(keys)} tensors); give the right `base_weights` (or "
                f"`allow_base_mismatch` to override, loudly)")
        out["status"] = "mismatch-overridden"
    else:
        out["status"] = "verified"
    return out


def probe_inputs(shape: Iterable[int], seed: int = PROBE_SEED, *, kind: str = "image",
                 vocab: Optional[int] = None):
    """The probe's inputs, drawn from ``seed``: an image batch ``randn(shape)``, or for
    ``kind="tokens"`` (text models) :func:`~ssf_deploy.models.token_batch` of shape ``[B, L]``."""
    shape = [int(s) for s in shape]
    if kind == "image":
        return torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)))
    if kind != "tokens" or len(shape) != 2 or not vocab:
        raise CheckpointError(f"unknown golden probe input kind {kind!r} (shape {shape})")
    return token_batch(shape[0], shape[1], int(vocab), int(seed))


def _input_digest(x) -> str:
    h = hashlib.sha256()
    for t in (x.values() if isinstance(x, dict) else [x]):
        h.update(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def record_probe(model: nn.Module, image_size: int, in_chans: int = 3,
                 batch: int = PROBE_BATCH, seed: int = PROBE_SEED) -> dict:
    """The model's eval-mode float32 CPU logits on the probe inputs (the model is not changed)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    ref = next(model.parameters(), None)
    on_cpu_fp32 = ref is None or (ref.device.type == "cpu" and ref.dtype == torch.float32)
    net = model if on_cpu_fp32 else copy.deepcopy(model).cpu().float()
    spec = (family_of(net) or ModelFamily()).probe_spec(net, image_size, in_chans, batch)
    x = probe_inputs(spec["shape"], seed, kind=spec.get("kind", "image"), vocab=spec.get("vocab"))
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = logits_of(call_model(net, x))
    finally:
        net.train(was_training)
    return {**spec, "seed": int(seed), "shape": list(spec["shape"]),
            "input_sha256": _input_digest(x), "logits": out.detach().float().cpu().clone(),
            "device": "cpu", "dtype": "float32"}


def checked_probe_inputs(probe: dict) -> torch.Tensor:
    """Regenerate a recorded probe's inputs, refusing if this torch draws different numbers."""
    try:
        x = probe_inputs(probe["shape"], probe["seed"], kind=probe.get("kind", "image"),
                         vocab=probe.get("vocab"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed golden probe record: {e}") from None
    if probe.get("input_sha256") and _input_digest(x) != probe["input_sha256"]:
        raise CheckpointError("the golden probe's inputs cannot be regenerated bit for bit by "
                              "this torch version (the random generator changed)")
    logits = probe.get("logits")
    if not isinstance(logits, torch.Tensor) or logits.shape[0] != batch_len(x):
        raise CheckpointError("malformed golden probe record: logits missing or of the wrong size")
    return x
