"""``engine`` / ``refit x.plan``: arguments, missing TensorRT, parser errors, build options, refit
by name — on the CPU with a stand-in for the ``tensorrt`` module that has the API surface of
TensorRT 10.x or 11.x (every precision decision, the logger, the timing cache, the calibrator, the
CUDA device plumbing); the real build, run and refit are ``@pytest.mark.tensorrt`` tests (skipped
without TensorRT and a GPU).
"""
from __future__ import annotations

import contextlib
import enum
import json
import os
import sys
import types

import numpy as np
import pytest
import timm
import torch
from torch import nn

from ssf_deploy import engine as E
from ssf_deploy.errors import SSFDeployError, UsageError
from ssf_deploy.export import export_onnx
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
# missing TensorRT, bad inputs: one line, exit 2, nothing written


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


# --------------------------------------------------------------------------------------------
# pure helpers


def test_resolve_batches():
    dyn = {"dynamic_batch": True, "batch_size": 1}
    assert E.resolve_batches(dyn) == (1, 8, 32)
    assert E.resolve_batches(dyn, 2, None, 4) == (2, 4, 4)
    assert E.resolve_batches(dyn, None, 64, None) == (1, 64, 64)
    assert E.resolve_batches(dyn, 1, 16, 16) == (1, 16, 16)
    with pytest.raises(SSFDeployError):
        E.resolve_batches(dyn, 4, 2, 8)
    with pytest.raises(SSFDeployError):
        E.resolve_batches(dyn, 5, 4, 4)
    static = {"dynamic_batch": False, "batch_size": 4}
    assert E.resolve_batches(static) == (4, 4, 4)
    assert E.resolve_batches(static, 4, 4, 4) == (4, 4, 4)
    with pytest.raises(SSFDeployError, match="static batch of 4"):
        E.resolve_batches(static, None, None, 8)


def test_tolerances():
    from ssf_deploy.tools.engine import make_batches
    from ssf_deploy.verify import resolve_tolerances
    from ssf_deploy.verify import DEFAULT_ATOL, FP16_ATOL, FP16_RTOL
    assert resolve_tolerances(None, None, True) == (FP16_ATOL, FP16_RTOL)
    assert resolve_tolerances(None, 0.5, False) == (DEFAULT_ATOL, 0.5)
    with pytest.raises(SSFDeployError):
        resolve_tolerances(-1.0, None, False)
    xs = make_batches((3, 8, 8), (1, 4, 16), 2)
    assert [x.shape[0] for x in xs] == [4, 4, 1, 16]


def test_sidecar_and_onnx_resolution(tiny_onnx, tmp_path):
    plan = str(tmp_path / "sub" / "tiny.plan")
    E.write_plan(plan, b"engine-bytes", E.build_sidecar(tiny_onnx, plan, {"fp16": True}))
    side = E.read_sidecar(plan)
    assert side["fp16"] and side["onnx_sha256"] == E.sha256_file(tiny_onnx)
    assert open(plan, "rb").read() == b"engine-bytes"
    assert os.path.samefile(E.resolve_onnx_for_plan(plan), tiny_onnx)
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(open(tiny_onnx, "rb").read() + b"\0")
    with pytest.raises(SSFDeployError, match="sha256"):
        E.resolve_onnx_for_plan(plan, str(changed))
    # no sidecar: <stem>.onnx next to the plan
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"x")
    with pytest.raises(SSFDeployError, match="--onnx"):
        E.resolve_onnx_for_plan(str(bare))
    (tmp_path / "bare.onnx").write_bytes(b"y")
    assert E.resolve_onnx_for_plan(str(bare)).endswith("bare.onnx")


