"""An engine on disk: the plan and its ``.plan.json`` sidecar (precision, the ONNX it was built
from and that ONNX's sha256), written as one output set."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import CheckpointError, UsageError
from ..fileio import OutputSet, check_manifest, sha256_of

__all__ = ["PLAN_SUFFIXES", "SIDECAR_FORMAT", "sidecar_path", "read_sidecar", "build_sidecar",
           "write_plan", "read_plan", "resolve_onnx_for_plan"]

PLAN_SUFFIXES = (".plan", ".engine", ".trt")
SIDECAR_FORMAT = "ssf-deploy/engine/1"


def sidecar_path(plan: str) -> str:
    return os.fspath(plan) + ".json"


def read_sidecar(plan: str) -> dict:
    path = sidecar_path(plan)
    if not os.path.isfile(path):
        return {}
    check_manifest(path)     # a sidecar of another build next to this engine is refused
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt engine sidecar {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def read_plan(plan: str) -> bytes:
    if not os.path.isfile(plan):
        raise UsageError(f"engine file not found: {plan}")
    check_manifest(plan)
    with open(plan, "rb") as f:
        return f.read()


def build_sidecar(onnx_path: str, plan: str, info: dict) -> dict:
    folder = os.path.dirname(os.path.abspath(plan))
    try:
        rel = os.path.relpath(os.path.abspath(onnx_path), folder)
    except ValueError:   # another drive (Windows)
        rel = os.path.abspath(onnx_path)
    return {"format": SIDECAR_FORMAT, "onnx": rel, "onnx_abs": os.path.abspath(onnx_path),
            "onnx_sha256": sha256_of(onnx_path), **info}


def write_plan(plan: str, data: bytes, sidecar: dict, *, caches: Optional[dict] = None) -> None:
    """Engine and its sidecar JSON as one set (neither exists if one fails; a manifest of both
    is written last, see :class:`~ssf_deploy.fileio.OutputSet`); ``caches`` (path -> bytes:
    the timing and calibration caches, shared between builds) are written with them, unlisted."""
    with OutputSet() as outs:
        with open(outs.add(plan), "wb") as f:
            f.write(data)
        with open(outs.add(sidecar_path(plan)), "w") as f:
            json.dump(sidecar, f, indent=2, default=str)
        for path, blob in (caches or {}).items():
            with open(outs.add(path, record=False), "wb") as f:
                f.write(blob)


def resolve_onnx_for_plan(plan: str, onnx_path: Optional[str] = None) -> str:
    """The ONNX an engine was built from: ``onnx_path``, else the sidecar's, else
    ``<stem>.onnx``.

    The engine holds no graph names for derived weights, so refit needs that ONNX; a sidecar's
    sha256 guards against refitting with an ONNX that changed since the build.
    """
    side = read_sidecar(plan)
    if onnx_path is None:
        cands = []
        if side.get("onnx"):
            rec = side["onnx"]
            cands += [rec if os.path.isabs(rec) else
                      os.path.join(os.path.dirname(os.path.abspath(plan)), rec)]
            if side.get("onnx_abs"):
                cands.append(side["onnx_abs"])
        cands.append(os.path.splitext(plan)[0] + ".onnx")
        onnx_path = next((c for c in cands if os.path.isfile(c)), cands[0])
    if not os.path.isfile(onnx_path):
        raise UsageError(f"refit needs the ONNX the engine was built from: {onnx_path} not "
                         f"found (give `onnx`)")
    want = side.get("onnx_sha256")
    if want and sha256_of(onnx_path) != want:
        raise UsageError(f"{onnx_path} is not the ONNX {plan} was built from (sha256 differs "
                         f"from {sidecar_path(plan)}): give `onnx` with the original file")
    return onnx_path
