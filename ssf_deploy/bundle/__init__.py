"""Many tasks, one backbone: N SSF tasks in ONE model that runs mixed-task batches.

SSF makes a task a per-channel scale and shift plus a classifier (~0.3 % of the backbone), so a
batch that mixes tasks needs only each sample's own factors: ``bundle(packs, out="tasks.onnx")``
writes one ONNX graph with inputs ``images`` (float32 ``[B,3,H,W]``) and ``task`` (int64 ``[B]``,
each sample's task index) and output ``logits`` (float32 ``[B, Cmax]``; task *t*'s logits are its
first ``C_t`` columns, the rest are zeros). Task names, indices and class counts are in the
ONNX metadata (:func:`task_table`); indices never depend on argument order at serving time.

Nothing is written unless the exactness gate passes (:mod:`ssf_deploy.bundle.check`): every
task's golden probe, shuffled among the other tasks' samples, reproduces the outputs recorded at
training and the task's own fused model, and no sample moves when its neighbours' tasks change.
Tasks come and go without re-exporting the backbone graph (:func:`add_tasks`,
:func:`remove_tasks`): see :mod:`ssf_deploy.bundle.files` for the layout that makes that cheap.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import BaseMismatchError, CheckpointError, SSFDeployError, UsageError, \
    VerificationError
from ..fileio import check_writable, sha256_of
from ..formats import Task, build_model, read_task
from ..formats.provenance import checked_probe_inputs, describe_base
from ..formats.task import provenance_of
from ..models import creation_record
from ..runtime import ort_session
from ..fuse import fuse_many
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL
from .check import GateReport, probe_of, recorded_tasks, run_gate
from .files import (BUNDLE_FORMAT, IMAGES, LOGITS, TASK, assemble, backbone_location, commit,
                    export_graph, read_graph, row_location, row_name, rows_of, staged,
                    write_bundle)
from .layout import (Layout, TaskBundleModule, layout_for, measure_repeats, state_from_row,
                     task_keys, task_row)

__all__ = ["bundle", "add_tasks", "remove_tasks", "update_bundle", "verify_bundle", "task_table", "BundleReport",
           "BundleRunner", "Layout", "TaskBundleModule", "IMAGES", "TASK", "LOGITS"]

Progress = Optional[Callable[[str], None]]
TaskLike = Union[str, os.PathLike, Task]


@dataclass
class BundleReport:
    """What a bundle run did and found; ``str()`` is the human report, ``as_dict()`` the JSON."""
    path: str = ""
    tasks: list = field(default_factory=list)        # {"name", "index", "num_classes", ...}
    added: list = field(default_factory=list)        # names added by this run
    removed: list = field(default_factory=list)      # names removed by this run
    gate: Optional[GateReport] = None
    anchor: dict = field(default_factory=dict)
    graph: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    written: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    failure: str = ""

    @property
    def passed(self) -> bool:
        return not self.failure and (self.gate is None or self.gate.passed)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "path": self.path, "tasks": self.tasks,
                "added": self.added, "removed": self.removed,
                "gate": self.gate.as_dict() if self.gate else None, "anchor": self.anchor,
                "graph": self.graph, "sizes": self.sizes, "written": self.written,
                "seconds": self.seconds, "notes": self.notes, "error": self.failure or None}

    def __str__(self) -> str:
        live = len(self.tasks)
        lines = [f"bundle {self.path}: {live} task(s)"
                 + (f", added {', '.join(self.added)}" if self.added else "")
                 + (f", removed {', '.join(self.removed)}" if self.removed else "")]
        if self.anchor:
            lines.append(f"base: {self.anchor.get('base')}")
        if self.graph:
            g = self.graph
            base = f" (base export: {g['base_nodes']}, +{g['extra_nodes']} for the per-sample " \
                   f"factors)" if g.get("base_nodes") is not None else ""
            lines.append(f"ONNX: {g['nodes']} nodes{base}; inputs {IMAGES} float32 "
                         f"[B,{','.join(map(str, g['chw']))}], {TASK} int64 [B]; output "
                         f"{LOGITS} float32 [B,{g['max_classes']}]")
        if self.sizes:
            s = self.sizes
            lines.append(f"files: backbone {s['backbone_bytes'] / 1e6:.1f} MB, "
                         f"{s['row_bytes'] / 1e6:.3f} MB per task row")
        if self.gate is not None:
            lines.append(str(self.gate))
        lines += [f"note: {n}" for n in self.notes]
        for p in self.written:
            lines.append(f"wrote {p}")
        if self.failure:
            lines.append(f"FAIL: {self.failure}")
        return "\n".join(lines)


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


class _Stage:
    def __init__(self, report: BundleReport, name: str, progress: Progress):
        self.report, self.name, self.progress = report, name, progress

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, exc_type, exc, tb):
        s = round(time.perf_counter() - self.t0, 3)
        self.report.seconds[self.name] = s
        if exc is None:     # a failure is said once, by the caller, in one line
            _say(self.progress, f"{self.name}: {s:.1f} s")
        return False


# --------------------------------------------------------------------------------------------
# reading and checking the tasks


@dataclass
class _Entry:
    name: str
    task: Task

    @property
    def num_classes(self) -> int:
        return int(self.task.num_classes)


def _name_of(task: Task, i: int) -> str:
    name = (task.extra or {}).get("name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    if task.path:
        return os.path.splitext(os.path.basename(task.path))[0]
    return f"task{i}"


def _read(tasks: Sequence[TaskLike], names: Optional[Sequence[str]]) -> list[_Entry]:
    tasks = list(tasks)
    if not tasks:
        raise UsageError("give at least one task pack")
    if names is not None and len(names) != len(tasks):
        raise UsageError(f"{len(names)} `names` for {len(tasks)} task(s): give one name per "
                         f"task, in order, or none")
    out = []
    for i, t in enumerate(tasks):
        task = t if isinstance(t, Task) else read_task(os.fspath(t))
        where = task.path or f"task {i}"
        if task.method != "ssf":
            raise UsageError(f"{where} is not an SSF task (method '{task.method}'): a bundle "
                             f"holds SSF tasks")
        if task.complete:
            raise UsageError(f"{where} holds a whole model, not an SSF task on a base: write it "
                             f"as a task pack first (ssf-deploy fuse {where} --save-pack ...)")
        if task.base is None:
            raise BaseMismatchError(f"{where} records no base hash, so the base it was trained "
                                    f"on cannot be checked: a bundle shares one base")
        if task.probe is None:
            raise CheckpointError(f"{where} records no golden outputs, so its place in a bundle "
                                  f"cannot be checked against what was trained")
        if not task.arch or not task.num_classes:
            raise CheckpointError(f"{where} does not record its architecture and classes")
        name = names[i] if names is not None else _name_of(task, i)
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\n\r\t"):
            raise UsageError(f"task name {name!r} is not a usable name")
        out.append(_Entry(name.strip(), task))
    return out


def _image_size(task: Task) -> Optional[int]:
    return task.image_size


def _plain(kwargs: dict) -> str:
    """Model kwargs as JSON: a checkpoint's tuple and a pack's list are the same setting."""
    import json
    return json.dumps(kwargs, sort_keys=True, default=str)


def _check_same(entries: list[_Entry], ref: dict) -> None:
    """One line for the first task that cannot share ``ref`` (arch, kwargs, size, base, names)."""
    seen = set(ref.get("names", ()))
    for e in entries:
        t, where = e.task, e.task.path or e.name
        if t.arch != ref["arch"]:
            raise UsageError(f"{where} is a '{t.arch}' task; the bundle's tasks are "
                             f"'{ref['arch']}': one bundle shares one architecture")
        if _plain(t.model_kwargs) != _plain(ref["model_kwargs"]):
            raise UsageError(f"{where} was trained with model kwargs {t.model_kwargs}; the "
                             f"bundle's tasks with {ref['model_kwargs']}")
        if _image_size(t) != ref["image_size"]:
            raise UsageError(f"{where} was trained at {_image_size(t)} px; the bundle's tasks "
                             f"at {ref['image_size']} px")
        sha = t.base["sha256"]
        if sha != ref["base"]["sha256"]:
            raise BaseMismatchError(f"{where} was trained on another base: {sha} "
                                    f"({describe_base(t.base)}), the bundle's base is "
                                    f"{ref['base']['sha256']}")
        if e.name in seen:
            raise UsageError(f"two tasks are named '{e.name}': give each a unique name "
                             f"(`names`)")
        seen.add(e.name)


def _check_layout(entries: list[_Entry], layout: Layout) -> None:
    want = layout.keys()
    for e in entries:
        where = e.task.path or e.name
        have = set(task_keys(e.task.state))
        if have != set(want):
            diff = sorted(have ^ set(want))
            raise UsageError(f"{where} holds other tensors than the bundle's tasks (e.g. "
                             f"'{diff[0]}'): bundle tasks trained with the same SSF options "
                             f"on the same architecture")
        for k, n in want.items():
            if n is not None and e.task.state[k].numel() != n:
                raise UsageError(f"{where}: '{k}' has {e.task.state[k].numel()} values, the "
                                 f"bundle's tasks {n}")
        if e.num_classes > layout.max_classes:
            raise UsageError(f"{where} has {e.num_classes} classes; the bundle's logits have "
                             f"{layout.max_classes} columns: rebuild it with `max_classes` >= "
                             f"{e.num_classes}")


def _nonfinite(entries: list[_Entry]) -> None:
    for e in entries:
        for k, v in e.task.state.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{e.task.path or e.name}: tensor '{k}' holds NaN or Inf")


# --------------------------------------------------------------------------------------------
# references: the recorded outputs and each task's own fused model


def _fused_logits(entries: list[_Entry], templates: dict, progress: Progress) -> dict:
    """``{name: the task's own fused model's logits on its probe inputs}``: the real fuser,
    one trace per class count (tasks of one class count share the traced graph)."""
    out = {}
    groups: dict = {}
    for e in entries:
        groups.setdefault(e.num_classes, []).append(e)
    for classes, group in groups.items():
        tuned = templates[classes]
        own = tuned.state_dict()

        def states():
            for e in group:
                yield {**own, **e.task.state}
        example = checked_probe_inputs(group[0].task.probe)[:2]
        for e, (fused, _) in zip(group, fuse_many(tuned, states(), example)):
            x = checked_probe_inputs(e.task.probe)
            with torch.inference_mode():
                out[e.name] = fused(x).float().numpy()
        _say(progress, f"fused {len(group)} task(s) of {classes} classes")
    return out


def _fused_subset(entries: list[_Entry], check_fused) -> list[_Entry]:
    """The tasks compared with their own fused model: all (``True``), none (``False``/0) or a
    fixed sample of ``K`` (large bundles: every fold costs a pass over the base weights)."""
    if check_fused is True:
        return list(entries)
    k = int(check_fused or 0)
    if k <= 0:
        return []
    if k >= len(entries):
        return list(entries)
    pick = sorted(np.random.default_rng(0).choice(len(entries), size=k, replace=False))
    return [entries[i] for i in pick]


def _templates(entries: list[_Entry], first_model, base_weights, pretrained) -> dict:
    """One tuned model per class count (the first is the already-verified one)."""
    out = {int(creation_record(first_model)["num_classes"]): first_model}
    for e in entries:
        if e.num_classes not in out:
            out[e.num_classes] = build_model(e.task, base_weights=base_weights,
                                             pretrained=pretrained)
    return out


# --------------------------------------------------------------------------------------------
# onnxruntime


class BundleRunner:
    """An onnxruntime session on a bundle: ``runner(images, task) -> logits`` (numpy), and
    ``runner.run(images, names_or_indices)`` -> each sample's own logits (its classes only).

    The session is made from the file path (the backbone and rows are external data next to
    it); onnxruntime folds the row table into one initializer when the session is created, and
    the session factory gives the freed row blocks back to the OS
    (:func:`ssf_deploy.runtime.release_freed_memory`), so the table is resident once.
    """

    def __init__(self, path: str, *, providers=None, threads: Optional[int] = None,
                 check: bool = True):
        if check:
            _, self.meta = read_graph(path)
        else:
            import onnx
            from .files import read_meta
            self.meta = read_meta(onnx.load(path, load_external_data=False), path)
        # from the file path: the backbone and rows are external data next to it
        self.session = ort_session(os.fspath(path), providers=providers or
                                   ["CPUExecutionProvider"], threads=threads,
                                   fold_large_constants=True)
        self.path = os.fspath(path)
        self.providers = list(self.session.get_providers())
        self.tasks = {t["name"]: t for t in self.meta["tasks"]}
        self.by_index = {int(t["index"]): t for t in self.meta["tasks"]}

    def __call__(self, images, task) -> np.ndarray:
        x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else \
            np.asarray(images, dtype=np.float32)
        t = task.detach().cpu().numpy() if isinstance(task, torch.Tensor) else np.asarray(task)
        return self.session.run([LOGITS], {IMAGES: x, TASK: t.astype(np.int64)})[0]

    def index(self, task: Union[str, int]) -> int:
        """A task's index from its name (or a checked index)."""
        if isinstance(task, str):
            if task not in self.tasks:
                raise UsageError(f"unknown task '{task}'; this bundle serves "
                                 f"{', '.join(sorted(self.tasks)) or 'no tasks'}")
            return int(self.tasks[task]["index"])
        if int(task) not in self.by_index:
            raise UsageError(f"unknown task index {task}; live indices: "
                             f"{sorted(self.by_index)}")
        return int(task)

    def run(self, images, tasks: Sequence[Union[str, int]]) -> list[np.ndarray]:
        idx = [self.index(t) for t in tasks]
        logits = self(images, np.asarray(idx, dtype=np.int64))
        return [logits[j, : int(self.by_index[i]["num_classes"])] for j, i in enumerate(idx)]


