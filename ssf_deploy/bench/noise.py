"""Is the machine quiet enough for the timings to mean something?

Three pieces of evidence, all recorded in the report and turned into warnings:

* the load average before the run starts and after it ends (a one-minute average: at the start
  it still holds work that may just have ended, at the end it includes the benchmark itself);
* what other processes use right at the start and at the end (a one-second sample), and the CPU
  time they used during every timing pass: ``/proc/stat`` busy time minus this process's and
  its children's (``getrusage``), in cores;
* the spread of a row's timed steps, ``(max - min) / median``.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Optional

__all__ = ["cores", "loadavg", "CpuMeter", "others_now", "spread", "busy_threshold",
           "SPREAD_WARN", "noise_warnings"]

SPREAD_WARN = 0.20


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def busy_threshold() -> float:
    """Load (in cores) above which the machine counts as busy: half of its cores."""
    return cores() / 2.0


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _proc_stat_busy() -> Optional[float]:
    """Seconds of non-idle CPU time of the whole machine since boot (steal counts as busy)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMeter:
    """Cores' worth of CPU that other processes used between :meth:`start` and :meth:`stop`."""

    def start(self) -> "CpuMeter":
        self._busy, self._own, self._t = _proc_stat_busy(), _own_cpu(), time.perf_counter()
        return self

    def stop(self) -> Optional[float]:
        busy = _proc_stat_busy()
        elapsed = time.perf_counter() - self._t
        if busy is None or self._busy is None or elapsed <= 0:
            return None
        others = (busy - self._busy) - (_own_cpu() - self._own)
        return round(max(0.0, others) / elapsed, 2)


def others_now(seconds: float = 1.0) -> Optional[float]:
    """Cores' worth of CPU other processes use now (sampled over ``seconds`` of sleep)."""
    meter = CpuMeter().start()
    time.sleep(seconds)
    return meter.stop()


def spread(values: list[float]) -> Optional[float]:
    """``(max - min) / median`` of the timed steps; None with fewer than two."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else None


def noise_warnings(report: dict) -> list[str]:
    """Every reason to distrust this report's timings, one line each."""
    out = []
    limit = report["busy_threshold"]
    load0, now0 = report["loadavg_start"][0], report.get("others_cpu_start")
    if now0 is not None and now0 > limit:
        out.append(f"the machine was busy when the run started: other processes used "
                   f"{now0:.2f} cores (> {limit:g}, half of {report['cores']} cores)")
    if load0 > limit:
        quiet = (f" (though other processes used only {now0:.2f} cores right at the start: "
                 f"that load was work that had just ended)" if now0 is not None and now0 <= limit
                 else "")
        out.append(f"load average {load0:.2f} over the minute before the run > {limit:g} (half "
                   f"of {report['cores']} cores){quiet}")
    others = report.get("others_cpu_max")
    if others is not None and others > limit:
        out.append(f"other processes used up to {others:.2f} cores during a timing pass "
                   f"(> {limit:g}); timings are not trustworthy")
    for r in report["results"]:
        for key, label in (("train_step_spread", "train step"), ("infer_spread", "inference")):
            if key == "infer_spread" and r.get("infer_same_as"):
                continue      # base's own numbers, already warned about under base
            s = r.get(key)
            if s is not None and s > SPREAD_WARN:
                out.append(f"{r['method']}: {label} times spread {100 * s:.0f}% "
                           f"(max-min over median; > {100 * SPREAD_WARN:.0f}%)")
    if any("just ended" not in w for w in out):
        repeat = int(report.get("repeat") or 1)
        out.append("rerun on a quiet machine, with --repeat 3 to interleave the rows" if repeat < 3
                   else f"rerun on a quiet machine, or with more --iters / a --repeat above "
                        f"{repeat}")
    return out
