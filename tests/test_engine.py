"""``engine`` / ``refit x.plan``: arguments, missing TensorRT, parser errors, build options, refit
by name — on the CPU with a stand-in for the ``tensorrt`` module; the real build, run and refit
are ``@pytest.mark.tensorrt`` tests (skipped without TensorRT and a GPU).
"""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from ssf_deploy import engine as E
from ssf_deploy.errors import SSFDeployError
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
# the TensorRT calls, against a recording stand-in


class _Rec:
    def __init__(self):
        self.calls = []


def fake_trt(rec: _Rec, *, parse_ok=True, refittable=True, missing=(), reject=()):
    trt = types.SimpleNamespace(__version__="10.fake")

    class Logger:
        WARNING, INFO = "W", "I"

        def __init__(self, sev):
            rec.calls.append(("logger", sev))

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
            rec.calls.append(("parse", len(data)))
            return parse_ok

        def get_error(self, i):
            return Err()

    class Profile:
        def set_shape(self, name, mn, op, mx):
            rec.calls.append(("set_shape", name, mn, op, mx))

    class Cache:
        def serialize(self):
            return b"cache-out"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("pool", pool, size))

        def set_flag(self, flag):
            rec.calls.append(("flag", flag))

        def add_optimization_profile(self, p):
            rec.calls.append(("profile",))

        def create_timing_cache(self, blob):
            rec.calls.append(("create_cache", bytes(blob)))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_cache", ignore_mismatch))

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def get_all_weights(self):
            return ["w1", "b1"]

        def set_named_weights(self, name, w):
            rec.calls.append(("set_named", name, w.shape))
            return name not in reject

        def get_missing_weights(self):
            return list(missing)

        def refit_cuda_engine(self):
            rec.calls.append(("refit",))
            return True

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            pass

        def refit_from_bytes(self, data):
            rec.calls.append(("refit_from_bytes", data))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Refitter = Logger, Builder, Parser, Refitter
    trt.OnnxParserRefitter = OnnxParserRefitter
    trt.Weights = lambda a: a
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", REFIT="REFIT")
    trt.engine = types.SimpleNamespace(refittable=refittable)
    return trt


DYN = {"dynamic_batch": True, "batch_size": 1, "chw": (3, 8, 8)}


def test_build_engine_calls(tmp_path):
    rec = _Rec()
    cache_file = tmp_path / "tc.bin"
    cache_file.write_bytes(b"cache-in")
    opts = E.BuildOptions(fp16=True, refittable=True, workspace_gb=0.5, min_batch=2,
                          opt_batch=4, max_batch=16, timing_cache=str(cache_file))
    plan, info, cache = E.build_engine(b"onnx", opts, DYN, trt=fake_trt(rec))
    assert plan == b"PLAN" and cache == b"cache-out"
    assert ("network", 0) in rec.calls
    assert ("pool", "WORKSPACE", 1 << 29) in rec.calls
    assert ("flag", "FP16") in rec.calls and ("flag", "REFIT") in rec.calls
    assert ("set_shape", "input", (2, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)) in rec.calls
    assert ("profile",) in rec.calls
    assert ("create_cache", b"cache-in") in rec.calls and ("set_cache", False) in rec.calls
    assert info["batch"] == {"min": 2, "opt": 4, "max": 16} and info["layers"] == 5
    rec2 = _Rec()
    E.build_engine(b"onnx", E.BuildOptions(), DYN, trt=fake_trt(rec2))
    assert not [c for c in rec2.calls if c[0] in ("flag", "create_cache")]


def test_parser_errors_are_one_clear_line():
    rec = _Rec()
    with pytest.raises(SSFDeployError) as e:
        E.build_engine(b"onnx", E.BuildOptions(), DYN, source="m.onnx",
                       trt=fake_trt(rec, parse_ok=False))
    msg = str(e.value)
    assert "ONNX parser rejected m.onnx" in msg and "FooOp" in msg and "node 7" in msg
    assert "Unsupported operator" in msg and "\n" not in msg


def test_refit_engine_by_name():
    rec = _Rec()
    trt = fake_trt(rec)
    seen = {}

    def weights_for(names):
        seen["names"] = names
        return {"w1": np.ones((2, 2), np.float32), "b1": np.zeros(2, np.float32)}
    info = E.refit_engine(trt.engine, weights_for, trt=trt)
    assert seen["names"] == ["w1", "b1"] and info["weights"] == 2
    assert ("set_named", "w1", (2, 2)) in rec.calls and ("refit",) in rec.calls
    with pytest.raises(SSFDeployError, match="refittable"):
        t = fake_trt(_Rec(), refittable=False)
        E.refit_engine(t.engine, weights_for, trt=t)
    with pytest.raises(SSFDeployError, match="misses 1"):
        t = fake_trt(_Rec(), missing=["x"])
        E.refit_engine(t.engine, weights_for, trt=t)
    with pytest.raises(SSFDeployError, match="rejected the weights 'b1'"):
        t = fake_trt(_Rec(), reject=["b1"])
        E.refit_engine(t.engine, weights_for, trt=t)


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
    assert not [c for c in rec.calls if c[0] == "set_named"]


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
    built = json.loads(capsys.readouterr().out)
    assert built["passed"] and built["latency"]["median_ms"] > 0
    assert os.path.isfile(plan) and os.path.isfile(E.sidecar_path(plan))
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
    # fp16 build uses fp16 tolerances
    assert main(["engine", onnx_path, "--out", str(tmp_path / "h.plan"), "--fp16",
                 "--iters", "3"]) == 0