def task_table(path: str) -> list[dict]:
    """The live tasks of a bundle: ``[{"name", "index", "num_classes"}]`` by index."""
    _, meta = read_graph(path)
    return [{"name": t["name"], "index": int(t["index"]), "num_classes": int(t["num_classes"])}
            for t in sorted(meta["tasks"], key=lambda t: int(t["index"]))]


# --------------------------------------------------------------------------------------------
# pipelines


def _task_meta(e: _Entry, index: int, onnx_name: str, row: np.ndarray) -> dict:
    probe = dict(e.task.probe)
    logits = probe["logits"]
    probe["logits"] = (logits.float().tolist() if isinstance(logits, torch.Tensor)
                       else np.asarray(logits, dtype=np.float32).tolist())
    import hashlib
    return {"name": e.name, "index": int(index), "num_classes": e.num_classes,
            "row": row_location(onnx_name, index),
            "row_sha256": hashlib.sha256(np.ascontiguousarray(row, np.float32).tobytes()
                                         ).hexdigest(),
            "source": os.path.basename(e.task.path) if e.task.path else None,
            "source_sha256": sha256_of(e.task.path) if e.task.path and
            os.path.isfile(e.task.path) else None,
            "probe": probe}


def _gate_tasks(entries: list[_Entry], indices: dict, fused: dict) -> list[dict]:
    out = []
    for e in entries:
        x, logits = probe_of(e.task.probe)
        out.append({"name": e.name, "index": indices[e.name], "num_classes": e.num_classes,
                    "inputs": x, "recorded": logits, "fused": fused.get(e.name)})
    return out


