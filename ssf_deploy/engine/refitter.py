"""Refit an engine in place with a task's weights, by ONNX initializer name (Polygraphy has no
refit; this is TensorRT's ``Refitter`` directly, logging through Polygraphy's TensorRT logger).

Calls: ``Refitter(engine, logger)``, ``get_all_weights``, ``get_weights_prototype(name)`` (dtype
of the engine's copy), ``set_named_weights(name, Weights(ndarray))``, ``get_missing_weights``,
``refit_cuda_engine`` and ``OnnxParserRefitter(refitter, logger).refit_from_bytes`` for weights
the engine names itself.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from ..errors import SSFDeployError, UsageError
from .policy import unexposed_biases
from .trt import cuda_device, device_scope, import_tensorrt, polygraphy_scope

__all__ = ["refit_engine", "refittable_names"]


def _np_dtype(trt, dt):
    try:
        return np.dtype(trt.nptype(dt))
    except (TypeError, AttributeError):   # a type numpy has no dtype for: leave the array as is
        return None


def refittable_names(engine, *, device=None) -> list:
    """The names of the weights ``engine``'s refitter can change."""
    trt = import_tensorrt()
    from polygraphy.backend.trt.util import get_trt_logger
    dev = cuda_device(device) if device is not None else None
    with device_scope(dev), polygraphy_scope("TensorRT cannot refit this engine"):
        return list(trt.Refitter(engine, get_trt_logger()).get_all_weights())


def refit_engine(engine, weights_for: Callable, *, onnx_fallback: Optional[Callable] = None,
                 proto=None, device=None, verbose: bool = False) -> dict:
    """Refit ``engine`` in place.

    ``weights_for(names) -> {name: ndarray}`` gets the engine's refittable weight names (the
    ONNX parser names them after the ONNX initializers) and returns the task's values; each is
    cast to the dtype of the engine's copy (``get_weights_prototype``: fp16 for an engine built
    from an fp16 ONNX). Names it leaves out are TensorRT-internal; then ``onnx_fallback() ->
    bytes`` (the ONNX holding the task's weights) is refitted through ``OnnxParserRefitter``,
    which maps the weights itself. With the graph ``proto``, ``info['unexposed_biases']`` names
    its matrix-product biases the refitter does not list (see :func:`.policy.unexposed_biases`).
    Times set + refit with ``time.perf_counter``.
    """
    trt = import_tensorrt()
    from polygraphy.backend.trt.util import get_trt_logger
    if not getattr(engine, "refittable", True):
        raise UsageError("the engine was built without `refittable`: rebuild it with "
                         "`refittable`")
    dev = cuda_device(device) if device is not None else None
    with device_scope(dev), polygraphy_scope("TensorRT refit failed", verbose=verbose) as log:
        logger = get_trt_logger()
        refitter = trt.Refitter(engine, logger)
        names = list(refitter.get_all_weights())
        if not names:
            raise SSFDeployError("the engine has no refittable weights (built without "
                                 "`refittable`?)")
        values = weights_for(names)
        unknown = [n for n in names if n not in values]
        keep = []                              # host memory must live until refit_cuda_engine
        if unknown and onnx_fallback is None:
            raise SSFDeployError(f"{len(unknown)} refittable weight(s) have no ONNX name, e.g. "
                                 f"'{unknown[0]}'")
        if unknown:
            data = onnx_fallback()
            t0 = time.perf_counter()
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            if not parser_refitter.refit_from_bytes(data):
                raise SSFDeployError(f"TensorRT's ONNX refitter failed: "
                                     f"{log.last_error() or 'see the log above'}")
            how = "OnnxParserRefitter.refit_from_bytes"
        else:
            prototype = getattr(refitter, "get_weights_prototype", None)
            t0 = time.perf_counter()
            for name in names:
                arr = np.ascontiguousarray(values[name])
                if prototype is not None:
                    want = _np_dtype(trt, prototype(name).dtype)
                    if want is not None and arr.dtype != want:
                        arr = np.ascontiguousarray(arr.astype(want))
                keep.append(arr)
                if not refitter.set_named_weights(name, trt.Weights(arr)):
                    raise SSFDeployError(f"TensorRT rejected the weights '{name}' {arr.shape} "
                                         f"{arr.dtype} (wrong element count or type)")
            how = "set_named_weights"
        missing = list(refitter.get_missing_weights())
        if missing:
            raise SSFDeployError(f"TensorRT still misses {len(missing)} weight(s) after refit, "
                                 f"e.g. '{missing[0]}'")
        if not refitter.refit_cuda_engine():
            raise SSFDeployError(f"TensorRT refit_cuda_engine() failed: "
                                 f"{log.last_error() or 'see the log above'}")
        seconds = time.perf_counter() - t0
    info = {"refit_seconds": round(seconds, 4), "weights": len(names), "method": how,
            "unnamed_weights": len(unknown)}
    if proto is not None:
        info["unexposed_biases"] = unexposed_biases(proto, names)
    return info
