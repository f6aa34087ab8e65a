"""The runtime I/O layer: each piece that reads inputs, loads models or times them, written once.

* :mod:`.images` — the one image-folder walk (one extension list) through timm's eval transform;
* :mod:`.onnxfile` — the one ONNX loader (manifests always checked) and input-spec reader;
* :mod:`.session` — the one onnxruntime session factory and :class:`OrtRunner`;
* :mod:`.timing` — the one timing loop (``time.perf_counter`` or CUDA events);
* :mod:`.keys` — the one missing / unexpected / wrong-shape key diff.

File hashes are :func:`ssf_deploy.fileio.sha256_of`. This layer imports nothing of the package
above :mod:`ssf_deploy.families` (the model-family registry, which the image data config asks),
so every module above it can use it.
"""
from .images import IMAGE_EXTS, ImageBatches, data_config, eval_transform, image_files, load_images
from .keys import KeyDiff, key_diff
from .onnxfile import TensorSpec, graph_inputs, load_onnx, onnx_bytes
from .session import OrtRunner, bind_inputs, ort_session, release_freed_memory
from .timing import Timing, interleaved, time_calls, warm_up

__all__ = ["IMAGE_EXTS", "ImageBatches", "data_config", "eval_transform", "image_files",
           "load_images", "KeyDiff", "key_diff", "TensorSpec", "graph_inputs", "load_onnx",
           "onnx_bytes", "OrtRunner", "bind_inputs", "ort_session", "release_freed_memory",
           "Timing", "interleaved", "time_calls", "warm_up"]