def _graph_stats(proto, base_model, chw, opset, base_sha) -> dict:
    from ..deploy import graph_stats_cached
    from ..export import export_proto, graph_stats
    stats = graph_stats(proto)
    key = {"what": "base-graph", "arch": (base_model.__dict__.get("ssf_deploy_create") or
                                          {}).get("arch"), "opset": opset, "dynamic_batch": True,
           "simplify": True, "shape": list(chw), "base": base_sha}

    def make():
        return graph_stats(export_proto(base_model, example=torch.zeros(1, *chw), opset=opset,
                                        dynamic_batch=True, simplify=True))
    base, cached = graph_stats_cached(key, make)
    return {"nodes": stats["nodes"], "base_nodes": base["nodes"],
            "extra_nodes": stats["nodes"] - base["nodes"], "base_cached": cached,
            "ops": stats["ops"], "base_ops": base["ops"]}


def bundle(tasks: Sequence[TaskLike], *, out: str, names: Optional[Sequence[str]] = None,
           base_weights: Optional[str] = None, pretrained: bool = False,
           max_classes: Optional[int] = None, atol: float = DEFAULT_ATOL,
           rtol: float = DEFAULT_RTOL, opset: int = 17, batch_size: int = 32,
           check_fused: Union[bool, int] = True, fold_bias: bool = True,
           progress: Progress = None) -> BundleReport:
    """Build one bundle from SSF task packs (paths or :class:`~ssf_deploy.formats.Task`).

    ``check_fused``: compare every task (``True``), none, or a fixed sample of K with its own
    fused model (every task is always compared with its recorded outputs). ``fold_bias=False``
    builds the naive layout (factors on top of every producer's bias), for measurement only.

    Every task must share the base (recorded hash), architecture, model kwargs, image size and
    SSF sites; names must be unique (the pack's name, else its file stem, or ``names``).
    Raises a one-line :class:`~ssf_deploy.errors.SSFDeployError` for unusable input and
    :class:`~ssf_deploy.errors.VerificationError` (with ``.report``) when the gate fails;
    nothing is written then.
    """
    out = os.fspath(out)
    if not out.endswith(".onnx"):
        raise UsageError(f"the bundle is an ONNX graph: out must end with .onnx, got {out}")
    check_writable(out)
    report = BundleReport(path=out)
    with _Stage(report, "read tasks", progress):
        entries = _read(tasks, names)
        _nonfinite(entries)
        first = entries[0].task
        ref = {"arch": first.arch, "model_kwargs": dict(first.model_kwargs),
               "image_size": _image_size(first), "base": first.base, "names": ()}
        _check_same(entries, ref)
    with _Stage(report, "base", progress):
        tuned = build_model(first, base_weights=base_weights, pretrained=pretrained)
        prov = provenance_of(tuned) or {}
        bc = prov.get("base_check") or {}
        report.anchor = {"base": f"verified: {bc.get('actual')} ({bc.get('tensors')} tensors)",
                         "sha256": bc.get("actual"), "probe": "recorded per task"}
    cmax = int(max_classes or max(e.num_classes for e in entries))
    if cmax < max(e.num_classes for e in entries):
        raise UsageError(f"`max_classes` {cmax} is below the largest task's "
                         f"{max(e.num_classes for e in entries)} classes")
    layout = layout_for(tuned, first.state, cmax, fold_bias=fold_bias)
    _check_layout(entries, layout)
    chw = tuple(int(v) for v in checked_probe_inputs(first.probe).shape[1:])
    with _Stage(report, "rows", progress):
        rows = {i: task_row(layout, e.task.state) for i, e in enumerate(entries)}
    with _Stage(report, "export", progress):
        base = _plain_base(tuned)
        measure_repeats(base, layout, chw)
        module = TaskBundleModule(base, layout).eval()
        proto = export_graph(module, chw, layout.width, opset=opset)
    onnx_name = os.path.basename(out)
    indices = {e.name: i for i, e in enumerate(entries)}
    meta = {"format": BUNDLE_FORMAT, "arch": first.arch, "model_kwargs": ref["model_kwargs"],
            "image_size": ref["image_size"], "chw": list(chw), "base": first.base,
            "options": dict(first.options), "layout": layout.as_dict(), "opset": opset,
            "tasks": [_task_meta(e, i, onnx_name, rows[i]) for i, e in enumerate(entries)],
            "removed": [], "next_index": len(entries)}
    with _Stage(report, "graph stats", progress):
        report.graph = {**_graph_stats(proto, _plain_base(tuned), chw, opset,
                                       bc.get("actual")),
                        "chw": list(chw), "max_classes": cmax}
    fused = {}
    chosen = _fused_subset(entries, check_fused)
    if chosen:
        with _Stage(report, "fused references", progress):
            fused = _fused_logits(chosen, _templates(chosen, tuned, base_weights, pretrained),
                                  progress)
    report.tasks = [{"name": e.name, "index": i, "num_classes": e.num_classes}
                    for i, e in enumerate(entries)]
    report.added = [e.name for e in entries]
    with staged(out) as stage:
        with _Stage(report, "write", progress):
            graph = assemble(proto, [row_name(i) for i in range(len(entries))], layout.width,
                             meta)
            files = write_bundle(graph, stage, onnx_name, rows=rows)
        _sizes(report, stage, onnx_name, rows)
        _gate(report, os.path.join(stage, onnx_name), _gate_tasks(entries, indices, fused),
              atol, rtol, batch_size, progress)
        with _Stage(report, "commit", progress):
            report.written = commit(stage, files, out)
    report.notes += _drop_stale_rows(out, set(rows))
    return report


