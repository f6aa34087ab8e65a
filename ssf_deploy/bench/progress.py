"""Progress of a long benchmark: what runs, how long it took, how long is left (on stderr).

A tqdm bar on a terminal, one line per finished pass otherwise (logs, pipes). Before a run
that looks long on the CPU, a rough estimate and how to make it shorter.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import SSFDeployError
from ..runtime.timing import time_calls
from .rows import BenchConfig

__all__ = ["Pass", "Progress", "estimate_costs", "fmt_seconds", "LONG_RUN_S"]

LONG_RUN_S = 180.0          # above this a CPU run says how to make it shorter
_SUBPROCESS_S = 4.0         # interpreter + torch/timm import + model build, per isolated pass
_GEMM_EFFICIENCY = 0.75     # a ViT step reaches about this share of a large GEMM's rate

LABELS = {"train-time": "train timing", "infer-time": "inference timing",
          "train-memory": "train memory", "infer-memory": "inference memory",
          "fuse": "fuse ssf once for ssf-fused"}


@dataclass
class Pass:
    row: str
    task: str               # one of measure.TASKS, or "fuse"
    round: int = 0          # --repeat round of a timing pass
    cost: float = 1.0       # a-priori seconds (relative weight when no estimate exists)

    def label(self) -> str:
        r = f" (round {self.round + 1})" if self.task.endswith("time") and self.round else ""
        return f"{self.row}: {LABELS.get(self.task, self.task)}{r}"


def fmt_seconds(s: float) -> str:
    s = int(round(max(0.0, s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _gemm_flops_per_s(n: int = 1024) -> float:
    """This CPU's rate on a large fp32 GEMM (best of 5, about 0.1 s on two cores)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(time_calls(lambda: torch.mm(a, b), 5, warmup=2).ms) / 1e3
    return 2 * n ** 3 / max(best, 1e-9)


def _forward_flops(cfg: BenchConfig) -> Optional[float]:
    """FLOPs of one image through the base model, counted on the meta device (no memory)."""
    from .measure import count_flops
    from .rows import create_model, image_size
    try:
        with torch.device("meta"):
            model = create_model(cfg)
            return float(count_flops(model, torch.empty(1, 3, image_size(cfg), image_size(cfg))))
    except (SSFDeployError, RuntimeError, TypeError, ValueError, NotImplementedError,
            AssertionError):   # a model the meta device cannot count: no estimate, no failure
        return None


def estimate_costs(cfg: BenchConfig, passes: list[Pass], isolated: bool) -> Optional[float]:
    """Fill each pass's a-priori seconds (CPU only); the total, or None when unknown."""
    if not cfg.device.startswith("cpu"):
        return None
    flops = _forward_flops(cfg)
    if flops is None:
        return None
    rate = _gemm_flops_per_s() * _GEMM_EFFICIENCY
    tokens_factor = {"vpt-shallow": 1 + (cfg.prompts or 200) / 197,
                     "vpt-deep": 1 + (cfg.prompts or 50) / 197}   # ViT-B/16: 197 tokens
    fwd = flops * cfg.batch_size / rate
    overhead = _SUBPROCESS_S if isolated else 0.5
    warm = max(3 if cfg.compile else 1, cfg.warmup)
    for p in passes:
        f = fwd * tokens_factor.get(p.row, 1.0)
        if p.task == "train-time":
            p.cost = overhead + (warm + cfg.iters) * 3 * f
        elif p.task == "infer-time":
            p.cost = overhead + (warm + cfg.iters) * f
        elif p.task == "train-memory":
            p.cost = overhead + (warm + 1) * 3 * f * 1.4 + f
        elif p.task == "infer-memory":
            p.cost = overhead + (warm + 1) * f * 1.4
        else:
            p.cost = overhead + 2 * f
    return sum(p.cost for p in passes)


class Progress:
    """Reports each pass: a bar on a TTY, a line per pass otherwise; silent when disabled."""

    def __init__(self, passes: list[Pass], enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.n = len(passes)
        self.total_cost = sum(p.cost for p in passes) or 1.0
        self.done_cost = 0.0
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=self.n, desc="bench", unit="pass", file=self.stream,
                            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {postfix}",
                            dynamic_ncols=True)

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def remaining(self) -> Optional[float]:
        if not self.done_cost:
            return None
        elapsed = time.perf_counter() - self.t0
        return elapsed / self.done_cost * (self.total_cost - self.done_cost)

    def _eta(self) -> str:
        left = self.remaining()
        return f"~{fmt_seconds(left)} left" if left is not None else "estimating"

    def start(self, p: Pass) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{p.label()}; {fmt_seconds(time.perf_counter() - self.t0)} "
                                     f"elapsed, {self._eta()}")

    def finish(self, p: Pass, seconds: float) -> None:
        self.done += 1
        self.done_cost += p.cost
        if not self.enabled:
            return
        elapsed = fmt_seconds(time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{p.label()} {seconds:.1f}s; {elapsed} elapsed, "
                                     f"{self._eta()}")
        else:
            print(f"bench [{self.done}/{self.n}] {p.label()}: {seconds:.1f}s "
                  f"({elapsed} elapsed, {self._eta()})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
