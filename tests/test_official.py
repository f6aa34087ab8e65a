"""Checkpoints of the official SSF code (dongzelian/SSF on timm 0.6.5) -> ssf-deploy models.

The official checkpoints are written here by hand: a current timm model's weights renamed back to the
timm-0.6.5 / official layout (Swin's downsample at the end of a stage, ``head.*``, persistent
``relative_position_index``/``attn_mask`` buffers; ConvNeXt's ``stem.proj``/``downsample.norm``...) plus
random SSF factors under their official names. The reference output is a hand-written replica of the
official forward (hooks and patched forwards on a timm model), independent of ssf_deploy.formats.official.

Its quirks are pinned to what the real code does. The real architectures are measured against
dongzelian/SSF@e94e0e7 itself (timm 0.6.5, 100 classes, every tensor perturbed) in the committed
record benchmarks/official/results/results.md, which benchmarks/official/run.py regenerates from a
checkout the user fetches; the numbers below are read from that table:

* Swin PatchMerging and ConvNeXt Downsample get the per-block tuning_mode *list*: no factors on
  downsample layers. Rebuilt / fused / onnxruntime max abs logit difference from the official
  outputs: swin_tiny 1.2e-6 / 1.4e-6 / 2.4e-6, swin_base_patch4_window7_224_in22k 2.0e-6 / 2.6e-6 /
  3.3e-6, swin_base_patch4_window12_384 1.3e-6 / 1.9e-6 / 1.8e-6.
* The official ConvNeXt LayerNorm2d normalises a non-contiguous input (the downsample norms: the
  residual stream is channels-last in memory) with torch.var_mean, the UNBIASED variance: ignoring it
  costs 0.011 max abs logit (convnext_tiny and convnext_base_in22k); stem and head norms take the
  biased F.layer_norm path.
* Plain ConvNeXt (norm_pre Identity): the top-level factor scales the last stage's output before the
  head; rebuilt as an affine there (the official forward), folded by fuse through that stage's
  residual stream: convnext_tiny 1.7e-6 / 1.7e-6 / 2.1e-6, convnext_base_in22k 2.1e-6 / 2.1e-6 /
  2.3e-6; with a layer scale of -2.14e-5 under a shift of -0.361 (once refused) 1.4e-6 / 2.1e-6 /
  2.1e-6; with a zero scale (the affine stays, +2 nodes) 1.4e-6 / 1.5e-6 / 1.9e-6.
* convnext_*_hnf applies norm_pre twice (0.56 max abs logit if applied once), both times on a
  non-contiguous input (unbiased); deployed with --allow-extra-nodes (+1 LayerNorm): 1.4e-6 /
  1.3e-6 / 1.9e-6.

Tiny registered architectures (``swin_ssftest``, ``convnext_ssftest``...) keep these tests to seconds;
their sizes avoid the official ``ssf_ada``'s other quirk (it scales the LAST axis of an NCHW tensor
whose width equals its channel count; never the case at 224 px for these models).
"""
from __future__ import annotations

import argparse
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F

from ssf_deploy.formats import build_model, read_task
from ssf_deploy.formats.checkpoint import FORMAT
from ssf_deploy.errors import SSFDeployError
from ssf_deploy.formats.official import is_official
from ssf_deploy.fuse import fuse, fuse_with_report
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


def test_a_nan_factor_is_refused_at_load_naming_the_official_key(tmp_path, vit32):
    """Issue 19: one NaN in blocks.2.attn.ssf_scale_1 used to fold, fail verification with exit
    1 and report 100 % top-1 agreement. Now: one line at load, naming the key as the file spells
    it, exit 2, nothing built or written."""
    from ssf_deploy.tools import main
    official = dict(vit32[1])
    official["blocks.2.attn.ssf_scale_1"] = official["blocks.2.attn.ssf_scale_1"].clone()
    official["blocks.2.attn.ssf_scale_1"][17] = float("nan")
    path = os.path.join(tmp_path, "nan.pth")
    torch.save(_checkpoint("vit_tiny_patch16_224_in21k", official, 7), path)
    with pytest.raises(SSFDeployError, match=r"'blocks\.2\.attn\.qkv\.ssf_scale' \('blocks\.2\.attn"
                                             r"\.ssf_scale_1' in the file\) holds 1 NaN of 576"):
        read_task(path)
    out = os.path.join(tmp_path, "m.onnx")
    assert main(["fuse", path, "--out", out]) == 2 and not os.path.exists(out)


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


