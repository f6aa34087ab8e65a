"""Swap a task's fused weights into an artefact built for another task, checked, as one call.

SSF changes only weights, so one built artefact serves every task of a base model:

* :func:`refit_onnx` — a new onnxruntime session on the same ONNX bytes with the task's
  initializers, checked against the task's unfused PyTorch model (CPU);
* :func:`refit_plan` — TensorRT's Refitter on a refittable engine, checked against onnxruntime
  on the same graph holding the task's weights (every refit is compared: TensorRT 11.3's REFIT
  issue can leave a bias unrefittable).

Both also compare with the outputs the task recorded at training (its golden probe), and write
``out`` only when every check passes.
"""
from __future__ import annotations

import time
import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import onnx
import torch
from torch import nn

from ..anchor import anchor_of, check_golden, golden_of
from ..engine import (PLAN_SUFFIXES, EngineRunner, build_sidecar, cuda_device, deserialize,
                      fp16_onnx, import_tensorrt, read_plan, read_sidecar, refit_engine,
                      refuse_quantized_refit, require_cuda, resolve_onnx_for_plan,
                      sidecar_path, sidecar_precision, write_plan)
from ..errors import UsageError, VerificationError
from ..fileio import atomic_path, check_writable
from ..formats import Task, build_model, read_task
from ..models import creation_record
from ..runtime import OrtRunner, load_onnx
from ..verify import VerifyReport, resolve_tolerances, verify
from .weights import (TaskOrtRunner, TaskWeights, bake_initializers, check_task_matches,
                      compute_task_weights, export_settings, graph_weight_names)

__all__ = ["RefitReport", "refit_onnx", "refit_plan", "task_inputs"]

TaskLike = Union[str, Task, nn.Module, Callable[[], Task]]


@dataclass
class RefitReport:
    """What a refit did and found; ``str()`` is the human report, ``as_dict()`` the JSON."""
    target: str
    onnx: str
    task: str
    weights: TaskWeights
    verify: VerifyReport
    golden: Optional[VerifyReport] = None
    refit: Optional[dict] = None            # TensorRT: seconds, method, unexposed biases
    seconds: dict = field(default_factory=dict)
    anchor: dict = field(default_factory=dict)
    not_refitted: list = field(default_factory=list)   # changed biases TensorRT cannot refit
    lines: list = field(default_factory=list)
    written: Optional[str] = None
    build_seconds: Optional[float] = None

    @property
    def passed(self) -> bool:
        return self.verify.passed and (self.golden is None or self.golden.passed) \
            and not self.not_refitted

    def as_dict(self) -> dict:
        d = {"target": self.target, "onnx": self.onnx, "pack": self.task,
             "weights": self.weights.as_dict(), "verify": self.verify.as_dict(),
             "verify_recorded": self.golden.as_dict() if self.golden is not None else None,
             "anchor": dict(self.anchor), "passed": self.passed}
        if self.refit is not None:
            d.update(refit=self.refit, build_seconds=self.build_seconds,
                     not_refitted=list(self.not_refitted))
        else:
            d["seconds"] = dict(self.seconds)
        if self.written:
            d["out"] = self.written
        return d

    def __str__(self) -> str:
        return "\n".join(self.lines)


def task_inputs(settings: dict, batch_size: int, n: int, seed: int = 0) -> list:
    """``n`` seeded random batches for the graph of ``settings`` (its static batch, or
    ``batch_size`` for a dynamic one)."""
    b = batch_size if settings["dynamic_batch"] else int(settings["batch_size"])
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *settings["chw"], generator=g) for _ in range(max(1, n))]


def _task(task: TaskLike) -> tuple:
    """(the Task or the given model, a label, an object with ``arch``/``num_classes`` for the
    graph check: the Task, or the model's creation record)."""
    if callable(task) and not isinstance(task, (nn.Module, Task)):
        task = task()
    if isinstance(task, nn.Module):
        rec = creation_record(task) or {}
        return task, type(task).__name__, types.SimpleNamespace(
            arch=rec.get("arch"), num_classes=rec.get("num_classes"))
    t = read_task(task) if not isinstance(task, Task) else task
    if t.method != "ssf":
        raise UsageError(f"the task holds method '{t.method}'; only ssf refits")
    return t, str(task if not isinstance(task, Task) else (t.path or "the task")), t


def _prepare(target: str, onnx_path: str, task: TaskLike, *, plan: bool):
    proto = load_onnx(onnx_path)
    # INT8/FP8: the scales were calibrated on the weights in the file; swapping weights under
    # them gives a wrong model, whatever a comparison on random inputs says
    refuse_quantized_refit(read_sidecar(target) if plan else {}, proto, source=target)
    settings = export_settings(proto)
    t, label, meta = _task(task)
    check_task_matches(proto, meta, source=onnx_path)
    return proto, settings, t, label


