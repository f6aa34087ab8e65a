"""Checkpoints of the official SSF code (dongzelian/SSF on timm 0.6.5) -> ssf-deploy models.

The official checkpoints are written here by hand: a current timm model's weights renamed back to the
timm-0.6.5 / official layout (Swin's downsample at the end of a stage, ``head.*``, persistent
``relative_position_index``/``attn_mask`` buffers; ConvNeXt's ``stem.proj``/``downsample.norm``...) plus
random SSF factors under their official names. The reference output applies those factors with hooks
and patched forwards that transcribe the official forward code, independently of ssf_deploy.official.
"""
from __future__ import annotations

import argparse
import os
import re

import pytest
import timm
import torch

from ssf_deploy.formats import build_model, read_task
from ssf_deploy.formats.checkpoint import FORMAT
from ssf_deploy.errors import SSFDeployError
from ssf_deploy.formats.official import is_official
from ssf_deploy.formats.official import _convert_base  # noqa: PLC2701  (base-key adaptation, tested directly)


def _factor(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # far from identity, so a misplaced or missing factor changes the logits
    return 1.0 + 0.3 * torch.randn(n, generator=gen), 0.3 * torch.randn(n, generator=gen)


def _add(official: dict, prefix: str, idx: int, n: int, gen: torch.Generator) -> None:
    s, b = _factor(gen, n)
    official[f"{prefix}ssf_scale_{idx}"] = s
    official[f"{prefix}ssf_shift_{idx}"] = b


def _args(model: str, num_classes: int) -> argparse.Namespace:
    return argparse.Namespace(model=model, num_classes=num_classes, tuning_mode="ssf", lr=1e-3,
                              img_size=None, drop_path=0.1, mean=(0.5, 0.5, 0.5), amp=True)


def _checkpoint(arch: str, state: dict, num_classes: int, **more) -> dict:
    # what timm's CheckpointSaver (used by the official train.py) writes
    ckpt = {"epoch": 29, "arch": arch, "state_dict": state, "args": _args(arch, num_classes),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "version": 2, "metric": 91.5}
    ckpt.update(more)
    return ckpt


def _affine(s: torch.Tensor, b: torch.Tensor, switch: dict = None):
    def hook(mod, inp, out):
        return out * s + b if switch is None or switch["on"] else out
    return hook


def _affine_cf(s: torch.Tensor, b: torch.Tensor):
    """x * s + b on the channel axis of an NCHW output (the official ``ssf_ada`` 4-D branch)."""
    return lambda mod, inp, out: out * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _load(tmp_path, ckpt: dict, name: str = "official.pth"):
    path = os.path.join(tmp_path, name)
    torch.save(ckpt, path)
    return read_task(path)


# ---------------------------------------------------------------------------------------------- ViT

def _vit_official(img_size: int, num_classes: int = 7):
    """(reference model with official SSF placement, official state_dict)."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=img_size).eval()
    gen = torch.Generator().manual_seed(2)
    official = dict(ref.state_dict())   # timm 0.6.5 ViT names == today's for this layout
    d = ref.embed_dim
    _add(official, "patch_embed.", 1, d, gen)
    for i in range(len(ref.blocks)):
        _add(official, f"blocks.{i}.", 1, d, gen)
        _add(official, f"blocks.{i}.", 2, d, gen)
        _add(official, f"blocks.{i}.attn.", 1, 3 * d, gen)
        _add(official, f"blocks.{i}.attn.", 2, d, gen)
        _add(official, f"blocks.{i}.mlp.", 1, 4 * d, gen)
        _add(official, f"blocks.{i}.mlp.", 2, d, gen)
    _add(official, "", 1, d, gen)

    def f(key, i):
        return official[f"{key}ssf_scale_{i}"], official[f"{key}ssf_shift_{i}"]
    switch = {"on": True}

    def hook(module, key, i):
        module.register_forward_hook(_affine(*f(key, i), switch))
    # official PatchEmbed: proj -> flatten -> x*s1+b1 -> norm (Identity in ViT): the embed's output
    hook(ref.patch_embed, "patch_embed.", 1)
    for i, blk in enumerate(ref.blocks):
        hook(blk.norm1, f"blocks.{i}.", 1)         # attn(ssf_1(norm1(x)))
        hook(blk.norm2, f"blocks.{i}.", 2)         # mlp(ssf_2(norm2(x)))
        hook(blk.attn.qkv, f"blocks.{i}.attn.", 1)  # ssf_1(qkv(x)), then the q/k/v head split
        hook(blk.attn.proj, f"blocks.{i}.attn.", 2)
        hook(blk.mlp.fc1, f"blocks.{i}.mlp.", 1)    # before the GELU
        hook(blk.mlp.fc2, f"blocks.{i}.mlp.", 2)
    hook(ref.norm, "", 1)                          # ssf_1(norm(x)), before token pooling
    return ref, official, switch


@pytest.fixture(scope="module")
def vit32():
    """vit_tiny at 32 px (2x2 patches): the official code fine-tuned it at a non-default size."""
    return _vit_official(32)


def test_vit_official_checkpoint_rebuilds_the_official_model(tmp_path, vit32):
    ref, official, switch = vit32
    task = _load(tmp_path, _checkpoint("vit_tiny_patch16_224_in21k", official, 7))
    assert task.arch == "vit_tiny_patch16_224.augreg_in21k"
    assert (task.num_classes, task.method, task.options, task.source, task.complete) == \
        (7, "ssf", {}, "official-ssf", True)
    assert task.model_kwargs == {"img_size": 32}   # from pos_embed, instead of resampling it
    assert torch.equal(task.state["blocks.3.attn.qkv.ssf_scale"], official["blocks.3.attn.ssf_scale_1"])
    assert torch.equal(task.state["norm.ssf_shift"], official["ssf_shift_1"])
    assert torch.equal(task.state["pos_embed"], official["pos_embed"])
    assert task.extra["epoch"] == 29 and task.extra["args"]["model"] == "vit_tiny_patch16_224_in21k"
    assert task.extra["args"]["mean"] == [0.5, 0.5, 0.5]
    assert task.extra["official_arch"] == "vit_tiny_patch16_224_in21k"

    model = build_model(task)
    x = _image(32)
    with torch.no_grad():
        want, got = ref(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        switch["on"] = False   # the factors matter: without them the logits differ
        try:
            assert not torch.allclose(ref(x), want, atol=1e-2)
        finally:
            switch["on"] = True


def test_vit_at_its_default_size_needs_no_model_kwargs(tmp_path, vit32):
    _, official, _ = vit32
    state = dict(official)
    state["pos_embed"] = torch.randn(1, 1 + 14 * 14, 192)   # 224 px: the arch's own size
    task = _load(tmp_path, _checkpoint("vit_tiny_patch16_224_in21k", state, 7))
    assert task.model_kwargs == {} and torch.equal(task.state["pos_embed"], state["pos_embed"])


def test_unknown_ssf_key_is_refused(tmp_path, vit32):
    official = dict(vit32[1])
    official["blocks.0.attn.ssf_scale_3"] = torch.ones(3 * 192)
    with pytest.raises(SSFDeployError, match=r"unknown SSF key 'blocks\.0\.attn\.ssf_scale_3'"):
        _load(tmp_path, _checkpoint("vit_tiny_patch16_224_in21k", official, 7))


def test_missing_factor_and_other_tuning_modes_are_refused(tmp_path, vit32):
    official = vit32[1]
    lacking = dict(official)
    del lacking["blocks.1.mlp.ssf_shift_2"]
    with pytest.raises(SSFDeployError, match=r"lacks SSF factors for blocks\.1\.mlp\.fc2"):
        _load(tmp_path, _checkpoint("vit_tiny_patch16_224_in21k", lacking, 7), "a.pth")
    ssffc = dict(official)
    ssffc["blocks.0.mlp.ssffc_fc_1.weight"] = torch.zeros(192, 192)
    with pytest.raises(SSFDeployError, match=r"unsupported key 'blocks\.0\.mlp\.ssffc_fc_1\.weight'"):
        _load(tmp_path, _checkpoint("vit_tiny_patch16_224_in21k", ssffc, 7), "b.pth")


def test_unknown_family_is_refused(tmp_path):
    state = {"conv1.weight": torch.zeros(4, 3, 3, 3), "ssf_scale_1": torch.ones(4),
             "ssf_shift_1": torch.zeros(4), "fc.weight": torch.zeros(2, 4)}
    with pytest.raises(SSFDeployError, match=r"'resnet50'.*unsupported architecture family"):
        _load(tmp_path, _checkpoint("resnet50", state, 2))


def test_is_official():
    state = {"blocks.0.ssf_scale_1": torch.ones(2), "head.weight": torch.zeros(3, 2)}
    assert is_official({"arch": "vit_base_patch16_224_in21k", "state_dict": state})
    assert is_official({"args": argparse.Namespace(model="vit_base_patch16_224_in21k"),
                        "state_dict": state})
    assert not is_official({"state_dict": state})                                  # no arch
    assert not is_official({"arch": "vit_base_patch16_224", "state_dict": {"head.weight": state[
        "head.weight"]}})                                                          # not SSF
    assert not is_official({"blocks.0.ssf_scale": torch.ones(2)})                  # ours, plain
    assert not is_official({"format": FORMAT, "state": {"blocks.0.ssf_scale": torch.ones(2)}})


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_official_checkpoint_is_refused_without_running_it(tmp_path):
    marker = os.path.join(tmp_path, "pwned")
    ckpt = _checkpoint("vit_tiny_patch16_224_in21k", {"blocks.0.ssf_scale_1": torch.ones(2)}, 2)
    ckpt["args"] = _Evil(marker)
    path = os.path.join(tmp_path, "evil.pth")
    torch.save(ckpt, path)
    with pytest.raises(SSFDeployError, match="refusing to load"):
        read_task(path)
    assert not os.path.exists(marker)


# --------------------------------------------------------------------------------------------- Swin

def _swin_to_official(state: dict, model) -> dict:
    """Today's Swin state -> timm 0.6.5 names (downsample ends stage i, head, persistent buffers)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index
            if blk.attn_mask is not None:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = blk.attn_mask
    return out


def _official_patch_merging(pm, s, b):
    """dongzelian/SSF PatchMerging.forward (x0..x3 concat, norm, SSF, reduction) on an NHWC input."""
    def forward(x):
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1)
        return pm.reduction(pm.norm(x) * s + b)
    return forward


