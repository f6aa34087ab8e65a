"""The deploy pipeline as one call: fold -> verify -> ONNX -> checker/onnxsim -> onnxruntime.

``deploy(model, inputs, out="model.onnx")`` is what ``ssf-deploy fuse``, the main job and the
transfer study all run. Every comparison is made against outputs computed *once*: the tuned
model's outputs on the inputs (the expensive side) and, when the task recorded them at training
time, its golden probe outputs. Nothing is written unless every check passes; a failed check
raises :class:`~ssf_deploy.errors.VerificationError` carrying the report.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .errors import OutputError, UsageError, VerificationError
from .fileio import OutputSet, atomic_path, check_writable, manifest_path, save_safetensors
from .anchor import GoldenProbe, anchor_of
from .formats.task import provenance_of
from .fuse import FuseReport, fuse_with_report
from .models import batch_len, batch_slice, input_extent, sample_shape
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, VerifyReport, compare, run_outputs

__all__ = ["deploy", "DeployReport", "graph_stats_cached", "GoldenProbe", "anchor_of"]

RECORDED = "recorded at training (golden probe)"


Progress = Optional[Callable[[str], None]]


@dataclass
class DeployReport:
    """What a deploy run did and found; ``str()`` is the human report, ``as_dict()`` the JSON."""
    fuse: FuseReport
    checks: list = field(default_factory=list)       # VerifyReport, one per comparison
    onnx: Optional[dict] = None                      # fused graph stats vs the base export
    written: dict = field(default_factory=dict)      # role -> path
    seconds: dict = field(default_factory=dict)      # stage -> seconds
    notes: list = field(default_factory=list)
    failure: str = ""
    anchor: dict = field(default_factory=dict)       # what the PASS rests on (see anchor_of)

    @property
    def passed(self) -> bool:
        return not self.failure and all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "anchor": dict(self.anchor), "fuse": self.fuse.as_dict(),
                "checks": [c.as_dict() for c in self.checks], "onnx": self.onnx,
                "written": dict(self.written), "seconds": dict(self.seconds),
                "notes": list(self.notes), "error": self.failure or None}

    def __str__(self) -> str:
        lines = [str(self.fuse)]
        if self.anchor:
            lines.append(f"base: {self.anchor.get('base')}")
            lines.append(f"golden probe: {self.anchor.get('probe')}")
        lines += [str(c) for c in self.checks]
        if self.onnx:
            f, b = self.onnx["fused"], self.onnx.get("base")
            if b is None:
                lines.append(f"ONNX: {f['nodes']} nodes, {f['parameters']:,} parameters "
                             f"(base graph not compared)")
            else:
                extra = self.onnx.get("extra_nodes", 0)
                diff = ", ".join(f"{op} {n:+d}" for op, n in (self.onnx.get("ops_diff") or
                                                                {}).items())
                raw = self.onnx.get("compared") == "exporter" and f.get("exported")
                stage = "exporter" if raw else "simplified"
                mine = f["exported"] if raw else f
                where = "the exporter's graph (before onnxsim, Identity nodes aside): " \
                    if raw else ""
                lines.append(f"ONNX: {f['nodes']} nodes; {where}{_graph(mine, stage)[0]} nodes vs "
                             f"the base export's {_graph(b, stage)[0]}"
                             f"{' (cached)' if self.onnx.get('base_cached') else ''}"
                             f"{f', {extra:+d} node(s): {diff}' if diff else ''}; op histogram "
                             f"{'identical to' if self.onnx['same_graph_as_base'] else 'DIFFERENT from'}"
                             f" the base export's; {mine['parameters']:,} parameters "
                             f"(base {b['parameters']:,})")
        lines += [f"note: {n}" for n in self.notes]
        for role, path in self.written.items():
            lines.append(f"wrote {role}: {path}")
        if self.failure:
            lines.append(f"FAIL: {self.failure}")
        return "\n".join(lines)


def _because(r: VerifyReport) -> str:
    return f" ({r.why()})" if r.non_finite else ""


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


@contextlib.contextmanager
def _stage(report: DeployReport, name: str, progress: Progress):
    t0 = time.perf_counter()
    yield
    report.seconds[name] = round(time.perf_counter() - t0, 3)
    _say(progress, f"{name}: {report.seconds[name]:.1f} s")


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ssf-deploy")


def graph_stats_cached(key: dict, make: Callable[[], dict]) -> tuple[dict, bool]:
    """Base-graph statistics per (architecture, weights, recipe, versions): ``(stats, cached)``.

    Exporting the base graph only to count its nodes costs as much as the fused export; the
    answer depends on nothing but the key, so it is kept in ``~/.cache/ssf-deploy``.
    """
    import onnx
    full = dict(key, torch=torch.__version__, onnx=onnx.__version__)
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(_cache_dir(), "graph-stats", digest[:32] + ".json")
    try:
        with open(path) as f:
            return json.load(f), True
    except (OSError, ValueError):
        pass
    stats = make()
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(stats, f)
    except (OSError, OutputError):
        pass   # a read-only home or a full disk: no cache, same answer
    return stats, False


def _graph(stats: dict, stage: str) -> tuple[int, dict]:
    """(nodes, op histogram) as compared: at the exporter stage without Identity nodes."""
    ops = dict(stats["ops"])
    identity = ops.pop("Identity", 0) if stage == "exporter" else 0
    return stats["nodes"] - identity, ops


def _base_graph(model: nn.Module, fused_info: dict, example: torch.Tensor, *, opset: int,
                dynamic_batch: bool, simplify: bool, fresh: bool, key: dict
                ) -> tuple[dict, bool, str]:
    """The plain base export's statistics to compare the fused graph with: ``(stats, cached,
    stage)``, stage ``"exporter"`` (the graph the exporter wrote, before onnxsim) or
    ``"simplified"``.

    The exporter's graphs are compared first, Identity nodes aside (the exporter adds one per
    repeated initializer, e.g. an untrained base's ones and zeros; they compute nothing and
    onnxsim removes them all): the base export then costs one export and no onnxsim, no
    checker (neither is an output). Only when they differ (a producer that gained a bias, a
    graph edit) is the base simplified too, so the difference is stated as in the deployed
    files (e.g. +1 LayerNormalization, where the exporter's graph also has the two Transposes
    onnxsim cancels).
    """
    from .export import export_proto, graph_stats
    from .fuse import base_of

    def stats(stage: str) -> dict:
        simplified = stage == "simplified"
        return graph_stats(export_proto(base_of(model), example=example, opset=opset,
                                        dynamic_batch=dynamic_batch, simplify=simplified,
                                        check=simplified))

    def get(stage: str) -> tuple[dict, bool]:
        if fresh:
            return stats(stage), False
        return graph_stats_cached(dict(key, stage=stage), lambda: stats(stage))

    exported = fused_info.get("exported")
    if exported is not None:
        base, cached = get("exporter")
        if not simplify or _graph(base, "exporter") == _graph(exported, "exporter"):
            return base, cached, "exporter"
    base, cached = get("simplified")
    return base, cached, "simplified"


def deploy(model: nn.Module, inputs: Sequence[torch.Tensor], *, out: Optional[str] = None,
           atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, opset: int = 17,
           dynamic_batch: bool = False, simplify: bool = True,
           save_weights: Optional[str] = None, save_pack: Optional[str] = None,
           pack_info: Optional[dict] = None, compare_graph: str = "cached",
           graph_key: Optional[dict] = None, strict_graph: bool = False,
           onnx_metadata: Optional[dict] = None, progress: Progress = None,
           allow_extra_nodes: bool = False) -> DeployReport:
    """Fold ``model``'s SSF, verify the result, and write the requested artefacts.

    ``compare_graph``: ``"always"`` exports the base graph to compare node counts, ``"cached"``
    (default) reuses earlier statistics for the same ``graph_key``, ``"never"`` skips it.
    ``allow_extra_nodes``: deploy a model whose forward the base graph cannot compute (graph
    edits with no fold, see :func:`~ssf_deploy.fuse.fuse_with_report`) with those nodes added,
    reported against the base export.
    Raises :class:`VerificationError` (with ``.report``) when any check fails; nothing is written.
    """
    from .export import OrtRunner, export_onnx
    from .models import edits_of

    check_writable(out, save_weights, save_pack)    # before the work, not after it
    if save_pack and edits_of(model):
        raise UsageError("a task pack rebuilds the task on the plain timm architecture, and this "
                         "model's forward needs graph edits (" + ", ".join(edits_of(model)) +
                         "): deploy the checkpoint itself, without `save_pack`")
    model = model.eval()
    inputs = list(inputs)
    report = DeployReport(fuse=FuseReport(), anchor=anchor_of(model))
    prov = provenance_of(model) or {}
    golden = GoldenProbe(prov["probe"]) if prov.get("probe") is not None else None
    if save_pack and str(report.anchor.get("base_status", "")).endswith("overridden"):
        raise UsageError("refusing to write a task pack from a base that was not verified "
                         "(`allow_base_mismatch`): the pack would record a base it was not "
                         "trained on")

    def fail(why: str):
        report.failure = why
        raise VerificationError(why, report)

    def golden_check(candidate, name: str, per_sample: bool = False) -> None:
        if golden is None:
            return
        r = golden.check(candidate, name, atol=atol, rtol=rtol, per_sample=per_sample)
        report.checks.append(r)
        if not r.passed:
            fail(f"{name} does not reproduce the outputs recorded when the task was trained"
                 f"{_because(r)}")

    with _stage(report, "reconstruction vs recorded", progress):
        golden_check(model, "unfused (rebuilt)")
    with _stage(report, "fuse", progress):
        fused, report.fuse = fuse_with_report(model, batch_slice(inputs[0], 0, 2),
                                              allow_extra_nodes=allow_extra_nodes)
    with _stage(report, "reference outputs", progress):
        reference = run_outputs(model, inputs)

    def check(name: str, candidate, batches=None) -> VerifyReport:
        got = run_outputs(candidate, batches if batches is not None else inputs)
        r = compare(reference, got, atol=atol, rtol=rtol, names=["logits"],
                    ref_name="unfused (PyTorch)", cand_name=name)
        report.checks.append(r)
        return r

    with _stage(report, "verify fused", progress):
        r = check("fused (PyTorch)", fused)
        if not r.passed:
            fail(f"the fused PyTorch model does not match the unfused model{_because(r)}")
        golden_check(fused, "fused (PyTorch)")

    # every output is a temp file; all are renamed, then their manifest written, only when the
    # whole block succeeded (OutputSet): never a mix of this run's files and an earlier run's
    with OutputSet() as outs:
        if out:
            tmp = outs.add(out)
            example = batch_slice(inputs[0], 0, 1)
            with _stage(report, "export", progress):
                info = export_onnx(fused, tmp, example=example, opset=opset,
                                   dynamic_batch=dynamic_batch, simplify=simplify,
                                   metadata=onnx_metadata,
                                   exported_stats=compare_graph != "never")
            info["path"] = out
            report.onnx = {"fused": info, "base": None, "same_graph_as_base": None}
            if compare_graph != "never":
                with _stage(report, "base graph", progress):
                    base_info, cached, stage = _base_graph(
                        model, info, example, opset=opset, dynamic_batch=dynamic_batch,
                        simplify=simplify, fresh=compare_graph == "always" or not graph_key,
                        key=dict(graph_key or {}, opset=opset, dynamic_batch=dynamic_batch,
                                 simplify=simplify, shape=sample_shape(example),
                                 base=(prov.get("base_check") or {}).get("actual")))
                (n_mine, mine), (n_base, theirs) = (
                    _graph(info if stage == "simplified" else info["exported"], stage),
                    _graph(base_info, stage))
                diff = {op: mine.get(op, 0) - theirs.get(op, 0)
                        for op in sorted(set(mine) | set(theirs))}
                same = (n_mine, mine) == (n_base, theirs)
                report.onnx.update(base=base_info, same_graph_as_base=same, base_cached=cached,
                                   compared=stage, extra_nodes=n_mine - n_base,
                                   ops_diff={k: v for k, v in diff.items() if v})
                if not same and report.fuse.extra_nodes:
                    report.notes.append("the fused graph differs from the base export by the "
                                        "node(s) the fuse report lists")
                elif not same:
                    report.notes.append(
                        "the exporter folds equal initializers (e.g. the all-zero biases of an "
                        "untrained base) differently; compare with a trained base"
                        + ("" if report.fuse.added else ", or see the fuse report"))
            with _stage(report, "verify onnxruntime", progress):
                batches = inputs if dynamic_batch else [batch_slice(x, i, i + 1) for x in inputs
                                                        for i in range(batch_len(x))]
                runner = OrtRunner(tmp)
                r = check("fused (onnxruntime)", runner, batches)
                if not r.passed:
                    fail(f"onnxruntime output does not match the unfused model{_because(r)}")
                if golden is not None and golden.image_size != input_extent(example):
                    report.notes.append(f"golden probe recorded at {golden.image_size} px, ONNX "
                                        f"exported at {input_extent(example)} px: not compared")
                else:
                    golden_check(runner, "fused (onnxruntime)", per_sample=not dynamic_batch)
            if strict_graph and report.onnx["same_graph_as_base"] is False:
                fail("the fused ONNX graph differs from the base export")
            report.written["onnx"] = out
        if save_weights:
            tmp = outs.add(save_weights)
            save_safetensors(fused.state_dict(), tmp)
            report.written["weights"] = save_weights
        if save_pack:
            from .formats.pack import save_pack as write_pack
            tmp = outs.add(save_pack)
            size = write_pack(model, tmp, **(pack_info or {}))
            report.written["pack"] = save_pack
            report.notes.append(f"task pack: {size / 1e6:.2f} MB")
    if len(report.written) > 1:
        report.written["manifest"] = manifest_path(next(iter(report.written.values())))
    return report
