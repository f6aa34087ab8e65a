"""The main job end to end (short schedule): train -> fuse -> verify -> ONNX -> onnxruntime."""
import json
import os

from ssf_deploy.tools import main


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
    ort = [c for c in report["checks"] if c["candidate"] == "fused (onnxruntime)"]
    assert len(ort) == 1 and ort[0]["passed"]
    top1 = report["val_top1"]
    assert top1["unfused_pytorch"] == top1["fused_onnxruntime"]
    for name in ("base.safetensors", "ssf.pt", "model.onnx", "task.safetensors",
                 "fused.safetensors"):
        assert os.path.isfile(work / name), name


def test_main_job_bad_kwargs(tmp_path, capsys):
    assert main(["run", "--workdir", str(tmp_path), "--model-kwargs", "{nope"]) == 2
    assert "not JSON" in capsys.readouterr().err
