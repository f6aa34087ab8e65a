"""The bundle on disk: one ONNX graph, one backbone file, one small file per task.

::

    tasks.onnx                 graph (inputs images, task; output logits) + task table metadata
    tasks.onnx.backbone        the base weights the graph reads (ONNX external data)
    tasks.onnx.rows/000007.bin one task's row (ONNX external data of initializer bundle.row.7)

The graph's row table is ``Concat(bundle.row.0, bundle.row.1, ...)``: onnxruntime folds it into
one ``[tasks, width]`` initializer when the session is created, and the graph gathers each
sample's row from it. A task is added by writing its row file and a new (small) ``tasks.onnx``
whose Concat has one more input: the backbone file and the other rows are not touched, so the
cost does not grow with the number of tasks. A removed task's slot reads a zero row and its
index is never given to another task (a client holding an old table cannot reach the wrong task).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import SSFDeployError, UsageError, first_line
from ..fileio import OutputSet, check_manifest, sha256_of

__all__ = ["BUNDLE_FORMAT", "META_KEY", "IMAGES", "TASK", "LOGITS", "TABLE", "export_graph",
           "assemble", "read_graph", "read_meta", "row_name", "row_location", "write_bundle",
           "staged", "rows_of", "is_bundle", "backbone_location"]

BUNDLE_FORMAT = "ssf-deploy/bundle/1"
META_KEY = "ssf_deploy.bundle"
IMAGES, TASK, LOGITS, TABLE = "images", "task", "logits", "bundle.table"
FREE_ROW = "bundle.row.free"
_ALIGN = 4096                  # page-aligned external data: onnxruntime can map it
_INLINE_MAX = 1024             # smaller initializers stay in the graph file


def row_name(index: int) -> str:
    return f"bundle.row.{int(index)}"


def row_location(onnx_name: str, index: int) -> str:
    return f"{onnx_name}.rows/{int(index):06d}.bin"


def backbone_location(onnx_name: str) -> str:
    return f"{onnx_name}.backbone"


# --------------------------------------------------------------------------------------------
# export


def export_graph(module, chw: tuple, width: int, *, opset: int = 17,
                 simplify: bool = True) -> onnx.ModelProto:
    """The bundle module as ONNX with the row table as an input (``bundle.table``), so that the
    exporter can neither fold nor merge it; :func:`assemble` turns it into the row Concat."""
    images = torch.randn(2, *chw, generator=torch.Generator().manual_seed(0))
    task = torch.tensor([0, 1], dtype=torch.int64)
    table = torch.zeros(2, int(width))
    buf = io.BytesIO()
    dyn = {IMAGES: {0: "batch"}, TASK: {0: "batch"}, TABLE: {0: "tasks"}, LOGITS: {0: "batch"}}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (images, task, table), buf, dynamo=False,
                              opset_version=opset, input_names=[IMAGES, TASK, TABLE],
                              output_names=[LOGITS], dynamic_axes=dyn, do_constant_folding=True)
    except Exception as e:
        raise SSFDeployError(f"ONNX export of the bundle failed: {first_line(e)}") from e
    proto = onnx.load_from_string(buf.getvalue())
    if simplify:
        import onnxsim
        try:
            simplified, ok = onnxsim.simplify(proto)
        except Exception as e:
            raise SSFDeployError(f"onnxsim failed on the bundle graph: {first_line(e)}") from e
        if not ok:
            raise SSFDeployError("onnxsim could not validate the simplified bundle graph")
        proto = simplified
    return fuse_norm_affine(proto)


_FUSED_DOC = "ssf-deploy bundle: per-sample affine, channels="


def _users(g) -> dict:
    users: dict = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def fuse_norm_affine(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give each affine-less ``LayerNormalization`` the per-sample scale and shift that follow
    it: ``LN(x, 1, 0) -> Mul(s) -> Add(c)`` becomes ``LN(x, s, c)`` with ``s``/``c`` of shape
    ``[B, 1, C]``. The operator is defined as ``Mul(Normalized, Scale)`` then ``Add(.., B)`` with
    numpy broadcasting, and onnxruntime applies it inside its kernel: the two passes over the
    activations disappear. Only the pattern the bundle module exports is touched."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    users = _users(g)

    consts = {n.output[0]: a.t for n in g.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR}
    consts.update(inits)

    def const(name, value) -> bool:
        t = consts.get(name)
        return t is not None and bool(np.all(numpy_helper.to_array(t) == value))

    drop, moved = set(), {}
    for n in g.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 2 or \
                any(o for o in n.output[1:]):
            continue
        if not const(n.input[1], 1.0) or (len(n.input) > 2 and n.input[2] and
                                          not const(n.input[2], 0.0)):
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        y = n.output[0]
        mul = users.get(y, [])
        if axis != -1 or y in outputs or len(mul) != 1 or mul[0].op_type != "Mul":
            continue
        mul = mul[0]
        s = mul.input[1] if mul.input[0] == y else mul.input[0]
        add = users.get(mul.output[0], [])
        if s in consts or mul.output[0] in outputs or len(add) != 1 or \
                add[0].op_type != "Add":
            continue
        add = add[0]
        c = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
        if c in consts:
            continue
        channels = int(numpy_helper.to_array(consts[n.input[1]]).size)
        del n.input[1:]
        n.input.extend([s, c])
        n.output[0] = add.output[0]
        n.doc_string = f"{_FUSED_DOC}{channels}"
        drop.update((id(mul), id(n)))
        moved[id(add)] = n           # runs where the Add ran: after s and c exist
    if drop:
        keep = [moved.get(id(n), n) for n in g.node if id(n) not in drop]
        used = {i for n in keep for i in n.input}
        keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]
        del g.node[:]
        g.node.extend(keep)
        live = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(live)
    return proto


def unfuse_norm_affine(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of :func:`fuse_norm_affine` (``LN(x, 1, 0) -> Mul -> Add``), for runtimes
    whose LayerNorm takes only a ``[C]`` scale: TensorRT's builder fuses the pointwise ops."""
    g = proto.graph
    nodes = []
    for n in g.node:
        if n.op_type != "LayerNormalization" or not n.doc_string.startswith(_FUSED_DOC):
            nodes.append(n)
            continue
        c = int(n.doc_string[len(_FUSED_DOC):])
        x, s, sh = n.input[0], n.input[1], n.input[2]
        out, base = n.output[0], n.name or n.output[0]
        ones, zeros = f"{base}.ones", f"{base}.zeros"
        g.initializer.extend([numpy_helper.from_array(np.ones(c, np.float32), ones),
                              numpy_helper.from_array(np.zeros(c, np.float32), zeros)])
        plain = helper.make_node("LayerNormalization", [x, ones, zeros], [f"{base}.norm"],
                                 name=f"{base}.plain", axis=-1,
                                 epsilon=next((a.f for a in n.attribute if a.name == "epsilon"),
                                              1e-5))
        nodes += [plain,
                  helper.make_node("Mul", [f"{base}.norm", s], [f"{base}.scaled"],
                                   name=f"{base}.mul"),
                  helper.make_node("Add", [f"{base}.scaled", sh], [out], name=f"{base}.add")]
    del g.node[:]
    g.node.extend(nodes)
    return proto