def _drop_stale_rows(out: str, live: set) -> list:
    """Remove the row files of an earlier bundle written at ``out`` that the new graph does not
    read; returns a note for each one that could not be removed."""
    name = os.path.basename(out)
    folder = os.path.dirname(os.path.abspath(out))
    keep = {os.path.basename(row_location(name, i)) for i in live}
    rows_dir = os.path.dirname(os.path.join(folder, row_location(name, 0)))
    notes = []
    for f in os.listdir(rows_dir) if os.path.isdir(rows_dir) else []:
        if f.endswith(".bin") and f not in keep:
            try:
                os.unlink(os.path.join(rows_dir, f))
            except OSError as e:
                notes.append(f"could not remove the unused row file {f}: {e.strerror}")
    return notes


def _plain_base(tuned):
    from ..tuners import unload
    base = unload(copy.deepcopy(tuned)).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _sizes(report: BundleReport, stage: str, onnx_name: str, rows: dict) -> None:
    row_bytes = next(iter(rows.values())).nbytes if rows else 0
    report.sizes = {"backbone_bytes": os.path.getsize(os.path.join(stage,
                                                                   backbone_location(onnx_name))),
                    "graph_bytes": os.path.getsize(os.path.join(stage, onnx_name)),
                    "row_bytes": int(row_bytes)}