def test_write_plan_is_atomic(tmp_path, monkeypatch):
    plan = str(tmp_path / "m.plan")

    def boom(*a, **k):
        raise TypeError("not serializable")
    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(TypeError):
        E.write_plan(plan, b"data", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# the TensorRT calls, against a recording stand-in for the `tensorrt` module (10.x or 11.x)

V10, V11 = "10.16.1.11", "11.1.0.4"


class _Rec:
    def __init__(self):
        self.calls = []

    def named(self, kind):
        return [c for c in self.calls if c[0] == kind]


class _Sev(enum.IntEnum):            # trt.ILogger.Severity: INTERNAL_ERROR (0) .. VERBOSE (4)
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


_CURRENT_DEVICE = []                 # set by the fake torch.cuda.device below


def _cur():
    """The CUDA device index the fake torch.cuda.device made current (None: none entered)."""
    return _CURRENT_DEVICE[-1] if _CURRENT_DEVICE else None


def fake_trt(rec: _Rec, *, version=V10, parse_ok=True, refittable=True, missing=(), reject=(),
             build_ok=True, cache_ok=True, prototype=None, with_fp16_flag=None):
    """A stand-in with the API surface of TensorRT ``version``: 10.x has BuilderFlag.FP16/INT8/
    FP8 and IInt8EntropyCalibrator2 (pyCore.cpp / pyInt8.cpp at 10.16), 11.x has neither
    (11.1), both have TF32, REFIT, STRONGLY_TYPED and the ILogger base class."""
    trt = types.SimpleNamespace(__version__=version)
    v10 = version.startswith("10.")
    fp16_flag = v10 if with_fp16_flag is None else with_fp16_flag

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(_Sev)
        Severity = _Sev

        def __init__(self):
            rec.calls.append(("ilogger_init",))

    class Err:
        def desc(self):
            return "Unsupported operator FooOp"

        def node(self):
            return 7

        def node_operator(self):
            return "FooOp"

        def node_name(self):
            return "/foo/FooOp"

    class Tensor:
        name, shape = "input", (-1, 3, 8, 8)

    class Network:
        num_inputs, num_layers = 1, 5

        def get_input(self, i):
            return Tensor()

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            rec.calls.append(("parse", bytes(data)))
            return parse_ok

        def get_error(self, i):
            return Err()

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            rec.calls.append(("set_shape", name, mn, op, mx))

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"cache-out"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("pool", pool, size))

        def set_flag(self, flag):
            rec.calls.append(("flag", flag))

        def clear_flag(self, flag):
            rec.calls.append(("clear_flag", flag))

        def add_optimization_profile(self, p):
            rec.calls.append(("profile",))

        def create_timing_cache(self, blob):
            blob = bytes(blob)
            rec.calls.append(("create_cache", blob))
            return None if blob == b"garbage" else Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            ok = cache_ok or cache.blob == b""
            rec.calls.append(("set_cache", cache.blob, ignore_mismatch, ok))
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return self.cache

        def __setattr__(self, name, value):
            if name == "int8_calibrator":
                rec.calls.append(("int8_calibrator", value))
            object.__setattr__(self, name, value)

        def set_calibration_profile(self, profile):
            rec.calls.append(("calibration_profile",))
            return True

    if not v10:      # removed in 11.0
        del Config.set_calibration_profile

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            rec.calls.append(("builder", _cur()))

        def create_network(self, flags):
            rec.calls.append(("network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(_Sev.WARNING, "fake builder warning")
            self.logger.log(_Sev.INFO, "fake builder info")
            calib = getattr(config, "int8_calibrator", None)
            if calib is not None:            # what TensorRT does with a calibrator
                if calib.read_calibration_cache() is None:
                    while True:
                        ptrs = calib.get_batch(["input"])
                        if not ptrs:
                            break
                        rec.calls.append(("calib_batch", calib.get_batch_size(), len(ptrs)))
                    calib.write_calibration_cache(memoryview(b"calib-table"))
            if not build_ok:
                self.logger.log(_Sev.ERROR, "out of fake memory")
                return None
            return b"PLAN"

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def get_all_weights(self):
            return ["w1", "b1"]

        def set_named_weights(self, name, w):
            rec.calls.append(("set_named", name, w.shape, w.dtype))
            return name not in reject

        def get_missing_weights(self):
            return list(missing)

        def refit_cuda_engine(self):
            rec.calls.append(("refit",))
            return True

    if prototype is not None:
        Refitter.get_weights_prototype = lambda self, name: types.SimpleNamespace(
            dtype=prototype, size=4)

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            pass

        def refit_from_bytes(self, data):
            rec.calls.append(("refit_from_bytes", data))
            return True

    flags = dict(TF32="TF32", REFIT="REFIT")
    if v10:
        flags.update(INT8="INT8", FP8="FP8")
    if fp16_flag:
        flags["FP16"] = "FP16"
    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Refitter = ILogger, Builder, Parser, Refitter
    trt.OnnxParserRefitter = OnnxParserRefitter
    trt.Weights = lambda a: a
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.float16, trt.float32 = "half", "float"
    trt.nptype = lambda dt: {"half": np.float16, "float": np.float32}[dt]
    if v10:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                rec.calls.append(("calibrator_init",))
        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    trt.engine = types.SimpleNamespace(refittable=refittable)
    return trt


DYN = {"dynamic_batch": True, "batch_size": 1, "chw": (3, 8, 8)}


def _build(trt, *, data=b"onnx", settings=DYN, qdq=None, **kw):
    return E.build_engine(data, E.BuildOptions(**kw), settings, trt=trt, qdq=qdq)


def test_build_engine_calls(tmp_path):
    rec = _Rec()
    cache_file = tmp_path / "tc.bin"
    cache_file.write_bytes(b"cache-in")
    plan, info, cache = _build(fake_trt(rec), fp16=True, refittable=True, workspace_gb=0.5,
                               min_batch=2, opt_batch=4, max_batch=16,
                               timing_cache=str(cache_file))
    assert plan == b"PLAN" and cache == b"cache-out"
    assert ("network", 0) in rec.calls
    assert ("pool", "WORKSPACE", 1 << 29) in rec.calls
    assert ("flag", "FP16") in rec.calls and ("flag", "REFIT") in rec.calls
    assert ("set_shape", "input", (2, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)) in rec.calls
    assert ("profile",) in rec.calls
    assert ("create_cache", b"cache-in") in rec.calls
    assert ("set_cache", b"cache-in", False, True) in rec.calls
    assert info["timing_cache"]["status"] == "reused"
    assert info["batch"] == {"min": 2, "opt": 4, "max": 16} and info["layers"] == 5
    rec2 = _Rec()
    _build(fake_trt(rec2))
    assert not rec2.named("create_cache") and ("flag", "FP16") not in rec2.calls


# --- 1. TF32 is TensorRT's default: cleared unless --tf32, and the precision is reported


@pytest.mark.parametrize("version", [V10, V11])
def test_fp32_engines_clear_tf32(version):
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=version))
    assert ("clear_flag", "TF32") in rec.calls and ("flag", "TF32") not in rec.calls
    prec = info["precision"]
    assert prec["name"] == "fp32" and prec["tf32"] is False
    assert "TF32 off" in info["precision_text"]
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=version), tf32=True)
    assert ("flag", "TF32") in rec.calls and ("clear_flag", "TF32") not in rec.calls
    assert info["precision"]["name"] == "tf32" and "TF32 on" in info["precision_text"]