def assemble(proto: onnx.ModelProto, slots: list, width: int, meta: dict) -> onnx.ModelProto:
    """A copy of ``proto`` whose table input is ``Concat`` of one initializer per slot.

    ``slots[i]`` is the row name of index ``i``, or ``None`` for a removed task (a zero row).
    Initializer *values* are not set here: rows and the backbone are bound by :func:`write_bundle`.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    keep = [i for i in g.input if i.name != TABLE]
    if len(keep) == len(g.input):
        raise SSFDeployError("the bundle graph has no row table input")
    del g.input[:]
    g.input.extend(keep)
    inputs = [s if s is not None else FREE_ROW for s in slots]
    nodes = []
    if any(s is None for s in slots):
        nodes.append(helper.make_node(
            "ConstantOfShape", [FREE_ROW + ".shape"], [FREE_ROW], name=FREE_ROW,
            value=numpy_helper.from_array(np.zeros(1, dtype=np.float32))))
        g.initializer.append(numpy_helper.from_array(np.array([1, width], dtype=np.int64),
                                                     FREE_ROW + ".shape"))
    nodes.append(helper.make_node("Concat", inputs, [TABLE], name="bundle.rows", axis=0))
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    for name in dict.fromkeys(s for s in slots if s is not None):
        t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[1, int(width)])
        g.initializer.append(t)
    set_meta(out, meta)
    return out


def set_meta(proto: onnx.ModelProto, meta: dict) -> None:
    props = {p.key: p.value for p in proto.metadata_props}
    props[META_KEY] = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    del proto.metadata_props[:]
    for k, v in sorted(props.items()):
        e = proto.metadata_props.add()
        e.key, e.value = k, v


def read_meta(proto: onnx.ModelProto, path: str = "the ONNX model") -> dict:
    raw = next((p.value for p in proto.metadata_props if p.key == META_KEY), None)
    if raw is None:
        raise UsageError(f"{path} is not a task bundle (no '{META_KEY}' metadata): make one "
                         f"with ssf-deploy bundle")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SSFDeployError(f"corrupt bundle metadata in {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise SSFDeployError(f"{path}: unknown bundle format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def is_bundle(path: str) -> bool:
    """Does ``path`` hold an ONNX graph with bundle metadata? (Reads the graph file only.)"""
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:       # not ONNX at all: the caller treats it as something else
        return False
    return any(p.key == META_KEY for p in proto.metadata_props)


def read_graph(path: str) -> tuple[onnx.ModelProto, dict]:
    """The bundle graph (external data not loaded) and its metadata."""
    if not os.path.isfile(path):
        raise UsageError(f"bundle not found: {path}")
    check_manifest(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise SSFDeployError(f"cannot read {path}: {first_line(e)}") from None
    return proto, read_meta(proto, path)


def rows_of(path: str, meta: dict) -> dict:
    """``{index: row ndarray}`` of the live tasks, read from their row files (sha256 checked)."""
    folder = os.path.dirname(os.path.abspath(path))
    out = {}
    for t in meta["tasks"]:
        f = os.path.join(folder, t["row"])
        if not os.path.isfile(f):
            raise SSFDeployError(f"task '{t['name']}' row file {t['row']} is missing next to "
                                 f"{path}")
        if sha256_of(f) != t["row_sha256"]:
            raise SSFDeployError(f"task '{t['name']}' row file {t['row']} does not hold the row "
                                 f"this bundle recorded (sha256 differs)")
        out[int(t["index"])] = np.fromfile(f, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# writing


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` read its bytes from ``location`` (ONNX external data, relative to the graph)."""
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
              "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(int(offset))),
                 ("length", str(int(length)))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def _externalise(t: onnx.TensorProto, fh, location: str) -> None:
    data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
    pad = (-fh.tell()) % _ALIGN
    if pad:
        fh.write(b"\0" * pad)
    offset = fh.tell()
    fh.write(data)
    _point(t, location, offset, len(data))