def _official_swin_patch_embed(pe, s1, b1, s2, b2):
    def forward(x):   # proj -> flatten -> ssf_1 -> norm -> ssf_2 (kept NHWC, as today's stages want)
        x = pe.proj(x).permute(0, 2, 3, 1)
        return pe.norm(x * s1 + b1) * s2 + b2
    return forward


def test_swin_official_checkpoint_rebuilds_the_official_model(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", num_classes=5).eval()
    gen = torch.Generator().manual_seed(3)
    official = _swin_to_official(ref.state_dict(), ref)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    dims = [layer.blocks[0].norm1.normalized_shape[0] for layer in ref.layers]
    ssf = {}
    _add(ssf, "patch_embed.", 1, dims[0], gen)
    _add(ssf, "patch_embed.", 2, dims[0], gen)
    for i, layer in enumerate(ref.layers):
        d = dims[i]
        for j in range(len(layer.blocks)):
            p = f"layers.{i}.blocks.{j}."
            _add(ssf, p, 1, d, gen)
            _add(ssf, p, 2, d, gen)
            _add(ssf, p + "attn.", 1, 3 * d, gen)
            _add(ssf, p + "attn.", 2, d, gen)
            _add(ssf, p + "mlp.", 1, 4 * d, gen)
            _add(ssf, p + "mlp.", 2, d, gen)
        if i < len(ref.layers) - 1:
            _add(ssf, f"layers.{i}.downsample.", 1, 4 * d, gen)
    _add(ssf, "", 1, dims[-1], gen)
    official.update(ssf)

    def f(key, i):
        return ssf[f"{key}ssf_scale_{i}"], ssf[f"{key}ssf_shift_{i}"]
    ref.patch_embed.forward = _official_swin_patch_embed(ref.patch_embed, *f("patch_embed.", 1),
                                                         *f("patch_embed.", 2))
    for i, layer in enumerate(ref.layers):
        if i > 0:   # the official code ran this merge at the end of stage i-1
            layer.downsample.forward = _official_patch_merging(layer.downsample,
                                                               *f(f"layers.{i - 1}.downsample.", 1))
        for j, blk in enumerate(layer.blocks):
            p = f"layers.{i}.blocks.{j}."
            blk.norm1.register_forward_hook(_affine(*f(p, 1)))
            blk.norm2.register_forward_hook(_affine(*f(p, 2)))
            blk.attn.qkv.register_forward_hook(_affine(*f(p + "attn.", 1)))
            blk.attn.proj.register_forward_hook(_affine(*f(p + "attn.", 2)))
            blk.mlp.fc1.register_forward_hook(_affine(*f(p + "mlp.", 1)))
            blk.mlp.fc2.register_forward_hook(_affine(*f(p + "mlp.", 2)))
    ref.norm.register_forward_hook(_affine(*f("", 1)))

    task = _load(tmp_path, _checkpoint("swin_tiny_patch4_window7_224", official, 5))
    assert (task.arch, task.num_classes, task.options) == ("swin_tiny_patch4_window7_224", 5, {})
    assert torch.equal(task.state["layers.1.downsample.norm.ssf_scale"],
                       ssf["layers.0.downsample.ssf_scale_1"])
    assert "layers.1.downsample.reduction.ssf_scale" not in task.state   # bias-free: no site
    assert not any("relative_position_index" in k or "attn_mask" in k for k in task.state)
    model = build_model(task)
    x = _image(224)[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- ConvNeXt

def _convnext_to_official(state: dict) -> dict:
    """Today's ConvNeXt state -> the official code's names (its own PatchEmbed stem and Downsample)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.0\.", "stem.proj.", k)
        k = re.sub(r"^stem\.1\.", "stem.norm.", k)
        k = re.sub(r"^(stages\.\d+\.downsample)\.0\.", r"\1.norm.", k)
        k = re.sub(r"^(stages\.\d+\.downsample)\.1\.", r"\1.proj.", k)
        if re.search(r"\.mlp\.fc\d\.weight$", k) and v.dim() == 4:
            v = v.flatten(1)   # timm's conv_mlp 1x1 convs: the official Block always has Linear fc1/fc2
        out[k] = v
    return out


def _convnext_official(arch: str = "convnext_atto"):
    torch.manual_seed(0)
    ref = timm.create_model(arch, num_classes=4).eval()
    gen = torch.Generator().manual_seed(4)
    official = _convnext_to_official(ref.state_dict())
    _add(official, "stem.", 1, ref.stem[0].out_channels, gen)
    _add(official, "stem.", 2, ref.stem[0].out_channels, gen)
    for i, stage in enumerate(ref.stages):
        d = stage.blocks[0].conv_dw.out_channels
        if i > 0:
            _add(official, f"stages.{i}.downsample.", 1, stage.downsample[0].normalized_shape[0], gen)
            _add(official, f"stages.{i}.downsample.", 2, d, gen)
        for j in range(len(stage.blocks)):
            p = f"stages.{i}.blocks.{j}."
            _add(official, p, 1, d, gen)
            _add(official, p, 2, d, gen)
            _add(official, p + "mlp.", 1, 4 * d, gen)
            _add(official, p + "mlp.", 2, d, gen)
    _add(official, "", 1, ref.num_features, gen)

    def f(key, i):
        return official[f"{key}ssf_scale_{i}"], official[f"{key}ssf_shift_{i}"]
    # official forward: stem proj -> ssf_1 -> norm -> ssf_2; Downsample norm -> ssf_1 -> proj -> ssf_2;
    # block conv_dw -> ssf_1 (NCHW) -> permute -> norm -> ssf_2 -> mlp(fc1 -> ssf_1 -> GELU -> fc2 ->
    # ssf_2) -> permute -> gamma; forward_features ends with norm_pre(x) -> ssf_1
    ref.stem[0].register_forward_hook(_affine_cf(*f("stem.", 1)))
    ref.stem[1].register_forward_hook(_affine_cf(*f("stem.", 2)))
    for i, stage in enumerate(ref.stages):
        if i > 0:
            stage.downsample[0].register_forward_hook(_affine_cf(*f(f"stages.{i}.downsample.", 1)))
            stage.downsample[1].register_forward_hook(_affine_cf(*f(f"stages.{i}.downsample.", 2)))
        for j, blk in enumerate(stage.blocks):
            p = f"stages.{i}.blocks.{j}."
            # timm's conv_mlp variant keeps NCHW where the official code went channels-last
            cl = _affine_cf if blk.use_conv_mlp else _affine
            blk.conv_dw.register_forward_hook(_affine_cf(*f(p, 1)))
            blk.norm.register_forward_hook(cl(*f(p, 2)))
            blk.mlp.fc1.register_forward_hook(cl(*f(p + "mlp.", 1)))
            blk.mlp.fc2.register_forward_hook(cl(*f(p + "mlp.", 2)))
    ref.norm_pre.register_forward_hook(_affine_cf(*f("", 1)))
    return ref, official


def test_convnext_head_norm_first_official_checkpoint_rebuilds_the_official_model(tmp_path):
    ref, official = _convnext_official("convnext_tiny_hnf")
    assert "norm_pre.weight" in official and "stem.proj.weight" in official
    assert official["stages.0.blocks.0.mlp.fc1.weight"].dim() == 2   # official Linear MLP
    task = _load(tmp_path, _checkpoint("convnext_tiny_hnf", official, 4))
    assert (task.arch, task.num_classes, task.options) == ("convnext_tiny_hnf", 4, {})
    assert torch.equal(task.state["norm_pre.ssf_scale"], official["ssf_scale_1"])
    assert torch.equal(task.state["stages.2.downsample.1.ssf_shift"],
                       official["stages.2.downsample.ssf_shift_2"])
    model = build_model(task)
    x = _image(64)[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_convnext_base_keys_go_through_timms_filter():
    ref, official = _convnext_official()
    base = {k: v for k, v in official.items() if "ssf_" not in k}
    assert "stem.proj.weight" in base and "stages.1.downsample.norm.weight" in base
    converted = _convert_base("convnext", base, ref)
    own = ref.state_dict()
    assert base["stages.0.blocks.0.mlp.fc1.weight"].dim() == 2
    assert set(converted) == set(own)
    assert all(torch.equal(converted[k], own[k]) for k in own)


def test_convnext_official_checkpoint_is_refused_naming_the_pre_head_factor(tmp_path):
    _, official = _convnext_official()
    with pytest.raises(SSFDeployError, match=r"unsupported SSF key 'ssf_s(cale|hift)_1'.*head"):
        _load(tmp_path, _checkpoint("convnext_atto", official, 4), "a.pth")
    # without that factor the rest maps, but ssf-deploy would also put SSF after head.norm
    rest = {k: v for k, v in official.items() if k not in ("ssf_scale_1", "ssf_shift_1")}
    with pytest.raises(SSFDeployError, match=r"lacks SSF factors for head\.norm"):
        _load(tmp_path, _checkpoint("convnext_atto", rest, 4), "b.pth")
