"""Fusion: exactness across timm families, every hard case, fp16/bf16, refusal paths."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssf_deploy as sd
from ssf_deploy.fuse import fuse, fuse_with_report
from ssf_deploy.layers import scale_shift
from ssf_deploy.tuners.base import add_params

from conftest import FAMILIES, make_model


def pretrained_like(model, seed=0):
    """Perturb every weight so no bias is zero and no norm weight is one, like real weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tuned(family, std=0.3, **options):
    model = pretrained_like(make_model(family))
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd.apply_method(model, "ssf", init_std=std, **options)
    return model.eval(), base_shapes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuse_is_exact_and_base_architecture(family):
    model, base_shapes = tuned(family)
    fused, report = fuse_with_report(model)
    assert type(fused) is type(model)
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == base_shapes
    assert report.keys_match_base and not report.added
    assert not any("ssf" in k for k in fused.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fused.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert not torch.allclose(ref, pretrained_like(make_model(family))(x), atol=1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fuse_returns_timm_instance_for_created_models():
    model = sd.create_base_model("test_vit", 7, img_size=32, patch_size=8)
    sd.apply_method(model, "ssf", init_std=0.2)
    fused = fuse(model.eval())
    import timm
    ref = timm.create_model("test_vit", num_classes=7, img_size=32, patch_size=8)
    assert {k: v.shape for k, v in fused.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_fuse_leaves_input_model_untouched():
    model, _ = tuned("convnext")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bias_free_conv_folds_forward_into_batchnorm():
    """ResNet conv (no bias) -> SSF -> BN: the shift goes exactly into the BN, no new bias."""
    model, base_shapes = tuned("resnet", bias_free=True)
    fused, report = fuse_with_report(model)
    assert report.as_dict()["by_kind"]["consumer"] > 0 and not report.added
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == base_shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_bias_free_linear_without_absorbing_consumer_gains_bias_and_says_so():
    """Swin's reduction Linear has no bias and feeds a residual: a bias must be added."""
    model, base_shapes = tuned("swin", bias_free=True)
    fused, report = fuse_with_report(model)
    added = [n for n, _ in report.added]
    assert added and all(n.endswith(".bias") for n in added)
    assert not report.keys_match_base
    assert "NOT the unchanged base graph" in str(report)
    assert set(fused.state_dict()) - set(base_shapes) == set(added)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


class _After(nn.Module):
    """fc -> GELU -> SSF -> consumer: an SSF whose producer is non-linear."""

    def __init__(self, consumer, channels_last=True, shift=True, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c) if channels_last else nn.Conv2d(c, c, 1)
        self.consumer = consumer
        self.channels_last = channels_last
        add_params(self, "ssf_scale", nn.Parameter(torch.rand(c) + 0.5))
        if shift:
            add_params(self, "ssf_shift", nn.Parameter(torch.randn(c)))

    def forward(self, x):
        h = F.gelu(self.fc(x))
        if hasattr(self, "ssf_scale"):   # gone once unloaded: the fused copy is the plain model
            h = scale_shift(h, self.ssf_scale, getattr(self, "ssf_shift", None),
                            -1 if self.channels_last else 1)
        return self.consumer(h)


def _check(model, x):
    model.eval()
    fused, report = fuse_with_report(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(k.startswith("ssf") for k in fused.state_dict())
    return report


def test_after_nonlinear_folds_into_linear_consumer():
    report = _check(_After(nn.Linear(8, 4)), torch.randn(5, 8))
    assert report.folds[0].how == "consumer" and report.folds[0].targets == ["consumer"]


def test_after_nonlinear_folds_into_bias_free_linear_by_adding_a_bias():
    report = _check(_After(nn.Linear(8, 4, bias=False)), torch.randn(5, 8))
    assert [n for n, _ in report.added] == ["consumer.bias"]


def test_after_nonlinear_folds_into_unpadded_and_depthwise_conv():
    x = torch.randn(2, 8, 6, 6)
    _check(_After(nn.Conv2d(8, 4, 3, padding=0), channels_last=False), x)
    _check(_After(nn.Conv2d(8, 8, 3, padding=0, groups=8), channels_last=False), x)
    _check(_After(nn.Conv2d(8, 4, 3, padding=0, groups=2), channels_last=False), x)


def test_padded_conv_consumer_takes_scale_only():
    x = torch.randn(2, 8, 6, 6)
    _check(_After(nn.Conv2d(8, 4, 3, padding=1), channels_last=False, shift=False), x)
    with pytest.raises(sd.SSFDeployError, match="cannot fuse SSF at '<model>'|exactly"):
        fuse(_After(nn.Conv2d(8, 4, 3, padding=1), channels_last=False).eval(), x)


def test_after_nonlinear_folds_into_eval_batchnorm():
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    _check(_After(bn, channels_last=False), torch.randn(2, 8, 4, 4))


def test_refuses_layernorm_consumer_and_names_the_module():
    m = _After(nn.LayerNorm(8)).eval()
    with pytest.raises(sd.SSFDeployError) as e:
        fuse(m, torch.randn(5, 8))
    assert "cannot fuse SSF" in str(e.value) and "gelu" in str(e.value)


class _TwoConsumers(nn.Module):
    def __init__(self, residual):
        super().__init__()
        self.inner = _After(nn.Identity())
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
        self.residual = residual

    def forward(self, x):
        h = self.inner(x)
        return self.a(h) + (h[..., :4] if self.residual else self.b(h))


def test_several_consumers_fold_when_all_absorb_else_refuse():
    _check(_TwoConsumers(residual=False), torch.randn(3, 8))
    with pytest.raises(sd.SSFDeployError, match="cannot fuse"):
        fuse(_TwoConsumers(residual=True).eval(), torch.randn(3, 8))


class _Shared(nn.Module):
    """One Linear called twice: folding into it would change the other call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        add_params(self.fc, "ssf_scale", nn.Parameter(torch.rand(8) + 0.5))
        add_params(self.fc, "ssf_shift", nn.Parameter(torch.randn(8)))

    def forward(self, x):
        y = self.fc(x)
        if hasattr(self.fc, "ssf_scale"):
            y = scale_shift(y, self.fc.ssf_scale, self.fc.ssf_shift, -1)
        return y + self.fc(x)


def test_shared_module_whose_calls_need_different_folds_is_refused():
    """Only one of fc's two calls carries the SSF: folding it into fc would change the other call."""
    with pytest.raises(sd.SSFDeployError, match=r"cannot fuse SSF at 'fc'.*fc is called 2 times "
                                                r"and the calls would need different folds"):
        fuse(_Shared().eval(), torch.randn(2, 8))


class _SharedHook(nn.Module):
    """One Linear called at three depths, its SSF a hook: every call carries the same factors."""

    def __init__(self, tied_factors=True):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)
        self.other.weight = self.fc.weight   # tied weights, a second module: needs equal factors too
        self.other.bias = self.fc.bias
        self.tied_factors = tied_factors

    def forward(self, x):
        x = x + torch.tanh(self.fc(x))
        x = x + torch.tanh(self.fc(x))
        return x + torch.tanh(self.other(x))


def _ssf_hook(module, scale, shift):
    add_params(module, "ssf_scale", nn.Parameter(scale))
    add_params(module, "ssf_shift", nn.Parameter(shift))
    module.register_forward_hook(lambda m, i, y: scale_shift(y, m.ssf_scale, m.ssf_shift, -1)
                                 if hasattr(m, "ssf_scale") else y)


def test_shared_module_with_the_same_ssf_on_every_call_folds_once():
    m = _SharedHook()
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    _ssf_hook(m.fc, scale, shift)
    _ssf_hook(m.other, scale.clone(), shift.clone())   # equal values on the tied module's calls
    report = _check(m, torch.randn(4, 8))
    assert [(f.site, f.how, f.calls) for f in report.folds] == [("fc", "producer", 3)]
    assert not report.added and report.keys_match_base


def test_tied_weights_with_different_factors_are_refused():
    m = _SharedHook()
    _ssf_hook(m.fc, torch.rand(8) + 0.5, torch.randn(8))
    _ssf_hook(m.other, torch.rand(8) + 0.5, torch.randn(8))
    with pytest.raises(sd.SSFDeployError, match=r"cannot fuse SSF at '(fc|other)'.*called 3 times.*"
                                                r"different factors"):
        fuse(m.eval(), torch.randn(4, 8))


def test_coat_shared_conv_pos_enc_folds_once():
    """coat_lite_tiny: one ConvPosEnc (and ConvRelPosEnc) per stage, called by every serial block."""
    model = pretrained_like(sd.create_base_model("coat_lite_tiny", 5, img_size=32))
    sd.apply_method(model, "ssf", init_std=0.3)
    x = torch.randn(2, 3, 32, 32)
    report = _check(model, x)
    shared = [f for f in report.folds if f.calls > 1]
    assert shared and all(f.how == "producer" and f.calls == 2 for f in shared)
    assert any(f.site.endswith("cpe.proj") for f in shared)
    assert report.keys_match_base and not report.added


# ------------------------------------------------------------------ non-persistent buffers

# create_base_model records how to build the model again: the fused copy is built on the meta device
# and loaded with assign=True, which leaves buffers outside the state dict on meta
NON_PERSISTENT = {
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                                   window_size=4, img_size=32), 32),   # + attn_mask
    "vit_relpos": ("vit_relpos_small_patch16_224", dict(depth=2, embed_dim=32, num_heads=2,
                                                        img_size=32, patch_size=8), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=28), 28),
    "beit": ("beit_base_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=32,
                                           patch_size=8), 32),
}