@contextlib.contextmanager
def staged(target: str):
    """A private folder on ``target``'s file system where a bundle is written whole, checked,
    and then moved into place (see :func:`write_bundle`); removed afterwards in every case."""
    folder = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(folder, exist_ok=True)
    d = tempfile.mkdtemp(prefix=".tmp-bundle-", dir=folder)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_bundle(proto: onnx.ModelProto, stage: str, name: str, *,
                 backbone_from: Optional[str] = None, rows: Optional[dict] = None,
                 keep_rows: Optional[dict] = None) -> dict:
    """Write the bundle into ``stage`` (file names as they will be in the end): the graph, the
    backbone (written from the graph's own initializers, or linked from ``backbone_from``) and
    the rows (``rows``: index -> ndarray, written; ``keep_rows``: index -> an existing row file,
    linked). Returns ``{relative name: "new" | "linked"}``."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())   # a copy we may edit
    files = {}
    bb = backbone_location(name)
    if backbone_from is None:
        with open(os.path.join(stage, bb), "wb") as fh:
            for t in proto.graph.initializer:
                if t.name.startswith("bundle.row.") or t.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                if len(t.raw_data) > _INLINE_MAX or \
                        len(numpy_helper.to_array(t).tobytes()) > _INLINE_MAX:
                    _externalise(t, fh, bb)
            fh.flush()
            os.fsync(fh.fileno())
        files[bb] = "new"
    else:
        _link_or_copy(backbone_from, os.path.join(stage, bb))
        files[bb] = "linked"
        for t in proto.graph.initializer:   # the same bytes under this graph's file name
            if t.data_location == onnx.TensorProto.EXTERNAL and \
                    not t.name.startswith("bundle.row."):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = bb
    by_name = {t.name: t for t in proto.graph.initializer}
    for index, src in (keep_rows or {}).items():
        loc = row_location(name, index)
        _link_or_copy(src, os.path.join(stage, loc))
        _point(by_name[row_name(index)], loc, 0, os.path.getsize(os.path.join(stage, loc)))
        files[loc] = "linked"
    for index, row in (rows or {}).items():
        loc = row_location(name, index)
        dst = os.path.join(stage, loc)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        data = np.ascontiguousarray(row, dtype=np.float32).tobytes()
        with open(dst, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _point(by_name[row_name(index)], loc, 0, len(data))
        files[loc] = "new"
    check_graph(proto)
    with open(os.path.join(stage, name), "wb") as fh:
        fh.write(proto.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    files[name] = "new"
    return files


def check_graph(proto: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check, shape inference included) on the bundle's graph.

    The external tensors are checked as typed graph inputs: their bytes are read and used by
    onnxruntime in the exactness gate, and the checker's own file checks refuse the hard links
    that let an updated bundle share its backbone and rows with the bundle it came from.
    """
    g = onnx.ModelProto()
    g.CopyFrom(proto)
    ext = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    keep = [t for t in g.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)
    g.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                         for t in ext)
    try:
        onnx.checker.check_model(g, full_check=True)
    except Exception as e:
        raise SSFDeployError(f"onnx.checker rejected the bundle: {first_line(e)}") from e


