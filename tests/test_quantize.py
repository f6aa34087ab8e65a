"""INT8 (ssf_deploy.quantize / ssf-deploy quantize) on tiny models: recipe, checks, the gate, CLI.

No timing assertions: latency is measured (a few rounds) only to check the report's shape; the
real numbers are in benchmarks/quantize/.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import ssf_deploy as sd
from ssf_deploy.errors import UsageError, VerificationError
from ssf_deploy.export import export_onnx, export_proto
from ssf_deploy.fuse import fuse
from ssf_deploy.quantize import META_QUANT, QuantizeConfig, image_sets, quantize_onnx
from ssf_deploy.tools import main

from conftest import make_model
from test_fuse import pretrained_like

pytest.importorskip("onnxruntime")

CLASSES = ("a", "b", "c")


def _tree(root, per_class=6, size=32, seed=0):
    """A small labelled ImageFolder tree (train/ + val/) of random images."""
    rng = np.random.RandomState(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.randint(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("data"))


def _ssf_model(family, seed=0):
    model = pretrained_like(make_model(family, num_classes=len(CLASSES), seed=seed))
    sd.apply_method(model, "ssf", init_std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory):
    """A fused tiny ViT (timm test_vit, 32 px, patch 8) exported as ssf-deploy does."""
    d = tmp_path_factory.mktemp("vit")
    fused = fuse(_ssf_model("vit"), torch.randn(2, 3, 32, 32))
    path = str(d / "vit.onnx")
    export_onnx(fused, path, example=torch.randn(1, 3, 32, 32), dynamic_batch=True,
                metadata={"arch": "test_vit"})
    return path


def test_quantize_writes_a_checked_qdq_model(vit_onnx, data, tmp_path):
    out = str(tmp_path / "vit.int8.onnx")
    report = quantize_onnx(vit_onnx, out, calib=data, val=data, min_agreement=0,
                           latency_runs=3, latency_warmup=1)
    assert report.passed and report.written == out and os.path.isfile(out)
    q = onnx.load(out)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["ssf_deploy.arch"] == "test_vit"                  # kept from the fp32 model
    recipe = json.loads(meta[META_QUANT])
    assert recipe["format"] == "QDQ" and recipe["per_channel"] is True
    assert (recipe["activation_type"], recipe["weight_type"]) == ("u8", "s8")
    # calibration on train/, checks on the other split: 9 val images, 18 train images
    assert report.calibration == {"source": f"{data}/train", "images": 18}
    assert report.holdout["images"] == 9 and report.val["images"] == 9
    assert report.val["classes"] == 3
    # top-1 of the written model, scored independently: a plain onnxruntime session on the
    # same validation images (the report's split, timm's eval transform) against their labels
    import onnxruntime as ort
    from ssf_deploy.runtime import eval_transform, load_images
    sets = image_sets(QuantizeConfig(calib=data, val=data))
    x = load_images(sets["val"], eval_transform("test_vit", chw=(3, 32, 32))).numpy()
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert report.val["top1_int8"] == pytest.approx(
        100.0 * float((logits.argmax(1) == sets["val_labels"]).mean()))
    assert report.val["top1_drop"] == pytest.approx(report.val["top1_fp32"]
                                                    - report.val["top1_int8"])
    assert report.holdout["max_abs_logit_error"] > 0         # it really is a different model
    assert report.nodes["int8"] > report.nodes["fp32"] and report.nodes["int8_kernels"] > 0
    lat = report.latency
    assert lat["batch"] == 1 and lat["runs"] == 3 and lat["ratio"] == pytest.approx(
        lat["int8_ms"] / lat["fp32_ms"])
    d = report.as_dict()
    assert json.loads(json.dumps(d)) == d and d["passed"] and d["error"] is None
    assert "PASS" in str(report) and "agreement" in str(report)


def test_for_tensorrt_is_what_the_engine_builds(vit_onnx, data, tmp_path):
    """--for tensorrt: signed symmetric Q/DQ with float biases, which the engine's own check
    (written against TensorRT's documented Q/DQ rules) accepts; the onnxruntime default
    (U8 activations, asymmetric) is what it refuses."""
    from ssf_deploy.engine import check_qdq_supported, qdq_info
    from ssf_deploy.errors import SSFDeployError
    out = str(tmp_path / "trt.int8.onnx")
    report = quantize_onnx(vit_onnx, out, calib=data, min_agreement=0, latency_runs=0,
                           target="tensorrt")
    q = onnx.load(out)
    info = qdq_info(q)
    assert info["kind"] == "int8" and info["types"] == ["int8"] and not info["asymmetric"]
    check_qdq_supported(info)
    assert report.recipe["activation_type"] == "s8" and report.recipe["QuantizeBias"] is False
    assert report.recipe["reduce_range"] is False
    default = quantize_onnx(vit_onnx, str(tmp_path / "ort.int8.onnx"), calib=data,
                            min_agreement=0, latency_runs=0)
    with pytest.raises(SSFDeployError, match="signed, symmetric"):
        check_qdq_supported(qdq_info(onnx.load(default.written)))
    with pytest.raises(UsageError, match="cannot be built by TensorRT"):
        quantize_onnx(vit_onnx, None, calib=data, target="tensorrt", activation_type="u8")


def test_quantized_outputs_track_fp32(vit_onnx, data):
    """fp32 under the report equals a plain onnxruntime run; int8 is close to it."""
    import onnxruntime as ort
    from ssf_deploy.runtime import data_config, eval_transform, load_images
    report = quantize_onnx(vit_onnx, None, calib=data, val=data, min_agreement=0,
                           latency_runs=0)
    assert report.latency is None and report.written is None
    sets = image_sets(QuantizeConfig(calib=data, val=data))
    cfg = data_config("test_vit", chw=(3, 32, 32))
    assert cfg["input_size"] == (3, 32, 32)          # the ONNX size, timm's mean/std/crop
    x = load_images(sets["val"], eval_transform("test_vit", chw=(3, 32, 32))).numpy()
    logits = ort.InferenceSession(vit_onnx, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    top1 = 100.0 * float((logits.argmax(1) == sets["val_labels"]).mean())
    assert report.val["top1_fp32"] == pytest.approx(top1)
    assert report.holdout["max_abs_logit_error"] < 0.5 * report.holdout["max_abs_fp32_logit"]


@pytest.fixture
def int8_disagrees(monkeypatch):
    """Make the int8 model disagree with fp32 everywhere, by what it is, not by call order:
    every session on a graph holding QuantizeLinear nodes returns negated logits."""
    import ssf_deploy.quantize as Q
    real = Q._session

    class Negated:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feed):
            return [-o for o in self.session.run(names, feed)]

    def session(model, threads=None, level="all"):
        s = real(model, threads, level)
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        return Negated(s) if any(n.op_type == "QuantizeLinear" for n in proto.graph.node) else s
    monkeypatch.setattr(Q, "_session", session)


def test_failed_gate_raises_and_writes_nothing(vit_onnx, data, tmp_path, int8_disagrees):
    out = tmp_path / "never.onnx"
    with pytest.raises(VerificationError) as e:
        quantize_onnx(vit_onnx, str(out), calib=data, val=data, min_agreement=99,
                      latency_runs=0)
    report = e.value.report
    assert report is not None and not report.passed and report.agreement < 99
    assert "below `min_agreement` 99%" in report.failure and report.written is None
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(vit_onnx, data, method):
    report = quantize_onnx(vit_onnx, None, calib=data, method=method, min_agreement=0,
                           latency_runs=0)
    assert report.recipe["calibration"] == method and report.nodes["int8_kernels"] > 0


def test_exclusions_keep_ops_in_float(vit_onnx, data):
    """Excluded ops really run in float under onnxruntime (no int8 kernel, float inputs)."""
    base = quantize_onnx(vit_onnx, None, calib=data, min_agreement=0, latency_runs=0)
    assert base.nodes["int8_ops"].get("QLinearSoftmax", 0) > 0
    assert base.recipe["excluded_inputs_kept_float"] == 0
    r = quantize_onnx(vit_onnx, None, calib=data, min_agreement=0, latency_runs=0,
                      exclude_op_types=("Softmax", "LayerNormalization"))
    assert "QLinearSoftmax" not in r.nodes["int8_ops"]
    assert r.nodes["runtime_float_op_types"]["Softmax"] > 0
    assert r.recipe["excluded_nodes_resolved"] > 0 and r.recipe["excluded_inputs_kept_float"] > 0
    q = onnx.load_from_string(_written(vit_onnx, data, exclude_op_types=("Softmax",)))
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type == "Softmax":
            assert producer.get(n.input[0]) != "DequantizeLinear"
    names = [n.name for n in onnx.load(vit_onnx).graph.node if n.op_type == "Gemm"]
    r = quantize_onnx(vit_onnx, None, calib=data, min_agreement=0, latency_runs=0,
                      exclude_nodes=(names[-1],))
    assert r.nodes["int8_ops"]["QGemm"] == base.nodes["int8_ops"]["QGemm"] - 1
    with pytest.raises(UsageError, match="no node named"):
        quantize_onnx(vit_onnx, None, calib=data, exclude_nodes=("nope",), latency_runs=0)
    with pytest.raises(UsageError, match="no Conv3D node"):
        quantize_onnx(vit_onnx, None, calib=data, exclude_op_types=("Conv3D",), latency_runs=0)


def _written(model, data, **options) -> bytes:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.onnx")
        quantize_onnx(model, path, calib=data, min_agreement=0, latency_runs=0, **options)
        with open(path, "rb") as f:
            return f.read()


def test_fused_and_unfused_resnet_both_quantize(data, tmp_path):
    """The unfused graph (SSF as Mul/Add) quantizes too, from the same tuned model."""
    model = _ssf_model("resnet")
    x = torch.randn(1, 3, 32, 32)
    fused = fuse(model, x)
    export_onnx(fused, str(tmp_path / "fused.onnx"), example=x, metadata={"arch": "test_resnet"})
    unfused = export_proto(model, example=x)
    unfused.metadata_props.add(key="ssf_deploy.arch", value="test_resnet")
    f = quantize_onnx(str(tmp_path / "fused.onnx"), None, calib=data, val=data,
                      min_agreement=0, latency_runs=0)
    u = quantize_onnx(unfused, None, calib=data, val=data, min_agreement=0, latency_runs=0)
    assert u.source == "<ModelProto>"
    assert u.nodes["fp32"] > f.nodes["fp32"]              # the SSF Mul/Add (whatever survived)
    assert f.val["top1_fp32"] == pytest.approx(u.val["top1_fp32"])   # same model, same images


def test_image_sets_split_a_flat_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.png")
    sets = image_sets(QuantizeConfig(calib=str(folder), calib_images=6))
    assert len(sets["calib"]) == 6 and len(sets["holdout"]) == 4
    assert not set(sets["calib"]) & set(sets["holdout"])
    assert sets == image_sets(QuantizeConfig(calib=str(folder), calib_images=6))  # seeded


def test_bad_inputs_are_usage_errors(vit_onnx, data, tmp_path):
    with pytest.raises(UsageError, match="not found"):
        quantize_onnx(str(tmp_path / "missing.onnx"), None, calib=data)
    with pytest.raises(UsageError, match="percentage"):
        quantize_onnx(vit_onnx, None, calib=data, min_agreement=0.99)
    with pytest.raises(UsageError, match="folder of images or 'builtin'"):
        quantize_onnx(vit_onnx, None, calib=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="also calibration images"):
        quantize_onnx(vit_onnx, None, calib=f"{data}/val", val=data, latency_runs=0)
    plain = onnx.load(vit_onnx)
    del plain.metadata_props[:]
    with pytest.raises(UsageError, match="`arch` ARCH"):
        quantize_onnx(plain, None, calib=data)


# ----------------------------------------------------------------------------- CLI

def test_cli_json_and_gate(vit_onnx, data, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", vit_onnx, "--calib", data, "--val", data, "--out", str(out),
               "--min-agreement", "0", "--latency-runs", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["passed"] and report["written"] == str(out) and out.is_file()
    assert report["latency"]["runs"] == 2 and report["val"]["images"] == 9



def test_cli_failed_gate_exit_1(vit_onnx, data, tmp_path, capsys, int8_disagrees):
    bad = tmp_path / "bad.onnx"
    rc = main(["quantize", vit_onnx, "--calib", data, "--out", str(bad), "--latency-runs", "0",
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1 and not bad.exists()
    assert captured.err.startswith("error: ") and "nothing written" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "FAIL" in captured.out


@pytest.mark.parametrize("args, message", [
    (["--calib", "/no/such/dir"], "folder of images or 'builtin'"),
    (["--out", "x.txt"], "--out must end with .onnx"),
    (["--min-agreement", "0.99"], "percentage"),
    (["--method", "kl"], "--method"),
    (["--exclude-nodes", "nope"], "no node named"),
])
def test_cli_bad_input_is_one_line_exit_2(vit_onnx, data, capsys, args, message):
    argv = ["quantize", vit_onnx, "--latency-runs", "0"] + args
    if "--calib" not in args:
        argv += ["--calib", data]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_model_and_no_arch(tmp_path, data, capsys):
    assert main(["quantize", str(tmp_path / "none.onnx"), "--calib", data]) == 2
    assert "not found" in capsys.readouterr().err
    model = make_model("resnet", num_classes=3).eval()
    path = str(tmp_path / "plain.onnx")
    onnx.save(export_proto(model, example=torch.randn(1, 3, 32, 32)), path)
    assert main(["quantize", path, "--calib", data, "--latency-runs", "0"]) == 2
    assert "--model ARCH" in capsys.readouterr().err
    assert main(["quantize", path, "--calib", data, "--latency-runs", "0", "--model",
                 "test_resnet", "--min-agreement", "0", "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_builtin_calibration(vit_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSF_DEPLOY_CACHE", str(tmp_path / "cache"))
    # test_vit has 3 outputs here; builtin's val split has 10 classes -> refused for --val
    assert main(["quantize", vit_onnx, "--calib", "builtin", "--val", "builtin",
                 "--latency-runs", "0"]) == 2
    assert "10 classes but the model outputs 3" in capsys.readouterr().err
    rc = main(["quantize", vit_onnx, "--calib", "builtin", "--calib-images", "8",
               "--eval-images", "16", "--latency-runs", "0", "--min-agreement", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["calibration"] == {"source": "builtin train split", "images": 8}
    assert report["holdout"]["source"] == "builtin val split"
    assert report["holdout"]["images"] == 16
