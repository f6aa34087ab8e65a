"""The Triton model repository: the artefact GPU production users deploy.

::

    DIR/<model>/config.pbtxt          Triton's model configuration (text protobuf)
    DIR/<model>/tasks.json            the task table of the newest version (names, indices, classes)
    DIR/<model>/<N>/model.onnx        version N: the bundle graph, renamed (a bundle in its own right)
    DIR/<model>/<N>/model.onnx.backbone, model.onnx.rows/*.bin   its external data, hard links
    DIR/<model>/<N>/tasks.json        the task table of version N
    DIR/<model>_trt/...               the TensorRT variant (``tensorrt_plan``), when an engine is given

Every config is parsed into Triton's own ``ModelConfig`` message (the ``model_config.proto`` that
``tritonclient`` ships), so a field Triton does not know, a wrong enum or a wrong type is refused
here, not when the server loads it. A task change is a new version directory: under
``--model-control-mode=explicit`` Triton switches to it on ``POST
/v2/repository/models/<model>/load`` (its default version policy serves the newest version and
drains the old one); ``ssf-deploy serve`` does the same on its own ``load`` endpoint.

The task table is also in the config (``parameters { key: "ssf_deploy.tasks" }``), so a client
of a remote server reads it from ``GET /v2/models/<model>/config``; a client never infers an
index from argument order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import onnx

from ..bundle import update_bundle
from ..bundle.files import (BUNDLE_FORMAT, IMAGES, LOGITS, META_KEY, TASK, backbone_location,
                            read_meta, row_location, set_meta)
from ..errors import SSFDeployError, UsageError, first_line
from ..fileio import OutputSet, check_manifest, check_writable
from ..runtime import ort_session

__all__ = ["write_triton_repo", "update_repo", "RepoReport", "ModelVersion", "latest_version",
           "read_model", "model_config", "validate_config", "config_text", "TASKS_PARAM",
           "tasks_of_config", "signature_of", "versions", "check_target",
           "MODEL_FILE", "PLAN_FILE", "DEFAULT_MAX_BATCH", "DEFAULT_QUEUE_DELAY_US"]

MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
TASKS_FILE = "tasks.json"
TASKS_PARAM = "ssf_deploy.tasks"
DEFAULT_MAX_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 2000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TMP = ".tmp-version-"

# numpy/onnx element type -> Triton's DataType name
_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
                 onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL"}


# --------------------------------------------------------------------------------------------
# what a model file declares


@dataclass
class Signature:
    """The inputs/outputs of a served model: a bundle (images + task) or one plain model."""
    images: str
    logits: str
    chw: tuple
    classes: int                   # logits columns (Cmax for a bundle)
    task: Optional[str] = None     # the task-index input of a bundle
    tasks: list = field(default_factory=list)    # [{"name", "index", "num_classes"}]
    kind: str = "bundle"           # "bundle" | "model"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "images": self.images, "task": self.task,
                "logits": self.logits, "chw": list(self.chw), "classes": self.classes}


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in
            vi.type.tensor_type.shape.dim]


def signature_of(path: str, *, task_name: Optional[str] = None) -> Signature:
    """Read a served model's signature from its graph file (external data not loaded)."""
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise UsageError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    inits = {t.name for t in proto.graph.initializer}
    ins = [i for i in proto.graph.input if i.name not in inits]
    outs = list(proto.graph.output)
    is_bundle = any(p.key == META_KEY for p in proto.metadata_props)
    if is_bundle:
        meta = read_meta(proto, path)
        by = {i.name: i for i in ins}
        if set(by) != {IMAGES, TASK} or [o.name for o in outs] != [LOGITS]:
            raise SSFDeployError(f"{path}: a bundle has inputs {IMAGES}, {TASK} and output "
                                 f"{LOGITS}; this one has {sorted(by)} -> "
                                 f"{[o.name for o in outs]}")
        tasks = [{"name": t["name"], "index": int(t["index"]), "num_classes": int(t["num_classes"])}
                 for t in sorted(meta["tasks"], key=lambda t: int(t["index"]))]
        return Signature(IMAGES, LOGITS, tuple(int(v) for v in meta["chw"]),
                         int(meta["layout"]["max_classes"]), TASK, tasks, "bundle")
    if len(ins) != 1 or len(outs) != 1:
        raise UsageError(f"{path}: a served model takes one image input and gives one logits "
                         f"output (or is a task bundle); it has {len(ins)} input(s) and "
                         f"{len(outs)} output(s)")
    shape, oshape = _dims(ins[0]), _dims(outs[0])
    if ins[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(shape) != 4 or \
            None in shape[1:]:
        raise UsageError(f"{path}: the input '{ins[0].name}' must be float32 [B,C,H,W] with "
                         f"fixed C, H, W; it is {shape}")
    if shape[0] is not None:
        raise UsageError(f"{path}: the input '{ins[0].name}' has a fixed batch of {shape[0]}; "
                         f"serving batches requests: export with a dynamic batch")
    if len(oshape) != 2 or oshape[1] is None:
        raise UsageError(f"{path}: the output '{outs[0].name}' must be [B, classes]; it is "
                         f"{oshape}")
    name = task_name or os.path.splitext(os.path.basename(path))[0]
    return Signature(ins[0].name, outs[0].name, tuple(shape[1:]), int(oshape[1]), None,
                     [{"name": name, "index": 0, "num_classes": int(oshape[1])}], "model")


# --------------------------------------------------------------------------------------------
# config.pbtxt


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise SSFDeployError(f"checking a Triton model config needs tritonclient ({e.name} is "
                             f"missing): pip install \"ssf-deploy[serve]\"") from None
    return model_config_pb2


def config_text(name: str, sig: Signature, *, platform: str = "onnxruntime_onnx",
                default_model_filename: str = MODEL_FILE,
                max_batch_size: int = DEFAULT_MAX_BATCH,
                queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                instance_kind: Optional[str] = None, instances: int = 1,
                tasks: Optional[list] = None) -> str:
    """``config.pbtxt`` for ``sig``: the inputs and output it declares, dynamic batching.

    ``task`` is ``[B]`` in the graph: Triton writes such an input as ``dims: [1]`` with
    ``reshape: { shape: [] }`` (its documented form for a batch-only tensor).
    """
    c, h, w = sig.chw
    lines = [f'name: "{name}"', f'platform: "{platform}"',
             f'default_model_filename: "{default_model_filename}"',
             f"max_batch_size: {int(max_batch_size)}",
             "version_policy: { latest: { num_versions: 1 } }",
             "input [",
             f'  {{ name: "{sig.images}" data_type: TYPE_FP32 format: FORMAT_NCHW '
             f"dims: [ {c}, {h}, {w} ] }}" + ("," if sig.task else "")]
    if sig.task:
        lines.append(f'  {{ name: "{sig.task}" data_type: TYPE_INT64 dims: [ 1 ] '
                     f"reshape: {{ shape: [ ] }} }}")
    lines += ["]", "output [",
              f'  {{ name: "{sig.logits}" data_type: TYPE_FP32 dims: [ {sig.classes} ] }}', "]",
              "dynamic_batching {",
              f"  max_queue_delay_microseconds: {int(queue_delay_us)}",
              "  preserve_ordering: false", "}"]
    if instance_kind:
        lines.append(f"instance_group [ {{ kind: {instance_kind} count: {int(instances)} }} ]")
    table = json.dumps(tasks if tasks is not None else sig.tasks, separators=(",", ":"))
    lines += ["parameters [", f'  {{ key: "{TASKS_PARAM}" value: {{ string_value: '
                                f"{json.dumps(table)} }} }}", "]"]
    return "\n".join(lines) + "\n"


def model_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's own ``inference.ModelConfig`` message."""
    from google.protobuf import text_format
    pb2 = _model_config_pb2()
    cfg = pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise SSFDeployError(f"not a valid Triton model config: {first_line(e)}") from None
    return cfg


def validate_config(text: str, sig: Optional[Signature] = None) -> dict:
    """Check ``config.pbtxt`` against Triton's schema and, given ``sig``, against the model.

    Beyond the schema, the rules Triton enforces when it loads the model: a name, a known
    platform, batching on (``max_batch_size`` > 0) with dynamic batching, every input and
    output typed and shaped. Returns the parsed config as a dict (protobuf's JSON mapping).
    """
    from google.protobuf import json_format
    pb2 = _model_config_pb2()
    cfg = model_config(text)
    problems = []
    if not cfg.name:
        problems.append("no model name")
    if cfg.platform not in ("onnxruntime_onnx", "tensorrt_plan") and not cfg.backend:
        problems.append(f"platform '{cfg.platform}' is neither onnxruntime_onnx nor "
                        f"tensorrt_plan")
    if cfg.max_batch_size < 1:
        problems.append("max_batch_size must be >= 1 for batched serving")
    if not cfg.HasField("dynamic_batching"):
        problems.append("no dynamic_batching")
    for t in list(cfg.input) + list(cfg.output):
        if t.data_type == pb2.TYPE_INVALID:
            problems.append(f"'{t.name}' has no data_type")
        if not t.dims:
            problems.append(f"'{t.name}' has no dims")
    if sig is not None:
        ins = {t.name: t for t in cfg.input}
        want = {sig.images: (pb2.TYPE_FP32, list(sig.chw))}
        if sig.task:
            want[sig.task] = (pb2.TYPE_INT64, [1])
        for n, (dt, dims) in want.items():
            if n not in ins:
                problems.append(f"input '{n}' is not declared")
            elif ins[n].data_type != dt or list(ins[n].dims) != dims:
                problems.append(f"input '{n}' is declared {pb2.DataType.Name(ins[n].data_type)} "
                                f"{list(ins[n].dims)}, the model has {pb2.DataType.Name(dt)} "
                                f"{dims}")
        extra = set(ins) - set(want)
        if extra:
            problems.append(f"inputs the model does not have: {sorted(extra)}")
        outs = {t.name: t for t in cfg.output}
        if list(outs) != [sig.logits] or list(outs[sig.logits].dims) != [sig.classes]:
            problems.append(f"the output must be '{sig.logits}' [{sig.classes}]")
        if sig.task and not list(ins.get(sig.task, pb2.ModelInput()).reshape.shape) == [] \
                and not ins[sig.task].HasField("reshape"):
            problems.append(f"input '{sig.task}' needs reshape: {{ shape: [ ] }} (the graph "
                            f"takes [B])")
    if problems:
        raise SSFDeployError(f"Triton model config '{cfg.name}': {'; '.join(problems)}")
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


def tasks_of_config(text: str) -> list:
    """The task table a config carries (what a Triton client reads from the config API)."""
    cfg = model_config(text)
    if TASKS_PARAM not in cfg.parameters:
        raise SSFDeployError(f"the config of '{cfg.name}' carries no task table "
                             f"('{TASKS_PARAM}' parameter)")
    return json.loads(cfg.parameters[TASKS_PARAM].string_value)


# --------------------------------------------------------------------------------------------
# versions


@dataclass
class ModelVersion:
    """One version directory of a served model."""
    model: str
    version: int
    folder: str
    path: str                      # model.onnx (or model.plan)
    tasks: list

    def as_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "path": self.path,
                "tasks": self.tasks}


