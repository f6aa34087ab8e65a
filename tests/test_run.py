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
    for name in ("base.safetensors", "ssf.pt", "model.onnx", "task.safetensors",
                 "fused.safetensors"):
        assert os.path.isfile(work / name), name


def test_main_job_bad_kwargs(tmp_path, capsys):
    assert main(["run", "--workdir", str(tmp_path), "--model-kwargs", "{nope"]) == 2
    assert "not JSON" in capsys.readouterr().err