def _model(t, settings: dict, base: dict, warn) -> tuple:
    """The task's unfused model (``t``: a Task, built on its base; or the model itself), fused."""
    from ..fuse import fuse
    t0 = time.perf_counter()
    model = t if isinstance(t, nn.Module) else build_model(t, **base)
    anchor = anchor_of(model)
    if str(anchor.get("base_status", "")).endswith("overridden") and warn is not None:
        warn(f"base {anchor['base']}; outputs are NOT anchored to the trained model's base")
    fused = fuse(model, torch.randn(2, *settings["chw"], generator=torch.Generator().manual_seed(1)))
    return model, fused, anchor, time.perf_counter() - t0


def _check_common(out: Optional[str], suffixes: tuple, inputs: int, batch_size: int,
                  extra=None) -> None:
    if inputs < 1 or batch_size < 1:
        raise UsageError("`inputs` and `batch_size` must be >= 1")
    if out:
        if not out.endswith(suffixes):
            raise UsageError(f"`out` must end with {'/'.join(suffixes)} for this target: {out}")
        check_writable(out, extra)


def refit_onnx(onnx_path: str, task: TaskLike, out: Optional[str] = None, *,
               base_weights: Optional[str] = None, pretrained: bool = False,
               allow_base_mismatch: bool = False, atol=None, rtol=None, inputs: int = 2,
               batch_size: int = 4, warn: Optional[Callable[[str], None]] = None
               ) -> RefitReport:
    """The ONNX file ``onnx_path`` with ``task``'s weights (a pack or checkpoint path, a
    :class:`~ssf_deploy.formats.Task`, or the task's unfused model), checked in onnxruntime
    against the unfused task and its golden probe; ``out``: the same graph holding the task's
    weights. Raises :class:`~ssf_deploy.errors.VerificationError` (with ``.report``) when a
    check fails; nothing is written then."""
    _check_common(out, (".onnx",), inputs, batch_size)
    proto, settings, t, label = _prepare(onnx_path, onnx_path, task, plan=False)
    model, fused, anchor, prep = _model(t, settings, dict(
        base_weights=base_weights, pretrained=pretrained,
        allow_base_mismatch=allow_base_mismatch), warn)
    atol, rtol = resolve_tolerances(atol, rtol, False)
    t0 = time.perf_counter()
    weights = compute_task_weights(proto, fused.state_dict(), fused)
    t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = TaskOrtRunner(proto, weights.values,
                           label="onnxruntime (same ONNX, task initializers)")
    t_session = time.perf_counter() - t0
    report_v = verify(model, runner, task_inputs(settings, batch_size, inputs), atol=atol,
                      rtol=rtol, names=["logits"])
    report_v.reference = "unfused task (PyTorch)"
    gold = check_golden(golden_of(model), runner, runner.label, chw=settings["chw"], atol=atol,
                        rtol=rtol, per_sample=not settings["dynamic_batch"])
    r = RefitReport(target=onnx_path, onnx=onnx_path, task=label, weights=weights,
                    verify=report_v, golden=gold, anchor=anchor,
                    seconds={"task_and_fuse": round(prep, 3), "weights": round(t_weights, 3),
                             "session": round(t_session, 4)})
    r.lines = [f"task {label} on {onnx_path}: {weights.summary()}",
               f"task model + fuse {prep:.2f} s, weights by name {t_weights:.2f} s, new session "
               f"with swapped initializers {t_session:.3f} s", str(report_v)]
    r.lines += [str(gold)] if gold is not None else []
    if not r.passed:
        raise VerificationError("onnxruntime with the task's initializers does not match the "
                                "task (its unfused model, or the outputs recorded at training) "
                                "— nothing written", r)
    if out:
        with atomic_path(out) as tmp:
            onnx.save(bake_initializers(proto, weights.values), tmp)
        r.lines.append(f"wrote {out} (the same graph holding the task's weights)")
        r.written = out
    return r


