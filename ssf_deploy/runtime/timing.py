"""The one timing loop: milliseconds per call with ``time.perf_counter`` on the CPU or CUDA
event pairs on a stream, warm-up apart; several callables interleaved so machine drift hits all
alike. Every timed number in the package (bench, quantize, engine) comes from here."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

__all__ = ["Timing", "warm_up", "time_calls", "interleaved"]


@dataclass
class Timing:
    """Milliseconds of each timed call; ``first_ms``: the first warm-up call (compilation)."""
    ms: list
    first_ms: Optional[float] = None
    clock: str = "time.perf_counter"

    def summary(self, digits: int = 4) -> dict:
        ms = sorted(self.ms)
        return {"median_ms": round(statistics.median(ms), digits),
                "mean_ms": round(statistics.fmean(ms), digits),
                "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], digits),
                "min_ms": round(ms[0], digits), "iters": len(ms), "clock": self.clock}


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def warm_up(fn: Callable[[], object], n: int, device=None) -> Optional[float]:
    """Run ``n`` calls (CUDA: synchronised after each); milliseconds of the first, or None."""
    first = None
    for i in range(max(0, n)):
        t0 = time.perf_counter()
        fn()
        if _is_cuda(device):
            torch.cuda.synchronize(device)
        if i == 0:
            first = (time.perf_counter() - t0) * 1e3
    return first


def time_calls(fn: Callable[[], object], iters: int, *, warmup: int = 0, device=None,
               stream=None) -> Timing:
    """``iters`` timed calls of ``fn`` after ``warmup`` untimed ones.

    On a CUDA ``device`` each call is bracketed by a CUDA event pair recorded on ``stream``
    (default: the current stream; an engine's own stream for TensorRT) and the device is
    synchronised once after the loop, so no host sync sits between calls.
    """
    first = warm_up(fn, warmup, device)
    iters = max(1, int(iters))
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) for s, e in pairs], first, "CUDA events")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times, first)


def interleaved(fns: Mapping[str, Callable[[], object]], runs: int, *,
                warmup: int = 0) -> dict:
    """``{name: Timing}``: every round calls each function once (CPU clock), in an order
    rotated every round, so drift in machine load affects all of them alike."""
    names = list(fns)
    for _ in range(max(0, warmup)):
        for k in names:
            fns[k]()
    ms = {k: [] for k in names}
    for r in range(max(1, int(runs))):
        for k in names[r % len(names):] + names[:r % len(names)]:
            ms[k] += time_calls(fns[k], 1).ms
    return {k: Timing(v) for k, v in ms.items()}