@pytest.mark.parametrize("flags", [dict(fp16=True), dict(qdq="int8")])
def test_tf32_cleared_in_reduced_precision_builds_too(flags):
    rec = _Rec()
    _build(fake_trt(rec), **flags)
    assert ("clear_flag", "TF32") in rec.calls


# --- 2. FP16 per TensorRT version


def test_fp16_on_tensorrt10_sets_the_builder_flag(tiny_onnx):
    rec = _Rec()
    data = open(tiny_onnx, "rb").read()
    _, info, _ = _build(fake_trt(rec, version=V10), fp16=True, data=data)
    assert ("flag", "FP16") in rec.calls and ("network", 0) in rec.calls
    assert rec.named("parse") == [("parse", data)]            # the ONNX as it is
    p = info["precision"]
    assert p["name"] == "fp16" and not p["strongly_typed"] and not p["fp16_onnx"]
    assert p["builder_flags"] == ["FP16"] and info["fp16"] is True


def _float_types(proto):
    io = [t.type.tensor_type.elem_type for t in [*proto.graph.input, *proto.graph.output]]
    inits = {i.data_type for i in proto.graph.initializer}
    return io, inits


@pytest.mark.parametrize("version,net_flags", [(V11, 0), ("10.99.0", 1 << 1)])
def test_fp16_without_the_flag_builds_a_strongly_typed_fp16_onnx(tiny_onnx, version, net_flags):
    """TensorRT 11 (or any build without BuilderFlag.FP16): the ONNX converted to fp16 with fp32
    I/O, parsed into a strongly typed network (the creation flag only where it still matters)."""
    import onnx
    rec = _Rec()
    data = open(tiny_onnx, "rb").read()
    _, info, _ = _build(fake_trt(rec, version=version, with_fp16_flag=False), fp16=True,
                        data=data)
    assert ("network", net_flags) in rec.calls
    assert not [c for c in rec.named("flag") if c[1] != "REFIT"]
    parsed = onnx.load_from_string(rec.named("parse")[0][1])
    io, inits = _float_types(parsed)
    assert io == [onnx.TensorProto.FLOAT] * 2                      # fp32 I/O kept
    assert onnx.TensorProto.FLOAT16 in inits and "Cast" in {n.op_type for n in parsed.graph.node}
    p = info["precision"]
    assert p["name"] == "fp16" and p["strongly_typed"] and p["fp16_onnx"]
    assert "ONNX converted to fp16" in info["precision_text"]


def test_fp16_onnx_runs_in_onnxruntime_close_to_fp32(tiny_onnx):
    """The converted graph is a valid model computing the same function at fp16 precision."""
    from ssf_deploy.export import OrtRunner
    from ssf_deploy.verify import FP16_ATOL, FP16_RTOL, verify
    data = open(tiny_onnx, "rb").read()
    half = OrtRunner(E.fp16_onnx(data), providers=["CPUExecutionProvider"], label="fp16")
    full = OrtRunner(data, providers=["CPUExecutionProvider"], label="fp32")
    assert verify(full, half, torch.randn(4, 3, 8, 8), atol=FP16_ATOL, rtol=FP16_RTOL).passed


# --- 3. TensorRT's log goes to stderr, never into --json stdout


