"""Transfer study (benchmarks/transfer/run.py) in --quick mode: the whole pipeline -- offline data,
pre-training to safetensors, fine-tuning from it, fused-ONNX check, JSON/Markdown/plot -- on tiny
settings. The real study's numbers are in benchmarks/transfer/results/."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "transfer", "run.py")

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


def _load():
    spec = importlib.util.spec_from_file_location("transfer_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    n = torch.get_num_threads()
    try:
        out = tmp_path_factory.mktemp("transfer")
        mod = _load()
        res = mod.main(["--out", str(out), "--quick", "--backbones", "vit",
                        "--methods", "linear,adapter,ssf", "--jobs", "1"])
    finally:
        torch.set_num_threads(n)
    return mod, out, res


def test_outputs_and_schema(study):
    mod, out, res = study
    for name in ("results.json", "results.md", "accuracy_vs_params.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.json") as f:
        data = json.load(f)
    assert data == json.loads(json.dumps(res))
    assert data["meta"]["schema"] == mod.SCHEMA and data["meta"]["quick"] is True
    assert set(data) >= {"meta", "methods", "pretrain", "summary", "ordering", "runs",
                         "fused_onnx_all_equal"}
    assert data["methods"] == ["linear", "adapter", "ssf"]
    assert data["meta"]["downstream"]["train_images"] == 200     # 20 per class in --quick
    assert data["meta"]["downstream"]["val_images"] == 1797 - 200
    p = data["pretrain"]["vit"]
    assert p["arch"] == "test_vit" and p["backbone_tensors_loaded"] > 0
    assert 0 <= p["upstream_top1"] <= 100
    assert len(data["runs"]) == 3
    for r in data["runs"]:
        assert {"backbone", "method", "seed", "lr", "top1", "top1_per_epoch",
                "trainable_params", "total_params", "seconds"} <= set(r)
        assert 0 <= r["top1"] <= 100 and r["top1"] == r["top1_per_epoch"][-1]
        assert 0 < r["trainable_params"] < r["total_params"]
    s = data["summary"]["vit"]
    # trainable parameters follow the paper's order: linear < ssf, and all below the full model
    assert s["linear"]["trainable_params"] < s["ssf"]["trainable_params"] < s["ssf"]["total_params"]
    for m in ("linear", "adapter", "ssf"):
        v = s[m]
        assert v["applicable"] and v["seeds"] == [0] and v["top1_std"] == 0.0
        assert v["top1_mean"] == pytest.approx(v["top1"][0])
    assert data["ordering"]["vit"]["ranking_by_mean"]
    md = (out / "results.md").read_text()
    assert "| SSF |" in md and "Fused ONNX" in md and "## INT8" in md


def test_int8_column(study):
    """Every run's deployable model is quantized and scored on all test digits."""
    _, _, res = study
    for r in res["runs"]:
        q = r["int8"]
        assert q["images"] == res["meta"]["downstream"]["val_images"]
        assert q["graph"] == ("fused" if r["method"] == "ssf" else "as trained")
        # the exported fp32 model under onnxruntime scores what train() measured in PyTorch
        assert q["top1_fp32_onnx"] == pytest.approx(r["top1"])
        assert q["top1_drop"] == pytest.approx(q["top1_fp32_onnx"] - q["top1_int8"])
        assert 0 <= q["agreement"] <= 100 and q["int8_nodes"] > q["onnx_nodes"]
    for m in ("linear", "adapter", "ssf"):
        assert "top1_drop_mean" in res["summary"]["vit"][m]["int8"]


def test_fused_onnx_matches_unfused(study):
    _, _, res = study
    checks = [r for r in res["runs"] if "fused_onnx" in r]
    assert [r["method"] for r in checks] == ["ssf"]
    f = checks[0]["fused_onnx"]
    assert f["images"] == res["meta"]["downstream"]["val_images"]
    # the rebuilt checkpoint reproduces what train() measured, and fusing changes nothing
    assert f["top1_unfused"] == pytest.approx(checks[0]["top1"])
    assert f["top1_fused_onnx"] == f["top1_unfused"] and f["deploy_passed"]
    assert f["deploy_anchor"]["base_status"] == "verified"   # the pre-trained file, hash-checked
    assert f["equal_top1"] and f["same_predictions"] and res["fused_onnx_all_equal"]
    assert f["max_abs_logit_diff_onnx"] < 1e-3 and f["max_abs_logit_diff_fused_torch"] < 1e-4
    assert f["fused_graph_is_base"] and f["folded_sites"] > 0


def test_not_applicable_on_convnext():
    mod = _load()
    summary = mod.summarize([], ["convnext"], ["adapter", "ssf"])
    assert summary["convnext"]["adapter"] == {
        "applicable": False, "reason": "needs transformer blocks / a token sequence"}