def versions(model_dir: str) -> list[int]:
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and
                  os.path.isdir(os.path.join(model_dir, n)) and int(n) > 0)


def latest_version(model_dir: str) -> Optional[ModelVersion]:
    """The newest complete version of ``model_dir`` (what Triton's default policy serves)."""
    name = os.path.basename(os.path.normpath(model_dir))
    for v in reversed(versions(model_dir)):
        folder = os.path.join(model_dir, str(v))
        for f in (MODEL_FILE, PLAN_FILE):
            path = os.path.join(folder, f)
            if os.path.isfile(path) and os.path.isfile(os.path.join(folder, TASKS_FILE)):
                with open(os.path.join(folder, TASKS_FILE)) as fh:
                    table = json.load(fh)
                return ModelVersion(name, v, folder, path, table["tasks"])
    return None


def _write_model_files(model_dir: str, table: dict, text: str) -> None:
    """The model folder's own tasks.json and config.pbtxt (the newest version's), together."""
    with OutputSet(manifest=False) as outs:
        _write_json(outs.add(os.path.join(model_dir, TASKS_FILE)), table)
        with open(outs.add(os.path.join(model_dir, "config.pbtxt")), "w") as fh:
            fh.write(text)


def read_model(repo: str, model: Optional[str] = None) -> str:
    """The model folder to serve: ``repo/<model>``, the repository's only ONNX model, or
    ``repo`` itself when it is a model folder. One line naming the choices otherwise."""
    repo = os.fspath(repo)
    if not os.path.isdir(repo):
        raise UsageError(f"model repository not found: {repo}")
    if model:
        d = os.path.join(repo, model)
        if latest_version(d) is None:
            raise UsageError(f"no servable version of model '{model}' in {repo}")
        return d
    if latest_version(repo) is not None:
        return repo
    found = [n for n in sorted(os.listdir(repo))
             if (v := latest_version(os.path.join(repo, n))) is not None and
             v.path.endswith(".onnx")]
    if not found:
        raise UsageError(f"{repo} holds no servable model (DIR/<model>/<version>/model.onnx): "
                         f"write one with ssf-deploy bundle ... --triton-repo {repo}")
    if len(found) > 1:
        raise UsageError(f"{repo} holds several models ({', '.join(found)}): name one with "
                         f"`model`")
    return os.path.join(repo, found[0])


