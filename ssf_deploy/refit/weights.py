"""A task's fused weights by ONNX initializer name (pure Python, CPU).

SSF changes only weights, so every task deploys as the same graph. ``refit`` swaps a task's
weights into an already-built artefact instead of re-exporting / rebuilding it:

* TensorRT: ``Refitter.set_named_weights(name, ...)`` with the ONNX initializer names (the ONNX
  parser names an engine's refittable weights after them), see :mod:`ssf_deploy.engine.refitter`;
* onnxruntime: a new session on the same ONNX bytes with ``SessionOptions.add_initializer``.

Where each initializer value comes from (:func:`compute_task_weights`):

1. the ONNX file's ``ssf_deploy.initializers`` map (initializer -> state key, same/transposed):
   read straight from the task's fused ``state_dict``;
2. initializers derived from several tensors (BatchNorm folded into a Conv, a reshaped layer
   scale): the fused task model is exported in memory with the file's own recipe (opset, dynamic
   batch, input shape, onnxsim) and the values are taken by initializer name. That export must
   have the very same graph (nodes, initializer names and shapes); if it does not — typically
   because the exporter merged equal weights, e.g. the all-zero biases of an untrained base — the
   graph cannot hold this task's weights and :class:`SSFDeployError` says so.

The map is the one source for what it covers; the in-memory export happens only for derived
weights (and then also checks that the task fits the very same graph).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import CheckpointError, SSFDeployError
from ..export import INPUT_NAME, META_INIT, export_proto, read_metadata
from ..runtime import OrtRunner, graph_inputs

__all__ = ["META_EXPORT", "TaskWeights", "export_settings", "check_task_matches",
           "compute_task_weights", "TaskOrtRunner", "bake_initializers", "same_graph",
           "graph_weight_names"]

# metadata key with the export recipe {"opset", "dynamic_batch", "simplify", ...}; files written
# before it existed get the recipe inferred from the graph itself (see export_settings)
META_EXPORT = "ssf_deploy.export"
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


# --------------------------------------------------------------------------------------------
# recipe and compatibility


def export_settings(proto: onnx.ModelProto) -> dict:
    """The export recipe of ``proto``: recorded in its metadata or inferred from the graph.

    ``simplify`` is ``None`` when the file does not say (both are then tried in turn).
    """
    meta = read_metadata(proto)
    recorded = {}
    if META_EXPORT in meta:
        try:
            recorded = json.loads(meta[META_EXPORT])
        except json.JSONDecodeError:
            recorded = {}     # an unreadable recipe: inferred from the graph like an old file
    specs = graph_inputs(proto)
    inp = next((s for s in specs if s.name == INPUT_NAME), specs[0])
    if len(inp.shape) < 2 or any(v is None for v in inp.shape[1:]):
        raise SSFDeployError(f"input '{inp.name}' has shape ({', '.join(map(str, inp.dims))}); "
                             f"expected a batch (N, C, H, W) whose dimensions after the batch are "
                             f"fixed")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    out = {"opset": int(opset) if opset else 17, "dynamic_batch": inp.shape[0] is None,
           "batch_size": inp.shape[0] or 1, "input_name": inp.name,
           "chw": tuple(inp.shape[1:]),   # every dimension after the batch (C, H, W for images)
           "simplify": None}
    for k in ("opset", "dynamic_batch", "simplify"):
        if k in recorded:
            out[k] = recorded[k]
    return out


def check_task_matches(proto: onnx.ModelProto, task, source: str = "the ONNX model") -> None:
    """Refuse a task whose architecture / classes differ from what ``proto`` was exported from."""
    meta = read_metadata(proto)
    arch = (meta.get("ssf_deploy.arch") or "").strip('"')
    t_arch = getattr(task, "arch", None)
    if arch and t_arch and arch.split(".")[0] != t_arch.split(".")[0]:
        raise SSFDeployError(f"the pack is for '{t_arch}' but {source} was exported from "
                             f"'{arch}': one engine serves the tasks of one base architecture")
    try:
        nc = int(json.loads(meta.get("ssf_deploy.num_classes", "0") or "0"))
    except (ValueError, TypeError):   # unreadable metadata: the class count is not checked
        nc = 0
    t_nc = getattr(task, "num_classes", None)
    if nc and t_nc and int(t_nc) != nc:
        raise SSFDeployError(f"the pack has {t_nc} classes but {source} has {nc}: the head must "
                             f"have the same shape to swap weights")


# --------------------------------------------------------------------------------------------
# weights by initializer name


@dataclass
class TaskWeights:
    """A task's values for a graph's initializers, and where each one came from."""
    values: dict                      # initializer name -> np.ndarray (graph dtype and shape)
    from_map: list = field(default_factory=list)      # names read from the fused state_dict
    from_export: list = field(default_factory=list)   # derived names, from the in-memory export
    kept: list = field(default_factory=list)          # structural constants, as in the file
    changed: int = 0                  # how many values differ from the file's
    settings: dict = field(default_factory=dict)
    reference: Optional[onnx.ModelProto] = None       # the task's own export (when one was needed)
    export_seconds: float = 0.0

    @property
    def exported(self) -> bool:
        return self.reference is not None

    def as_dict(self) -> dict:
        return {"weights": len(self.values), "from_state_dict": len(self.from_map),
                "from_export": len(self.from_export), "kept_from_file": len(self.kept),
                "exported_in_memory": self.exported, "changed_vs_file": self.changed,
                "recipe": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in self.settings.items()}}

    def summary(self) -> str:
        how = (f"the task re-exported in memory for them ({self.export_seconds:.2f} s)"
               if self.exported else "no re-export")
        return (f"{len(self.values)} weights: {len(self.from_map)} from the fused state_dict by "
                f"the file's initializer map, {len(self.from_export)} derived ({how}), "
                f"{len(self.kept)} structural constants kept; {self.changed} differ from the "
                f"file's values")


def _graph_inits(proto: onnx.ModelProto) -> dict:
    return {i.name: i for i in proto.graph.initializer}


def _constants(proto: onnx.ModelProto) -> dict:
    """Outputs of ``Constant`` nodes (TensorRT may list them as weights too)."""
    out = {}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def graph_weight_names(proto: onnx.ModelProto) -> set:
    """Names a weight can have in ``proto``: initializers and ``Constant`` outputs."""
    return set(_graph_inits(proto)) | set(_constants(proto))


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> Optional[str]:
    """``None`` when both graphs are the same up to initializer *values*, else the first difference."""
    ia, ib = _graph_inits(a), _graph_inits(b)
    if set(ia) != set(ib):
        only_a, only_b = sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia))
        return (f"initializers differ: {len(only_a)} only in the file (e.g. {only_a[:2]}), "
                f"{len(only_b)} only in the task's export (e.g. {only_b[:2]})")
    for name, init in ia.items():
        if list(init.dims) != list(ib[name].dims) or init.data_type != ib[name].data_type:
            return f"initializer '{name}' is {list(init.dims)} in the file, " \
                   f"{list(ib[name].dims)} in the task's export"
    na, nb = a.graph.node, b.graph.node
    if len(na) != len(nb):
        return f"{len(na)} nodes in the file, {len(nb)} in the task's export"
    for i, (x, y) in enumerate(zip(na, nb)):
        if x.op_type != y.op_type or list(x.input) != list(y.input) \
                or list(x.output) != list(y.output):
            return f"node {i} is {x.op_type}({', '.join(x.input)}) in the file, " \
                   f"{y.op_type}({', '.join(y.input)}) in the task's export"
    return None


def _example(settings: dict) -> torch.Tensor:
    b = max(1, int(settings.get("batch_size") or 1))
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, *settings["chw"], generator=g)


def _export_like(fused_model, proto: onnx.ModelProto, settings: dict):
    """Export the fused task model with the file's recipe; returns (export, recipe used)."""
    tries = [settings["simplify"]] if settings.get("simplify") is not None else [True, False]
    first_diff = None
    for simplify in tries:
        ref = export_proto(fused_model, example=_example(settings), opset=settings["opset"],
                         dynamic_batch=settings["dynamic_batch"], simplify=simplify)
        diff = same_graph(proto, ref)
        if diff is None:
            return ref, {**settings, "simplify": simplify}
        first_diff = first_diff or diff
    raise SSFDeployError(
        f"this task's weights do not fit the graph: exporting it with the file's recipe gives a "
        f"different graph ({first_diff}). The exporter merges equal weights (e.g. the all-zero "
        f"biases of an untrained base), so a graph exported from one task can differ from "
        f"another's; export from a trained base and rebuild")