# ----------------------------------------------------------------------------------- tiny models

def _register_tiny_models():
    """Official-style names for tiny configs (the reader needs an architecture name, not kwargs)."""
    from timm.models import register_model
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    def build(cls, defaults, kwargs):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):   # no hub weights here
            kwargs.pop(k, None)
        return cls(**dict(defaults, **kwargs))

    def swin_ssftest(pretrained=False, **kwargs):
        return build(SwinTransformer, dict(img_size=64, patch_size=4, window_size=4, embed_dim=16,
                                           depths=(2, 2, 2), num_heads=(1, 2, 4)), kwargs)

    def convnext_ssftest(pretrained=False, **kwargs):
        # 64 px: widths 16/8/4/2 never equal the channels 8/16/24/32 (the official ssf_ada quirk)
        return build(ConvNeXt, dict(depths=(1, 1, 2, 2), dims=(8, 16, 24, 32)), kwargs)

    def convnext_ssftest_hnf(pretrained=False, **kwargs):
        return build(ConvNeXt, dict(depths=(1, 1, 1, 2), dims=(8, 16, 24, 32), head_norm_first=True,
                                    conv_mlp=True), kwargs)

    for fn in (swin_ssftest, convnext_ssftest, convnext_ssftest_hnf):
        if not timm.is_model(fn.__name__):
            register_model(fn)


_register_tiny_models()


