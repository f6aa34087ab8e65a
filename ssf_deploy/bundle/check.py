"""The bundle's exactness gate: every task, in mixed batches, against what it must reproduce.

Each task's golden probe images run through the bundle shuffled among the samples of the other
tasks, and that task's columns must match (a) the outputs recorded when the task was trained and
(b) the task's own fused model (the real fuser, one trace for all tasks), within ``fuse``'s
tolerances. Then the same batches run again with the *neighbours'* tasks changed: a sample's
output must not move. The columns past a task's classes must hold zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..formats.provenance import checked_probe_inputs
from ..verify import VerifyReport, compare

__all__ = ["TaskCheck", "GateReport", "run_gate", "probe_of", "recorded_tasks"]


@dataclass
class TaskCheck:
    name: str
    index: int
    num_classes: int
    recorded: Optional[VerifyReport] = None     # vs the outputs recorded at training
    fused: Optional[VerifyReport] = None        # vs the task's own fused model
    padding_nonzero: int = 0

    @property
    def passed(self) -> bool:
        return all(r is None or r.passed for r in (self.recorded, self.fused)) and \
            self.recorded is not None and not self.padding_nonzero

    def as_dict(self) -> dict:
        def err(r):
            return None if r is None else {"passed": r.passed, "error": r.error or None,
                                           **({"max_abs": r.outputs[0].max_abs,
                                               "max_rel": r.outputs[0].max_rel,
                                               "top1_agreement": r.outputs[0].top1_agree}
                                              if r.outputs else {})}
        return {"name": self.name, "index": self.index, "num_classes": self.num_classes,
                "vs_recorded": err(self.recorded), "vs_fused": err(self.fused),
                "padding_nonzero": self.padding_nonzero, "passed": self.passed}

    def line(self) -> str:
        def part(label, r):
            if r is None:
                return f"{label} -"
            if not r.outputs:
                return f"{label} FAIL ({r.error})"
            o = r.outputs[0]
            return f"{label} {o.max_abs:.2e}{'' if r.passed else ' FAIL'}"
        pad = f", padding {self.padding_nonzero} non-zero FAIL" if self.padding_nonzero else ""
        return (f"  [{self.index}] {self.name} ({self.num_classes} classes): "
                f"{part('recorded', self.recorded)}, {part('fused', self.fused)}{pad}")


@dataclass
class GateReport:
    tasks: list = field(default_factory=list)          # TaskCheck
    samples: int = 0
    batch_size: int = 0
    neighbour_samples: int = 0
    neighbour_max_abs: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    fused_checked: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.tasks) and all(t.passed for t in self.tasks) and \
            self.neighbour_max_abs <= self.atol

    def worst(self, which: str) -> float:
        vals = [getattr(t, which).outputs[0].max_abs for t in self.tasks
                if getattr(t, which) is not None and getattr(t, which).outputs]
        return max(vals) if vals else float("nan")

    def as_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "batch_size": self.batch_size,
                "atol": self.atol, "rtol": self.rtol,
                "max_abs_vs_recorded": self.worst("recorded"),
                "max_abs_vs_fused": self.worst("fused"), "fused_checked": self.fused_checked,
                "neighbours": {"samples": self.neighbour_samples,
                               "max_abs_change": self.neighbour_max_abs},
                "seconds": round(self.seconds, 3), "tasks": [t.as_dict() for t in self.tasks]}

    def __str__(self) -> str:
        bad = [t for t in self.tasks if not t.passed]
        head = (f"exactness gate: {len(self.tasks)} task(s), {self.samples} probe samples in "
                f"mixed batches of {self.batch_size} (atol={self.atol:g}, rtol={self.rtol:g}): "
                f"{'PASS' if self.passed else 'FAIL'}")
        fused = (f"vs own fused model {self.worst('fused'):.2e} ({self.fused_checked} task(s) "
                 f"fused)" if self.fused_checked else "own fused models not compared")
        lines = [head,
                 f"  worst max abs error: vs recorded {self.worst('recorded'):.2e}, {fused}",
                 f"  neighbours' tasks changed under {self.neighbour_samples} sample(s): "
                 f"largest change {self.neighbour_max_abs:.2e}"
                 f"{'' if self.neighbour_max_abs <= self.atol else ' FAIL'}"]
        shown = bad[:10] if bad else self.tasks[:5]
        lines += [t.line() for t in shown]
        rest = (len(bad) if bad else len(self.tasks)) - len(shown)
        if rest > 0:
            lines.append(f"  ... {rest} more {'failing ' if bad else ''}task(s)")
        return "\n".join(lines)


def run_gate(run: Callable, tasks: list, *, atol: float, rtol: float, batch_size: int = 32,
             seed: int = 0, neighbour_limit: int = 256) -> GateReport:
    """``run(images [B,C,H,W] float32, task [B] int64) -> logits ndarray [B, Cmax]``;
    ``tasks``: dicts with ``name, index, num_classes, inputs`` (probe images ``[P,C,H,W]``),
    ``recorded`` (``[P, classes]``) and optionally ``fused`` (``[P, classes]``)."""
    import time
    t0 = time.perf_counter()
    report = GateReport(batch_size=int(batch_size), atol=atol, rtol=rtol)
    samples = [(k, i) for k, t in enumerate(tasks) for i in range(int(t["inputs"].shape[0]))]
    order = np.random.default_rng(seed).permutation(len(samples))
    report.samples = len(samples)

    def run_all(assign: list) -> list:
        out = [None] * len(assign)
        for s in range(0, len(assign), batch_size):
            chunk = assign[s:s + batch_size]
            images = torch.stack([tasks[img_of]["inputs"][i] for (img_of, i, _) in chunk])
            task = torch.tensor([tasks[k]["index"] for (_, _, k) in chunk], dtype=torch.int64)
            logits = np.asarray(run(images.float(), task))
            for j in range(len(chunk)):
                out[s + j] = logits[j]
        return out

    # run 1: every task's probe samples, shuffled among the other tasks' samples
    first = [(samples[o][0], samples[o][1], samples[o][0]) for o in order]
    got = run_all(first)
    per_task: dict = {}
    for (k, i, _), row in zip(first, got):
        per_task.setdefault(k, {})[i] = row
    for k, t in enumerate(tasks):
        rows = np.stack([per_task[k][i] for i in range(int(t["inputs"].shape[0]))])
        c = int(t["num_classes"])
        chk = TaskCheck(t["name"], int(t["index"]), c)
        chk.recorded = compare([t["recorded"]], [rows[:, :c]], atol=atol, rtol=rtol,
                               names=["logits"], ref_name="recorded at training (golden probe)",
                               cand_name=f"bundle, task '{t['name']}'")
        if t.get("fused") is not None:
            chk.fused = compare([t["fused"]], [rows[:, :c]], atol=atol, rtol=rtol,
                                names=["logits"], ref_name="the task's own fused model",
                                cand_name=f"bundle, task '{t['name']}'")
            report.fused_checked += 1
        chk.padding_nonzero = int(np.count_nonzero(rows[:, c:]))
        report.tasks.append(chk)

    # runs 2 and 3: the same positions, the neighbours' tasks changed (odd, then even positions);
    # the samples that kept their task must not change
    if len(tasks) > 1:
        n = min(len(first), max(2, int(neighbour_limit)))
        base = first[:n]
        worst = 0.0
        for parity in (1, 0):
            moved = [(img, i, (k + 1) % len(tasks)) if p % 2 == parity else (img, i, k)
                     for p, (img, i, k) in enumerate(base)]
            again = run_all(moved)
            for p in range(n):
                if p % 2 != parity:
                    d = np.abs(again[p].astype(np.float64) - got[p].astype(np.float64))
                    worst = max(worst, float(d.max()) if np.isfinite(d).all() else np.inf)
        report.neighbour_samples = n
        report.neighbour_max_abs = worst
    report.seconds = time.perf_counter() - t0
    return report


def probe_of(task_probe: dict) -> tuple[torch.Tensor, np.ndarray]:
    x = checked_probe_inputs(task_probe)
    logits = task_probe["logits"]
    logits = logits.float().numpy() if isinstance(logits, torch.Tensor) else \
        np.asarray(logits, dtype=np.float32)
    return x, logits


def recorded_tasks(meta: dict, names: Iterable[str]) -> list[dict]:
    """Gate entries for tasks already in a bundle: their recorded outputs, from its metadata."""
    by = {t["name"]: t for t in meta["tasks"]}
    out = []
    for n in names:
        t = by[n]
        probe = dict(t["probe"])
        probe["logits"] = torch.tensor(probe["logits"], dtype=torch.float32)
        x, logits = probe_of(probe)
        out.append({"name": n, "index": int(t["index"]), "num_classes": int(t["num_classes"]),
                    "inputs": x, "recorded": logits, "fused": None})
    return out