def test_logger_writes_to_stderr_and_honours_verbose(capsys):
    rec = _Rec()
    trt = fake_trt(rec)
    quiet = E.make_logger(trt)
    assert isinstance(quiet, trt.ILogger) and ("ilogger_init",) in rec.calls
    quiet.log(_Sev.WARNING, "w1")
    quiet.log(_Sev.INFO, "i1")
    quiet.log(_Sev.ERROR, "e1")
    out, err = capsys.readouterr()
    assert out == "" and "[TensorRT] warning: w1" in err and "e1" in err and "i1" not in err
    assert quiet.errors == ["e1"]
    loud = E.make_logger(trt, verbose=True)
    loud.log(_Sev.INFO, "i2")
    loud.log(_Sev.VERBOSE, "v2")
    out, err = capsys.readouterr()
    assert out == "" and "[TensorRT] info: i2" in err and "v2" not in err


def test_build_logs_go_to_stderr_and_failures_name_the_last_error(capsys):
    _build(fake_trt(_Rec()))
    out, err = capsys.readouterr()
    assert out == "" and "fake builder warning" in err and "fake builder info" not in err
    _build(fake_trt(_Rec()), verbose=True)
    assert "fake builder info" in capsys.readouterr().err
    with pytest.raises(SSFDeployError) as e:
        _build(fake_trt(_Rec(), build_ok=False))
    assert "out of fake memory" in str(e.value) and "\n" not in str(e.value)


# --- 5. a timing cache from elsewhere is checked and replaced


def test_timing_cache_new_reused_mismatch_unreadable(tmp_path):
    path = tmp_path / "tc.bin"
    rec = _Rec()
    _, info, cache = _build(fake_trt(rec), timing_cache=str(path))
    assert info["timing_cache"]["status"] == "new" and cache == b"cache-out"
    assert ("set_cache", b"", False, True) in rec.calls
    path.write_bytes(b"from-an-a100")
    rec = _Rec()
    _, info, cache = _build(fake_trt(rec, cache_ok=False), timing_cache=str(path))
    tc = info["timing_cache"]
    assert tc["status"] == "mismatch" and "another GPU or TensorRT version" in tc["message"]
    assert "fresh" in tc["message"] and "\n" not in tc["message"]
    assert [c[1:] for c in rec.named("set_cache")] == [(b"from-an-a100", False, False),
                                                       (b"", False, True)]
    assert cache == b"cache-out"                     # the fresh cache is what gets written
    path.write_bytes(b"garbage")
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec), timing_cache=str(path))
    assert info["timing_cache"]["status"] == "unreadable"
    assert "cannot be read by TensorRT 10.16.1.11" in info["timing_cache"]["message"]
    assert ("set_cache", b"", False, True) in rec.calls


# --- 12. INT8: Q/DQ detection and the route per version; FP8; calibration


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


def test_int8_qdq_on_tensorrt10_sets_int8_on_a_weakly_typed_network():
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=V10), qdq="int8")
    assert ("flag", "INT8") in rec.calls and ("network", 0) in rec.calls
    p = info["precision"]
    assert (p["name"], p["quantization"], p["strongly_typed"]) == ("int8", "explicit", False)
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=V10), qdq="int8", fp16=True)
    assert ("flag", "FP16") in rec.calls and info["precision_text"].startswith("int8+fp16")


def test_int8_qdq_on_tensorrt11_is_strongly_typed():
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=V11), qdq="int8")
    assert not [c for c in rec.named("flag") if c[1] != "REFIT"] and ("network", 0) in rec.calls
    p = info["precision"]
    assert (p["name"], p["quantization"], p["strongly_typed"]) == ("int8", "explicit", True)
    with pytest.raises(SSFDeployError, match="TensorRT 11.1.0.4") as e:
        _build(fake_trt(_Rec(), version=V11), qdq="int8", fp16=True)
    assert "removed in 11.0" in str(e.value)


def test_build_reads_qdq_from_the_onnx_when_not_told(int8_onnx):
    rec = _Rec()
    _, info, _ = E.build_engine(open(int8_onnx, "rb").read(), E.BuildOptions(), DYN,
                                trt=fake_trt(rec))
    assert info["precision"]["name"] == "int8" and ("flag", "INT8") in rec.calls


@pytest.mark.parametrize("version,net_flags", [(V10, 1 << 1), (V11, 0)])
def test_fp8_qdq_is_built_strongly_typed(version, net_flags):
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=version), qdq="fp8", fp8=True)
    assert ("network", net_flags) in rec.calls
    assert not [c for c in rec.named("flag") if c[1] not in ("REFIT",)]
    assert info["precision"]["name"] == "fp8" and info["precision"]["strongly_typed"]