# --------------------------------------------------------------------------------------------
# writing


@dataclass
class RepoReport:
    repo: str
    model: str
    version: int
    kind: str
    tasks: list
    files: dict = field(default_factory=dict)      # relative name -> "linked" | "new"
    configs: list = field(default_factory=list)
    trt_model: Optional[str] = None
    bundle: Optional[object] = None                 # the BundleReport of an update

    def as_dict(self) -> dict:
        return {"repo": self.repo, "model": self.model, "version": self.version,
                "kind": self.kind, "tasks": self.tasks, "files": self.files,
                "configs": self.configs, "trt_model": self.trt_model,
                "bundle": self.bundle.as_dict() if self.bundle is not None else None}

    def __str__(self) -> str:
        lines = [f"Triton repository {self.repo}: model '{self.model}' version {self.version} "
                 f"({self.kind}, {len(self.tasks)} task(s): "
                 f"{', '.join(t['name'] for t in self.tasks)})"]
        linked = sum(1 for v in self.files.values() if v == "linked")
        lines.append(f"files: {len(self.files)} ({linked} hard-linked, not copied)")
        for c in self.configs:
            lines.append(f"wrote {c} (valid against Triton's model_config.proto)")
        if self.trt_model:
            lines.append(f"TensorRT variant: model '{self.trt_model}' (tensorrt_plan)")
        return "\n".join(lines)


