"""``refit``: a task's fused weights by ONNX initializer name, onnxruntime swap, CLI, errors.

One ONNX exported from task A's fused model must run task B exactly once B's initializers are
swapped in (and must then differ from A). Three families cover the three weight sources:
ViT (every initializer maps to a state key), ConvNeXt (reshaped layer scales are derived),
ResNet (BatchNorm folded into Convs: derived).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ssf_deploy.formats import build_model
from ssf_deploy.errors import SSFDeployError
from ssf_deploy.export import OrtRunner, export_onnx, export_proto
from ssf_deploy.fuse import fuse
from ssf_deploy.models import create_base_model
from ssf_deploy.formats.pack import read_pack, save_pack
from ssf_deploy.refit import (TaskOrtRunner, bake_initializers, check_task_matches,
                              compute_task_weights, export_settings, load_onnx, same_graph)
from ssf_deploy.tools import main
from ssf_deploy.tuners import apply_method

FAMILIES = {
    "vit": ("test_vit", {"img_size": 32, "patch_size": 8}),
    "convnext": ("test_convnext", {}),
    "resnet": ("test_resnet", {}),
}
NUM_CLASSES = 5


def _perturb_base(model: nn.Module) -> None:
    """Random weights away from init, so no two biases are equal (the exporter merges those)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)


def _task(arch, kwargs, base_file, seed) -> nn.Module:
    torch.manual_seed(seed)
    m = create_base_model(arch, NUM_CLASSES, pretrained_file=base_file, **kwargs)
    apply_method(m, "ssf")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:           # SSF factors and the head: this task's weights
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


class Setup:
    pass


_SETUPS: dict = {}


def _setup(family, tmp_path_factory):
    if family not in _SETUPS:
        _SETUPS[family] = _make_setup(family, tmp_path_factory)
    return _SETUPS[family]


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _setup("vit", tmp_path_factory)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return _setup("resnet", tmp_path_factory)


