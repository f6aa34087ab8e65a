"""ONNX export with one fixed recipe, so base and fused graphs can be compared node for node.

Recipe: TorchScript exporter (``dynamo=False``: fast, dynamic batch), eval mode, constant
folding, ``onnx.checker``, then onnxsim. The same recipe for ``export`` (plain base) and
``fuse`` (folded SSF) is what makes "same node count and op histogram" a meaningful check.
Each file records where its weight initializers come from (``ssf_deploy.initializers``), which is
what lets ``refit`` swap a task's weights into an engine or session by initializer name.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import warnings
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from .errors import SSFDeployError, first_line
from .fileio import atomic_path
from .models import call_args, example_input, family_of, inputs_to
from .runtime import OrtRunner  # noqa: F401 - moved to the runtime layer; imported from here too

__all__ = ["export_onnx", "export_proto", "graph_stats", "OrtRunner", "initializer_map",
           "read_metadata", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME"]

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_INIT = "ssf_deploy.initializers"


def export_proto(model: nn.Module, *, example: Optional[torch.Tensor] = None,
                 image_size: Optional[int] = None, batch_size: int = 1,
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                 simplify: bool = True, check: bool = True) -> onnx.ModelProto:
    """Export ``model`` as it runs in eval mode, in fp32; return the checked, simplified graph.

    The caller's model is left as it was (its train/eval mode and dtype are restored or, for a
    non-fp32 model, a float copy is exported): TensorRT ``--fp16`` chooses precision itself.
    """
    if example is None:
        example = example_input(model, batch=batch_size, image_size=image_size)
    ref = next(model.parameters(), None)
    if ref is not None and ref.dtype != torch.float32:
        import copy
        model = copy.deepcopy(model).float()
    was_training = model.training
    model.eval()
    try:
        proto = _export(model, example, opset, dynamic_batch, simplify)
    finally:
        model.train(was_training)
    if check:
        _check(proto, "simplified" if simplify else "exported")
    return proto


def _export(model, example, opset, dynamic_batch, simplify) -> onnx.ModelProto:
    buf = io.BytesIO()
    family = family_of(model)   # another model family names its own inputs and outputs
    names = family.onnx_names(model, example) if family else ([INPUT_NAME], [OUTPUT_NAME])
    dyn = {n: {0: "batch"} for n in names[0] + names[1]} if dynamic_batch else None
    args, kwargs = call_args(inputs_to(example, dtype=torch.float32))
    try:
        # the TorchScript exporter prints its whole IR graph on failure: keep stdout clean
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buf, kwargs=kwargs, dynamo=False,
                              opset_version=opset, input_names=names[0], output_names=names[1],
                              dynamic_axes=dyn, do_constant_folding=True)
    except Exception as e:
        raise SSFDeployError(f"ONNX export of {type(model).__name__} failed: {first_line(e)}") from e
    proto = onnx.load_from_string(buf.getvalue())
    if simplify:
        try:
            proto = _simplify(proto)
        except SSFDeployError:
            _check(proto, "exported")   # a broken export explains itself better than onnxsim
            raise
    return proto


def _check(proto, stage: str) -> None:
    """``onnx.checker`` (full check, shape inference included) on a ModelProto or a file path;
    once, on the final model (a path is cheaper: no re-serialisation)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise SSFDeployError(f"onnx.checker rejected the {stage} model: {first_line(e)}") from e


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SSFDeployError("onnxsim is not installed: pip install onnxsim "
                             "(or pass --no-simplify)") from e
    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as e:
        raise SSFDeployError(f"onnxsim failed: {first_line(e)}") from e
    if not ok:
        raise SSFDeployError("onnxsim could not validate the simplified model")
    return simplified


def graph_stats(proto: onnx.ModelProto) -> dict:
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {"nodes": len(proto.graph.node), "ops": dict(sorted(ops.items())),
            "initializers": len(proto.graph.initializer),
            "parameters": int(sum(np.prod(i.dims) for i in proto.graph.initializer
                                  if i.data_type in (onnx.TensorProto.FLOAT,
                                                     onnx.TensorProto.FLOAT16)))}


def _fingerprint(a: np.ndarray) -> int:
    """Cheap, exact, order-free summary (the integer sum of the float32 bit patterns), the same
    for a weight and its transpose: only equal fingerprints are compared in full."""
    return int(np.ascontiguousarray(a, dtype=np.float32).view(np.int32).sum(dtype=np.int64))


def initializer_map(proto: onnx.ModelProto, state: dict) -> dict:
    """ONNX initializer name -> (state key, "same" | "transpose"), matched by value.

    Names alone are not enough: the exporter renames folded weights (``onnx::MatMul_123`` is a
    transposed Linear weight). Initializers derived from several tensors (BatchNorm folded into a
    Conv) stay unmapped; ``refit`` recomputes those through the exporter. Candidates are found by
    shape and a fingerprint, then compared exactly (one pass over the weights, not one per pair).
    """
    index: dict[tuple, list] = collections.defaultdict(list)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1:
            a = v.detach().float().cpu().numpy()
            fp = _fingerprint(a)
            index[(a.shape, fp)].append((k, "same", a))
            if a.ndim == 2:
                index[(a.T.shape, fp)].append((k, "transpose", a.T))
    out = {}
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = onnx.numpy_helper.to_array(init)
        if arr.size <= 1:
            continue
        cands = index.get((arr.shape, _fingerprint(arr)), [])
        hits = [(k, how) for k, how, a in cands if np.array_equal(a, arr)]
        named = [h for h in hits if h[0] == init.name]
        if named:
            out[init.name] = named[0]
        elif len({h[0] for h in hits}) == 1:
            out[init.name] = hits[0]
    return out


def export_onnx(model: nn.Module, path: str, *, example: Optional[torch.Tensor] = None,
                image_size: Optional[int] = None, batch_size: int = 1,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, simplify: bool = True,
                metadata: Optional[dict] = None) -> dict:
    """Export, check, simplify and atomically write ``path``; returns graph statistics."""
    proto = export_proto(model, example=example, image_size=image_size, batch_size=batch_size,
                         opset=opset, dynamic_batch=dynamic_batch, simplify=simplify, check=False)
    state = model.state_dict()
    meta = {META_INIT: json.dumps(initializer_map(proto, state), sort_keys=True),
            "ssf_deploy.export": json.dumps({"opset": opset, "dynamic_batch": dynamic_batch,
                                             "simplify": simplify}, sort_keys=True)}
    meta.update({f"ssf_deploy.{k}": (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                 for k, v in (metadata or {}).items()})
    meta = {**{p.key: p.value for p in proto.metadata_props}, **meta}   # onnxsim's + ours
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):     # same content, same bytes: one fixed order
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
        _check(tmp, "simplified" if simplify else "exported")
    info = graph_stats(proto)
    info.update(path=os.fspath(path), opset=opset, simplified=simplify,
                dynamic_batch=dynamic_batch)
    return info


def read_metadata(proto: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}
