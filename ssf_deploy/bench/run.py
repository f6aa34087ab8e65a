"""One benchmark run: every pass of every row, in an order that keeps the ratios honest.

1. ``ssf-fused`` weights are folded once, here, and saved; its passes load them into a fresh
   base model, as ``base`` is built (the measuring process never traced or fused anything).
2. Timing passes, the rows interleaved (``--repeat K``: K rounds, A B C A B C ...), each pass in
   a fresh process with the normal allocator (CPU), or in this process (CUDA, ``--no-isolate``).
3. Memory passes, one per row and kind, under the accounting memory needs.

Medians over rounds are reported; the load average before and after, other processes' CPU use
during timing and every row's spread are recorded and turned into warnings.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from typing import Optional

import torch

from ..errors import SSFDeployError, UsageError
from .isolate import run_isolated
from .measure import measure_task
from .meters import mmap_big_blocks
from .noise import CpuMeter, busy_threshold, cores, loadavg, noise_warnings, others_now, spread
from .progress import LONG_RUN_S, Pass, Progress, estimate_costs, fmt_seconds
from .rows import SAME_AS_BASE, TRAIN_ROWS, BenchConfig, fuse_to_file, image_size, warmup_steps
from .table2 import table2

__all__ = ["run_bench", "plan", "SCHEMA_KEYS"]

SCHEMA_KEYS = ("method", "trainable_params", "inference_params", "inference_flops",
               "train_step_ms", "train_peak_mem_mb", "infer_ms", "infer_peak_mem_mb")


def _infers(row: str) -> bool:
    return row not in SAME_AS_BASE


def plan(rows: list[str], repeat: int = 1) -> list[Pass]:
    """Every pass of a run, in order (see the module docstring)."""
    passes = [Pass("ssf-fused", "fuse")] if "ssf-fused" in rows else []
    for k in range(repeat):
        for row in rows:
            if row in TRAIN_ROWS:
                passes.append(Pass(row, "train-time", k))
            if _infers(row):
                passes.append(Pass(row, "infer-time", k))
    for row in rows:
        if row in TRAIN_ROWS:
            passes.append(Pass(row, "train-memory"))
        if _infers(row) or row not in TRAIN_ROWS:
            passes.append(Pass(row, "infer-memory"))
    return passes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({cores()} cores)"


def _merge(row: dict, res: dict, p: Pass) -> None:
    for key in ("train_step_ms_all", "infer_ms_all"):
        if key in res:
            row.setdefault("_" + key, []).append(res.pop(key))   # one list per round
    if p.task.endswith("time") and "others_cpu" in res:
        row.setdefault("others_cpu", []).append(res.pop("others_cpu"))
    row.update(res)


def _finish_times(r: dict) -> None:
    for prefix in ("train_step_ms", "infer_ms"):
        rounds = r.pop("_" + prefix + "_all", None)
        if not rounds:
            r.setdefault(prefix, None)
            continue
        flat = [v for rnd in rounds for v in rnd]
        r[prefix] = statistics.median([statistics.median(rnd) for rnd in rounds])
        r[prefix + "_all"] = flat
        if len(rounds) > 1:
            r[prefix + "_rounds"] = [statistics.median(rnd) for rnd in rounds]
        r[("train_step" if prefix == "train_step_ms" else "infer") + "_spread"] = spread(flat)


# ViTs from large to small: what a long CPU run suggests instead
SMALLER_VITS = ("vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224")


def shorter_run_hint(arch: str) -> str:
    """What to change for a quicker CPU run (a smaller ViT only where there is one)."""
    smaller = SMALLER_VITS[SMALLER_VITS.index(arch) + 1:] if arch in SMALLER_VITS else ()
    model = (f"a smaller model (--model {' or '.join(smaller)}), " if smaller else
             "" if arch in SMALLER_VITS else "a smaller model, ")
    return (f"note: that is long for a CPU. For a quicker run pick {model}a smaller --batch-size "
            f"(e.g. 4), fewer --iters (e.g. 2), or fewer rows (--method M)")


def run_bench(cfg: BenchConfig, rows: list[str], *, isolate: Optional[bool] = None,
              progress: bool = True, repeat: int = 1, stream=None) -> dict:
    """Measure ``rows``; on CPU every pass runs in a fresh subprocess unless ``isolate=False``."""
    device = torch.device(cfg.device)
    if repeat < 1:
        raise UsageError(f"repeat must be >= 1, got {repeat}")
    if isolate is None:
        isolate = device.type == "cpu"
    t_start = time.perf_counter()
    load0, now0 = loadavg(), others_now()
    passes = plan(rows, repeat)
    estimate = estimate_costs(cfg, passes, isolate) if progress else None
    prog = Progress(passes, enabled=progress, stream=stream)
    prog.note(f"bench: {cfg.arch} on {cfg.device}, {len(rows)} rows in {len(passes)} passes"
              f"{f', roughly {fmt_seconds(estimate)} here' if estimate else ''}; "
              f"load average {load0[0]:.2f}, other processes using "
              f"{'?' if now0 is None else format(now0, '.2f')} of {cores()} cores now")
    if estimate and estimate > LONG_RUN_S:
        prog.note(shorter_run_hint(cfg.arch))
    if (now0 if now0 is not None else load0[0]) > busy_threshold():
        prog.note(f"warning: the machine is busy (other processes use "
                  f"{'?' if now0 is None else format(now0, '.2f')} cores, load average "
                  f"{load0[0]:.2f}; more than half of {cores()} cores): timings will not be "
                  f"trustworthy")
    results: dict[str, dict] = {row: {"method": row} for row in rows}
    others: list[float] = []
    memory_mode = False
    with tempfile.TemporaryDirectory(prefix="ssf-bench-") as tmp:
        fused_weights = None
        try:
            for p in passes:
                prog.start(p)
                t0 = time.perf_counter()
                if p.task == "fuse":
                    fused_weights = os.path.join(tmp, "ssf-fused.safetensors")
                    fuse_to_file(cfg, fused_weights)
                else:
                    if p.task.endswith("memory") and not isolate and device.type == "cpu" \
                            and not memory_mode:
                        mmap_big_blocks()   # timings are all done: from here on memory only
                        memory_mode = True
                    meter = CpuMeter().start() if p.task.endswith("time") else None
                    try:
                        res = (run_isolated(cfg, p.row, p.task, fused_weights) if isolate
                               else measure_task(cfg, p.row, p.task, fused_weights))
                    except UsageError:
                        raise
                    except SSFDeployError as e:
                        if cfg.backend == "torch" or not p.task.startswith("infer"):
                            raise
                        res = {"infer_error": str(e)}
                    if meter is not None:
                        used = meter.stop()
                        if used is not None:
                            others.append(used)
                            res["others_cpu"] = used
                    _merge(results[p.row], res, p)
                prog.finish(p, time.perf_counter() - t0)
        finally:
            prog.close()
    for r in results.values():
        _finish_times(r)
    if "base" in results:
        for row in rows:
            if row in SAME_AS_BASE:
                for k in ("infer_ms", "infer_ms_all", "infer_spread", "infer_peak_mem_mb",
                          "infer_error", "infer_runtime"):
                    if k in results["base"]:
                        results[row][k] = results["base"][k]
                results[row]["infer_same_as"] = "base"
    for r in results.values():
        for k in SCHEMA_KEYS:
            r.setdefault(k, None)
    report = {
        "model": cfg.arch, "device": cfg.device, "device_name": _device_name(device),
        "batch_size": cfg.batch_size, "image_size": image_size(cfg),
        "num_classes": cfg.num_classes, "amp": cfg.amp, "backend": cfg.backend,
        "compile": cfg.compile, "warmup": warmup_steps(cfg), "iters": cfg.iters,
        "repeat": repeat, "threads": torch.get_num_threads(), "cores": cores(),
        "isolated": bool(isolate), "torch": torch.__version__,
        "loadavg_start": load0, "loadavg_end": loadavg(), "busy_threshold": busy_threshold(),
        "others_cpu_start": now0, "others_cpu_end": others_now(),
        "others_cpu_max": max(others) if others else None,
        "timing": "normal allocator; " + ("a fresh subprocess per pass" if isolate
                                          else "in this process, rows rebuilt per pass"),
        "memory": ("CUDA max_memory_allocated" if device.type == "cuda" else
                   "VmHWM minus the RSS before the model, glibc mmap threshold 64 KiB; "
                   + ("a fresh subprocess per pass" if isolate else
                      "in this process after all timings (--no-isolate: the allocator keeps "
                      "freed memory, so CPU peaks are rough)")),
        "flops_note": "per image; FlopCounterMode (multiply-add = 2) + CPU attention + "
                      "elementwise mul/add/sub (1 per element) and addcmul (2)",
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": [results[r] for r in rows],
    }
    report["table2"] = table2(cfg, results)
    report["warnings"] = noise_warnings(report)
    for w in report["warnings"]:
        prog.note(f"warning: {w}")
    return report
