"""Inference through a deployment runtime: onnxruntime or TensorRT, on exactly the bench device.

Both run the same ONNX recipe as ``ssf-deploy export``. What actually ran is recorded
(``infer_runtime``); a run that would not execute on the asked device fails instead of
reporting CPU timings under a CUDA label.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time

import torch
from torch import nn

from ..runtime import ort_session as _session
from ..runtime.timing import time_calls, warm_up
from .meters import MB, Peak, rss
from .rows import BenchConfig, warmup_steps

__all__ = ["ort_session", "infer_onnxruntime", "infer_tensorrt"]


def _export(model: nn.Module, x: torch.Tensor, tmp: str) -> str:
    from ..export import export_onnx
    path = os.path.join(tmp, "model.onnx")
    export_onnx(model.cpu(), path, image_size=x.shape[-1], batch_size=x.shape[0],
                dynamic_batch=False, simplify=True)
    return path


def ort_session(path: str, device: torch.device):
    """An onnxruntime session on ``device``; refuses one that would silently run elsewhere
    (onnxruntime falls back to the CPU provider when the CUDA one cannot load)."""
    return _session(path, device=device)


def infer_onnxruntime(cfg: BenchConfig, model: nn.Module, x: torch.Tensor, device: torch.device,
                      what: str) -> dict:
    import numpy as np
    with tempfile.TemporaryDirectory() as tmp:
        path = _export(model, x, tmp)
        del model
        gc.collect()
        cuda = device.type == "cuda"
        peak = Peak(device, None if cuda else rss())   # count the session, not the torch model
        free0 = torch.cuda.mem_get_info(device)[0] if cuda else 0
        sess = ort_session(path, device)
        name = sess.get_inputs()[0].name
        arr = np.ascontiguousarray(x.detach().cpu().numpy())
        if cuda:   # input and output stay on the device: time the model, not PCIe copies
            import onnxruntime as ort
            binding = sess.io_binding()
            binding.bind_ortvalue_input(
                name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", device.index or 0))
            for out in sess.get_outputs():
                binding.bind_output(out.name, "cuda", device.index or 0)

            def run():
                sess.run_with_iobinding(binding)
        else:
            feed = {name: arr}

            def run():
                sess.run(None, feed)
        runtime = f"onnxruntime {sess.get_providers()[0]}"
        if what == "time":   # session.run returns when the outputs are ready: a host clock
            return {"infer_ms_all": time_calls(run, cfg.iters, warmup=warmup_steps(cfg)).ms,
                    "infer_runtime": runtime}
        warm_up(run, warmup_steps(cfg))
        if cuda:   # onnxruntime's arena is not torch's: the device's own free-memory counter
            return {"infer_peak_mem_mb": max(0.0, (free0 - torch.cuda.mem_get_info(device)[0]) / MB),
                    "infer_runtime": runtime}
        peak.reset()
        run()
        return {"infer_peak_mem_mb": peak.peak() / MB, "infer_runtime": runtime}


def infer_tensorrt(cfg: BenchConfig, model: nn.Module, x: torch.Tensor, device: torch.device,
                   what: str) -> dict:
    """Same ONNX recipe, built into an engine and timed with CUDA events, all on ``device``.

    Builds, runs and measures on the one device given (``ssf_deploy.engine`` takes it
    explicitly); memory is that device's free-memory drop over build and run.
    """
    from ..engine import BuildOptions, EngineRunner, build_engine
    from ..export import export_proto
    proto = export_proto(model.cpu(), example=x.detach().cpu(), batch_size=x.shape[0],
                         dynamic_batch=False, simplify=True)
    del model
    gc.collect()
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        free0 = torch.cuda.mem_get_info(device)[0]
        t0 = time.perf_counter()
        built = build_engine(proto, BuildOptions(fp16=cfg.amp, device=device),
                             source="the benchmark model")
        with EngineRunner(built.plan, device=device) as runner:
            lat = runner.latency(x.to(device), warmup=warmup_steps(cfg), iters=cfg.iters)
            used = (free0 - torch.cuda.mem_get_info(device)[0]) / MB
    out = {"infer_runtime": f"tensorrt {device}",
           "engine_build_seconds": built.info.get("build_seconds", time.perf_counter() - t0)}
    if what == "time":   # the runner reports a median (and p90) of its own CUDA-event timings
        out.update({"infer_ms_all": [lat["median_ms"]], "infer_p90_ms": lat.get("p90_ms")})
        return out
    out["infer_peak_mem_mb"] = max(0.0, used)
    return out
