"""Each measurement in a fresh subprocess: one row's garbage never counts towards another's.

Timing processes run with the allocator as users have it; memory processes get
``MALLOC_MMAP_THRESHOLD_`` (and :func:`.meters.mmap_big_blocks`), which makes peak RSS follow
live tensors but slows training by a third or more — the two are never mixed. The child imports
the same ``ssf_deploy`` as this process (its folder goes first on ``PYTHONPATH``), whatever is
installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

from ..errors import SSFDeployError
from .rows import BenchConfig

__all__ = ["run_isolated", "child_env", "worker_main", "MEMORY_ENV"]

RESULT_TAG = "SSF_BENCH_RESULT "
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(memory: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MEMORY_ENV}
    if memory:
        env.update(MEMORY_ENV)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *[p for p in path if p != _PACKAGE_ROOT]])
    return env


def run_isolated(cfg: BenchConfig, row: str, task: str,
                 fused_weights: Optional[str] = None) -> dict:
    """:func:`.measure.measure_task` in a fresh interpreter; its result, or a one-line error."""
    payload = json.dumps({"config": cfg.as_dict(), "row": row, "task": task,
                          "fused_weights": fused_weights})
    proc = subprocess.run([sys.executable, "-m", "ssf_deploy.bench", payload],
                          env=child_env(task.endswith("memory")), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SSFDeployError(f"bench {task} worker for '{row}' failed "
                             f"(exit {proc.returncode}): {tail}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    if "error" in res:
        raise type_of(res.get("error_type"))(res["error"])
    return res


def type_of(name: Optional[str]) -> type:
    from .. import errors
    cls = getattr(errors, name or "", None)
    return cls if isinstance(cls, type) and issubclass(cls, SSFDeployError) else SSFDeployError


def worker_main(argv: list[str]) -> int:
    """``python -m ssf_deploy.bench PAYLOAD``: one task, result on stdout after a tag."""
    args = json.loads(argv[0])
    try:
        if args["task"].endswith("memory"):   # before the heavy imports allocate anything
            from .meters import mmap_big_blocks
            mmap_big_blocks()
        from .measure import measure_task
        res = measure_task(BenchConfig(**args["config"]), args["row"], args["task"],
                           args.get("fused_weights"))
    except SSFDeployError as e:
        res = {"error": str(e), "error_type": type(e).__name__}
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0
