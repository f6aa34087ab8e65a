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

from .errors import SSFDeployError, find_os_error, first_line
from .fileio import atomic_path, scratch_path
from .fuse import FP16_MAX
from .models import call_args, example_input, family_of, inputs_to
from .runtime import OrtRunner  # noqa: F401 - moved to the runtime layer; imported from here too

__all__ = ["export_onnx", "export_proto", "graph_stats", "OrtRunner", "initializer_map",
           "read_metadata", "fp16_range_issues", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME",
           "FP16_MAX"]

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_INIT = "ssf_deploy.initializers"


@contextlib.contextmanager
def _exportable(model: nn.Module, example: Optional[torch.Tensor], image_size: Optional[int],
                batch_size: int):
    """(the model in eval mode and fp32, the example input); the caller's model is left as it
    was (its mode is restored; a non-fp32 model is exported from a float copy)."""
    if example is None:
        example = example_input(model, batch=batch_size, image_size=image_size)
    ref = next(model.parameters(), None)
    if ref is not None and ref.dtype != torch.float32:
        import copy
        model = copy.deepcopy(model).float()
    was_training = model.training
    model.eval()
    try:
        yield model, example
    finally:
        model.train(was_training)


def export_proto(model: nn.Module, *, example: Optional[torch.Tensor] = None,
                 image_size: Optional[int] = None, batch_size: int = 1,
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                 simplify: bool = True, check: bool = True) -> onnx.ModelProto:
    """Export ``model`` as it runs in eval mode, in fp32; return the checked, simplified graph.

    The caller's model is left as it was (its train/eval mode and dtype are restored or, for a
    non-fp32 model, a float copy is exported): TensorRT ``--fp16`` chooses precision itself.
    """
    with _exportable(model, example, image_size, batch_size) as (m, x):
        buf = io.BytesIO()
        _torchscript(m, x, opset, dynamic_batch, buf)
    proto = onnx.load_from_string(buf.getvalue())
    del buf
    if simplify:
        try:
            proto = _simplify(proto)
        except SSFDeployError:
            _check(proto, "exported")   # a broken export explains itself better than onnxsim
            raise
    if check:
        _check(proto, "simplified" if simplify else "exported")
    return proto


def _torchscript(model, example, opset, dynamic_batch, f) -> None:
    """The recipe's exporter, into ``f`` (a file object or a path)."""
    family = family_of(model)   # another model family names its own inputs and outputs
    names = family.onnx_names(model, example) if family else ([INPUT_NAME], [OUTPUT_NAME])
    dyn = {n: {0: "batch"} for n in names[0] + names[1]} if dynamic_batch else None
    args, kwargs = call_args(inputs_to(example, dtype=torch.float32))   # named inputs: keywords
    try:
        # the TorchScript exporter prints its whole IR graph on failure: keep stdout clean
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=False, opset_version=opset,
                              input_names=names[0], output_names=names[1],
                              dynamic_axes=dyn, do_constant_folding=True)
    except Exception as e:
        if find_os_error(e) is not None:
            raise               # disk full, no permission: the output set names the output
        raise SSFDeployError(f"ONNX export of {type(model).__name__} failed: {first_line(e)}") from e


def _check(proto, stage: str) -> None:
    """``onnx.checker`` (full check, shape inference included) on a ModelProto or a file path;
    once, on the final model (a path is cheaper: no re-serialisation)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise SSFDeployError(f"onnx.checker rejected the {stage} model: {first_line(e)}") from e


def _simplify(model, output_path: Optional[str] = None) -> onnx.ModelProto:
    """onnxsim on a ModelProto, or file to file (``model`` a path, ``output_path`` given: its
    C++ core reads and writes the files, the model is never serialised in Python)."""
    try:
        import onnxsim
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SSFDeployError("onnxsim is not installed: pip install onnxsim "
                             "(or export with `simplify` off)") from e
    try:
        kwargs = {"output_path": output_path} if output_path else {}
        simplified, ok = onnxsim.simplify(model, **kwargs)
    except Exception as e:
        if find_os_error(e) is not None:
            raise
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


def fp16_range_issues(proto: onnx.ModelProto, limit: float = FP16_MAX) -> list:
    """``[(tensor name, largest |value|)]`` of the float weights an fp16 engine cannot hold.

    Initializers and Constant nodes whose largest magnitude is beyond ``limit`` (or not finite),
    largest first. A fold can legitimately write such values (the official ConvNeXt's shift
    through a tiny layer scale: t / g); fp32 runs them exactly, fp16 turns them into inf.
    """
    def tensors():
        yield from proto.graph.initializer
        for node in proto.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t
    out = []
    for t in tensors():
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                               onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        a = onnx.numpy_helper.to_array(t)
        if not a.size:
            continue
        m = float(np.abs(a.astype(np.float64)).max())
        if not m <= limit:
            out.append((t.name, m))
    return sorted(out, key=lambda x: -x[1] if x[1] == x[1] else float("-inf"))


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
                metadata: Optional[dict] = None, exported_stats: bool = False) -> dict:
    """Export, simplify, check and atomically write ``path``; returns graph statistics
    (with ``exported_stats``, also the exporter's graph before onnxsim, as ``info["exported"]``).

    File to file: the exporter writes the graph next to ``path``, onnxsim reads it and writes
    the simplified model, whose metadata is then appended as a message of its own (protobuf
    merges repeated fields), so the model is never re-serialised in Python; it is parsed once
    (for its initializer map) and checked from the file.
    """
    with _exportable(model, example, image_size, batch_size) as (m, x), \
            atomic_path(path) as tmp, scratch_path(tmp, ".raw.onnx") as raw:
        _torchscript(m, x, opset, dynamic_batch, raw)
        exported = graph_stats(onnx.load(raw)) if exported_stats or not simplify else None
        if simplify:
            try:
                proto = _simplify(raw, tmp)
            except SSFDeployError:
                _check(raw, "exported")   # a broken export explains itself better than onnxsim
                raise
        else:
            os.replace(raw, tmp)
            proto = onnx.load(tmp)
        state = m.state_dict()
        meta = {META_INIT: json.dumps(initializer_map(proto, state), sort_keys=True),
                "ssf_deploy.export": json.dumps({"opset": opset, "dynamic_batch": dynamic_batch,
                                                 "simplify": simplify}, sort_keys=True)}
        meta.update({f"ssf_deploy.{k}": (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                     for k, v in (metadata or {}).items()})
        have = {p.key for p in proto.metadata_props}
        clash = sorted(have & set(meta))
        if clash:   # cannot happen with onnxsim's own keys; appending would duplicate them
            raise SSFDeployError(f"ONNX metadata key {clash[0]!r} written twice")
        extra = onnx.ModelProto()
        for k, v in sorted(meta.items()):     # same content, same bytes: one fixed order
            entry = extra.metadata_props.add()
            entry.key, entry.value = k, v
        with open(tmp, "ab") as f:
            f.write(extra.SerializeToString())
        _check(tmp, "simplified" if simplify else "exported")
    info = graph_stats(proto)
    info.update(path=os.fspath(path), opset=opset, simplified=simplify,
                dynamic_batch=dynamic_batch)
    if exported_stats:
        info["exported"] = exported
    return info


def read_metadata(proto: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}
