"""The Python API behaves like a library a timm/PEFT user expects (issue 11's traps)."""
from __future__ import annotations

import copy

import pytest
import torch

import ssf_deploy as sd
from ssf_deploy.errors import (BaseMismatchError, CheckpointError, FuseError, SSFDeployError,
                               UsageError, VerificationError)
from ssf_deploy.tuners import METHODS, get_tuner, infer_method, trainable_state_dict, unload

from conftest import make_model

OPTIONS = {"vpt-shallow": {"prompts": 3, "dropout": 0.5}, "vpt-deep": {"prompts": 3, "dropout": 0.5},
           "adapter": {"dim": 4}, "ssf": {"init_std": 0.3}}


def _tuned(method: str, seed: int = 0):
    model = make_model("vit", seed=seed)
    sd.apply_method(model, method, **OPTIONS.get(method, {}))
    with torch.no_grad():   # move every trainable tensor off its init, so copies can differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_eval_is_deterministic(method):
    """VPT's prompt dropout used to be an unregistered module: eval() never turned it off."""
    model = _tuned(method).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_runs_on_its_own_parameters(method):
    """A deepcopy (timm's ModelEmaV2) must read its own prompts/factors, not the original's."""
    model = _tuned(method).eval()
    ema = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(ema(x), before, rtol=0, atol=0)
        for p in ema.parameters():
            if p.requires_grad:
                p.mul_(0.5)
        assert not torch.equal(ema(x), before)              # the copy reads its own tensors
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)   # the original is untouched


@pytest.mark.parametrize("method", METHODS)
def test_unload_restores_the_base_and_the_method_is_inferred_from_its_keys(method):
    model = _tuned(method)
    base_keys = set(make_model("vit").state_dict())
    state = trainable_state_dict(model)
    expected = method if get_tuner(method).key_pattern else "full"
    assert infer_method(state if method != "linear" else {}) in (expected, "full")
    if get_tuner(method).key_pattern:
        assert infer_method(state) == method
    unload(model)
    assert set(model.state_dict()) == base_keys
    assert sd.method_of(model) is None


def test_capabilities_live_on_the_tuner():
    fusable = {m for m in METHODS if get_tuner(m).fusable}
    assert fusable == {"full", "linear", "bias", "ssf"}
    assert {m for m in METHODS if get_tuner(m).adds_tokens} == {"vpt-shallow", "vpt-deep"}
    model = _tuned("adapter")
    with pytest.raises(FuseError, match="adds modules or tokens"):
        sd.fuse(model)


def test_error_hierarchy_and_exit_codes():
    for cls in (UsageError, CheckpointError, BaseMismatchError, FuseError, VerificationError):
        assert issubclass(cls, SSFDeployError)
    assert VerificationError("x").exit_code == 1
    assert all(c("x").exit_code == 2 for c in (UsageError, CheckpointError, FuseError))
    with pytest.raises(UsageError):
        sd.apply_method(make_model("vit"), "nope")


def test_signatures_do_not_surprise():
    """fuse returns a module, fuse_with_report a pair; export_proto leaves the model as it was."""
    from ssf_deploy.export import export_proto
    model = _tuned("ssf")
    fused = sd.fuse(model)
    assert isinstance(fused, torch.nn.Module)
    fused2, report = sd.fuse_with_report(model)
    assert isinstance(report, sd.FuseReport) and len(report.folds) > 0
    half = make_model("vit").half().train()
    proto = export_proto(half, example=torch.randn(1, 3, 32, 32))
    assert half.training and next(half.parameters()).dtype == torch.float16
    assert len(proto.graph.node) > 0


def test_cli_options_come_from_the_method_configs():
    from ssf_deploy.tools._options import parse_method_options
    assert parse_method_options("ssf", {"ssf_blocks": 2, "ssf_exclude": "mlp, attn",
                                        "ssf_no_scale": True, "prompts": 9}) == \
        {"blocks": 2, "exclude": ("mlp", "attn"), "scale": False}
    assert parse_method_options("vpt-deep", {"prompts": 9, "ssf_blocks": 2}) == {"prompts": 9}
    assert parse_method_options("adapter", {"adapter_dim": 7}) == {"dim": 7}
