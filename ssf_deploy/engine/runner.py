"""A TensorRT engine as a callable on torch tensors: Polygraphy's ``TrtRunner`` on one CUDA
device, inputs by name (one image input, or several: ``images`` and a ``task`` index)."""
from __future__ import annotations

from typing import Optional

import torch

from ..runtime.session import bind_inputs
from ..runtime.timing import time_calls
from .trt import cuda_device, device_scope, import_polygraphy, import_tensorrt, polygraphy_scope

__all__ = ["EngineRunner", "deserialize"]


def deserialize(data: bytes, device=None, *, verbose: bool = False):
    """``ICudaEngine`` from serialized bytes on ``device`` (Polygraphy's ``engine_from_bytes``)."""
    poly = import_polygraphy()
    dev = cuda_device(device) if device is not None else None
    with device_scope(dev), polygraphy_scope("TensorRT cannot deserialize the engine (built by "
                                             "another TensorRT version or for another GPU?)",
                                             verbose=verbose):
        return poly.engine_from_bytes(bytes(data))


class EngineRunner:
    """Run an engine (an ``ICudaEngine`` or its serialized bytes) on ``device``.

    ``runner(x)`` feeds the engine's only input, ``runner(images, task)`` its inputs in order,
    ``runner({"images": x, "task": t})`` or ``runner(images=x, task=t)`` by name; every tensor
    is cast to the engine's dtype for that input and moved to the device. Returns every output
    as a float32 CPU tensor, in the engine's output order (``outputs``).
    """

    def __init__(self, engine, label: str = "TensorRT", device=None, verbose: bool = False):
        self.trt = import_tensorrt()
        poly = import_polygraphy()
        self.device = cuda_device(device)
        if isinstance(engine, (bytes, bytearray, memoryview)):
            engine = deserialize(engine, self.device, verbose=verbose)
        self.engine, self.label, self.verbose = engine, label, verbose
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        from polygraphy.datatype import DataType
        self.dtypes = {n: DataType.to_dtype(DataType.from_dtype(engine.get_tensor_dtype(n),
                                                                "tensorrt"), "torch")
                       for n in self.inputs}
        with device_scope(self.device), polygraphy_scope("TensorRT could not create an "
                                                         "execution context", verbose=verbose):
            self._runner = poly.TrtRunner(engine, name=label)
            self._runner.activate()

    def profile(self, name: Optional[str] = None) -> tuple:
        """(min, opt, max) shape of input ``name`` (default: the first) in profile 0."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(
            name or self.inputs[0], 0))

    def feed(self, *args, **named) -> dict:
        named = bind_inputs(self.inputs, args, named, what="engine")
        return {n: torch.as_tensor(named[n]).to(self.device, dtype=self.dtypes[n]).contiguous()
                for n in self.inputs}

    def _infer(self, feed: dict) -> dict:
        with device_scope(self.device), polygraphy_scope(f"{self.label} failed to run",
                                                         verbose=self.verbose):
            torch.cuda.current_stream(self.device).synchronize()   # inputs are on the device
            return self._runner.infer(feed, copy_outputs_to_host=True)

    def __call__(self, *args, **named) -> list:
        out = self._infer(self.feed(*args, **named))
        # Polygraphy reuses its host buffers between calls: copy
        return [out[n].to(torch.float32, copy=True) for n in self.outputs]

    def latency(self, *args, warmup: int = 10, iters: int = 50, **named) -> dict:
        """Milliseconds per ``execute_async_v3`` on the runner's stream (CUDA events, the one
        timing loop), after one inference has bound every input and output."""
        feed = self.feed(*args, **named)
        self._infer(feed)
        ctx, stream = self._runner.context, self._runner.stream
        with device_scope(self.device):
            t = time_calls(lambda: ctx.execute_async_v3(stream.ptr), iters, warmup=warmup,
                           device=self.device, stream=torch.cuda.ExternalStream(stream.ptr))
        s = t.summary()
        batch = int(next(iter(feed.values())).shape[0]) if feed else 1
        return {"batch": batch, "median_ms": s["median_ms"], "mean_ms": s["mean_ms"],
                "p90_ms": s["p90_ms"], "warmup": warmup, "iters": s["iters"],
                "device": str(self.device), "clock": s["clock"],
                "images_per_s": round(1000.0 * batch / s["median_ms"], 1)
                if s["median_ms"] > 0 else None}

    def close(self) -> None:
        """Free the context, buffers and stream (also on leaving a ``with`` block)."""
        if getattr(self, "_runner", None) is not None and self._runner.is_active:
            with device_scope(self.device):
                self._runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
