"""The one onnxruntime session factory, and :class:`OrtRunner` (a session as a callable on torch
tensors, one or several named inputs)."""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np
import torch

from ..errors import SSFDeployError, UsageError, first_line
from .onnxfile import Source, check_onnx_path

__all__ = ["ort_session", "OrtRunner", "OPTIMIZATION", "bind_inputs", "release_freed_memory"]

OPTIMIZATION = ("all", "extended", "basic", "disable")


def _providers(device) -> tuple[list, Optional[str]]:
    """(providers to ask for, the one that must run it) for a torch device or its spelling."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ([("CUDAExecutionProvider", {"device_id": dev.index or 0}),
                 "CPUExecutionProvider"], "CUDAExecutionProvider")
    return ["CPUExecutionProvider"], "CPUExecutionProvider"


def ort_session(model: Source, *, device=None, providers=None, threads: Optional[int] = None,
                optimization: Optional[str] = None, initializers: Optional[Mapping] = None,
                optimized_path: Optional[str] = None, spinning: bool = True,
                fold_large_constants: bool = False):
    """An ``onnxruntime.InferenceSession`` on a path, bytes or ModelProto.

    * ``device`` (``"cpu"``, ``"cuda:N"``): the providers for it, and a session that would run
      elsewhere (onnxruntime silently falls back to the CPU provider) is refused;
      ``providers``: asked as given (default: every available one), what runs is
      ``session.get_providers()``;
    * ``optimization``: onnxruntime's graph optimization level, ``"all"`` by default and
      ``"disable"`` with ``initializers`` (``{name: ndarray}`` overriding the file's):
      onnxruntime 1.32's optimizers fold the file's own values and ignore some overrides (seen
      on a ViT patch-embed Conv, ConvNeXt's reshaped layer scales);
    * ``spinning=False``: no spin-waiting after a run (with several sessions timed in turn, one
      session's spinning threads steal the cores the next one runs on);
    * ``optimized_path``: where onnxruntime saves the graph it runs;
    * ``fold_large_constants``: fold constant subgraphs whatever their output size. onnxruntime
      1.27+ skips folding an output above a size cap; a 1000-task ViT-B/16 bundle's task table
      (1.15 GB, the Concat of its row initializers) then stayed a node, so every batch
      concatenated the table again and it was resident twice (2,763 MB vs 1,642 MB folded).
    """
    import onnxruntime as ort
    level = optimization or ("disable" if initializers else "all")
    if level not in OPTIMIZATION:
        raise UsageError(f"`optimization` must be one of {', '.join(OPTIMIZATION)}, got "
                         f"{level!r}")
    if isinstance(model, (str, os.PathLike)):
        data = check_onnx_path(model)         # exists, manifest: one line each
    else:
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else bytes(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if fold_large_constants:
        opts.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes",
                                      "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = os.fspath(optimized_path)
    keep = []
    for name, value in (initializers or {}).items():
        ov = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
        keep.append(ov)                       # must outlive the session
        opts.add_initializer(name, ov)
    want = None
    if device is not None:
        providers, want = _providers(device)
    try:
        session = ort.InferenceSession(data, sess_options=opts,
                                       providers=providers or ort.get_available_providers())
    except Exception as e:
        raise SSFDeployError(f"onnxruntime cannot load the model: {first_line(e)}") from e
    got = session.get_providers()
    if want is not None and (not got or got[0] != want):
        raise UsageError(f"onnxruntime runs this model on {got[0] if got else 'nothing'}, not "
                         f"{want} ({device}): install onnxruntime-gpu with a CUDA matching "
                         f"this driver, or use the cpu device")
    session._ssf_keep = keep
    release_freed_memory()
    return session


def release_freed_memory() -> bool:
    """Give the heap memory freed so far back to the OS (glibc ``malloc_trim``); False where
    the C library is not glibc.

    Why: onnxruntime reads external initializers into ~0.5 MB heap blocks, folds constants
    (a bundle's rows into its one task table) and frees the originals, but glibc keeps freed
    blocks of that size in the heap, so a 1000-task bundle's resident memory would count its
    table twice (measured: 1151 MB after loading a ViT-S/16 bundle of 1000 tasks, 691 MB after
    trimming). Called once per session made here."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc (macOS, musl): its allocator returns memory itself
        return False
    return bool(libc.malloc_trim(0))


def bind_inputs(names: list, args: tuple, named: dict, what: str = "model") -> dict:
    """``{input name: value}`` for a runner taking ``names``: positional values in that order,
    one mapping, or keywords; every input must be given (one line naming the missing)."""
    if len(args) == 1 and isinstance(args[0], Mapping):
        args, named = (), {**args[0], **named}
    if len(args) > len(names):
        raise UsageError(f"{len(args)} inputs given, the {what} takes {len(names)} "
                         f"({', '.join(names)})")
    named = {**dict(zip(names, args)), **named}
    missing = [n for n in names if n not in named]
    if missing:
        raise UsageError(f"missing {what} input(s) {', '.join(missing)}")
    return named


class OrtRunner:
    """Run an ONNX model in onnxruntime as a callable on torch tensors.

    ``runner(x)`` feeds the first input; ``runner(images, task)`` the inputs in graph order;
    ``runner({"images": x, "task": t})`` or ``runner(images=x, task=t)`` by name (a text
    batch: ``runner({"input_ids": ..., "attention_mask": ...})``). Returns every output as a
    CPU tensor.
    ``providers`` (attribute) lists the execution providers the session really runs on,
    whatever was asked for. Other keywords go to :func:`ort_session`.
    """

    def __init__(self, model: Source, providers=None, initializers: Optional[Mapping] = None,
                 label: str = "onnxruntime", **options):
        self.session = ort_session(model, providers=providers, initializers=initializers,
                                   **options)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.input = self.inputs[0]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.label = label
        self.providers = list(self.session.get_providers())

    def feed(self, *args, **named) -> dict:
        """``{input name: ndarray}`` from positional tensors (graph order), one mapping or
        keywords (by name). Names the graph does not take are left out: a text batch carries
        inputs the exporter may have pruned (a misspelt name still fails, as a missing input)."""
        named = bind_inputs(self.inputs, args, named)
        return {n: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                for n, v in named.items() if n in self.inputs}

    def __call__(self, *args, **named):
        feed = self.feed(*args, **named)
        specs = {s.name: s for s in self.session.get_inputs()}
        for n, v in feed.items():     # each in the graph's element type: images arrive as
            want = _NP_TYPES.get(specs[n].type)   # any float, token ids as int64 or int32
            if want is not None and v.dtype != want:
                feed[n] = v.astype(want)
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


_NP_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_}

