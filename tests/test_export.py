"""ONNX: zero extra nodes vs the base export, checker, onnxruntime; the fuse/verify/export CLI."""
import json
import os
import pickle

import onnx
import pytest
import torch

import ssf_deploy as sd
from ssf_deploy.formats.checkpoint import FORMAT, save_checkpoint
from ssf_deploy.export import OrtRunner, export_onnx, graph_stats, export_proto
from ssf_deploy.fuse import fuse
from ssf_deploy.tools import main
from ssf_deploy.tuners import trainable_state_dict
from ssf_deploy.verify import verify

from conftest import make_model
from test_fuse import pretrained_like


@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "resnet", "efficientnet", "mixer"])
def test_fused_onnx_has_exactly_the_base_graph(family, tmp_path):
    base = pretrained_like(make_model(family))
    model = pretrained_like(make_model(family))
    sd.apply_method(model, "ssf", init_std=0.3)
    model.eval()
    fused = fuse(model)
    x = torch.randn(1, 3, 32, 32)
    info = export_onnx(fused, str(tmp_path / "fused.onnx"), example=x)
    base_info = graph_stats(export_proto(base.eval(), example=x))
    assert info["nodes"] == base_info["nodes"]
    assert info["ops"] == base_info["ops"]
    assert info["parameters"] == base_info["parameters"]
    proto = onnx.load(str(tmp_path / "fused.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    r = verify(model, OrtRunner(str(tmp_path / "fused.onnx")), [torch.randn(1, 3, 32, 32)
                                                                 for _ in range(3)])
    assert r.passed, str(r)


def test_dynamic_batch_export(tmp_path):
    model = pretrained_like(make_model("convnext")).eval()
    export_onnx(model, str(tmp_path / "m.onnx"), example=torch.randn(1, 3, 32, 32),
                dynamic_batch=True)
    r = verify(model, OrtRunner(str(tmp_path / "m.onnx")), torch.randn(5, 3, 32, 32))
    assert r.passed and r.outputs[0].shape == (5, 5)


def test_verify_report_detects_mismatch_and_reads_well():
    a = make_model("vit").eval()
    b = pretrained_like(make_model("vit")).eval()
    r = verify(a, b, torch.randn(2, 3, 32, 32), atol=1e-6, rtol=1e-6)
    assert not r.passed
    assert "MISMATCH" in str(r) and "FAIL" in str(r)
    d = r.as_dict()
    assert d["passed"] is False and d["outputs"][0]["max_abs_error"] > 0
    same = verify(a, a, torch.randn(2, 3, 32, 32))
    assert same.passed and same.outputs[0].max_abs == 0.0


# ---------------------------------------------------------------------------- CLI

def _checkpoint(tmp_path, family="vit"):
    """An ssf-deploy checkpoint of a trained-looking tiny model, plus its base weights file."""
    from safetensors.torch import save_file
    model = sd.create_base_model("test_vit", 5, img_size=32, patch_size=8)
    pretrained_like(model)
    base = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    sd.apply_method(model, "ssf", init_std=0.3)
    ckpt = str(tmp_path / "ckpt.pt")
    sd.save_task(model, ckpt)
    return ckpt, base


