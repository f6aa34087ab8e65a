"""A bundle as one TensorRT engine: every task, mixed batches, a dynamic batch; tasks come and go
by refitting one weight.

The engine is built from :func:`~ssf_deploy.bundle.files.materialize` (the row table as ONE
``bundle.table`` initializer with ``capacity`` slots, the backbone inline, the per-sample
LayerNorm affine as plain Mul + Add) through :func:`ssf_deploy.engine.build_checked_engine`
(Polygraphy): inputs ``images`` (float32, ``[B, C, H, W]``) and ``task`` (int64, ``[B]``) share
one batch profile. It is checked twice before anything is written: against onnxruntime running
the same graph on the tasks' own probe images in mixed batches, and by the bundle's exactness
gate run through the engine (every task against the outputs recorded at training).

Tasks added or removed later (:func:`ssf_deploy.bundle.update_bundle`) reach a refittable
engine without a rebuild while they fit its capacity: :func:`refit_bundle_engine` sets the
``bundle.table`` weight (same shape, new rows) with TensorRT's ``Refitter`` and runs the gate
again. Written to the documented TensorRT / Polygraphy API; it needs an NVIDIA GPU.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from ..errors import UsageError, VerificationError
from ..fileio import check_writable, sha256_of
from ..verify import resolve_tolerances
from .check import GateReport, recorded_tasks, run_gate
from .files import TABLE, materialize, read_graph

__all__ = ["BundleEngineReport", "build_bundle_engine", "refit_bundle_engine", "gate_feeds"]

SIDECAR_KEY = "bundle"


@dataclass
class BundleEngineReport:
    """The engine build (or refit) and the gate run through the engine."""
    bundle: str
    engine: Optional[str]
    capacity: int
    tasks: list = field(default_factory=list)
    build: object = None                   # ssf_deploy.engine.EngineReport (a build)
    refit: Optional[dict] = None           # refit_engine's info (a refit)
    gate: Optional[GateReport] = None
    written: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.build is None or self.build.passed) and \
            self.gate is not None and self.gate.passed

    def as_dict(self) -> dict:
        return {"bundle": self.bundle, "engine": self.engine, "capacity": self.capacity,
                "tasks": self.tasks, "build": self.build.as_dict() if self.build else None,
                "refit": self.refit, "gate": self.gate.as_dict() if self.gate else None,
                "written": self.written, "passed": self.passed}

    def __str__(self) -> str:
        lines = [f"bundle {self.bundle} -> TensorRT engine ({len(self.tasks)} task(s), "
                 f"{self.capacity} table slots)"]
        if self.build is not None:
            lines.append(str(self.build))
        if self.refit is not None:
            lines.append(f"refit {self.refit.get('weights')} weight(s) in "
                         f"{self.refit.get('refit_seconds', 0):.3f} s "
                         f"({self.refit.get('method')})")
        if self.gate is not None:
            lines.append(str(self.gate))
        lines += [f"wrote {p}" for p in self.written]
        return "\n".join(lines)


def _live_names(meta: dict) -> list:
    return [t["name"] for t in sorted(meta["tasks"], key=lambda t: int(t["index"]))]


def gate_feeds(meta: dict, batch: int, limit: int = 64) -> list:
    """Mixed-task feeds ``{"images", "task"}`` from the tasks' own probe images (up to ``limit``
    samples): what the engine is compared with onnxruntime on."""
    import torch
    tasks = recorded_tasks(meta, _live_names(meta))
    samples = [(t["inputs"][i], t["index"]) for t in tasks for i in range(t["inputs"].shape[0])]
    order = np.random.default_rng(0).permutation(len(samples))[:limit]
    picked = [samples[i] for i in order]
    return [{"images": torch.stack([x for x, _ in picked[s:s + batch]]),
             "task": torch.tensor([k for _, k in picked[s:s + batch]], dtype=torch.int64)}
            for s in range(0, len(picked), batch)]


def _engine_gate(runner, meta: dict, atol: float, rtol: float, batch: int) -> GateReport:
    def run(images, task):
        return runner(images=images, task=task)[0].numpy()
    return run_gate(run, recorded_tasks(meta, _live_names(meta)), atol=atol, rtol=rtol,
                    batch_size=batch)


def _save_graph(proto: onnx.ModelProto, folder: str) -> str:
    path = os.path.join(folder, "bundle.onnx")
    big = proto.ByteSize() > (1 << 31) - (64 << 20)      # protobuf's 2 GB limit
    onnx.save_model(proto, path, save_as_external_data=big, all_tensors_to_one_file=True,
                    location="bundle.onnx.data")
    return path


def build_bundle_engine(path: str, out: Optional[str] = None, *, capacity: Optional[int] = None,
                        fp16: bool = False, tf32: bool = False, device="cuda",
                        min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                        refittable: bool = True, workspace_gb: float = 4.0,
                        timing_cache: Optional[str] = None, atol=None, rtol=None,
                        warmup: int = 10, iters: int = 50,
                        verbose: bool = False) -> BundleEngineReport:
    """Build, check and write one engine for every task of the bundle at ``path``.

    ``capacity``: table slots in the engine (default: the bundle's slots); spare ones take tasks
    added later by :func:`refit_bundle_engine`. Raises one-line errors for bad input (a missing
    TensorRT or GPU included) and :class:`~ssf_deploy.errors.VerificationError` (with
    ``.report``) when a check fails; nothing is written then.
    """
    from ..engine import EngineRunner, build_checked_engine, build_sidecar, write_plan
    from ..engine import import_tensorrt, require_cuda
    proto, meta = read_graph(path)
    slots = int(meta["next_index"])
    capacity = slots if capacity is None else int(capacity)
    if capacity < slots:
        raise UsageError(f"`capacity` {capacity} is below the bundle's {slots} task slots")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"need 1 <= `min_batch` <= `opt_batch` <= `max_batch`, got "
                         f"{min_batch}/{opt_batch}/{max_batch}")
    check_writable(out, out + ".json" if out else None, timing_cache)
    import_tensorrt()
    dev = require_cuda(device)
    report = BundleEngineReport(bundle=os.fspath(path), engine=out, capacity=capacity,
                                tasks=_live_names(meta))
    feeds = gate_feeds(meta, opt_batch)
    with tempfile.TemporaryDirectory(prefix="ssf-bundle-engine-") as tmp:
        graph = _save_graph(materialize(path, capacity), tmp)
        try:
            report.build = build_checked_engine(
                graph, None, fp16=fp16, tf32=tf32, device=dev, workspace_gb=workspace_gb,
                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                refittable=refittable, timing_cache=timing_cache, atol=atol, rtol=rtol,
                inputs=feeds, warmup=warmup, iters=iters, verbose=verbose)
        except VerificationError as e:
            report.build = e.report
            raise VerificationError(str(e), report) from e
    a, r = report.build.tolerances["atol"], report.build.tolerances["rtol"]
    if atol is None and rtol is None:     # recorded outputs: the fp32 or fp16 policy
        a, r = resolve_tolerances(None, None, report.build.precision.name != "fp32")
    with EngineRunner(report.build.plan, label="TensorRT (bundle)", device=dev,
                      verbose=verbose) as runner:
        report.gate = _engine_gate(runner, meta, a, r, min(max_batch, 32))
    if not report.passed:
        raise VerificationError("the bundle engine does not reproduce every task (see the "
                                "gate) — nothing written", report)
    if out:
        side = build_sidecar(path, out, {**report.build.build,
                                         SIDECAR_KEY: _sidecar(path, meta, capacity)})
        write_plan(out, report.build.plan, side)
        report.written = [out, out + ".json"]
    return report


def _sidecar(path: str, meta: dict, capacity: int) -> dict:
    return {"graph": os.path.abspath(path), "graph_sha256": sha256_of(path),
            "base": meta["base"]["sha256"], "width": int(meta["layout"]["width"]),
            "capacity": int(capacity), "tasks": [{"name": t["name"], "index": int(t["index"]),
                                                  "num_classes": int(t["num_classes"])}
                                                 for t in meta["tasks"]]}


def refit_bundle_engine(plan: str, path: str, out: Optional[str] = None, *, device="cuda",
                        atol=None, rtol=None, verbose: bool = False) -> BundleEngineReport:
    """Give the engine ``plan`` the tasks the bundle at ``path`` holds now (after
    :func:`~ssf_deploy.bundle.update_bundle`): the ``bundle.table`` weight is refitted in place
    (same shape: the bundle's slots must fit the engine's capacity), then the gate runs through
    the engine. Writes ``out`` (default: ``plan``) only when it passes."""
    from ..engine import (EngineRunner, build_sidecar, deserialize, read_plan, read_sidecar,
                          refit_engine, require_cuda, sidecar_precision, write_plan)
    side = read_sidecar(plan)
    info = side.get(SIDECAR_KEY)
    if not isinstance(info, dict):
        raise UsageError(f"{plan} was not built from a task bundle (its sidecar "
                         f"{plan}.json has no '{SIDECAR_KEY}' entry)")
    proto, meta = read_graph(path)
    if meta["base"]["sha256"] != info["base"] or int(meta["layout"]["width"]) != \
            int(info["width"]):
        raise UsageError(f"{path} is not a bundle of the engine's backbone and row layout: "
                         f"build a new engine")
    if int(meta["next_index"]) > int(info["capacity"]):
        raise UsageError(f"the bundle has {meta['next_index']} task slots, the engine "
                         f"{info['capacity']}: build a new engine with a larger `capacity`")
    dev = require_cuda(device)
    out = out or plan
    check_writable(out, out + ".json")
    graph = materialize(path, int(info["capacity"]))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    engine = deserialize(read_plan(plan), dev, verbose=verbose)
    report = BundleEngineReport(bundle=os.fspath(path), engine=out,
                                capacity=int(info["capacity"]), tasks=_live_names(meta))
    report.refit = refit_engine(
        engine, lambda names: {n: values[n] for n in names if n in values},
        onnx_fallback=lambda: graph.SerializeToString(), proto=graph, device=dev,
        verbose=verbose)
    if TABLE not in values:       # pragma: no cover - materialize always names it
        raise UsageError("the materialized bundle has no row table")
    prec = sidecar_precision(side)
    a, r = resolve_tolerances(atol, rtol, prec.name != "fp32")
    with EngineRunner(engine, label="TensorRT (bundle, refitted)", device=dev,
                      verbose=verbose) as runner:
        report.gate = _engine_gate(runner, meta, a, r, 32)
    if not report.passed:
        raise VerificationError("the refitted bundle engine does not reproduce every task — "
                                "nothing written", report)
    data = bytes(memoryview(engine.serialize()))
    write_plan(out, data, {**side, **build_sidecar(path, out, {}),
                           SIDECAR_KEY: _sidecar(path, meta, int(info["capacity"])),
                           "refit": report.refit})
    report.written = [out, out + ".json"]
    return report
