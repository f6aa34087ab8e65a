"""The main job end to end (short schedule): train -> fuse -> verify -> ONNX -> onnxruntime."""
import json
import os

import pytest

from ssf_deploy.tools import main


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSF_DEPLOY_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "run"
    rc = main(["run", "--workdir", str(work), "--pretrain-epochs", "1", "--epochs", "1",
               "--no-bench", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out[out.index("{"):])
    assert report["passed"] and report["fuse"]["keys_match_base"]
    assert report["onnx"]["same_graph_as_base"]
    ort = {c["reference"]: c["passed"] for c in report["checks"]
           if c["candidate"] == "fused (onnxruntime)"}
    # against the rebuilt unfused model AND against the outputs recorded at training
    assert ort == {"unfused (PyTorch)": True, "recorded at training (golden probe)": True}, ort
    top1 = report["val_top1"]
    assert top1["unfused_pytorch"] == top1["fused_onnxruntime"]
    # int8 next to fp32: the quantizer's own fp32 evaluation (timm eval transform from the ONNX
    # metadata, onnxruntime) reproduces the main job's fp32 ONNX top-1 on the same val images
    q = report["int8"]
    assert q["passed"] and q["written"] == str(work / "model.int8.onnx")
    assert q["val"]["top1_fp32"] == top1["fused_onnxruntime"]
    assert 0 <= q["val"]["top1_int8"] <= 100 and 0 <= q["agreement"] <= 100
    assert q["calibration"]["source"].endswith("train") and q["latency"]["batch"] == 1
    # many tasks, one backbone: the second task and the two-task bundle, each task scoring
    # through the bundle what it scores alone; the gate ran every task in mixed batches
    b = report["bundle"]
    assert b["passed"] and [t["name"] for t in b["tasks"]] == ["textures", "shapes"]
    assert b["gate"]["passed"] and b["gate"]["fused_checked"] == 2
    for name, top in b["val_top1"].items():
        assert top["bundle"] == top["own_model"], name
    assert b["val_top1"]["textures"]["own_model"] == top1["unfused_pytorch"]
    for name in ("base.safetensors", "ssf.pt", "model.onnx", "task.safetensors",
                 "fused.safetensors", "model.int8.onnx", "ssf-shapes.pt", "tasks.onnx",
                 "tasks.onnx.backbone"):
        assert os.path.isfile(work / name), name


def test_main_job_bad_kwargs(tmp_path, capsys):
    assert main(["run", "--workdir", str(tmp_path), "--model-kwargs", "{nope"]) == 2
    assert "not JSON" in capsys.readouterr().err