def _gate(report: BundleReport, path: str, gate_tasks: list, atol, rtol, batch_size,
          progress) -> None:
    with _Stage(report, "gate", progress):
        runner = BundleRunner(path, check=False)
        report.gate = run_gate(runner, gate_tasks, atol=atol, rtol=rtol, batch_size=batch_size)
    if not report.gate.passed:
        report.failure = "the bundle does not reproduce every task exactly (see the gate)"
        raise VerificationError(f"{report.failure}: nothing written", report)


def _live(meta: dict) -> list:
    return sorted(meta["tasks"], key=lambda t: int(t["index"]))


def _slots(meta: dict) -> list:
    live = {int(t["index"]) for t in meta["tasks"]}
    return [row_name(i) if i in live else None for i in range(int(meta["next_index"]))]


def add_tasks(path: str, tasks: Sequence[TaskLike], *, out: Optional[str] = None,
              names: Optional[Sequence[str]] = None, base_weights: Optional[str] = None,
              pretrained: bool = False, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
              check_fused: Union[bool, int] = True, sample: int = 8, batch_size: int = 32,
              progress: Progress = None) -> BundleReport:
    """Add tasks to a bundle without re-exporting its graph: one row file per new task and a
    new graph file (the backbone and the other rows are reused, linked when ``out`` is
    elsewhere). The gate runs the new tasks next to up to ``sample`` existing ones."""
    return update_bundle(path, add=tasks, out=out, names=names, base_weights=base_weights,
                         pretrained=pretrained, atol=atol, rtol=rtol, check_fused=check_fused,
                         sample=sample, batch_size=batch_size, progress=progress)