def _perturb(model, seed: int = 0):
    """Every tensor off identity with realistic sizes: norm affines, biases, ConvNeXt layer scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.copy_(0.1 * torch.exp(0.5 * r))
            elif leaf == "weight" and p.dim() == 1:
                p.copy_(1.0 + 0.2 * r)
            elif leaf == "bias":
                p.add_(0.1 * r)
            else:
                p.add_(0.05 * r)
    return model.eval()


def _fused_and_onnx(model, x, details: bool = False, **fuse_kw):
    """(fused torch output, onnxruntime output of the fused model's ONNX export)
    [+ (fuse report, fused ONNX nodes, base export nodes, op-count difference) with ``details``]."""
    import collections
    import copy

    import onnxruntime as ort
    from ssf_deploy.export import export_proto
    from ssf_deploy.fuse import fuse_with_report
    from ssf_deploy.models import plain_architecture
    from ssf_deploy.tuners import unload
    fused, report = fuse_with_report(model, **fuse_kw)
    proto = export_proto(fused, example=x)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        out = fused(x), torch.from_numpy(got)
    if not details:
        return out
    base = export_proto(plain_architecture(unload(copy.deepcopy(model))), example=x)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    ops.subtract(collections.Counter(n.op_type for n in base.graph.node))
    return out + (report, len(proto.graph.node), len(base.graph.node),
                  {k: v for k, v in ops.items() if v})


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


def _official_patch_merging(pm, factors=None):
    """dongzelian/SSF PatchMerging.forward on an NHWC input: x0..x3 concat, norm, [SSF], reduction.

    The official code has no factors here (``tuning_mode`` is the per-block list); ``factors`` is a
    fork that hands PatchMerging the string."""
    def forward(x):
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        x = pm.norm(torch.cat([x0, x1, x2, x3], -1))
        if factors is not None:
            x = x * factors[0] + factors[1]
        return pm.reduction(x)
    return forward


def _official_swin_patch_embed(pe, s1, b1, s2, b2):
    def forward(x):   # proj -> flatten -> ssf_1 -> norm -> ssf_2 (kept NHWC, as today's stages want)
        x = pe.proj(x).permute(0, 2, 3, 1)
        return pe.norm(x * s1 + b1) * s2 + b2
    return forward


def _swin_official(arch: str = "swin_ssftest", downsample_factors: bool = False, num_classes: int = 5):
    """(replica of the official SSF Swin, its official state_dict)."""
    torch.manual_seed(0)
    ref = _perturb(timm.create_model(arch, num_classes=num_classes))
    gen = torch.Generator().manual_seed(3)
    official = _swin_to_official(ref.state_dict(), ref)
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
        if downsample_factors and i < len(ref.layers) - 1:
            _add(ssf, f"layers.{i}.downsample.", 1, 4 * d, gen)
    _add(ssf, "", 1, dims[-1], gen)
    official.update(ssf)

    def f(key, i):
        return ssf[f"{key}ssf_scale_{i}"], ssf[f"{key}ssf_shift_{i}"]
    ref.patch_embed.forward = _official_swin_patch_embed(ref.patch_embed, *f("patch_embed.", 1),
                                                         *f("patch_embed.", 2))
    for i, layer in enumerate(ref.layers):
        if i > 0:   # the official code ran this merge at the end of stage i-1
            ref.layers[i].downsample.forward = _official_patch_merging(
                layer.downsample, f(f"layers.{i - 1}.downsample.", 1) if downsample_factors else None)
        for j, blk in enumerate(layer.blocks):
            p = f"layers.{i}.blocks.{j}."
            blk.norm1.register_forward_hook(_affine(*f(p, 1)))
            blk.norm2.register_forward_hook(_affine(*f(p, 2)))
            blk.attn.qkv.register_forward_hook(_affine(*f(p + "attn.", 1)))
            blk.attn.proj.register_forward_hook(_affine(*f(p + "attn.", 2)))
            blk.mlp.fc1.register_forward_hook(_affine(*f(p + "mlp.", 1)))
            blk.mlp.fc2.register_forward_hook(_affine(*f(p + "mlp.", 2)))
    ref.norm.register_forward_hook(_affine(*f("", 1)))
    return ref, official


@pytest.mark.parametrize("downsample_factors", [False, True], ids=["official", "fork-with-merge-ssf"])
def test_swin_official_checkpoint_rebuilds_and_fuses_the_official_model(tmp_path, downsample_factors):
    """The official code leaves PatchMerging unscaled: those sites get identity factors (exact).

    On the real code (benchmarks/official/results/results.md, swin_tiny/small/base at 224 and 384 px):
    0 downsample factors in the checkpoints; rebuilt 1.2e-6..2.0e-6, fused 1.4e-6..2.6e-6,
    onnxruntime 1.8e-6..3.3e-6 max abs logit difference from the official outputs."""
    ref, official = _swin_official(downsample_factors=downsample_factors)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert any(k.startswith("layers.0.downsample.ssf") for k in official) == downsample_factors
    task = _load(tmp_path, _checkpoint("swin_ssftest", official, 5))
    assert (task.arch, task.num_classes, task.options) == ("swin_ssftest", 5, {})
    scale = task.state["layers.1.downsample.norm.ssf_scale"]
    if downsample_factors:
        assert torch.equal(scale, official["layers.0.downsample.ssf_scale_1"])
        assert not task.extra["official_quirks"]
    else:
        assert torch.equal(scale, torch.ones_like(scale))
        assert not task.state["layers.2.downsample.norm.ssf_shift"].any()
        assert task.extra["official_quirks"] == [
            "identity SSF at 2 site(s) the official code leaves unscaled: layers.1.downsample.norm, "
            "layers.2.downsample.norm"]
    assert "layers.1.downsample.reduction.ssf_scale" not in task.state   # bias-free: no site
    assert not any("relative_position_index" in k or "attn_mask" in k for k in task.state)
    model = build_model(task)
    x = _image(64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    if downsample_factors:
        torch.testing.assert_close(fuse(model)(x), want, rtol=1e-4, atol=1e-4)
        return
    fused, onnx_out = _fused_and_onnx(model, x)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)


def test_swin_factor_missing_elsewhere_is_still_refused(tmp_path):
    """Identity only where the official code has no factor: any other gap is an error."""
    _, official = _swin_official()
    del official["layers.1.blocks.0.mlp.ssf_scale_2"]
    with pytest.raises(SSFDeployError, match=r"lacks SSF factors for layers\.1\.blocks\.0\.mlp\.fc2"):
        _load(tmp_path, _checkpoint("swin_ssftest", official, 5))


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


def _official_layer_norm_2d(norm, seen: list, name: str):
    """dongzelian/SSF models/convnext.py LayerNorm2d.forward, transcribed: biased F.layer_norm on a
    contiguous input, torch.var_mean - the UNBIASED variance - otherwise."""
    def forward(x):
        if x.is_contiguous():
            seen.append((name, "biased"))
            return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                                norm.eps).permute(0, 3, 1, 2)
        seen.append((name, "unbiased"))
        s, u = torch.var_mean(x, dim=1, keepdim=True)
        x = (x - u) * torch.rsqrt(s + norm.eps)
        return x * norm.weight[:, None, None] + norm.bias[:, None, None]
    return forward


def _convnext_official(arch: str = "convnext_ssftest", downsample_factors: bool = False,
                       unbiased: bool = True):
    """(replica of the official SSF ConvNeXt, its official state_dict, LayerNorm2d paths taken)."""
    torch.manual_seed(0)
    ref = _perturb(timm.create_model(arch, num_classes=4))
    gen = torch.Generator().manual_seed(4)
    official = _convnext_to_official(ref.state_dict())
    _add(official, "stem.", 1, ref.stem[0].out_channels, gen)
    _add(official, "stem.", 2, ref.stem[0].out_channels, gen)
    for i, stage in enumerate(ref.stages):
        d = stage.blocks[0].conv_dw.out_channels
        if i > 0 and downsample_factors:
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
    # official forward: stem proj -> ssf_1 -> norm -> ssf_2; Downsample norm -> proj (no SSF: it gets
    # the tuning_mode list); block conv_dw -> ssf_1 (NCHW) -> permute -> norm -> ssf_2 -> mlp(fc1 ->
    # ssf_1 -> GELU -> fc2 -> ssf_2) -> permute -> gamma -> + shortcut; forward_features ends with
    # ssf_1(norm_pre(norm_pre(x))), norm_pre Identity here; head: pool -> LayerNorm2d -> fc.
    seen = []
    for name, m in ref.named_modules():
        if type(m).__name__ == "LayerNorm2d" and unbiased:
            m.forward = _official_layer_norm_2d(m, seen, name)
    ref.stem[0].register_forward_hook(_affine_cf(*f("stem.", 1)))
    ref.stem[1].register_forward_hook(_affine_cf(*f("stem.", 2)))
    for i, stage in enumerate(ref.stages):
        if i > 0 and downsample_factors:
            stage.downsample[0].register_forward_hook(_affine_cf(*f(f"stages.{i}.downsample.", 1)))
            stage.downsample[1].register_forward_hook(_affine_cf(*f(f"stages.{i}.downsample.", 2)))
        for j, blk in enumerate(stage.blocks):
            p = f"stages.{i}.blocks.{j}."
            blk.conv_dw.register_forward_hook(_affine_cf(*f(p, 1)))
            blk.norm.register_forward_hook(_affine(*f(p, 2)))
            blk.mlp.fc1.register_forward_hook(_affine(*f(p + "mlp.", 1)))
            blk.mlp.fc2.register_forward_hook(_affine(*f(p + "mlp.", 2)))
    ref.stages.register_forward_hook(_affine_cf(*f("", 1)))   # after the last stage (norm_pre Identity)
    return ref, official, seen


@pytest.mark.parametrize("downsample_factors", [False, True], ids=["official", "fork-with-downsample-ssf"])
def test_convnext_official_checkpoint_rebuilds_and_fuses_the_official_model(tmp_path,
                                                                             downsample_factors):
    """No downsample factors, unbiased downsample norms, the top-level factor after the last stage.

    On the real code (benchmarks/official/results/results.md, 224 px): convnext_tiny 1.7e-6 rebuilt /
    1.7e-6 fused / 2.1e-6 onnxruntime, convnext_base_in22k 2.1e-6 / 2.1e-6 / 2.3e-6 max abs logit."""
    ref, official, seen = _convnext_official(downsample_factors=downsample_factors)
    assert "stem.proj.weight" in official and "ssf_scale_1" in official
    task = _load(tmp_path, _checkpoint("convnext_ssftest", official, 4))
    assert (task.arch, task.num_classes, task.options) == ("convnext_ssftest", 4, {})
    quirks = task.extra["official_quirks"]
    assert quirks[-2:] == ["unbiased-variance LayerNorm2d reproduced at stages.1.downsample.0, "
                           "stages.2.downsample.0, stages.3.downsample.0",
                           "top-level ssf_scale_1/ssf_shift_1 kept as a per-channel affine at "
                           "norm_pre, as the official forward applies it; fuse folds it through "
                           "stages.3's residual stream"]
    assert task.edits["norm_pre"]["kind"] == "affine"
    assert torch.equal(task.state["norm_pre.weight"], official["ssf_scale_1"])
    absent = ["head.norm"] + ([] if downsample_factors else
                              [f"stages.{i}.downsample.{j}" for i in (1, 2, 3) for j in (0, 1)])
    assert quirks[0] == (f"identity SSF at {len(absent)} site(s) the official code leaves unscaled: "
                         f"{', '.join(absent)}")
    assert "norm_pre.ssf_scale" not in task.state and "head.norm.ssf_scale" in task.state
    model = build_model(task)
    x = _image(64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    # the official LayerNorm2d took the unbiased path exactly at the downsample norms
    assert sorted(set(seen)) == [("head.norm", "biased"), ("stages.1.downsample.0", "unbiased"),
                                 ("stages.2.downsample.0", "unbiased"),
                                 ("stages.3.downsample.0", "unbiased"), ("stem.1", "biased")]
    fused, onnx_out, report, nodes, base_nodes, _ = _fused_and_onnx(model, x, details=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    # the affine folded away: the deployable is the base graph
    assert report.keys_match_base and not report.extra_nodes and nodes == base_nodes
    assert report.edits_folded == ["the per-channel affine at norm_pre (the official SSF ConvNeXt "
                                   "scales the last stage's output (ssf_scale_1, ssf_shift_1), "
                                   "where timm has no module) into stages.3's residual stream, "
                                   "exactly: no extra node"]


def test_convnext_quirks_matter():
    """The replica is sensitive to both quirks (on the real code: 0.011 for the variance, see
    benchmarks/official/results/results.md)."""
    x = _image(64)
    with torch.no_grad():
        want = _convnext_official()[0](x)
        biased = _convnext_official(unbiased=False)[0](x)
        ref, official, _ = _convnext_official()
        ref.stages._forward_hooks.clear()   # no top-level factor
        assert (biased - want).abs().max() > 1e-3
        assert (ref(x) - want).abs().max() > 1e-2


def test_convnext_trained_channels_last_also_has_an_unbiased_stem_norm(tmp_path):
    """``train.py --channels-last``: the stem conv's output is not contiguous either, so the stem norm
    takes the unbiased path too (the replica: the stem norm's input is then not contiguous)."""
    ref, official, seen = _convnext_official()
    ckpt = _checkpoint("convnext_ssftest", official, 4)
    ckpt["args"].channels_last = True
    task = _load(tmp_path, ckpt)
    assert task.extra["official_quirks"][1].startswith(
        "unbiased-variance LayerNorm2d reproduced at stages.1.downsample.0, stages.2.downsample.0, "
        "stages.3.downsample.0, stem.1")
    x = _image(64)
    ref = ref.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(build_model(task)(x), want, rtol=1e-4, atol=1e-4)
    assert ("stem.1", "unbiased") in seen and ("head.norm", "biased") in seen


def _convnext_case(tmp_path, tweak):
    """(official replica, rebuilt model, input, wanted output) after ``tweak(ref, official)``."""
    ref, official, _ = _convnext_official()
    with torch.no_grad():
        tweak(ref, official)
    official.update({k: v.detach().clone() for k, v in ref.state_dict().items()
                     if k.endswith(".gamma")})
    model = build_model(_load(tmp_path, _checkpoint("convnext_ssftest", official, 4)))
    x = _image(64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)   # the official forward
    return model, x, want


def _set(t: torch.Tensor, index: int, value: float) -> None:
    t.view(-1)[index] = value


@pytest.mark.parametrize("scale", [1e-6, 1e-12])
def test_convnext_tiny_top_level_scale_folds_exactly(tmp_path, scale):
    """Issue 19: a tiny scale used to be refused (|s| < 1e-4). The fold is computed in float64
    and lands in weights the stream multiplies again, so in float32 it is exact."""
    model, x, want = _convnext_case(tmp_path, lambda ref, off: _set(off["ssf_scale_1"], 5, scale))
    fused, onnx_out, report, nodes, base_nodes, _ = _fused_and_onnx(model, x, details=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    assert report.keys_match_base and nodes == base_nodes
    assert report.largest[1] > 1 / scale / 10       # the reader's 1/s: reported, not refused


def test_convnext_zero_scale_keeps_the_affine_as_the_fewest_extra_nodes(tmp_path):
    """s = 0 at a channel: the stream cannot carry it. Rather than no deployable, the affine
    stays: exact, +2 nodes (Mul, Add), reported as such."""
    model, x, want = _convnext_case(tmp_path, lambda ref, off: _set(off["ssf_scale_1"], 5, 0.0))
    fused, onnx_out, report, nodes, base_nodes, ops = _fused_and_onnx(model, x, details=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    assert not report.keys_match_base and nodes == base_nodes + 2 and ops == {"Mul": 1, "Add": 1}
    (where, what), = report.extra_nodes
    assert where == "norm_pre" and "+2 nodes: Mul, Add" in what and "scale 0 at channel 5" in what
    assert "NOT the unchanged base graph" in str(report)


def test_convnext_shift_through_a_zero_layer_scale_keeps_only_the_shift(tmp_path):
    """g = 0 at a channel where t is not: the scale folds, the shift stays (+1 Add node)."""
    def tweak(ref, off):
        _set(ref.stages[3].blocks[1].gamma, 2, 0.0)
    model, x, want = _convnext_case(tmp_path, tweak)
    fused, onnx_out, report, nodes, base_nodes, ops = _fused_and_onnx(model, x, details=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    assert nodes == base_nodes + 1 and ops == {"Add": 1}
    assert "stages.3.blocks.1.gamma, which is 0 at channel 2" in report.extra_nodes[0][1]


def test_convnext_tiny_layer_scale_folds_and_reports_the_largest_value(tmp_path):
    """Issue 19's checkpoint: gamma -2.14e-05 at one channel, shift -0.361 there, was refused.
    t/g ~ 1.7e4 enters fc2's bias and g multiplies it again: exact in float32. The largest value
    the fold writes is reported; beyond 65504 an fp16 engine cannot hold it (see
    test_export.py::test_fp16_range_issues... and engine --fp16)."""
    def tweak(ref, off, g=-2.14e-5):
        _set(ref.stages[3].blocks[1].gamma, 7, g)
        _set(off["ssf_shift_1"], 7, -0.361)
    model, x, want = _convnext_case(tmp_path, tweak)
    fused, onnx_out, report, nodes, base_nodes, _ = _fused_and_onnx(model, x, details=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    assert report.keys_match_base and nodes == base_nodes
    name, value = report.largest
    assert name == "stages.3.blocks.1.mlp.fc2.bias" and 1.6e4 < value < 65504
    d = report.as_dict()["largest_folded_value"]
    assert d["tensor"] == name and d["beyond_fp16"] is False and "fits fp16" in str(report)

    def smaller(ref, off):
        tweak(ref, off, g=-2.14e-6)
    (tmp_path / "b").mkdir()
    model, x, want = _convnext_case(tmp_path / "b", smaller)
    fused, report = fuse_with_report(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)   # fp32: still exact
    assert report.largest[1] > 65504 and report.as_dict()["largest_folded_value"]["beyond_fp16"]
    assert "BEYOND fp16's 65504" in str(report)


def test_convnext_factor_missing_elsewhere_is_still_refused(tmp_path):
    _, official, _ = _convnext_official()
    del official["stages.1.blocks.0.ssf_shift_1"]
    with pytest.raises(SSFDeployError, match=r"lacks SSF factors for stages\.1\.blocks\.0\.conv_dw"):
        _load(tmp_path, _checkpoint("convnext_ssftest", official, 4))


def _convnext_hnf_official():
    """Replica of the official head-norm-first ConvNeXt, whose forward_features ends with
    ``x = norm_pre(x); x = ssf_ada(norm_pre(x), s, t)`` (then pool -> fc). The official hnf
    blocks are channels-last (its Block ignores conv_mlp), so the downsample norms and both
    norm_pre applications take its LayerNorm2d's unbiased path (checked on the real code:
    the official benchmark, benchmarks/official/results.md); timm's hnf layout (conv_mlp) is
    contiguous, so the replica forces that path where the official code takes it."""
    torch.manual_seed(0)
    ref = _perturb(timm.create_model("convnext_ssftest_hnf", num_classes=4))
    gen = torch.Generator().manual_seed(5)
    official = _convnext_to_official(ref.state_dict())
    _add(official, "stem.", 1, ref.stem[0].out_channels, gen)
    _add(official, "stem.", 2, ref.stem[0].out_channels, gen)
    for i, stage in enumerate(ref.stages):
        d = stage.blocks[0].conv_dw.out_channels
        for j in range(len(stage.blocks)):
            p = f"stages.{i}.blocks.{j}."
            _add(official, p, 1, d, gen)
            _add(official, p, 2, d, gen)
            _add(official, p + "mlp.", 1, 4 * d, gen)
            _add(official, p + "mlp.", 2, d, gen)
    _add(official, "", 1, ref.num_features, gen)

    def f(key, i):
        return official[f"{key}ssf_scale_{i}"], official[f"{key}ssf_shift_{i}"]

    def unbiased(norm):
        def forward(x):
            s, u = torch.var_mean(x, dim=1, keepdim=True)
            x = (x - u) * torch.rsqrt(s + norm.eps)
            return x * norm.weight[:, None, None] + norm.bias[:, None, None]
        return forward
    ref.stem[0].register_forward_hook(_affine_cf(*f("stem.", 1)))
    ref.stem[1].register_forward_hook(_affine_cf(*f("stem.", 2)))
    for i, stage in enumerate(ref.stages):
        if i > 0:
            stage.downsample[0].forward = unbiased(stage.downsample[0])
        for j, blk in enumerate(stage.blocks):
            p = f"stages.{i}.blocks.{j}."
            blk.conv_dw.register_forward_hook(_affine_cf(*f(p, 1)))
            blk.norm.register_forward_hook(_affine_cf(*f(p, 2)))
            blk.mlp.fc1.register_forward_hook(_affine_cf(*f(p + "mlp.", 1)))
            blk.mlp.fc2.register_forward_hook(_affine_cf(*f(p + "mlp.", 2)))
    norm = unbiased(ref.norm_pre)
    s, t = f("", 1)
    ref.norm_pre.forward = lambda x: norm(norm(x)) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    return ref, official


def test_convnext_head_norm_first_deploys_with_one_extra_layernorm_when_allowed(tmp_path, capsys):
    """The official hnf forward applies norm_pre twice, which no timm architecture computes
    (0.56 max abs logit if applied once, in the record). It is rebuilt exactly (norm_pre applied
    twice, the second copy carrying the factor); fuse refuses it in one line naming
    --allow-extra-nodes, and with it deploys the base graph + one LayerNorm, exact."""
    from ssf_deploy.errors import FuseError
    from ssf_deploy.tools import main
    ref, official = _convnext_hnf_official()
    path = os.path.join(tmp_path, "hnf.pth")
    torch.save(_checkpoint("convnext_ssftest_hnf", official, 4), path)
    task = read_task(path)
    assert task.edits["norm_pre"]["kind"] == "twice"
    assert any("norm_pre applied twice" in q for q in task.extra["official_quirks"])
    assert any("norm_pre.0, norm_pre.1" in q for q in task.extra["official_quirks"])  # unbiased
    model = build_model(task)
    x = _image(64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
        once = model.norm_pre[1](model.stages(model.stem(x)))            # norm_pre applied once
        assert (model.head(once) - want).abs().max() > 1e-2
    with pytest.raises(FuseError, match=r"norm_pre applied a second time.*`allow_extra_nodes`"):
        fuse(model)
    out = os.path.join(tmp_path, "hnf.onnx")
    assert main(["fuse", path, "--out", out, "--compare-graph", "never", "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--allow-extra-nodes" in err[0] and not os.path.exists(out)

    fused, onnx_out, report, nodes, base_nodes, ops = _fused_and_onnx(
        model, x, details=True, allow_extra_nodes=True)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(onnx_out, want, rtol=1e-4, atol=1e-4)
    assert nodes == base_nodes + 1 and ops == {"LayerNormalization": 1}
    assert "norm_pre applied a second time" in report.extra_nodes[0][1]
    assert main(["fuse", path, "--out", out, "--allow-extra-nodes", "--compare-graph", "always",
                 "--json"]) == 0
    import json
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and rep["onnx"]["extra_nodes"] == 1
    assert rep["onnx"]["compared"] == "simplified"   # the exporter's graphs differ by 3 nodes
    assert rep["onnx"]["ops_diff"] == {"LayerNormalization": 1}
    assert rep["fuse"]["extra_nodes"][0]["where"] == "norm_pre"


def test_graph_edits_are_refused_in_packs(tmp_path):
    """A pack rebuilds the task on the plain timm architecture: a model that needs an edit
    cannot be written as one (one line, before the work)."""
    from ssf_deploy import deploy
    from ssf_deploy.errors import UsageError
    _, official = _convnext_hnf_official()
    model = build_model(_load(tmp_path, _checkpoint("convnext_ssftest_hnf", official, 4)))
    with pytest.raises(UsageError, match="graph edits"):
        deploy(model, [_image(64)], save_pack=str(tmp_path / "p.safetensors"),
               allow_extra_nodes=True)
    assert not os.path.exists(tmp_path / "p.safetensors")


def test_convnext_base_keys_go_through_timms_filter():
    torch.manual_seed(0)
    for arch in ("convnext_ssftest", "convnext_ssftest_hnf"):   # Linear MLP / timm's conv_mlp
        ref = timm.create_model(arch, num_classes=4)
        base = _convnext_to_official(ref.state_dict())
        assert "stem.proj.weight" in base and "stages.1.downsample.norm.weight" in base
        assert base["stages.0.blocks.0.mlp.fc1.weight"].dim() == 2
        converted = _convert_base("convnext", base, ref)
        own = ref.state_dict()
        assert set(converted) == set(own)
        assert all(torch.equal(converted[k], own[k]) for k in own)