def _as_graph_array(value, init) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.ascontiguousarray(np.asarray(value, dtype=dtype))


def _structural(t) -> bool:
    """Shape constants, indices, scalars: part of the graph, not of a task's weights."""
    return t.data_type not in _FLOAT_TYPES or int(np.prod(t.dims)) <= 1


def compute_task_weights(proto: onnx.ModelProto, fused_state: dict, fused_model=None, *,
                         names: Optional[Iterable[str]] = None,
                         settings: Optional[dict] = None) -> TaskWeights:
    """The task's value for every float initializer of ``proto`` (or for ``names``).

    One source per weight: the file's initializer map (initializer -> state key) gives whatever
    it covers, straight from ``fused_state``; structural constants stay as in the file; only
    weights *derived* from several tensors (BatchNorm folded into a Conv, a reshaped layer scale)
    need ``fused_model`` exported in memory with the file's own recipe — and only then is it
    exported (``TaskWeights.exported``), after checking the export has the very same graph.
    """
    inits, consts = _graph_inits(proto), _constants(proto)
    meta = read_metadata(proto)
    if META_INIT in meta:
        try:
            mapping = json.loads(meta[META_INIT])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"corrupt '{META_INIT}' metadata in the ONNX file: {e}") from e
    else:
        mapping = {}
    settings = dict(settings or export_settings(proto))
    floats = [n for n, i in inits.items() if i.data_type in _FLOAT_TYPES]
    wanted = list(dict.fromkeys(names)) if names is not None else floats
    unknown = [n for n in wanted if n not in inits and n not in consts]
    if unknown:
        raise SSFDeployError(f"{len(unknown)} weight name(s) are not in the ONNX graph (e.g. "
                             f"'{unknown[0]}'): the engine was built from another ONNX file")

    out = TaskWeights(values={}, settings=settings)
    derived = []
    for name in wanted:
        init = inits.get(name)
        if init is not None and name in mapping:
            out.values[name] = _from_map(name, init, mapping[name], fused_state)
            out.from_map.append(name)
        elif _structural(init if init is not None else consts[name]):
            out.values[name] = np.ascontiguousarray(numpy_helper.to_array(
                init if init is not None else consts[name]))
            out.kept.append(name)
        else:
            derived.append(name)
    if derived:
        if fused_model is None:
            raise SSFDeployError(f"{len(derived)} initializer(s) are derived from several weights "
                                 f"(e.g. '{derived[0]}', BatchNorm folded into a Conv) and need "
                                 f"the fused model to be exported: give `fused_model`")
        t0 = time.perf_counter()
        out.reference, out.settings = _export_like(fused_model, proto, settings)
        out.export_seconds = time.perf_counter() - t0
        ref = {**_constants(out.reference), **_graph_inits(out.reference)}
        for name in derived:
            out.values[name] = np.ascontiguousarray(numpy_helper.to_array(ref[name]))
            out.from_export.append(name)
    for name, value in out.values.items():
        src = inits.get(name) or consts.get(name)
        if src is not None and not np.array_equal(numpy_helper.to_array(src), value):
            out.changed += 1
    return out