def remove_tasks(path: str, names: Sequence[str], *, out: Optional[str] = None,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, sample: int = 8,
                 batch_size: int = 32, progress: Progress = None) -> BundleReport:
    """Remove tasks: their slots read a zero row and their indices are never reused."""
    return update_bundle(path, remove=names, out=out, atol=atol, rtol=rtol, sample=sample,
                         batch_size=batch_size, progress=progress)


def update_bundle(path: str, *, add: Sequence[TaskLike] = (), remove: Sequence[str] = (),
                  out: Optional[str] = None, names: Optional[Sequence[str]] = None,
                  base_weights: Optional[str] = None, pretrained: bool = False,
                  atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  check_fused: Union[bool, int] = True, sample: int = 8, batch_size: int = 32,
                  progress: Progress = None) -> BundleReport:
    """Add and/or remove tasks in one step (one new graph file, one gate): see
    :func:`add_tasks` and :func:`remove_tasks`. Writes in place unless ``out`` is given."""
    tasks = list(add)
    remove = list(remove)
    path = os.fspath(path)
    out = os.fspath(out) if out else path
    if not out.endswith(".onnx"):
        raise UsageError(f"the bundle is an ONNX graph: out must end with .onnx, got {out}")
    if not tasks and not remove:
        raise UsageError("nothing to change: give tasks to add or names to remove")
    report = BundleReport(path=out)
    with _Stage(report, "read bundle", progress):
        proto, meta = read_graph(path)
        folder = os.path.dirname(os.path.abspath(path))
        bb = os.path.join(folder, backbone_location(os.path.basename(path)))
        if not os.path.isfile(bb):
            raise SSFDeployError(f"the bundle's backbone file {bb} is missing")
    check_writable(out)
    layout = Layout.from_dict(meta["layout"])
    current = {t["name"] for t in meta["tasks"]}
    missing = [n for n in remove if n not in current]
    if missing:
        raise UsageError(f"no task named '{missing[0]}' in {path}; it has "
                         f"{', '.join(sorted(current)) or 'none'}")
    if len(set(remove)) != len(list(remove)):
        raise UsageError("a task is named twice in the removals")
    entries = []
    if tasks:
        with _Stage(report, "read tasks", progress):
            entries = _read(tasks, names)
            _nonfinite(entries)
            ref = {"arch": meta["arch"], "model_kwargs": meta["model_kwargs"],
                   "image_size": meta["image_size"], "base": meta["base"],
                   "names": sorted(current - set(remove))}
            _check_same(entries, ref)
            _check_layout(entries, layout)
    meta = copy.deepcopy(meta)
    onnx_name = os.path.basename(out)
    old_name = os.path.basename(path)
    # the graph's slots keep their indices; removed ones read a zero row
    removed = [t for t in meta["tasks"] if t["name"] in set(remove)]
    meta["tasks"] = [t for t in meta["tasks"] if t["name"] not in set(remove)]
    meta["removed"] = sorted(set(meta.get("removed", [])) | {int(t["index"]) for t in removed})
    rows, indices = {}, {}
    for e in entries:
        i = int(meta["next_index"])
        meta["next_index"] = i + 1
        rows[i] = task_row(layout, e.task.state)
        indices[e.name] = i
        meta["tasks"].append(_task_meta(e, i, onnx_name, rows[i]))
    keep = [int(t["index"]) for t in meta["tasks"] if int(t["index"]) not in rows]
    for t in meta["tasks"]:
        t["row"] = row_location(onnx_name, int(t["index"]))
    report.added = [e.name for e in entries]
    report.removed = [t["name"] for t in removed]
    if not meta["tasks"]:
        raise UsageError("removing every task would leave an empty bundle")
    fused = {}
    chosen = _fused_subset(entries, check_fused)
    if chosen:
        with _Stage(report, "fused references", progress):
            first = build_model(chosen[0].task, base_weights=base_weights, pretrained=pretrained)
            fused = _fused_logits(chosen, _templates(chosen, first, base_weights, pretrained),
                                  progress)
    others = [t["name"] for t in _live(meta) if t["name"] not in indices][: max(0, int(sample))]
    gate_tasks = _gate_tasks(entries, indices, fused) + recorded_tasks(meta, others)
    with staged(out) as stage:
        with _Stage(report, "write", progress):
            graph = assemble(_strip_rows(proto), _slots(meta), layout.width, meta)
            files = write_bundle(graph, stage, onnx_name, backbone_from=bb, rows=rows,
                                 keep_rows={i: os.path.join(folder, row_location(old_name, i))
                                            for i in keep})
        _sizes(report, stage, onnx_name, rows or {keep[0]: np.zeros(layout.width, np.float32)})
        _gate(report, os.path.join(stage, onnx_name), gate_tasks, atol, rtol, batch_size,
              progress)
        with _Stage(report, "commit", progress):
            report.written = commit(stage, files, out)
    if out == path:
        for t in removed:     # no graph refers to them any more
            try:
                os.unlink(os.path.join(folder, row_location(old_name, int(t["index"]))))
            except OSError as e:
                report.notes.append(f"could not remove the row file of '{t['name']}': "
                                    f"{e.strerror}")
    report.tasks = [{"name": t["name"], "index": int(t["index"]),
                     "num_classes": int(t["num_classes"])} for t in _live(meta)]
    report.graph = {"nodes": len(graph.graph.node), "base_nodes": None,
                    "chw": meta["chw"], "max_classes": layout.max_classes}
    return report