def test_fuse_cli_end_to_end_with_pack(tmp_path, capsys):
    ckpt, base = _checkpoint(tmp_path)
    out, pack = str(tmp_path / "m.onnx"), str(tmp_path / "task.safetensors")
    rc = main(["fuse", ckpt, "--base-weights", base, "--out", out, "--save-pack", pack,
               "--save-weights", str(tmp_path / "fused.safetensors"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["passed"] and report["onnx"]["same_graph_as_base"]
    ort = {c["reference"]: c["passed"] for c in report["checks"]
           if c["candidate"] == "fused (onnxruntime)"}
    # against the rebuilt unfused model AND against the outputs recorded at training
    assert ort == {"unfused (PyTorch)": True, "recorded at training (golden probe)": True}, ort
    assert os.path.getsize(pack) < os.path.getsize(tmp_path / "fused.safetensors") / 10
    # the pack + shared base weights rebuild the same deployed model
    out2 = str(tmp_path / "m2.onnx")
    assert main(["fuse", "--pack", pack, "--base-weights", base, "--out", out2]) == 0
    a, b = onnx.load(out), onnx.load(out2)
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    # the CI gate passes against the file; without the base it refuses to guess one
    assert main(["verify", ckpt, "--base-weights", base, "--onnx", out]) == 0
    capsys.readouterr()
    assert main(["verify", ckpt, "--onnx", out]) == 2
    assert "pass --base-weights" in capsys.readouterr().err


def test_export_cli_matches_fused_node_count(tmp_path, capsys):
    """`export` (plain base) and `fuse` (folded SSF) give the same graph, node for node."""
    from safetensors.torch import save_file
    model = pretrained_like(sd.create_base_model("test_convnext", 4))
    base = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    sd.apply_method(model, "ssf", init_std=0.3)
    ckpt = str(tmp_path / "c.pt")
    sd.save_task(model, ckpt)
    assert main(["fuse", ckpt, "--base-weights", base, "--out", str(tmp_path / "f.onnx"),
                 "--image-size", "64", "--json"]) == 0
    fused = json.loads(capsys.readouterr().out)["onnx"]["fused"]
    assert main(["export", "--model", "test_convnext", "--num-classes", "4", "--base-weights",
                 base, "--out", str(tmp_path / "b.onnx"), "--image-size", "64", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["nodes"] == fused["nodes"] and plain["ops"] == fused["ops"]


def test_export_cli_failure_writes_nothing(tmp_path, capsys):
    out = tmp_path / "v.onnx"
    assert main(["export", "--model", "test_vit", "--num-classes", "5", "--out", str(out),
                 "--opset", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_cli_plain_model(tmp_path, capsys):
    out = str(tmp_path / "r.onnx")
    assert main(["export", "--model", "test_resnet", "--num-classes", "3", "--out", out,
                 "--image-size", "64", "--dynamic-batch"]) == 0
    assert "nodes" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(out))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ssf_deploy_pwned",))


@pytest.mark.parametrize("kind", ["malicious", "corrupt", "missing", "not_a_checkpoint"])
def test_bad_checkpoints_are_refused_and_nothing_is_written(kind, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    if kind == "malicious":
        if os.path.exists("/tmp/ssf_deploy_pwned"):
            os.unlink("/tmp/ssf_deploy_pwned")
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"x": _Evil()}, "arch": "vit_base_patch16_224"}, f)
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "z.pt")
        path = tmp_path / "z.pt"
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    elif kind == "not_a_checkpoint":
        torch.save([1, 2, 3], path)
    out = tmp_path / "m.onnx"
    rc = main(["fuse", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    if kind == "malicious":
        assert "refusing" in err[0]
        assert not os.path.exists("/tmp/ssf_deploy_pwned")


def test_fuse_refuses_non_ssf_checkpoint(tmp_path, capsys):
    model = sd.create_base_model("test_vit", 5, img_size=32, patch_size=8)
    sd.apply_method(model, "adapter")
    ckpt = str(tmp_path / "a.pt")
    sd.save_task(model, ckpt)
    assert main(["fuse", ckpt, "--out", str(tmp_path / "m.onnx")]) == 2
    assert "only ssf fuses" in capsys.readouterr().err


def test_pack_without_base_weights_is_a_clear_error(tmp_path, capsys):
    ckpt, base = _checkpoint(tmp_path)
    pack = str(tmp_path / "t.safetensors")
    assert main(["fuse", ckpt, "--base-weights", base, "--save-pack", pack]) == 0
    capsys.readouterr()
    assert main(["fuse", "--pack", pack, "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--base-weights" in capsys.readouterr().err


def test_verify_fp16_tolerances(tmp_path, capsys):
    ckpt, base = _checkpoint(tmp_path)
    rc = main(["verify", ckpt, "--base-weights", base, "--fp16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["reports"][0]["atol"] == pytest.approx(2e-2)
    assert rc == (0 if data["passed"] else 1)


def test_failed_check_writes_no_output_at_all(tmp_path, capsys):
    """Zero tolerance cannot pass (float rounding): every requested file must stay absent."""
    ckpt, base = _checkpoint(tmp_path)
    out, pack = tmp_path / "m.onnx", tmp_path / "t.safetensors"
    rc = main(["fuse", ckpt, "--base-weights", base, "--out", str(out), "--save-pack", str(pack),
               "--atol", "0", "--rtol", "0"])
    captured = capsys.readouterr()
    assert rc == 1 and "nothing written" in captured.err   # 1: a check failed
    assert "FAIL" in captured.out
    assert not out.exists() and not pack.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_verify_inputs_from_an_image_folder(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    ckpt, base = _checkpoint(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    assert main(["verify", ckpt, "--base-weights", base, "--inputs", str(imgs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fused = [r for r in report["reports"] if r["candidate"] == "fused (PyTorch)"
             and r["reference"] == "unfused (PyTorch)"]
    assert fused[0]["outputs"][0]["shape"] == [5, 5]
    assert main(["verify", ckpt, "--base-weights", base, "--inputs", str(tmp_path / "none")]) == 2


def test_fp16_range_issues_and_engine_fp16_refuses_them(tmp_path, capsys):
    """A fold may write values fp32 holds and fp16 cannot (issue 19: the official ConvNeXt's
    shift through a tiny layer scale, t / g ~ 1e5). fp16_range_issues finds them in a real
    exported ONNX; ``engine --fp16`` refuses such a model in one line before TensorRT is even
    imported (so this runs without a GPU), an fp32 engine build is not affected by the check."""
    from ssf_deploy.export import FP16_MAX, fp16_range_issues
    model = make_model("vit").eval()
    path = str(tmp_path / "ok.onnx")
    export_onnx(model, path, image_size=32)
    assert fp16_range_issues(onnx.load(path)) == []
    with torch.no_grad():
        model.head.bias[3] = -1.5e5
        model.blocks[0].mlp.fc2.weight[0, 0] = 7e4
    big = str(tmp_path / "big.onnx")
    export_onnx(model, big, image_size=32)
    issues = fp16_range_issues(onnx.load(big))
    assert [round(v) for _, v in issues] == [150000, 70000] and FP16_MAX == 65504
    assert issues[0][0] in ("head.bias",) or "head" in issues[0][0]
    rc = main(["engine", big, "--out", str(tmp_path / "m.plan"), "--fp16"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "65504" in err[0] and "1.5e+05" in err[0] \
        and "(and 1 more)" in err[0], err
    assert not os.path.exists(tmp_path / "m.plan")


@pytest.mark.parametrize("trained", [True, False], ids=["trained-base", "untrained-base"])
def test_base_graph_is_compared_before_onnxsim_and_simplified_only_when_it_differs(
        trained, tmp_path, monkeypatch):
    """Issue 19 (fuse speed): the base export is compared with the exporter's graph of the fused
    model (written next to the output anyway), so it costs one export and no onnxsim; only a
    graph that differs is simplified too (test_official: +1 LayerNormalization after onnxsim).
    The fused ONNX is still simplified, checked and run in onnxruntime as before."""
    import onnxsim
    calls = []
    real = onnxsim.simplify

    def counting(model, *a, **k):
        calls.append(model if isinstance(model, str) else "proto")
        return real(model, *a, **k)
    monkeypatch.setattr(onnxsim, "simplify", counting)
    model = make_model("vit")
    if trained:
        model = pretrained_like(model)
    sd.apply_method(model, "ssf", init_std=0.3)
    out = str(tmp_path / "m.onnx")
    report = sd.deploy(model, [torch.randn(2, 3, 32, 32)], out=out, compare_graph="always")
    o = report.onnx
    assert o["compared"] == "exporter" and o["same_graph_as_base"] and o["extra_nodes"] == 0
    fused, base = o["fused"]["exported"], o["base"]
    # an untrained base repeats initializers (LayerNorm ones, zero biases): the exporter adds an
    # Identity node per repeat, the fused model has none; nothing else differs
    assert (base["ops"].get("Identity", 0) > fused["ops"].get("Identity", 0)) == (not trained)
    assert base["nodes"] - base["ops"].get("Identity", 0) == \
        fused["nodes"] - fused["ops"].get("Identity", 0) > o["fused"]["nodes"]
    assert len(calls) == 1 and calls[0].endswith(".raw.onnx")   # the fused file, file to file
    assert "the exporter's graph (before onnxsim, Identity nodes aside)" in str(report)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    keys = [p.key for p in proto.metadata_props]
    ours = [k for k in keys if k.startswith("ssf_deploy.")]
    assert ours == sorted(ours) and "ssf_deploy.initializers" in ours
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]   # no scratch left