@pytest.mark.parametrize("family", list(NON_PERSISTENT))
def test_non_persistent_buffers_of_created_models_are_real(family):
    arch, kwargs, size = NON_PERSISTENT[family]
    model = pretrained_like(sd.create_base_model(arch, 5, **kwargs))
    persistent = set(model.state_dict())
    non_persistent = {n for n, _ in model.named_buffers() if n not in persistent}
    assert non_persistent, "the test needs a model with non-persistent buffers"
    sd.apply_method(model, "ssf", init_std=0.3)
    model.eval()
    fused, report = fuse_with_report(model)
    buffers = dict(fused.named_buffers())
    assert not any(b.is_meta for b in buffers.values())
    source = dict(model.named_buffers())
    assert all(torch.equal(buffers[n], source[n]) for n in non_persistent)
    assert set(fused.state_dict()) == persistent   # still non-persistent
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_non_persistent_buffers_follow_a_half_precision_model():
    arch, kwargs, _ = NON_PERSISTENT["swin"]
    model = sd.create_base_model(arch, 5, **kwargs)
    sd.apply_method(model, "ssf", init_std=0.3)
    model = model.half().eval()
    fused = fuse(model)
    source = dict(model.named_buffers())
    for name, buf in fused.named_buffers():
        assert not buf.is_meta and buf.dtype == source[name].dtype and torch.equal(buf, source[name])
    assert any(buf.dtype == torch.float16 for buf in source.values())   # attn_mask