def _from_map(name: str, init, entry, fused_state: dict) -> np.ndarray:
    key, how = entry
    if key not in fused_state:
        raise SSFDeployError(f"the task's fused weights lack '{key}' (initializer '{name}'): the "
                             f"pack is for another architecture")
    value = fused_state[key]
    value = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) \
        else np.asarray(value)
    if how == "transpose":
        value = value.T
    if tuple(value.shape) != tuple(init.dims):
        raise SSFDeployError(f"the task does not fit the graph: initializer '{name}' is "
                             f"{tuple(init.dims)} in the ONNX file, the task's '{key}' is "
                             f"{tuple(value.shape)}")
    return _as_graph_array(value, init)


# --------------------------------------------------------------------------------------------
# onnxruntime


class TaskOrtRunner(OrtRunner):
    """An onnxruntime session on unchanged ONNX bytes whose initializers come from a task.

    Initializers are swapped with ``SessionOptions.add_initializer`` (the file is not rewritten).
    Graph optimizations are disabled for such sessions: onnxruntime's optimizers work on the
    file's own initializers and do not see the overrides (measured with onnxruntime 1.32: at
    ORT_ENABLE_ALL the NCHWc transform keeps a ViT patch-embed Conv's original weights; from
    ORT_ENABLE_BASIC on, the transpose optimizer breaks ConvNeXt's reshaped layer scales). For
    an optimized session use :func:`bake_initializers` and a plain :class:`OrtRunner`.
    """

    def __init__(self, model, initializers: dict, providers=None,
                 label: str = "onnxruntime (task initializers)"):
        super().__init__(model, providers=providers or ["CPUExecutionProvider"],
                         initializers=initializers, label=label)


def bake_initializers(proto: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers hold ``values`` (same graph, new weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(np.asarray(values[init.name]), init.name))
    return out