def _strip_rows(proto):
    """The bundle graph back to its exported form: the row Concat and row initializers out,
    the table an input again (so :func:`assemble` can rebuild it for the new slots)."""
    import onnx
    from onnx import helper
    from .files import FREE_ROW, TABLE
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    keep = [n for n in g.node if n.name not in ("bundle.rows", FREE_ROW)]
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if not t.name.startswith("bundle.row.")]
    del g.initializer[:]
    g.initializer.extend(inits)
    g.input.append(helper.make_tensor_value_info(TABLE, onnx.TensorProto.FLOAT,
                                                 ["tasks", None]))
    return out


def verify_bundle(path: str, *, base_weights: Optional[str] = None, pretrained: bool = False,
                  atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  check_fused: Union[bool, int] = True, batch_size: int = 32,
                  progress: Progress = None) -> BundleReport:
    """Re-run the exactness gate on a written bundle: every task's recorded outputs (kept in
    the bundle) and, with the base, every task's own fused model rebuilt from its row."""
    report = BundleReport(path=os.fspath(path))
    with _Stage(report, "read bundle", progress):
        proto, meta = read_graph(path)
        layout = Layout.from_dict(meta["layout"])
        rows = rows_of(path, meta)
    entries = []
    for t in _live(meta):
        probe = dict(t["probe"])
        probe["logits"] = torch.tensor(probe["logits"], dtype=torch.float32)
        task = Task(meta["arch"], int(t["num_classes"]), "ssf", dict(meta["options"]),
                    state_from_row(layout, rows[int(t["index"])], int(t["num_classes"])),
                    source="bundle", extra={"base": meta["base"], "probe": probe,
                                            "image_size": meta["image_size"]},
                    model_kwargs=dict(meta["model_kwargs"]), path=f"{path}#{t['name']}")
        entries.append(_Entry(t["name"], task))
    fused = {}
    chosen = _fused_subset(entries, check_fused)
    if chosen:
        with _Stage(report, "fused references", progress):
            first = build_model(chosen[0].task, base_weights=base_weights, pretrained=pretrained)
            bc = (provenance_of(first) or {}).get("base_check") or {}
            report.anchor = {"base": f"verified: {bc.get('actual')} ({bc.get('tensors')} "
                                     f"tensors)", "sha256": bc.get("actual"),
                             "probe": "recorded per task"}
            fused = _fused_logits(chosen, _templates(chosen, first, base_weights, pretrained),
                                  progress)
    else:
        report.anchor = {"base": "not rebuilt (recorded outputs only)",
                         "probe": "recorded per task"}
    report.tasks = [{"name": e.name, "index": int(t["index"]), "num_classes": e.num_classes}
                    for e, t in zip(entries, _live(meta))]
    indices = {t["name"]: int(t["index"]) for t in meta["tasks"]}
    report.graph = {"nodes": len(proto.graph.node), "base_nodes": None, "chw": meta["chw"],
                    "max_classes": layout.max_classes}
    _gate(report, path, _gate_tasks(entries, indices, fused), atol, rtol, batch_size, progress)
    return report