def _make_setup(family, tmp_path_factory):
    arch, kwargs = FAMILIES[family]
    d = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    base = create_base_model(arch, NUM_CLASSES, **kwargs)
    _perturb_base(base)
    s = Setup()
    s.family, s.arch, s.kwargs, s.dir = family, arch, kwargs, d
    s.base_file = str(d / "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, s.base_file)
    s.A = _task(arch, kwargs, s.base_file, seed=1)
    s.B = _task(arch, kwargs, s.base_file, seed=2)
    s.pack_B = str(d / "B.safetensors")
    save_pack(s.B, s.pack_B, model_kwargs=kwargs)
    s.x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    s.onnx_A = str(d / "A.onnx")
    export_onnx(fuse(s.A, s.x[:2]), s.onnx_A, example=s.x[:1], dynamic_batch=True,
                metadata={"arch": arch, "num_classes": NUM_CLASSES, "fused_from": "ssf"})
    with torch.no_grad():
        s.yA, s.yB = s.A(s.x), s.B(s.x)
    return s


def _fused_from_pack(s):
    if not hasattr(s, "fused_B"):
        s.model_B = build_model(read_pack(s.pack_B), base_weights=s.base_file)
        s.fused_B = fuse(s.model_B, s.x[:2])
    return s.model_B, s.fused_B


def _weights_B(s):
    if not hasattr(s, "w_B"):
        _, fused_B = _fused_from_pack(s)
        s.w_B = compute_task_weights(load_onnx(s.onnx_A), fused_B.state_dict(), fused_B)
    return s.w_B


def test_swapped_initializers_run_task_b(setup):
    s = setup
    proto = load_onnx(s.onnx_A)
    w = _weights_B(s)
    assert w.changed > 0
    out = TaskOrtRunner(s.onnx_A, w.values)(s.x)[0]
    torch.testing.assert_close(out, s.yB, atol=1e-4, rtol=1e-3)
    assert (out - s.yA).abs().max() > 1e-2            # it really is another task
    # the plain file is still task A
    torch.testing.assert_close(OrtRunner(s.onnx_A)(s.x)[0], s.yA, atol=1e-4, rtol=1e-3)
    # the same weights baked into a copy of the graph, in an optimized session
    baked = bake_initializers(proto, w.values)
    torch.testing.assert_close(OrtRunner(baked)(s.x)[0], s.yB, atol=1e-4, rtol=1e-3)
    # where the weights came from
    if s.family == "vit":   # the map covers everything: no re-export at all
        assert not w.from_export and len(w.from_map) == len(w.values) and not w.exported
    else:   # layer scales reshaped (ConvNeXt), BatchNorm folded into Conv (ResNet)
        assert w.from_export and w.exported


def test_map_only_needs_no_export_unless_derived(setup):
    s = setup
    proto = load_onnx(s.onnx_A)
    _, fused_B = _fused_from_pack(s)
    if s.family == "vit":
        vals = compute_task_weights(proto, fused_B.state_dict()).values
        out = TaskOrtRunner(proto, vals)(s.x)[0]
        torch.testing.assert_close(out, s.yB, atol=1e-4, rtol=1e-3)
    else:
        with pytest.raises(SSFDeployError, match="derived"):
            compute_task_weights(proto, fused_B.state_dict())


def test_cli_refit_onnx_writes_task_onnx(resnet, capsys):
    s = resnet
    out = s.dir / "B.onnx"
    rc = main(["refit", s.onnx_A, "--pack", s.pack_B, "--base-weights", s.base_file,
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["passed"] and report["weights"]["changed_vs_file"] > 0
    assert report["verify"]["reference"] == "unfused task (PyTorch)"
    torch.testing.assert_close(OrtRunner(str(out))(s.x)[0], s.yB, atol=1e-4, rtol=1e-3)


def test_cli_pack_for_another_architecture(vit, tmp_path, capsys):
    s = vit
    torch.manual_seed(4)
    m = create_base_model("test_resnet", NUM_CLASSES)
    apply_method(m, "ssf")
    pack = tmp_path / "resnet.safetensors"
    save_pack(m, str(pack))
    base = tmp_path / "rbase.safetensors"
    save_file({k: v.contiguous() for k, v in create_base_model(
        "test_resnet", NUM_CLASSES).state_dict().items()}, str(base))
    out = tmp_path / "never.onnx"
    rc = main(["refit", s.onnx_A, "--pack", str(pack), "--base-weights", str(base),
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "test_resnet" in err and "test_vit" in err
    assert not out.exists()


def test_shape_mismatch_names_the_initializer(vit):
    s = vit
    torch.manual_seed(5)
    other = create_base_model("test_vit", 7, img_size=32, patch_size=8).eval()
    proto = load_onnx(s.onnx_A)
    with pytest.raises(SSFDeployError, match="head.weight"):
        compute_task_weights(proto, other.state_dict())


def test_check_task_matches_classes(vit):
    s = vit
    task = read_pack(s.pack_B)
    check_task_matches(load_onnx(s.onnx_A), task)
    task.num_classes = 9
    with pytest.raises(SSFDeployError, match="9 classes"):
        check_task_matches(load_onnx(s.onnx_A), task)


def test_merged_equal_weights_are_refused():
    """A graph exported where two biases were equal (zero) cannot hold a task where they differ."""
    torch.manual_seed(0)

    def mlp(zero):
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
        if zero:
            with torch.no_grad():
                m[0].bias.zero_()
                m[2].bias.zero_()
        return m

    x = torch.randn(1, 8)
    proto = export_proto(mlp(True), example=x)
    b = mlp(False)
    with pytest.raises(SSFDeployError, match="merges equal weights"):
        compute_task_weights(proto, b.state_dict(), b)
    assert same_graph(proto, proto) is None


def test_export_settings_static_and_dynamic():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    x = torch.randn(2, 3, 16, 16)
    dyn = export_settings(export_proto(m.eval(), example=x[:1], dynamic_batch=True))
    assert dyn["dynamic_batch"] and dyn["chw"] == (3, 16, 16) and dyn["opset"] == 17
    static = export_settings(export_proto(m, example=x, dynamic_batch=False, opset=18))
    assert not static["dynamic_batch"] and static["batch_size"] == 2 and static["opset"] == 18


def test_unknown_names_and_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(SSFDeployError, match="cannot read ONNX"):
        load_onnx(str(bad))
    rc = main(["refit", str(bad), "--pack", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read ONNX" in err
    rc = main(["refit", str(tmp_path / "model.txt"), "--pack", "p.safetensors"])
    assert rc == 2 and "engine" in capsys.readouterr().err
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    proto = export_proto(m, example=torch.randn(1, 3, 8, 8))
    with pytest.raises(SSFDeployError, match="another ONNX"):
        compute_task_weights(proto, m.state_dict(), names=["no.such.weight"])


def test_refit_pack_needs_base_weights(vit, capsys):
    s = vit
    rc = main(["refit", s.onnx_A, "--pack", s.pack_B])
    assert rc == 2 and "--base-weights" in capsys.readouterr().err


def test_swap_needs_unoptimized_session(tmp_path_factory):
    """Why TaskOrtRunner disables graph optimizations: ORT ignores some overrides otherwise."""
    s = _setup("convnext", tmp_path_factory)   # its reshaped layer scales show it
    proto = load_onnx(s.onnx_A)
    vals = _weights_B(s).values
    try:   # the same overrides in a session optimized as usual (ORT_ENABLE_ALL)
        out = OrtRunner(s.onnx_A, initializers=vals, optimization="all")(s.x)[0]
        wrong = not torch.allclose(out, s.yB, atol=1e-4, rtol=1e-3)
    except Exception:
        wrong = True
    if not wrong:
        pytest.skip("this onnxruntime honours overrides under graph optimizations")
    torch.testing.assert_close(TaskOrtRunner(s.onnx_A, vals)(s.x)[0], s.yB, atol=1e-4, rtol=1e-3)
    assert all(isinstance(v, np.ndarray) for v in vals.values())
    assert isinstance(proto, onnx.ModelProto)


def test_refit_onnx_from_python(resnet, tmp_path):
    """The library call ``ssf-deploy refit model.onnx`` runs: a pack path, its base, a report,
    the ONNX written only when every check passed; a model works as the task too."""
    from ssf_deploy.errors import VerificationError
    from ssf_deploy.refit import refit_onnx
    s = resnet
    out = str(tmp_path / "B.onnx")
    report = refit_onnx(s.onnx_A, s.pack_B, out, base_weights=s.base_file)
    assert report.passed and report.written == out and report.verify.passed
    assert report.weights.changed > 0 and report.as_dict()["pack"] == s.pack_B
    torch.testing.assert_close(OrtRunner(out)(s.x)[0], s.yB, atol=1e-4, rtol=1e-3)
    back = refit_onnx(out, s.A)                # task A's own model: the graph runs A again
    assert back.passed and back.written is None and back.weights.changed > 0
    # a task whose unfused model disagrees with what the graph computes: nothing written
    wrong = str(tmp_path / "never.onnx")
    with pytest.raises(VerificationError) as e:
        refit_onnx(s.onnx_A, s.pack_B, wrong, base_weights=s.base_file, atol=0.0, rtol=0.0)
    assert e.value.report is not None and not e.value.report.passed
    assert not os.path.exists(wrong)