def commit(stage: str, files: dict, out: str) -> list[str]:
    """Move the staged files next to ``out`` as one set (:class:`~ssf_deploy.fileio.OutputSet`:
    nothing lands unless everything does). Files only linked from the old bundle stay put when
    they already are in place. Returns the paths written."""
    folder = os.path.dirname(os.path.abspath(out))
    written = []
    with OutputSet() as outs:
        # the graph last in the list: a reader that sees the new graph finds its rows in place
        order = sorted(files, key=lambda n: (not n.endswith(".bin") and n != backbone_location(
            os.path.basename(out)), n))
        for rel in order:
            dst = os.path.join(folder, rel)
            src = os.path.join(stage, rel)
            if files[rel] == "linked" and os.path.exists(dst) and os.path.samefile(src, dst):
                continue
            tmp = outs.add(dst, record=rel.endswith(".onnx"))
            os.replace(src, tmp)
            written.append(dst)
    return written


def _load_external(proto: onnx.ModelProto, folder: str) -> None:
    """Read every external tensor's bytes into the graph (the bundle's backbone and rows).

    onnx's own loader refuses files with several hard links, which is how an updated bundle or
    a Triton version folder shares the backbone with the bundle it came from; the locations are
    checked here instead: relative, inside ``folder``.
    """
    root = os.path.realpath(folder)
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = os.path.realpath(os.path.join(root, loc))
        if os.path.isabs(loc) or not full.startswith(root + os.sep):
            raise SSFDeployError(f"tensor '{t.name}' points outside the bundle's folder: {loc}")
        with open(full, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"])) if "length" in info else f.read()
        t.raw_data = data
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def materialize(path: str, capacity: Optional[int] = None) -> onnx.ModelProto:
    """The bundle as ONE self-contained graph: the row Concat replaced by a single
    ``bundle.table`` initializer ``[capacity, width]`` (rows by index, zero rows for removed and
    spare slots) and the backbone inline. What TensorRT builds from: its parser takes the table
    as one weight, and a refittable engine can take new rows in a spare slot by refitting that
    one weight (same shape), without a rebuild.
    """
    proto, meta = read_graph(path)
    rows = rows_of(path, meta)
    width = int(meta["layout"]["width"])
    slots = int(meta["next_index"])
    capacity = slots if capacity is None else int(capacity)
    if capacity < slots:
        raise UsageError(f"capacity {capacity} is below the bundle's {slots} task slots")
    table = np.zeros((capacity, width), dtype=np.float32)
    for i, row in rows.items():
        table[i] = row
    _load_external(proto, os.path.dirname(os.path.abspath(path)))
    g = proto.graph
    nodes = [n for n in g.node if n.name not in ("bundle.rows", FREE_ROW)]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if not t.name.startswith("bundle.row.")
             and t.name != FREE_ROW + ".shape"]
    del g.initializer[:]
    g.initializer.extend(inits)
    g.initializer.append(numpy_helper.from_array(table, TABLE))
    for t in g.initializer:
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    return unfuse_norm_affine(proto)