@pytest.mark.parametrize("kw,match", [
    (dict(fp8=True), "FP8 Q/DQ nodes"),
    (dict(fp8=True, qdq="int8"), "INT8 Q/DQ"),
    (dict(int8=True), "--calib DIR"),
    (dict(int8=True, fp8=True, qdq="fp8"), "exclude"),
    (dict(calibrate=True), "add --int8"),
    (dict(int8=True, calibrate=True, qdq="int8"), "already quantized"),
    (dict(qdq="fp8", fp16=True), "drop --fp16"),
    (dict(qdq="int8", refittable=True), "scales depend on the task's weights"),
])
def test_precision_requests_refused_before_tensorrt(kw, match):
    with pytest.raises(UsageError, match=match) as e:
        E.check_precision_request(**kw)
    assert "\n" not in str(e.value)


def test_refittable_int8_build_is_refused():
    with pytest.raises(SSFDeployError, match="scales depend"):
        _build(fake_trt(_Rec()), qdq="int8", refittable=True)


def _png_folder(folder, n, size=40):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return str(folder)


def test_calibration_images_use_timms_eval_transform(tmp_path):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    folder = _png_folder(tmp_path / "imgs", 5)
    imgs = E.CalibrationImages(folder, "test_vit", (3, 32, 32), 2)
    batches = list(imgs)
    assert len(imgs) == 2 and [tuple(b.shape) for b in batches] == [(2, 3, 32, 32)] * 2
    with torch.device("meta"):
        m = timm.create_model("test_vit")
    cfg = resolve_data_config({}, model=m)
    cfg["input_size"] = (3, 32, 32)
    tf = create_transform(**cfg, is_training=False)
    with Image.open(E.image_files(folder)[0]) as img:
        want = tf(img.convert("RGB"))
    torch.testing.assert_close(batches[0][0], want)
    with pytest.raises(UsageError, match="fewer than one batch"):
        E.CalibrationImages(folder, "test_vit", (3, 32, 32), 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images"):
        E.CalibrationImages(str(empty), "test_vit", (3, 32, 32), 1)


def test_int8_calibration_on_tensorrt10(tmp_path, monkeypatch):
    """--int8 --calib: IInt8EntropyCalibrator2 fed with image batches on the build's device,
    a calibration profile for the dynamic batch, the table kept for the cache file."""
    folder = _png_folder(tmp_path / "imgs", 6)
    images = E.CalibrationImages(folder, "test_vit", (3, 8, 8), 3)
    moved, to = [], torch.Tensor.to

    def record_to(self, *a, **k):        # CUDA copies of the batches, kept on the CPU here
        if a and isinstance(a[0], torch.device):
            moved.append(a[0])
            return self
        return to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    calib = E.Calibration(images=images, cache=str(tmp_path / "calib.cache"), batch_size=3)
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=V10), int8=True, calibration=calib)
    assert ("flag", "INT8") in rec.calls and rec.named("int8_calibrator")
    assert ("calibrator_init",) in rec.calls and ("calibration_profile",) in rec.calls
    assert ("set_shape", "input", (3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 8)) in rec.calls
    assert rec.named("calib_batch") == [("calib_batch", 1, 1)] * 2      # one pointer each
    assert calib.cache_out == b"calib-table"
    assert info["precision"]["quantization"] == "calibrated"
    assert info["calibration"]["batches"] == 2 and not info["calibration"]["cache_read"]
    assert moved == [torch.device("cuda")] * 2
    # a cache that exists is read and no image is needed
    (tmp_path / "calib.cache").write_bytes(b"calib-table")
    calib2 = E.Calibration(images=None, cache=str(tmp_path / "calib.cache"), batch_size=3)
    rec = _Rec()
    _, info, _ = _build(fake_trt(rec, version=V10), int8=True, calibration=calib2)
    assert not rec.named("calib_batch") and info["calibration"]["cache_read"]


def test_int8_calibration_refused_on_tensorrt11(tmp_path):
    calib = E.Calibration(images=None, cache=str(tmp_path / "c"), batch_size=2)
    with pytest.raises(SSFDeployError) as e:
        _build(fake_trt(_Rec(), version=V11), int8=True, calibration=calib)
    msg = str(e.value)
    assert "TensorRT 11.1.0.4" in msg and "removed in 11.0" in msg and "Q/DQ" in msg
    assert "\n" not in msg


def test_calibration_errors_surface_as_one_line(tmp_path):
    calib = E.Calibration(images=None, cache=str(tmp_path / "missing.cache"), batch_size=2)
    with pytest.raises(SSFDeployError, match="no --calib DIR") as e:
        _build(fake_trt(_Rec(), version=V10), int8=True, calibration=calib)
    assert "\n" not in str(e.value)


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


# --- refit: weights by name (cast to the engine's dtype), refusal for INT8/FP8