def test_non_persistent_buffers_missing_from_the_source_come_from_a_real_build():
    from ssf_deploy.fuse import _materialise  # noqa: PLC2701
    arch, kwargs, _ = NON_PERSISTENT["swin"]
    rec = {"arch": arch, "num_classes": 5, "kwargs": kwargs}
    import timm
    with torch.device("meta"):
        base = timm.create_model(arch, num_classes=5, **kwargs)
    _materialise(base, nn.Module(), rec)   # a source without any of those buffers
    real = timm.create_model(arch, num_classes=5, **kwargs)
    for name, buf in real.named_buffers():
        if name not in real.state_dict():
            assert torch.equal(dict(base.named_buffers())[name], buf)


class _NoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.norm(x))


def test_norm_without_affine_gains_affine_and_reports_it():
    m = _NoAffine()
    sd.apply_method(m, "ssf", init_std=0.3)
    report = _check(m, torch.randn(4, 8))
    assert sorted(n for n, _ in report.added) == ["norm.bias", "norm.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_fold_in_float64(dtype):
    model, _ = tuned("vit")
    model = model.to(dtype)
    fused = fuse(model)
    qkv = model.blocks[0].attn.qkv
    expected = (qkv.ssf_scale.double()[:, None] * qkv.weight.double()).to(dtype)
    assert fused.blocks[0].attn.qkv.weight.dtype == dtype
    assert torch.equal(fused.blocks[0].attn.qkv.weight, expected)
    expected_b = (qkv.ssf_scale.double() * qkv.bias.double() + qkv.ssf_shift.double()).to(dtype)
    assert torch.equal(fused.blocks[0].attn.qkv.bias, expected_b)


@pytest.mark.parametrize("method", ["adapter", "vpt-deep"])
def test_methods_that_change_the_graph_cannot_fuse(method):
    model = make_model("vit")
    sd.apply_method(model, method)
    with pytest.raises(sd.SSFDeployError, match="stay at inference"):
        fuse(model)


def test_plain_methods_fuse_to_themselves():
    model = make_model("vit")
    sd.apply_method(model, "bias")
    fused = fuse(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("arch,size", [("vit_small_patch16_224", 224), ("resnet18", 64),
                                       ("convnext_atto", 64), ("efficientnet_b0", 64),
                                       ("deit_tiny_patch16_224", 224), ("mixer_s32_224", 224)])
def test_fuse_sweep_real_timm_architectures(arch, size):
    model = pretrained_like(sd.create_base_model(arch, 10))
    sd.apply_method(model, "ssf", init_std=0.2)
    model.eval()
    x = torch.randn(1, 3, size, size)
    fused, report = fuse_with_report(model, x)
    assert report.keys_match_base
    with torch.no_grad():
        ref, out = model(x), fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * max(1.0, ref.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fuse_on_cuda(dtype):
    model, _ = tuned("convnext")
    model = model.cuda().to(dtype)
    fused = fuse(model)
    assert next(fused.parameters()).device.type == "cuda"
    assert next(fused.parameters()).dtype == dtype
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref, out = model(x).float(), fused(x).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
