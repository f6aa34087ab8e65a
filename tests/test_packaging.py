"""Packaging and deployment plumbing: extras, the Docker entrypoint, onnxruntime providers."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extras_bound_tensorrt_and_offer_onnxruntime_gpu():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["tensorrt"] == ["tensorrt>=10.0,<12"]      # what engine.py handles: 10.x, 11.x
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])


def test_docker_entrypoint_keeps_nvidias():
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        lines = f.read().splitlines()
    assert [ln for ln in lines if ln.startswith("ENTRYPOINT")] == \
        ['ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "ssf-deploy"]']
    assert "RUN test -x /opt/nvidia/nvidia_entrypoint.sh" in lines


def test_ort_runner_reports_the_providers_in_use(tmp_path):
    import onnxruntime as ort
    from ssf_deploy.export import OrtRunner, export_onnx
    path = str(tmp_path / "m.onnx")
    export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval(), path,
                example=torch.randn(1, 3, 2, 2))
    r = OrtRunner(path, providers=["CPUExecutionProvider"])
    assert r.providers == ["CPUExecutionProvider"]
    r = OrtRunner(path)          # everything available: what it got, in priority order
    assert r.providers == r.session.get_providers() and r.providers[-1] == "CPUExecutionProvider"
    assert set(r.providers) <= set(ort.get_available_providers())


def test_run_gpu_script_parses_and_names_every_step():
    """benchmarks/run_gpu.sh runs on a GPU machine only; here: valid bash, the four steps."""
    import shutil
    import subprocess
    script = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
    if shutil.which("bash"):
        r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    text = open(script).read()
    for needle in ('-m pytest -q -m "gpu or tensorrt"', "bench --model vit_base_patch16_224 "
                   "--batch-size 32 --device cuda", '--out "$RES/gpu_vit_base_b32.json"',
                   "nvidia-smi", "import tensorrt", "timeout --kill-after"):
        assert needle in text, needle