def test_refit_engine_by_name():
    rec = _Rec()
    trt = fake_trt(rec)
    seen = {}

    def weights_for(names):
        seen["names"] = names
        return {"w1": np.ones((2, 2), np.float32), "b1": np.zeros(2, np.float32)}
    info = E.refit_engine(trt.engine, weights_for, trt=trt)
    assert seen["names"] == ["w1", "b1"] and info["weights"] == 2
    assert ("set_named", "w1", (2, 2), np.float32) in rec.calls and ("refit",) in rec.calls
    with pytest.raises(SSFDeployError, match="refittable"):
        t = fake_trt(_Rec(), refittable=False)
        E.refit_engine(t.engine, weights_for, trt=t)
    with pytest.raises(SSFDeployError, match="misses 1"):
        t = fake_trt(_Rec(), missing=["x"])
        E.refit_engine(t.engine, weights_for, trt=t)
    with pytest.raises(SSFDeployError, match="rejected the weights 'b1'"):
        t = fake_trt(_Rec(), reject=["b1"])
        E.refit_engine(t.engine, weights_for, trt=t)


def test_refit_casts_to_the_engines_weight_dtype():
    """An engine built from the fp16 ONNX (TensorRT 11 --fp16) holds fp16 weights."""
    rec = _Rec()
    trt = fake_trt(rec, prototype="half")
    E.refit_engine(trt.engine, lambda names: {n: np.ones(2, np.float32) for n in names}, trt=trt)
    assert [c[3] for c in rec.named("set_named")] == [np.float16, np.float16]


def test_refit_engine_falls_back_to_onnx_refitter_for_unnamed_weights():
    rec = _Rec()
    trt = fake_trt(rec)

    def only_w1(names):
        return {"w1": np.ones((2, 2), np.float32)}     # "b1" has no ONNX name
    with pytest.raises(SSFDeployError, match="no ONNX name"):
        E.refit_engine(trt.engine, only_w1, trt=trt)
    info = E.refit_engine(trt.engine, only_w1, onnx_fallback=lambda: b"task-onnx", trt=trt)
    assert info["method"].startswith("OnnxParserRefitter") and info["unnamed_weights"] == 1
    assert ("refit_from_bytes", b"task-onnx") in rec.calls
    assert not rec.named("set_named")


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


def test_sidecar_precision_of_old_sidecars():
    assert E.sidecar_precision({}).name == "tf32"          # TensorRT's default was on
    assert E.sidecar_precision({"fp16": True}).name == "fp16"
    p = E.Precision(name="int8", quantization="explicit", builder_flags=["INT8"])
    assert E.sidecar_precision({"precision": p.as_dict()}) == p


# --- 7. explicit CUDA device for builder, runtime and runner


class _FakeStream:
    def __init__(self, device=None):
        self.device, self.cuda_stream = device, 1234

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class _FakeDevice:
    def __init__(self, index):
        self.index = index

    def __enter__(self):
        _CURRENT_DEVICE.append(self.index)

    def __exit__(self, *exc):
        _CURRENT_DEVICE.pop()


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _FakeDevice)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


class _FakeEvent:
    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.0


_MEMORY = {}      # data_ptr -> tensor: the stand-in's "device memory" (see _cpu_memory)


@pytest.fixture
def cpu_memory(monkeypatch):
    """TrtRunner's device buffers as CPU tensors the stand-in engine can read and write."""
    def to_device(self, x, dtype):
        t = x.to(dtype=dtype).contiguous().clone()
        _MEMORY[t.data_ptr()] = t
        return t

    def empty(self, shape, dtype):
        t = torch.zeros(shape, dtype=dtype)
        _MEMORY[t.data_ptr()] = t
        return t
    monkeypatch.setattr(E.TrtRunner, "_to_device", to_device)
    monkeypatch.setattr(E.TrtRunner, "_empty", empty)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    yield
    _MEMORY.clear()


def _runtime_trt(rec, trt, compute=None):
    """Adds Runtime/engine/context to the stand-in; ``compute(x)`` fills the output (needs
    ``cpu_memory``), else the output stays zero."""
    class Context:
        def __init__(self):
            self.addr = {}

        def set_input_shape(self, name, shape):
            rec.calls.append(("input_shape", name, shape, _cur()))
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name):
            return (self.batch, 3)

        def set_tensor_address(self, name, ptr):
            rec.calls.append(("address", name))
            self.addr[name] = ptr

        def execute_async_v3(self, handle):
            rec.calls.append(("execute", handle, _cur()))
            if compute is not None:
                _MEMORY[self.addr["logits"]].copy_(compute(_MEMORY[self.addr["input"]]))
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return "IN" if name == "input" else "OUT"

        def get_tensor_dtype(self, name):
            return "float"

        def create_execution_context(self):
            rec.calls.append(("context", _cur()))
            return Context()

    class Runtime:
        def __init__(self, logger):
            rec.calls.append(("runtime", _cur()))

        def deserialize_cuda_engine(self, data):
            rec.calls.append(("deserialize", _cur()))
            return Engine()

    trt.Runtime = Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="IN", OUTPUT="OUT")
    return trt


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