def refit_plan(plan: str, task: TaskLike, out: Optional[str] = None, *,
               onnx: Optional[str] = None, base_weights: Optional[str] = None,
               pretrained: bool = False, allow_base_mismatch: bool = False, device="cuda",
               atol=None, rtol=None, inputs: int = 2, batch_size: int = 4,
               verbose: bool = False, warn: Optional[Callable[[str], None]] = None
               ) -> RefitReport:
    """The refittable engine ``plan`` refitted with ``task``'s weights (see :func:`refit_onnx`
    for ``task``), checked against onnxruntime on the engine's graph holding the task's weights
    and against the task's golden probe; ``onnx``: the graph the engine was built from (default:
    the sidecar's, else ``<stem>.onnx``); ``out``: the refitted engine and its sidecar."""
    _check_common(out, PLAN_SUFFIXES, inputs, batch_size,
                  sidecar_path(out) if out else None)
    data = read_plan(plan)
    cuda_device(device)
    onnx_path = resolve_onnx_for_plan(plan, onnx)
    proto, settings, t, label = _prepare(plan, onnx_path, task, plan=True)
    import_tensorrt()     # before the heavy work: without TensorRT a plan cannot be used at all
    dev = require_cuda(device)
    model, fused, anchor, prep = _model(t, settings, dict(
        base_weights=base_weights, pretrained=pretrained,
        allow_base_mismatch=allow_base_mismatch), warn)
    side = read_sidecar(plan)
    prec = sidecar_precision(side)
    atol, rtol = resolve_tolerances(atol, rtol, prec.name in ("fp16", "tf32"))
    engine = deserialize(data, dev, verbose=verbose)
    state, known, holder = fused.state_dict(), graph_weight_names(proto), {}

    def weights_for(names):
        t0 = time.perf_counter()
        holder["w"] = compute_task_weights(proto, state, fused,
                                           names=[n for n in names if n in known])
        holder["seconds"] = time.perf_counter() - t0
        return holder["w"].values

    def onnx_fallback():   # TensorRT-internal weight names: let its ONNX refitter map them
        full = compute_task_weights(proto, state, fused)
        baked = bake_initializers(proto, full.values).SerializeToString()
        # an engine built from the fp16-converted ONNX (TensorRT 11 fp16) holds fp16 weights
        return fp16_onnx(baked) if prec.fp16_onnx else baked

    info = refit_engine(engine, weights_for, onnx_fallback=onnx_fallback, proto=proto,
                        device=dev, verbose=verbose)
    weights = holder["w"]
    # the reference holds *every* task weight: a bias TensorRT could not refit must show
    files = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    full = weights if all(n in weights.values for n, a in files.items()
                          if a.dtype.kind == "f" and a.size > 1) \
        else compute_task_weights(proto, state, fused)
    stuck = [b for b in info.get("unexposed_biases") or []
             if b in full.values and not np.array_equal(full.values[b], files[b])]
    with EngineRunner(engine, label=f"TensorRT (refitted, {prec.name})", device=dev,
                      verbose=verbose) as runner:
        batches = task_inputs(settings, batch_size, inputs)
        prof = runner.profile()
        if prof and settings["dynamic_batch"]:
            batches = [torch.randn(int(prof[1][0]), *settings["chw"],
                                   generator=torch.Generator().manual_seed(i))
                       for i in range(len(batches))]
        reference = OrtRunner(bake_initializers(proto, full.values),
                              providers=["CPUExecutionProvider"],
                              label="onnxruntime (same graph, the task's weights)")
        report_v = verify(reference, runner, batches, atol=atol, rtol=rtol, names=runner.outputs)
        gold = check_golden(golden_of(model), runner, runner.label, chw=settings["chw"],
                            atol=atol, rtol=rtol, per_sample=not settings["dynamic_batch"])
    build_s = side.get("build_seconds")
    r = RefitReport(target=plan, onnx=onnx_path, task=label, weights=weights, verify=report_v,
                    golden=gold, refit=info, anchor=anchor, not_refitted=stuck,
                    build_seconds=build_s)
    speed = f" vs build {build_s:.2f} s ({build_s / max(info['refit_seconds'], 1e-9):.0f}x)" \
        if isinstance(build_s, (int, float)) else ""
    r.lines = [f"task {label} on {plan} (graph {onnx_path}): {weights.summary()}",
               f"refit {info['weights']} weights in {info['refit_seconds']:.3f} s "
               f"({info['method']} + refit_cuda_engine){speed}; task model + fuse {prep:.2f} s, "
               f"weights by name {holder['seconds']:.2f} s", str(report_v)]
    r.lines += [str(gold)] if gold is not None else []
    if stuck:
        r.lines.append(f"{len(stuck)} bias(es) of this task are not exposed to refit (TensorRT's "
                       f"REFIT known issue), e.g. '{stuck[0]}': build this task's engine instead")
    if not r.passed:
        raise VerificationError("the refitted engine does not match this task (onnxruntime on "
                                "its weights, or the outputs recorded at training) — nothing "
                                "written", r)
    if out:
        write_plan(out, bytes(memoryview(engine.serialize())),
                   {**side, **build_sidecar(onnx_path, out, {}), "task_pack": label,
                    "refit": info})
        r.lines.append(f"wrote {out} (+ {sidecar_path(out)})")
        r.written = out
    return r
