"""TensorRT engines: build from ONNX through Polygraphy, check, run, time, refit by name.

* :mod:`.policy` — our precision policy as plain functions (Q/DQ checks, the 10.x/11.x routes,
  TF32 off for fp32, tolerances, per-input profiles, the sidecar's precision), returning
  Polygraphy's arguments; no TensorRT needed, tested on the CPU;
* :mod:`.trt` — lazy TensorRT/Polygraphy imports, the CUDA device, Polygraphy's log on stderr;
* :mod:`.build` — :func:`build_engine` (``network_from_onnx_bytes``, ``CreateConfig``,
  ``Calibrator``, ``engine_bytes_from_network``; our timing cache);
* :mod:`.runner` — :class:`EngineRunner` (Polygraphy's ``TrtRunner``, named inputs, latency);
* :mod:`.refitter` — :func:`refit_engine` (TensorRT's ``Refitter``: Polygraphy has none);
* :mod:`.files` — the plan and its sidecar;
* :mod:`.pipeline` — :func:`build_checked_engine`, what ``ssf-deploy engine`` runs.

Supported: TensorRT 10.x and 11.x, optional (``pip install "ssf-deploy[tensorrt]"``); every
other tool works without it.
"""
from .build import BuildOptions, BuiltEngine, Calibration, attach_timing_cache, build_engine
from .files import (PLAN_SUFFIXES, build_sidecar, read_plan, read_sidecar, resolve_onnx_for_plan,
                    sidecar_path, write_plan)
from .pipeline import EngineReport, build_checked_engine, image_input, random_feeds
from .policy import (FP8_MIN_CAPABILITY, QUANTIZED, REFIT_WHY, Precision, batch_profile,
                     check_capability, check_precision_request, check_qdq_supported, config_args,
                     fp16_onnx, gemm_biases, input_profiles, network_args, plan_precision,
                     qdq_info, refuse_quantized_refit, sidecar_precision, tolerances,
                     unexposed_biases)
from .refitter import refit_engine, refittable_names
from .runner import EngineRunner, deserialize
from .trt import (TRT_MISSING, cuda_device, import_polygraphy, import_tensorrt, require_cuda,
                  trt_version)

__all__ = ["BuildOptions", "BuiltEngine", "Calibration", "attach_timing_cache", "build_engine",
           "PLAN_SUFFIXES", "build_sidecar", "read_plan", "read_sidecar", "resolve_onnx_for_plan",
           "sidecar_path", "write_plan", "EngineReport", "build_checked_engine", "image_input",
           "random_feeds", "FP8_MIN_CAPABILITY", "QUANTIZED", "REFIT_WHY", "Precision",
           "batch_profile", "check_capability", "check_precision_request",
           "check_qdq_supported", "config_args", "fp16_onnx", "gemm_biases", "input_profiles",
           "network_args", "plan_precision", "qdq_info", "refuse_quantized_refit",
           "sidecar_precision", "tolerances", "unexposed_biases", "refit_engine",
           "refittable_names", "EngineRunner", "deserialize", "TRT_MISSING", "cuda_device",
           "import_polygraphy", "import_tensorrt", "require_cuda", "trt_version"]