def test_builder_and_runner_run_on_the_given_device(fake_cuda, monkeypatch):
    rec = _Rec()
    trt = _runtime_trt(rec, fake_trt(rec))
    _, info, _ = _build(trt, device="cuda:1")
    assert ("builder", 1) in rec.calls and info["device"] == "cuda:1"
    _build(trt)
    assert ("builder", None) in rec.calls                  # no device given: the current one

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    placed = []

    class Runner(E.TrtRunner):      # device memory without a GPU: record where it would go
        def _to_device(self, x, dtype):
            placed.append(("input", self.device, dtype))
            return x.to(dtype=dtype).contiguous()

        def _empty(self, shape, dtype):
            placed.append(("output", self.device, dtype))
            return torch.zeros(shape, dtype=dtype)

    runner = Runner(b"PLAN", device="cuda:1")
    assert runner.device == torch.device("cuda", 1) and runner.stream.device == runner.device
    assert ("runtime", 1) in rec.calls and ("deserialize", 1) in rec.calls
    out = runner(torch.randn(4, 3, 8, 8))
    assert out[0].shape == (4, 3)
    assert ("context", 1) in rec.calls and ("input_shape", "input", (4, 3, 8, 8), 1) \
        in rec.calls
    assert ("execute", 1234, 1) in rec.calls
    assert placed == [("input", torch.device("cuda", 1), torch.float32),
                      ("output", torch.device("cuda", 1), torch.float32)]


def test_refit_engine_on_the_given_device(fake_cuda):
    rec = _Rec()
    trt = fake_trt(rec)
    seen = []
    orig = trt.Refitter.__init__

    def init(self, engine, logger):
        seen.append(_cur())
        orig(self, engine, logger)
    trt.Refitter.__init__ = init
    E.refit_engine(trt.engine, lambda n: {k: np.ones(2, np.float32) for k in n}, trt=trt,
                   device="cuda:1")
    assert seen == [1]


# --- the CLI: precision contradictions and FP8 capability, before or without a GPU build


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