def _check_name(model: str) -> str:
    if not isinstance(model, str) or not _NAME.match(model):
        raise UsageError(f"model name {model!r}: use letters, digits, '_', '.', '-' (it is a "
                         f"folder name and a URL part)")
    return model


def check_target(repo: str, model: Optional[str]) -> None:
    """Refuse an unusable model name or an unwritable repository before any work is done."""
    if model is not None:
        _check_name(model)
    check_writable(os.path.join(repo, model or "model", "config.pbtxt"))


def _link(src: str, dst: str, files: dict, rel: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
        files[rel] = "linked"
    except OSError:
        shutil.copyfile(src, dst)
        files[rel] = "copied"


def _external_locations(proto) -> list[str]:
    out = []
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in out:
                out.append(loc)
    return out


def _stage_model(src: str, stage: str, files: dict) -> None:
    """``src`` as ``stage/model.onnx``; its external data linked next to it.

    A bundle's external data are named after its graph file: the copy's locations are renamed
    (``model.onnx.backbone``, ``model.onnx.rows/...``) so that the version directory is a bundle
    in its own right (``ssf-deploy verify`` and ``bundle --into`` work on it).
    """
    check_manifest(src)
    folder = os.path.dirname(os.path.abspath(src))
    proto = onnx.load(src, load_external_data=False)
    old = os.path.basename(src)
    is_bundle = any(p.key == META_KEY for p in proto.metadata_props)
    rename = {}
    if is_bundle:
        meta = read_meta(proto, src)
        rename[backbone_location(old)] = backbone_location(MODEL_FILE)
        for t in meta["tasks"]:
            rename[t["row"]] = row_location(MODEL_FILE, int(t["index"]))
            t["row"] = row_location(MODEL_FILE, int(t["index"]))
        set_meta(proto, meta)
    for loc in _external_locations(proto):
        if os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
            raise SSFDeployError(f"{src} reads external data from {loc}, outside its folder")
        s = os.path.join(folder, loc)
        if not os.path.isfile(s):
            raise SSFDeployError(f"{src} reads external data from {loc}, which is missing")
        new = rename.get(loc, loc)
        _link(s, os.path.join(stage, new), files, new)
    if rename:
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location" and e.value in rename:
                    e.value = rename[e.value]
        with open(os.path.join(stage, MODEL_FILE), "wb") as fh:
            fh.write(proto.SerializeToString())
        files[MODEL_FILE] = "new"
    else:
        _link(src, os.path.join(stage, MODEL_FILE), files, MODEL_FILE)


def _table(model: str, version: int, sig: Signature) -> dict:
    return {"format": "ssf-deploy/tasks/1", "model": model, "version": version,
            "kind": sig.kind, "inputs": {"images": sig.images, "task": sig.task},
            "output": sig.logits, "chw": list(sig.chw), "classes": sig.classes,
            "tasks": sig.tasks}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


def _publish(repo: str, model: str, fill, *, kind_check: Optional[str] = None,
             **cfg) -> tuple[int, Signature, dict]:
    """Make the next version of ``repo/model``: ``fill(stage, files)`` writes ``model.onnx``
    into a private folder, which is checked (signature, config schema, onnxruntime load) and
    renamed to ``<N>`` only when whole; then ``tasks.json`` and ``config.pbtxt`` are replaced
    as one set. A reader sees the old version or the new one, never a half-written one."""
    model_dir = os.path.join(repo, _check_name(model))
    os.makedirs(model_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=_TMP, dir=model_dir)
    try:
        files: dict = {}
        fill(stage, files)
        sig = signature_of(os.path.join(stage, MODEL_FILE), task_name=cfg.pop("task_name", None))
        if kind_check and sig.kind != kind_check:
            raise UsageError(f"{model} serves a {kind_check}; the new version is a {sig.kind}")
        _check_loads(os.path.join(stage, MODEL_FILE), sig)
        version = (versions(model_dir) or [0])[-1] + 1
        table = _table(model, version, sig)
        _write_json(os.path.join(stage, TASKS_FILE), table)
        files[f"{TASKS_FILE}"] = "new"
        text = config_text(model, sig, **cfg)
        validate_config(text, sig)
        os.rename(stage, os.path.join(model_dir, str(version)))
        stage = None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    _write_model_files(model_dir, table, text)
    return version, sig, {f"{model}/{version}/{k}": v for k, v in files.items()}


def _check_loads(path: str, sig: Signature) -> None:
    """onnxruntime creates a session from the staged file (its external data resolved from
    the version folder) and runs one sample for each of up to 4 tasks (first, last and two
    between: a 1000-task bundle is checked in one small batch): the version serves before it
    exists. Exactness is the bundle's gate's job, not this check's."""
    import numpy as np
    try:
        sess = ort_session(path, providers=["CPUExecutionProvider"], threads=1,
                           fold_large_constants=True)
        picks = sorted({0, len(sig.tasks) - 1, len(sig.tasks) // 3, 2 * len(sig.tasks) // 3})
        n = len(picks)
        feed = {sig.images: np.zeros((n, *sig.chw), np.float32)}
        if sig.task:
            feed[sig.task] = np.array([sig.tasks[i]["index"] for i in picks], np.int64)
        out = sess.run([sig.logits], feed)[0]
    except Exception as e:
        raise SSFDeployError(f"onnxruntime cannot run the staged model version: "
                             f"{first_line(e)}") from None
    if out.shape != (n, sig.classes) or not np.isfinite(out).all():
        raise SSFDeployError(f"the staged model version gives {out.shape} logits "
                             f"(finite: {bool(np.isfinite(out).all())}) for {n} of its tasks")


def _trt_variant(repo: str, model: str, engine: str, source: str, sig: Signature,
                 max_batch_size: int, queue_delay_us: int) -> tuple[str, dict]:
    """``repo/<model>_trt``: the engine as a ``tensorrt_plan`` model with the same inputs.

    The engine is a snapshot of the tasks it was built from (their rows are baked in), so its
    sidecar must name this bundle graph (sha256); its optimisation profile bounds the batch.
    """
    from ..engine import read_sidecar
    from ..fileio import sha256_of
    if not os.path.isfile(engine):
        raise UsageError(f"engine not found: {engine}")
    side = read_sidecar(engine)
    if not side:
        raise UsageError(f"{engine} has no sidecar ({engine}.json, written by ssf-deploy "
                         f"engine): the engine cannot be tied to this bundle's tasks")
    if side.get("onnx_sha256") != sha256_of(source):
        raise UsageError(f"{engine} was built from another graph than {source} (sha256 in its "
                         f"sidecar differs): rebuild it from this bundle, its tasks are baked in")
    top = int((side.get("batch") or {}).get("max") or 0)
    if top and top < max_batch_size:
        max_batch_size = top
    name = f"{model}_trt"
    model_dir = os.path.join(repo, name)
    os.makedirs(model_dir, exist_ok=True)
    version = (versions(model_dir) or [0])[-1] + 1
    stage = tempfile.mkdtemp(prefix=_TMP, dir=model_dir)
    files = {}
    try:
        _link(engine, os.path.join(stage, PLAN_FILE), files, f"{name}/{version}/{PLAN_FILE}")
        table = _table(name, version, sig)
        table["engine"] = {k: side.get(k) for k in ("precision_text", "batch", "tensorrt",
                                                    "onnx_sha256")}
        _write_json(os.path.join(stage, TASKS_FILE), table)
        text = config_text(name, sig, platform="tensorrt_plan", default_model_filename=PLAN_FILE,
                           max_batch_size=max_batch_size, queue_delay_us=queue_delay_us)
        validate_config(text, sig)
        os.rename(stage, os.path.join(model_dir, str(version)))
        stage = None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    _write_model_files(model_dir, table, text)
    return name, files


def write_triton_repo(source: str, repo: str, *, model: Optional[str] = None,
                      engine: Optional[str] = None, task_name: Optional[str] = None,
                      max_batch_size: int = DEFAULT_MAX_BATCH,
                      queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      instance_kind: Optional[str] = None, instances: int = 1) -> RepoReport:
    """Publish ``source`` (a task bundle, or one plain ONNX model such as a fused task) as the
    next version of ``repo/<model>`` (version 1 when new); ``engine`` adds the TensorRT variant.

    Files are hard links of the source's (the backbone is not copied); the version is checked
    before it appears (Triton's config schema, onnxruntime loads and runs it).
    """
    source = os.fspath(source)
    if not os.path.isfile(source):
        raise UsageError(f"model not found: {source}")
    if max_batch_size < 1:
        raise UsageError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instance_kind not in (None, "KIND_GPU", "KIND_CPU"):
        raise UsageError(f"instance kind must be KIND_GPU or KIND_CPU, got {instance_kind}")
    model = model or os.path.splitext(os.path.basename(source))[0]
    check_writable(os.path.join(repo, _check_name(model), "config.pbtxt"))
    version, sig, files = _publish(
        repo, model, lambda stage, files: _stage_model(source, stage, files),
        task_name=task_name, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
        instance_kind=instance_kind, instances=instances)
    report = RepoReport(repo, model, version, sig.kind, sig.tasks, files,
                        [os.path.join(repo, model, "config.pbtxt")])
    if engine:
        if sig.kind != "bundle":
            raise UsageError("`engine` adds the TensorRT variant of a task bundle")
        name, more = _trt_variant(repo, model, engine, source, sig, max_batch_size,
                                  queue_delay_us)
        report.files.update(more)
        report.trt_model = name
        report.configs.append(os.path.join(repo, name, "config.pbtxt"))
    return report


def update_repo(repo: str, model: str, *, add: Sequence = (), remove: Sequence[str] = (),
                names: Optional[Sequence[str]] = None, base_weights: Optional[str] = None,
                pretrained: bool = False, progress=None, **bundle_kw) -> RepoReport:
    """Change the tasks of a served bundle: the next version of ``repo/<model>`` is its newest
    version with ``add`` packs added and ``remove`` names removed (the bundle's own
    :func:`~ssf_deploy.bundle.update_bundle`: no re-export, the backbone and the kept rows are
    hard links, the exactness gate runs). A running server switches on its ``load`` call."""
    model_dir = os.path.join(repo, _check_name(model))
    cur = latest_version(model_dir)
    if cur is None or not cur.path.endswith(MODEL_FILE):
        raise UsageError(f"no ONNX version of model '{model}' in {repo} to change")
    with open(os.path.join(model_dir, "config.pbtxt")) as fh:
        old = model_config(fh.read())
    reports = []

    def fill(stage, files):
        out = os.path.join(stage, MODEL_FILE)
        rep = update_bundle(cur.path, add=list(add), remove=list(remove), out=out, names=names,
                            base_weights=base_weights, pretrained=pretrained, progress=progress,
                            **bundle_kw)
        reports.append(rep)
        for w in rep.written:
            files[os.path.relpath(w, stage)] = "new"
        for root, _, fs in os.walk(stage):
            for f in fs:
                rel = os.path.relpath(os.path.join(root, f), stage)
                if rel not in files:
                    files[rel] = "linked"

    kind = "KIND_GPU" if any(g.kind == 1 for g in old.instance_group) else \
        "KIND_CPU" if old.instance_group else None
    version, sig, files = _publish(
        repo, model, fill, kind_check="bundle", max_batch_size=old.max_batch_size,
        queue_delay_us=old.dynamic_batching.max_queue_delay_microseconds or
        DEFAULT_QUEUE_DELAY_US, instance_kind=kind,
        instances=old.instance_group[0].count if old.instance_group else 1)
    return RepoReport(repo, model, version, sig.kind, sig.tasks, files,
                      [os.path.join(model_dir, "config.pbtxt")], bundle=reports[0])
