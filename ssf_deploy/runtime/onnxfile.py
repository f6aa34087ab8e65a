"""The one ONNX loader (a file's manifest is always checked) and the one input-spec reader."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx

from ..errors import CheckpointError, UsageError, first_line
from ..fileio import check_manifest

__all__ = ["load_onnx", "onnx_bytes", "check_onnx_path", "TensorSpec", "graph_inputs"]

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto]


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(bytes(data))
    except Exception as e:   # protobuf DecodeError and friends
        raise CheckpointError(f"cannot read ONNX {where}: {first_line(e)}") from e


def check_onnx_path(path) -> str:
    """An ONNX file that exists and belongs to a complete output set (its manifest, see
    :func:`ssf_deploy.fileio.check_manifest`); parsing is left to the reader."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"ONNX file not found: {path}")
    check_manifest(path)
    return path


def load_onnx(source: Source) -> onnx.ModelProto:
    """A path, serialized bytes or a ModelProto as a ModelProto with a graph.

    A path must exist, belong to a complete output set (its manifest, see
    :func:`ssf_deploy.fileio.check_manifest`) and parse; each failure is one line.
    """
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto, where = _parse(source, "model (bytes)"), "the ONNX bytes"
    else:
        path = check_onnx_path(source)
        try:
            proto = onnx.load(path)
        except Exception as e:  # protobuf DecodeError, OSError, ...
            raise CheckpointError(f"cannot read ONNX file {path}: {first_line(e)}") from e
        where = path
    if not proto.graph.node or not proto.graph.input:
        raise CheckpointError(f"{where} holds no ONNX graph (empty or not an ONNX model)")
    return proto


def onnx_bytes(source: Source) -> bytes:
    """Serialized ONNX of ``source`` (a file's bytes as they are, after
    :func:`check_onnx_path`)."""
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(check_onnx_path(source), "rb") as f:
        return f.read()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input: name, numpy dtype, shape (``None`` for a dimension the graph leaves
    open) and the dimensions' own names or values (for messages)."""
    name: str
    dtype: np.dtype
    shape: tuple
    dims: tuple

    @property
    def dynamic(self) -> tuple:
        """Indices of the open dimensions."""
        return tuple(i for i, d in enumerate(self.shape) if d is None)

    def describe(self) -> str:
        return f"'{self.name}' ({', '.join(str(d) for d in self.dims)}) {self.dtype}"


def graph_inputs(proto: onnx.ModelProto, name: Optional[str] = None) -> list[TensorSpec]:
    """The graph's real inputs (initializers listed as inputs are not), in graph order; with
    ``name`` only that one (one line when it does not exist)."""
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for i in proto.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                     for d in t.shape.dim)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"input '{i.name}' has an element type numpy cannot hold "
                                  f"({t.elem_type})") from e
        specs.append(TensorSpec(i.name, dtype, shape, dims))
    if not specs:
        raise CheckpointError("the ONNX graph has no input")
    if name is not None:
        specs = [s for s in specs if s.name == name]
        if not specs:
            raise UsageError(f"the ONNX graph has no input '{name}'")
    return specs
