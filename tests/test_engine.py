"""``engine`` / ``refit x.plan``: arguments, missing TensorRT, our precision policy, refit by name.

On the CPU: the CLI's checks before TensorRT, and the policy functions (``ssf_deploy.engine.policy``)
fed with the facts of a TensorRT version and handed to Polygraphy's real ``CreateConfig`` /
``Profile``; no stand-in of TensorRT's bindings. The build, run and refit themselves are
``@pytest.mark.tensorrt`` tests against the real TensorRT (skipped without it and a GPU;
``benchmarks/run_gpu.sh`` runs them).
"""
from __future__ import annotations

import enum
import json
import os
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from ssf_deploy import engine as E
from ssf_deploy.errors import SSFDeployError, UsageError
from ssf_deploy.export import export_onnx
from ssf_deploy.fileio import sha256_of
from ssf_deploy.runtime import graph_inputs
from ssf_deploy.tools import main

TRT_LINE = 'pip install "ssf-deploy[tensorrt]"'


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    path = str(d / "tiny.onnx")
    export_onnx(m, path, example=torch.randn(1, 3, 8, 8), dynamic_batch=True)
    return path


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` -> ImportError


# --------------------------------------------------------------------------------------------
# missing TensorRT, bad inputs: one line, exit 2, nothing written (the CLI, unchanged)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_engine_without_tensorrt(tiny_onnx, tmp_path, no_tensorrt, capsys):
    out = tmp_path / "m.plan"
    rc = main(["engine", tiny_onnx, "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and TRT_LINE in line
    assert not out.exists() and not os.path.exists(E.sidecar_path(str(out)))
    assert list(tmp_path.iterdir()) == []


def test_refit_plan_without_tensorrt(tiny_onnx, tmp_path, no_tensorrt, capsys):
    from ssf_deploy.models import create_base_model
    from ssf_deploy.formats.pack import save_pack
    from ssf_deploy.tuners import apply_method
    plan = tmp_path / "tiny.plan"
    plan.write_bytes(b"\0" * 16)
    m = apply_method(create_base_model("test_resnet", 3), "ssf")
    pack = tmp_path / "t.safetensors"
    save_pack(m, str(pack))
    rc = main(["refit", str(plan), "--pack", str(pack), "--onnx", tiny_onnx,
               "--out", str(tmp_path / "o.plan")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and TRT_LINE in line
    assert not (tmp_path / "o.plan").exists()


def test_other_tools_import_without_tensorrt(no_tensorrt):
    import importlib
    for mod in ("ssf_deploy.engine", "ssf_deploy.refit", "ssf_deploy.tools.engine",
                "ssf_deploy.tools.refit"):
        importlib.reload(importlib.import_module(mod))
    assert main(["engine", "--help"]) == 0 and main(["refit", "--help"]) == 0
    with pytest.raises(SSFDeployError, match="ssf-deploy\\[tensorrt\\]"):
        E.import_tensorrt()


def test_engine_bad_onnx_and_arguments(tiny_onnx, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage")
    out = tmp_path / "m.plan"
    assert main(["engine", str(bad), "--out", str(out)]) == 2
    assert "cannot read ONNX" in _one_line(capsys.readouterr().err)
    assert main(["engine", str(tmp_path / "none.onnx"), "--out", str(out)]) == 2
    assert "not found" in _one_line(capsys.readouterr().err)
    assert main(["engine", tiny_onnx, "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--out must end with" in _one_line(capsys.readouterr().err)
    assert main(["engine", tiny_onnx, "--out", str(out), "--min-batch", "8",
                 "--max-batch", "4"]) == 2
    assert "--min-batch" in _one_line(capsys.readouterr().err)
    assert main(["engine", tiny_onnx, "--out", str(out), "--workspace-gb", "0"]) == 2
    assert "--workspace-gb" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_refit_plan_arguments(tiny_onnx, tmp_path, capsys):
    plan = tmp_path / "x.plan"
    assert main(["refit", str(plan), "--pack", "p.safetensors"]) == 2
    assert "engine file not found" in _one_line(capsys.readouterr().err)
    plan.write_bytes(b"\0")
    assert main(["refit", str(plan), "--pack", "p.safetensors"]) == 2   # no x.onnx next to it
    assert "--onnx" in _one_line(capsys.readouterr().err)
    assert main(["refit", str(plan), "--pack", "p.safetensors", "--onnx", tiny_onnx,
                 "--out", str(tmp_path / "o.onnx")]) == 2
    assert "--out must end with" in _one_line(capsys.readouterr().err)


def _ssf_pack(tmp_path):
    from ssf_deploy.formats.pack import save_pack
    from ssf_deploy.models import create_base_model
    from ssf_deploy.tuners import apply_method
    pack = tmp_path / "t.safetensors"
    save_pack(apply_method(create_base_model("test_resnet", 3), "ssf"), str(pack))
    return str(pack)


def test_refit_refuses_int8_engines_before_tensorrt(tiny_onnx, int8_onnx, tmp_path, no_tensorrt,
                                                    capsys):
    pack = _ssf_pack(tmp_path)
    plan = str(tmp_path / "q.plan")
    E.write_plan(plan, b"engine", E.build_sidecar(tiny_onnx, plan, {
        "precision": E.Precision(name="int8", quantization="calibrated").as_dict()}))
    assert main(["refit", plan, "--pack", pack, "--out", str(tmp_path / "o.plan")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "INT8" in line and "scales depend on the task's weights" in line
    assert "quantize after the swap, then build" in line
    # a Q/DQ graph, as the ONNX of an engine without a sidecar or as an onnxruntime target
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"engine")
    for argv in (["refit", str(bare), "--onnx", int8_onnx], ["refit", int8_onnx]):
        assert main([*argv, "--pack", pack]) == 2
        assert "scales depend" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o.plan").exists()


def _png_folder(folder, n, size=40):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return str(folder)


def test_engine_cli_refuses_contradictions_before_tensorrt(tiny_onnx, int8_onnx, tmp_path,
                                                           no_tensorrt, capsys):
    out = str(tmp_path / "m.plan")
    imgs = _png_folder(tmp_path / "imgs", 2, size=8)
    for argv, match in [
        ([tiny_onnx, "--int8"], "--calib DIR"),
        ([tiny_onnx, "--fp8"], "FP8 Q/DQ nodes"),
        ([tiny_onnx, "--calib", imgs], "add --int8"),
        ([int8_onnx, "--int8", "--calib", imgs], "already quantized"),
        ([int8_onnx, "--refittable"], "scales depend"),
        ([tiny_onnx, "--int8", "--calib-cache", str(tmp_path / "none.cache")], "does not exist"),
        ([tiny_onnx, "--int8", "--calib", imgs], "ssf_deploy.arch"),
        ([tiny_onnx, "--device", "cpu"], "NVIDIA GPU"),
        ([tiny_onnx, "--inputs", "nowhere"], "neither"),
    ]:
        assert main(["engine", *argv, "--out", out]) == 2, argv
        assert match in _one_line(capsys.readouterr().err), argv
    assert list(tmp_path.iterdir()) == [tmp_path / "imgs"]


def test_import_tensorrt_refuses_old_versions(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(SSFDeployError, match="too old"):
        E.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.1.0"))
    assert E.import_tensorrt().__version__ == "11.1.0"


def test_cuda_device_spelling():
    assert E.cuda_device(None) == torch.device("cuda")
    assert E.cuda_device("cuda:1") == torch.device("cuda", 1) == E.cuda_device(1)
    for bad in ("cpu", "gpu:0", "cuda:x", -1):
        with pytest.raises(UsageError):
            E.cuda_device(bad)


def test_require_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SSFDeployError, match="is_available"):
        E.require_cuda("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert E.require_cuda("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(SSFDeployError, match="1 CUDA device"):
        E.require_cuda("cuda:1")


# --------------------------------------------------------------------------------------------
# pure helpers


def test_batch_profile():
    assert E.batch_profile() == (1, 8, 32)
    assert E.batch_profile(None, 2, None, 4) == (2, 4, 4)
    assert E.batch_profile(None, None, 64, None) == (1, 64, 64)
    assert E.batch_profile(None, 1, 16, 16) == (1, 16, 16)
    with pytest.raises(SSFDeployError, match="`min_batch` <= `opt_batch`"):
        E.batch_profile(None, 4, 2, 8)
    with pytest.raises(SSFDeployError):
        E.batch_profile(None, 5, 4, 4)
    assert E.batch_profile(4) == (4, 4, 4)
    assert E.batch_profile(4, 4, 4, 4) == (4, 4, 4)
    with pytest.raises(SSFDeployError, match="static batch of 4"):
        E.batch_profile(4, None, None, 8)


def test_random_feeds_at_the_profile():
    from ssf_deploy.verify import DEFAULT_ATOL, FP16_ATOL, FP16_RTOL, resolve_tolerances
    assert resolve_tolerances(None, None, True) == (FP16_ATOL, FP16_RTOL)
    assert resolve_tolerances(None, 0.5, False) == (DEFAULT_ATOL, 0.5)
    with pytest.raises(SSFDeployError):
        resolve_tolerances(-1.0, None, False)
    specs = graph_inputs(_bundle_onnx())
    prof = E.input_profiles(specs, min_batch=1, opt_batch=4, max_batch=16)
    feeds = E.random_feeds(prof, specs, 2, value_ranges={"task": (0, 3)})
    assert [f["images"].shape[0] for f in feeds] == [4, 4, 1, 16]
    assert all(f["task"].shape == (f["images"].shape[0],) for f in feeds)
    assert all(f["task"].dtype == torch.int64 and 0 <= int(f["task"].min())
               and int(f["task"].max()) < 3 for f in feeds)
    assert any(int(f["task"].max()) > 0 for f in feeds)       # really drawn, not zeros
    again = E.random_feeds(prof, specs, 2, value_ranges={"task": (0, 3)})
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(feeds, again))  # seeded


def test_sidecar_and_onnx_resolution(tiny_onnx, tmp_path):
    plan = str(tmp_path / "sub" / "tiny.plan")
    E.write_plan(plan, b"engine-bytes", E.build_sidecar(tiny_onnx, plan, {"fp16": True}))
    side = E.read_sidecar(plan)
    assert side["fp16"] and side["onnx_sha256"] == sha256_of(tiny_onnx)
    assert open(plan, "rb").read() == b"engine-bytes"
    assert os.path.samefile(E.resolve_onnx_for_plan(plan), tiny_onnx)
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(open(tiny_onnx, "rb").read() + b"\0")
    with pytest.raises(SSFDeployError, match="sha256"):
        E.resolve_onnx_for_plan(plan, str(changed))
    # no sidecar: <stem>.onnx next to the plan
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"x")
    with pytest.raises(SSFDeployError, match="`onnx`"):
        E.resolve_onnx_for_plan(str(bare))
    (tmp_path / "bare.onnx").write_bytes(b"y")
    assert E.resolve_onnx_for_plan(str(bare)).endswith("bare.onnx")


def test_write_plan_writes_the_caches_with_the_set(tiny_onnx, tmp_path):
    plan, cache = str(tmp_path / "m.plan"), str(tmp_path / "tc.bin")
    E.write_plan(plan, b"P", E.build_sidecar(tiny_onnx, plan, {}), caches={cache: b"C"})
    assert open(cache, "rb").read() == b"C" and E.read_sidecar(plan)["format"]
    manifest = json.load(open(plan + ".manifest.json"))
    listed = json.dumps(manifest)
    assert "m.plan" in listed and "tc.bin" not in listed      # caches are shared, not listed


def test_write_plan_is_atomic(tmp_path, monkeypatch):
    plan = str(tmp_path / "m.plan")

    def boom(*a, **k):
        raise TypeError("not serializable")
    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(TypeError):
        E.write_plan(plan, b"data", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Q/DQ graphs, fp16 graphs, tolerances


def _quantize(src, dst, *, activation="QInt8", symmetric=True, quantize_bias=False):
    """onnxruntime's static Q/DQ quantization as TensorRT needs it: signed INT8, symmetric,
    float biases (TensorRT cannot dequantize int32 biases)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, \
        quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.data = iter([{"input": torch.randn(1, 3, 8, 8, generator=g).numpy()}
                              for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                   "QuantizeBias": quantize_bias})
    return dst


@pytest.fixture(scope="module")
def int8_onnx(tiny_onnx, tmp_path_factory):
    return _quantize(tiny_onnx, str(tmp_path_factory.mktemp("q") / "tiny.int8.onnx"))


def _fp8_onnx(path):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["logits"], name="dq")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, path)
    return path


def test_qdq_detection(tiny_onnx, int8_onnx, tmp_path):
    import onnx
    assert E.qdq_info(onnx.load(tiny_onnx))["kind"] is None
    q = E.qdq_info(onnx.load(int8_onnx))
    assert q["kind"] == "int8" and q["nodes"] > 0 and q["types"] == ["int8"]
    assert not q["asymmetric"]
    E.check_qdq_supported(q)
    f8 = E.qdq_info(onnx.load(_fp8_onnx(str(tmp_path / "f8.onnx"))))
    assert f8["kind"] == "fp8" and f8["types"] == ["fp8"]
    u8 = _quantize(tiny_onnx, str(tmp_path / "u8.onnx"), activation="QUInt8", symmetric=False)
    info = E.qdq_info(onnx.load(u8))
    with pytest.raises(SSFDeployError, match="symmetric") as e:
        E.check_qdq_supported(info, "u8.onnx")
    assert "\n" not in str(e.value)
    i32 = _quantize(tiny_onnx, str(tmp_path / "i32.onnx"), quantize_bias=True)
    with pytest.raises(SSFDeployError, match="QuantizeBias=False"):
        E.check_qdq_supported(E.qdq_info(onnx.load(i32)), "i32.onnx")


def test_fp16_onnx_runs_in_onnxruntime_close_to_fp32(tiny_onnx):
    """The converted graph is a valid model computing the same function at fp16 precision."""
    from ssf_deploy.export import OrtRunner
    from ssf_deploy.verify import FP16_ATOL, FP16_RTOL, verify
    data = open(tiny_onnx, "rb").read()
    half = OrtRunner(E.fp16_onnx(data), providers=["CPUExecutionProvider"], label="fp16")
    full = OrtRunner(data, providers=["CPUExecutionProvider"], label="fp32")
    assert verify(full, half, torch.randn(4, 3, 8, 8), atol=FP16_ATOL, rtol=FP16_RTOL).passed


def test_tolerances_per_precision():
    ref = [np.array([[10.0, -5.0], [2.0, 1.0]])]
    assert E.tolerances("fp32", ref)[:2] == (1e-4, 1e-3)
    assert E.tolerances("tf32", ref)[:2] == (2e-2, 2e-2)
    assert E.tolerances("fp16", ref)[:2] == (2e-2, 2e-2)
    a, r, why = E.tolerances(E.Precision(name="int8", quantization="explicit"), ref)
    assert a == pytest.approx(40 / 127) and r == 2e-2 and "Q/DQ" in why
    a, r, _ = E.tolerances(E.Precision(name="int8", quantization="calibrated"), ref)
    assert a == pytest.approx(80 / 127) and r == 5e-2
    assert E.tolerances("fp8", ref)[:2] == (10 / 16, 1 / 16)
    assert E.tolerances("int8", ref, atol=0.5, rtol=0.0) == (0.5, 0.0, "given")


def test_sidecar_precision_of_old_sidecars():
    assert E.sidecar_precision({}).name == "tf32"          # TensorRT's default was on
    assert E.sidecar_precision({"fp16": True}).name == "fp16"
    p = E.Precision(name="int8", quantization="explicit", builder_flags=["INT8"])
    assert E.sidecar_precision({"precision": p.as_dict()}) == p


# --------------------------------------------------------------------------------------------
# the precision policy, per TensorRT version, handed to Polygraphy's own objects
#
# plan_precision reads only a module's version and which documented attributes it has; these
# namespaces state those facts for TensorRT 10.16 and 11.1 (python/docstrings/infer at those
# tags): 10.x has BuilderFlag.FP16/INT8/TF32, STRONGLY_TYPED and IInt8EntropyCalibrator2; 11.x
# keeps TF32 and drops the rest.


class _Flags(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 2
    REFIT = 3


class _Flags11(enum.IntEnum):
    TF32 = 2
    REFIT = 3


class _Net(enum.IntEnum):
    STRONGLY_TYPED = 1


V10 = types.SimpleNamespace(__version__="10.16.1.11", BuilderFlag=_Flags,
                            NetworkDefinitionCreationFlag=_Net, IInt8EntropyCalibrator2=object)
V11 = types.SimpleNamespace(__version__="11.1.0.4", BuilderFlag=_Flags11,
                            NetworkDefinitionCreationFlag=_Net)


@pytest.mark.parametrize("trt,kw,name,flags,strong,fp16_onnx", [
    (V10, {}, "fp32", [], False, False),
    (V11, {}, "fp32", [], True, False),
    (V10, dict(tf32=True), "tf32", [], False, False),
    (V10, dict(fp16=True), "fp16", ["FP16"], False, False),
    (V11, dict(fp16=True), "fp16", [], True, True),
    (V10, dict(qdq="int8"), "int8", ["INT8"], False, False),
    (V10, dict(qdq="int8", fp16=True), "int8", ["INT8", "FP16"], False, False),
    (V11, dict(qdq="int8"), "int8", [], True, False),
    (V10, dict(int8=True, calibrate=True), "int8", ["INT8"], False, False),
    (V10, dict(qdq="fp8", fp8=True), "fp8", [], True, False),
    (V11, dict(qdq="fp8", fp8=True), "fp8", [], True, False),
])
def test_precision_route_per_version(trt, kw, name, flags, strong, fp16_onnx):
    p = E.plan_precision(trt, **kw)
    assert (p.name, p.builder_flags, p.strongly_typed, p.fp16_onnx) == \
        (name, flags, strong, fp16_onnx)
    assert p.tf32 == bool(kw.get("tf32"))
    # strongly typed is asked of Polygraphy's network loader only where the flag means something
    assert E.network_args(p, trt) == {"strongly_typed": strong and trt is V10}


@pytest.mark.parametrize("kw,match", [
    (dict(qdq="int8", fp16=True), "removed in 11.0"),
    (dict(int8=True, calibrate=True), "IInt8EntropyCalibrator2 were removed in 11.0"),
])
def test_routes_missing_in_tensorrt11_are_one_line(kw, match):
    with pytest.raises(SSFDeployError, match=match) as e:
        E.plan_precision(V11, **kw)
    assert "\n" not in str(e.value) and "11.1.0.4" in str(e.value)


@pytest.mark.parametrize("kw,match", [
    (dict(fp8=True), "FP8 Q/DQ nodes"),
    (dict(fp8=True, qdq="int8"), "INT8 Q/DQ"),
    (dict(int8=True), "`calib` DIR"),
    (dict(int8=True, fp8=True, qdq="fp8"), "exclude"),
    (dict(calibrate=True), "add `int8`"),
    (dict(int8=True, calibrate=True, qdq="int8"), "already quantized"),
    (dict(qdq="fp8", fp16=True), "drop `fp16`"),
    (dict(qdq="int8", refittable=True), "scales depend on the task's weights"),
])
def test_precision_requests_refused_before_tensorrt(kw, match):
    with pytest.raises(UsageError, match=match) as e:
        E.check_precision_request(**kw)
    assert "\n" not in str(e.value) and "--" not in str(e.value)   # arguments, not flags


def test_config_args_are_polygraphys_create_config():
    """The arguments build Polygraphy's real CreateConfig (its TensorRT import is lazy): TF32
    cleared for fp32, the 10.x flags where the route sets them, REFIT, workspace, profiles."""
    from polygraphy.backend.trt import CreateConfig, Profile
    prof = Profile().add("input", min=(1, 3, 8, 8), opt=(8, 3, 8, 8), max=(32, 3, 8, 8))
    for trt, kw, want in [(V10, {}, dict(tf32=False, fp16=False, int8=False)),
                          (V10, dict(tf32=True), dict(tf32=True, fp16=False, int8=False)),
                          (V10, dict(fp16=True), dict(tf32=False, fp16=True, int8=False)),
                          (V11, dict(fp16=True), dict(tf32=False, fp16=False, int8=False)),
                          (V10, dict(qdq="int8"), dict(tf32=False, fp16=False, int8=True))]:
        p = E.plan_precision(trt, **kw)
        cfg = CreateConfig(**E.config_args(p, workspace_bytes=1 << 30, refittable=True,
                                           profiles=[prof], workspace_pool="WORKSPACE"))
        assert {k: getattr(cfg, k) for k in want} == want, (trt.__version__, kw)
        assert cfg.refittable and cfg.memory_pool_limits == {"WORKSPACE": 1 << 30}
        assert cfg.profiles == [prof] and cfg.calibrator is None
    with pytest.raises(UsageError, match="`workspace_gb`"):
        E.config_args(E.Precision(), workspace_bytes=0, refittable=False, profiles=[])
    with pytest.raises(UsageError, match="calibrated INT8 only"):
        E.config_args(E.Precision(), workspace_bytes=1, refittable=False, profiles=[],
                      calibrator=object())


def _bundle_onnx(static: bool = False):
    """A two-input graph like the multi-task bundle: images (B, 3, 8, 8) and task (B,) int64."""
    b = 2 if static else "batch"
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [b, 3, 8, 8])
    t = helper.make_tensor_value_info("task", TensorProto.INT64, [b])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, 3, 8, 8])
    nodes = [helper.make_node("Cast", ["task"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["tf", "axes"], ["t4"]),
             helper.make_node("Add", ["images", "t4"], ["logits"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    return helper.make_model(helper.make_graph(nodes, "bundle", [x, t], [y], [axes]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_profiles_address_every_input_by_name():
    from polygraphy.backend.trt import Profile
    specs = graph_inputs(_bundle_onnx())
    assert [(s.name, s.shape, s.dtype.name) for s in specs] == [
        ("images", (None, 3, 8, 8), "float32"), ("task", (None,), "int64")]
    prof = E.input_profiles(specs, min_batch=1, opt_batch=4, max_batch=16)
    assert prof == {"images": ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)),
                    "task": ((1,), (4,), (16,))}             # one batch profile for both
    p = Profile()
    for name, (mn, op, mx) in prof.items():
        p.add(name, min=mn, opt=op, max=mx)
    assert p["task"].opt == (4,) and p["images"].max == (16, 3, 8, 8)
    # an input of its own shape
    own = E.input_profiles(specs, shapes={"task": ((1,), (2,), (4,))}, opt_batch=4)
    assert own["task"] == ((1,), (2,), (4,)) and own["images"][1] == (4, 3, 8, 8)
    assert E.input_profiles(graph_inputs(_bundle_onnx(static=True))) == {
        "images": ((2, 3, 8, 8),) * 3, "task": ((2,),) * 3}
    with pytest.raises(UsageError, match="names no input"):
        E.input_profiles(specs, shapes={"labels": (1,)})
    with pytest.raises(UsageError, match="does not fit input 'task'"):
        E.input_profiles(specs, shapes={"task": (2, 2)})
    with pytest.raises(UsageError, match="min <= opt <= max"):
        E.input_profiles(specs, shapes={"task": ((4,), (2,), (8,))})
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3, "h", "w"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, "h", "w"])
    open_hw = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input"], ["out"])],
                                                  "g", [x], [y]))
    with pytest.raises(SSFDeployError, match="dynamic dimensions beyond the batch"):
        E.input_profiles(graph_inputs(open_hw))
    assert E.input_profiles(graph_inputs(open_hw), shapes={"input": (1, 3, 16, 16)}) == {
        "input": ((1, 3, 16, 16),) * 3}
    assert E.image_input(specs) == "images" and E.image_input(graph_inputs(open_hw)) == "input"


def test_fp8_needs_compute_capability_89():
    E.check_capability((9, 0), "NVIDIA H100", "fp8")
    E.check_capability((8, 0), "NVIDIA A100", "fp16")
    with pytest.raises(SSFDeployError, match="compute capability 8.9") as e:
        E.check_capability((8, 0), "NVIDIA A100", "fp8")
    assert "A100 is 8.0" in str(e.value)


def test_biases_a_refitter_must_expose(tmp_path):
    """TensorRT 11.3's documented REFIT issue: a GEMM bias may be dropped and not exposed to
    refit. The biases are found in a real export (Linear -> Gemm, or MatMul + Add)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    path = str(tmp_path / "mlp.onnx")
    export_onnx(m, path, example=torch.randn(1, 3, 2, 2), dynamic_batch=True)
    proto = onnx.load(path)
    biases = E.gemm_biases(proto)
    assert len(biases) == 2
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert sorted(v.shape for v in (values[b] for b in biases)) == [(3,), (6,)]
    everything = [i.name for i in proto.graph.initializer]
    assert E.unexposed_biases(proto, everything) == []
    assert E.unexposed_biases(proto, [n for n in everything if n != biases[0]]) == [biases[0]]
    assert E.unexposed_biases(proto, everything + ["(Unnamed Layer* 3) [Constant]"]) is None


def test_polygraphy_failures_are_one_line_and_its_log_goes_to_stderr(capsys):
    """Polygraphy's G_LOGGER prints to stdout; inside the scope it is on stderr (``--json``),
    and its exception becomes one SSFDeployError line naming TensorRT's last error."""
    from polygraphy.logger import G_LOGGER
    from ssf_deploy.engine.trt import polygraphy_scope
    with polygraphy_scope("parsing failed"):
        G_LOGGER.warning("a warning")
        G_LOGGER.info("chatter")
    out, err = capsys.readouterr()
    assert out == "" and "a warning" in err and "chatter" not in err
    with pytest.raises(SSFDeployError) as e:
        with polygraphy_scope("TensorRT's ONNX parser rejected m.onnx"):
            G_LOGGER.error("In node 3 (Conv): INVALID_NODE: kernel weights missing")
            G_LOGGER.critical("Could not parse ONNX correctly")
    out, err = capsys.readouterr()
    assert str(e.value) == ("TensorRT's ONNX parser rejected m.onnx: In node 3 (Conv): "
                            "INVALID_NODE: kernel weights missing")
    assert out == "" and "Could not parse" not in err          # said once, by the error line
    assert type(e.value.__cause__).__name__ == "PolygraphyException"   # kept for --debug
    with pytest.raises(SSFDeployError, match="failed: Invalid Engine"):
        with polygraphy_scope("failed"):
            G_LOGGER.critical("Invalid Engine")
    with polygraphy_scope("x", verbose=True):
        G_LOGGER.verbose("TensorRT INFO")
    assert "TensorRT INFO" in capsys.readouterr().err


def _fused_vit_onnx(tmp_path):
    from ssf_deploy.fuse import fuse
    from ssf_deploy.models import create_base_model
    from ssf_deploy.tuners import apply_method
    torch.manual_seed(0)
    m = apply_method(create_base_model("test_vit", 5, img_size=32, patch_size=8), "ssf",
                     init_std=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "vit.onnx")
    export_onnx(fuse(m, x), path, example=x[:1], dynamic_batch=True,
                metadata={"arch": "test_vit", "num_classes": 5, "fused_from": "ssf"})
    return path


# --------------------------------------------------------------------------------------------
# the real thing (GPU + TensorRT): benchmarks/run_gpu.sh runs these


def _tasks(tmp_path):
    """A base, tasks A and B on it, B's pack and A's fused ONNX: (base, A, B, pack, onnx)."""
    from safetensors.torch import save_file
    from ssf_deploy.formats.pack import save_pack
    from ssf_deploy.fuse import fuse
    from ssf_deploy.models import create_base_model
    from ssf_deploy.tuners import apply_method
    kw = {"img_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    base = create_base_model("test_vit", 5, **kw)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base_file = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)

    def task(seed):
        torch.manual_seed(seed)
        m = apply_method(create_base_model("test_vit", 5, pretrained_file=base_file, **kw), "ssf")
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        return m.eval()
    A, B = task(1), task(2)
    pack, onnx_path = str(tmp_path / "B.safetensors"), str(tmp_path / "vit.onnx")
    save_pack(B, pack, model_kwargs=kw)
    x = torch.randn(2, 3, 32, 32)
    export_onnx(fuse(A, x), onnx_path, example=x[:1], dynamic_batch=True,
                metadata={"arch": "test_vit", "num_classes": 5, "fused_from": "ssf"})
    return base_file, A, B, pack, onnx_path


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_build_run_and_refit(tmp_path, capsys):
    """The CLI: build a refittable engine from task A's ONNX, refit it to task B, compare, time."""
    base_file, A, B, pack, onnx_path = _tasks(tmp_path)
    plan, x = str(tmp_path / "vit.plan"), torch.randn(2, 3, 32, 32)
    assert main(["engine", onnx_path, "--out", plan, "--refittable", "--max-batch", "8",
                 "--opt-batch", "4", "--iters", "5", "--timing-cache",
                 str(tmp_path / "tc.bin"), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)   # Polygraphy's log went to stderr
    assert built["passed"] and built["latency"]["median_ms"] > 0
    assert built["precision"] == "fp32" and built["build"]["precision"]["tf32"] is False
    assert built["tolerances"]["atol"] == 1e-4 and built["build"]["builder"] == "polygraphy"
    assert built["refit_exposure"]["unexposed"] == []
    assert os.path.isfile(plan) and os.path.isfile(E.sidecar_path(plan))
    assert E.read_sidecar(plan)["precision"]["name"] == "fp32"
    out = str(tmp_path / "vit_B.plan")
    assert main(["refit", plan, "--pack", pack, "--base-weights", base_file, "--out", out,
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["refit"]["refit_seconds"] < 1.0
    with E.EngineRunner(open(out, "rb").read()) as runner:     # the refitted engine runs B
        got = runner(x)[0]
    with torch.no_grad():
        yB, yA = B(x), A(x)
    torch.testing.assert_close(got, yB, atol=1e-3, rtol=1e-3)
    assert (got - yA).abs().max() > 1e-2
    assert main(["engine", onnx_path, "--out", str(tmp_path / "h.plan"), "--fp16",
                 "--iters", "3", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["precision"] == "fp16" and half["tolerances"]["atol"] == 2e-2
    assert main(["engine", onnx_path, "--out", str(tmp_path / "again.plan"), "--iters", "2",
                 "--timing-cache", str(tmp_path / "tc.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["build"]["timing_cache"]["status"] == "reused"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_and_refit_from_python(tmp_path):
    """The library calls the CLI runs, from Python: build + check + write, then refit + check."""
    from ssf_deploy.refit import refit_plan
    base_file, A, B, pack, onnx_path = _tasks(tmp_path)
    plan, x = str(tmp_path / "vit.plan"), torch.randn(4, 3, 32, 32)
    report = E.build_checked_engine(onnx_path, plan, refittable=True, opt_batch=4, max_batch=8,
                                    iters=3, warmup=1, inputs=[x])
    assert report.passed and report.written[0] == plan and report.verify.passed
    refit = refit_plan(plan, pack, str(tmp_path / "B.plan"), base_weights=base_file)
    assert refit.passed and refit.verify.passed and not refit.not_refitted
    with E.EngineRunner(open(str(tmp_path / "B.plan"), "rb").read()) as runner:
        torch.testing.assert_close(runner(x)[0], B(x).detach(), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_with_two_named_inputs(tmp_path):
    """A bundle-like graph (images + an int64 task index): profiles by name, runner by name."""
    path = str(tmp_path / "bundle.onnx")
    onnx.save(_bundle_onnx(), path)
    report = E.build_checked_engine(path, str(tmp_path / "b.plan"), opt_batch=4, max_batch=8,
                                    inputs=2, value_ranges={"task": (0, 3)}, iters=2, warmup=1)
    assert report.passed and report.build["profiles"]["task"] == [[1], [4], [8]]
    with E.EngineRunner(open(str(tmp_path / "b.plan"), "rb").read()) as runner:
        assert runner.inputs == ["images", "task"] and runner.profile("task")[2] == (8,)
        x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
        want = x + t.float().view(3, 1, 1, 1)
        torch.testing.assert_close(runner(images=x, task=t)[0], want)
        torch.testing.assert_close(runner({"images": x, "task": t})[0], want)
        with pytest.raises(SSFDeployError):
            runner(images=torch.randn(9, 3, 8, 8), task=torch.zeros(9, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_int8_from_qdq_onnx_matches_onnxruntime(tmp_path, capsys):
    """The recommended INT8 route: an explicitly quantized ONNX, compared with onnxruntime
    running the same Q/DQ graph; refit refuses the engine."""
    from ssf_deploy.quantize import quantize_onnx
    src = _fused_vit_onnx(tmp_path)
    imgs = _png_folder(tmp_path / "imgs", 16, size=32)
    qdq = str(tmp_path / "vit.int8.onnx")
    quantize_onnx(src, qdq, calib=imgs, min_agreement=0, latency_runs=0, target="tensorrt")
    plan = str(tmp_path / "vit.int8.plan")
    assert main(["engine", qdq, "--out", plan, "--inputs", imgs, "--opt-batch", "4",
                 "--iters", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == "int8" and r["build"]["precision"]["quantization"] == "explicit"
    assert r["verify"]["outputs"][0]["top1_agreement"] >= 0.75
    assert main(["refit", plan, "--pack", "x.safetensors"]) == 2
    assert "scales depend" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_int8_calibrated_on_tensorrt10(tmp_path, capsys):
    trt = E.import_tensorrt()
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        assert main(["engine", _fused_vit_onnx(tmp_path), "--out", str(tmp_path / "c.plan"),
                     "--int8", "--calib", _png_folder(tmp_path / "imgs", 8, size=32)]) == 2
        assert "removed in 11.0" in capsys.readouterr().err
        return
    src = _fused_vit_onnx(tmp_path)
    imgs = _png_folder(tmp_path / "imgs", 16, size=32)
    cache = str(tmp_path / "calib.cache")
    args = ["engine", src, "--int8", "--calib", imgs, "--calib-cache", cache, "--inputs", imgs,
            "--opt-batch", "4", "--iters", "3", "--json"]
    assert main([*args, "--out", str(tmp_path / "c.plan")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["build"]["calibration"]["batches"] == 4 and os.path.getsize(cache) > 0
    assert main([*args, "--out", str(tmp_path / "c2.plan")]) == 0     # from the cache
    assert json.loads(capsys.readouterr().out)["build"]["calibration"]["cache_read"]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_runner_on_an_explicit_device(tmp_path, capsys):
    src = _fused_vit_onnx(tmp_path)
    last = f"cuda:{torch.cuda.device_count() - 1}"
    plan = str(tmp_path / "d.plan")
    assert main(["engine", src, "--out", plan, "--device", last, "--iters", "2", "--verbose",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["build"]["device"] == last
    assert "[V]" in captured.err                       # TensorRT's INFO through Polygraphy
    with E.EngineRunner(open(plan, "rb").read(), device=last) as runner:
        assert runner(torch.randn(2, 3, 32, 32))[0].shape == (2, 5)