def test_engine_cli_fp8_needs_compute_capability_89(tmp_path, fake_cuda, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(_Rec()))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    f8 = _fp8_onnx(str(tmp_path / "f8.onnx"))
    out = tmp_path / "f8.plan"
    assert main(["engine", f8, "--out", str(out), "--fp8"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "compute capability 8.9" in line and "A100 is 8.0" in line
    assert not out.exists()


@pytest.mark.parametrize("version,flags,precision", [
    (V10, [], "fp32"), (V11, ["--tf32"], "tf32"), (V10, ["--fp16"], "fp16"),
    (V11, ["--fp16"], "fp16"), (V10, ["INT8"], "int8"), (V11, ["INT8"], "int8")])
def test_engine_cli_end_to_end_with_the_stand_in(tiny_onnx, int8_onnx, tmp_path, fake_cuda,
                                                 cpu_memory, monkeypatch, capsys, version,
                                                 flags, precision):
    """The whole command on the CPU: build, compare with onnxruntime (the stand-in engine runs
    the same graph in onnxruntime), time, write. The precision is in the text report, the JSON
    and the sidecar; TensorRT's log is on stderr, not in the JSON; the timing cache and the
    sidecar are written with the engine."""
    from ssf_deploy.export import OrtRunner
    src = int8_onnx if flags == ["INT8"] else tiny_onnx
    flags = [] if flags == ["INT8"] else flags
    ort = OrtRunner(src, providers=["CPUExecutionProvider"])
    rec = _Rec()
    trt = _runtime_trt(rec, fake_trt(rec, version=version, cache_ok=False),
                       compute=lambda x: ort(x)[0])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan, cache = tmp_path / "m.plan", tmp_path / "tc.bin"
    cache.write_bytes(b"from-another-gpu")
    argv = ["engine", src, "--out", str(plan), *flags, "--iters", "3", "--warmup", "1",
            "--timing-cache", str(cache), "--device", "cuda:1"]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert "fake builder warning" in err and "fake builder warning" not in out
    assert r["passed"] and r["precision"] == precision
    assert r["build"]["precision"]["name"] == precision and r["build"]["device"] == "cuda:1"
    assert r["build"]["timing_cache"]["status"] == "mismatch"
    assert r["verify"]["outputs"][0]["top1_agreement"] == 1.0
    side = E.read_sidecar(str(plan))
    assert side["precision"]["name"] == precision and "tolerances" in side
    assert plan.read_bytes() == b"PLAN" and cache.read_bytes() == b"cache-out"
    assert main(argv) == 0                                  # the text report
    text = capsys.readouterr().out
    assert f"precision: {precision}" in text and "TF32 o" in text and text.endswith("PASS\n")
    assert "timing cache" in text and "top-1 agree 100.0%" in text


def test_engine_cli_mismatch_writes_nothing(tiny_onnx, tmp_path, fake_cuda, cpu_memory,
                                            monkeypatch, capsys):
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "tensorrt", _runtime_trt(rec, fake_trt(rec)))  # zeros out
    plan = tmp_path / "m.plan"
    assert main(["engine", tiny_onnx, "--out", str(plan), "--iters", "2", "--timing-cache",
                 str(tmp_path / "tc.bin"), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["passed"] is False
    assert "does not match onnxruntime" in _one_line(err.replace("[TensorRT] warning: fake "
                                                                "builder warning", ""))
    assert list(tmp_path.iterdir()) == []


def test_import_tensorrt_refuses_old_versions(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(SSFDeployError, match="too old"):
        E.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.1.0"))
    assert E.import_tensorrt().__version__ == "11.1.0"


# --------------------------------------------------------------------------------------------
# the real thing (GPU + TensorRT)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_build_run_and_refit(tmp_path, capsys):
    """Build a refittable engine from task A's ONNX, refit it to task B, compare, time it."""
    from safetensors.torch import save_file
    from ssf_deploy.fuse import fuse
    from ssf_deploy.models import create_base_model
    from ssf_deploy.formats.pack import save_pack
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
    pack = str(tmp_path / "B.safetensors")
    save_pack(B, pack, model_kwargs=kw)
    onnx_path, plan = str(tmp_path / "vit.onnx"), str(tmp_path / "vit.plan")
    x = torch.randn(2, 3, 32, 32)
    export_onnx(fuse(A, x), onnx_path, example=x[:1], dynamic_batch=True,
                metadata={"arch": "test_vit", "num_classes": 5, "fused_from": "ssf"})
    assert main(["engine", onnx_path, "--out", plan, "--refittable", "--max-batch", "8",
                 "--opt-batch", "4", "--iters", "5", "--timing-cache",
                 str(tmp_path / "tc.bin"), "--json"]) == 0
    captured = capsys.readouterr()
    built = json.loads(captured.out)          # TensorRT's log went to stderr, not in the JSON
    assert built["passed"] and built["latency"]["median_ms"] > 0
    assert built["precision"] == "fp32" and built["build"]["precision"]["tf32"] is False
    assert built["tolerances"]["atol"] == 1e-4
    assert os.path.isfile(plan) and os.path.isfile(E.sidecar_path(plan))
    assert E.read_sidecar(plan)["precision"]["name"] == "fp32"
    out = str(tmp_path / "vit_B.plan")
    assert main(["refit", plan, "--pack", pack, "--base-weights", base_file, "--out", out,
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["refit"]["refit_seconds"] < 1.0
    # the refitted engine runs task B
    runner = E.TrtRunner(open(out, "rb").read())
    with torch.no_grad():
        yB, yA = B(x), A(x)
    got = runner(x)[0]
    torch.testing.assert_close(got, yB, atol=1e-3, rtol=1e-3)
    assert (got - yA).abs().max() > 1e-2
    # fp16 build (TensorRT 10: BuilderFlag.FP16; 11: fp16 ONNX, strongly typed), fp16 tolerances
    assert main(["engine", onnx_path, "--out", str(tmp_path / "h.plan"), "--fp16",
                 "--iters", "3", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["precision"] == "fp16" and half["tolerances"]["atol"] == 2e-2
    # the reused timing cache is accepted on the GPU that made it
    assert main(["engine", onnx_path, "--out", str(tmp_path / "again.plan"), "--iters", "2",
                 "--timing-cache", str(tmp_path / "tc.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["build"]["timing_cache"]["status"] == "reused"


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


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_int8_from_qdq_onnx_matches_onnxruntime(tmp_path, capsys):
    """The recommended INT8 route: an explicitly quantized ONNX, compared with onnxruntime
    running the same Q/DQ graph; refit refuses the engine."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, \
        quantize_static
    src = _fused_vit_onnx(tmp_path)
    imgs = _png_folder(tmp_path / "imgs", 16, size=32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = E.CalibrationImages(imgs, "test_vit", (3, 32, 32), 4)
            self.it = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    qdq = str(tmp_path / "vit.int8.onnx")
    quantize_static(src, qdq, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QuantizeBias": False})
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
    assert "[TensorRT] info:" in captured.err
    runner = E.TrtRunner(open(plan, "rb").read(), device=last)
    assert runner(torch.randn(2, 3, 32, 32))[0].shape == (2, 5)
