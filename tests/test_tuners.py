"""Tuning methods on real timm families: trainability, Table 5/6 counts, lean == naive gradients."""
import copy

import pytest
import torch

import ssf_deploy as sd
from ssf_deploy.tuners import METHODS, unload
from ssf_deploy.tools.params import count_for

from conftest import FAMILIES, TRANSFORMERS, make_model

# Table 5, ViT-B/16 on CIFAR-100 (M): the paper's own numbers.
TABLE5 = {"full": 85.88, "linear": 0.08, "adapter": 0.31, "bias": 0.18, "vpt-shallow": 0.23,
          "vpt-deep": 0.54, "ssf": 0.28}


@pytest.mark.parametrize("method", METHODS)
def test_table5_vit_b16_cifar100(method):
    trainable, total = count_for("vit_base_patch16_224", 100, method)
    assert round(trainable / 1e6, 2) == TABLE5[method]
    assert total >= trainable


@pytest.mark.parametrize("options,expected", [
    (dict(blocks=2), 0.11), (dict(blocks=4), 0.15), (dict(blocks=8), 0.22),      # Table 6a
    (dict(exclude=("mlp",)), 0.19), (dict(exclude=("attn",)), 0.21),             # Table 6b
    (dict(exclude=("embed",)), 0.28), (dict(exclude=("norm",)), 0.25),
    (dict(scale=False), 0.18), (dict(shift=False), 0.18),                        # Table 6d
    (dict(only=("norm",)), 0.11), (dict(scalar_scale=True), 0.18),
])
def test_table6_ablation_counts(options, expected):
    trainable, _ = count_for("vit_base_patch16_224", 100, "ssf", **options)
    assert round(trainable / 1e6, 2) == expected


def test_params_cli_json(capsys):
    from ssf_deploy.tools import main
    assert main(["params", "--json"]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(METHODS)
    assert {m: round(v["trainable"] / 1e6, 2) for m, v in data.items()} == TABLE5


def test_params_cli_bad_model(capsys):
    from ssf_deploy.tools import main
    assert main(["params", "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown timm model" in err[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_every_family(family, method):
    model = make_model(family)
    before = {k: v.shape for k, v in model.state_dict().items()}
    head = {id(p) for p in model.get_classifier().parameters()}
    needs_blocks = method == "adapter" and family not in TRANSFORMERS
    needs_tokens = method.startswith("vpt") and family not in ("vit", "deit")
    if needs_blocks or needs_tokens:
        with pytest.raises(sd.SSFDeployError):
            sd.apply_method(model, method)
        # a refused model is left as it was
        assert all(p.requires_grad for p in model.parameters())
        assert {k: v.shape for k, v in model.state_dict().items()} == before
        return
    sd.apply_method(model, method)
    trainable, total = sd.count_params(model)
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    if method == "full":
        assert trainable == total
    else:
        assert trainable < total
        frozen_backbone = [p for k, p in model.named_parameters()
                           if k in before and id(p) not in head and not k.endswith("bias")]
        assert not any(p.requires_grad for p in frozen_backbone)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    # unload restores the exact base structure (keys and shapes)
    unload(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == before


def test_ssf_sites_cover_paper_ops_on_vit():
    model = make_model("vit")
    sd.apply_method(model, "ssf")
    names = {k.rsplit(".", 1)[0] for k in model.state_dict() if k.endswith("ssf_scale")}
    block = {n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")}
    assert block == {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"}
    assert {"patch_embed.proj", "norm"} <= names
    assert not any(n.startswith("head") for n in names)


def test_ssf_init_table6c():
    torch.manual_seed(0)
    model = sd.create_base_model("vit_base_patch16_224", 10)
    sd.apply_method(model, "ssf")
    scale = torch.cat([p.flatten() for k, p in model.named_parameters() if k.endswith("ssf_scale")])
    shift = torch.cat([p.flatten() for k, p in model.named_parameters() if k.endswith("ssf_shift")])
    assert abs(scale.mean().item() - 1) < 1e-3 and abs(scale.std().item() - 0.02) < 1e-3
    assert abs(shift.mean().item()) < 1e-3 and abs(shift.std().item() - 0.02) < 1e-3
    m2 = make_model("vit")
    sd.apply_method(m2, "ssf", init="constant")
    assert all(bool((p == (1 if k.endswith("scale") else 0)).all())
               for k, p in m2.named_parameters() if "ssf_" in k)


def test_bad_options_are_one_line_errors():
    with pytest.raises(sd.SSFDeployError, match="no option"):
        sd.apply_method(make_model("vit"), "ssf", nonsense=1)
    with pytest.raises(sd.SSFDeployError, match="unknown SSF role"):
        sd.apply_method(make_model("vit"), "ssf", exclude=("wings",))
    with pytest.raises(sd.SSFDeployError, match="unknown method"):
        sd.apply_method(make_model("vit"), "lora")
    m = make_model("vit")
    sd.apply_method(m, "bias")
    with pytest.raises(sd.SSFDeployError, match="already carries"):
        sd.apply_method(m, "ssf")


def _grads(family, impl, options, steps=3, edit=None, retain=False):
    """Gradients after ``steps`` training steps (float64; the same input every step)."""
    model = make_model(family, seed=1).double()
    sd.apply_method(model, "ssf", impl=impl, init_std=0.2, **options)
    if edit is not None:
        edit(model)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    for _ in range(steps):   # step 1 probes the sites; later steps use what it learned
        model.zero_grad()
        loss = model(x).square().sum()
        if retain:
            loss.backward(retain_graph=True)
        loss.backward()
    return model, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(lean, naive):
    assert set(lean) == set(naive)
    scale = max(g.abs().max().item() for g in naive.values())
    for k in naive:
        torch.testing.assert_close(lean[k], naive[k], rtol=1e-9, atol=1e-10 * scale, msg=k)


@pytest.mark.parametrize("family,options", [
    ("vit", {}), ("deit", {}), ("swin", {}), ("convnext", {}), ("resnet", {}),
    ("efficientnet", {}), ("mixer", {}), ("resmlp", {}), ("vit", {"scalar_scale": True}),
    ("vit", {"shift": False}), ("vit", {"scale": False}), ("vit", {"exclude": ("norm",)}),
    ("vit", {"blocks": 1}), ("vit", {"bias_free": True}), ("resnet", {"bias_free": True})])
def test_lean_gradients_equal_naive(family, options):
    # float64: a ResNet's scale gradients are sums with heavy cancellation, and fp32 rounding
    # differs between any two summation orders; in float64 both paths must agree tightly.
    _assert_same(_grads(family, "lean", options)[1], _grads(family, "naive", options)[1])


def _zero_one_scale(model):
    with torch.no_grad():   # gamma = 0 on a residual site and tiny on a recovering one
        model.blocks[0].attn.proj.ssf_scale[3] = 0.0
        model.blocks[1].mlp.fc1.ssf_scale[5] = 1e-7


def test_lean_gradients_equal_naive_with_scales_near_zero():
    _assert_same(_grads("vit", "lean", {}, edit=_zero_one_scale)[1],
                 _grads("vit", "naive", {}, edit=_zero_one_scale)[1])


def test_lean_gradients_equal_naive_with_retained_graph():
    _assert_same(_grads("vit", "lean", {}, retain=True)[1],
                 _grads("vit", "naive", {}, retain=True)[1])


def test_lean_folded_sites_keep_what_the_frozen_network_keeps():
    """ViT: norms and Linears run with SSF folded in; attn.proj and mlp.fc2, read only by the
    residual add, get y back from the neighbouring norms' inputs instead of keeping it."""
    from ssf_deploy.tuners.ssf import lean_report
    model, _ = _grads("vit", "lean", {}, steps=1)
    report = {r["site"]: r for r in lean_report(model)}
    for name in ("blocks.0.norm1", "blocks.0.norm2", "norm"):
        assert report[name]["kind"] == "norm" and report[name]["keeps"] == "norm"
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1"):
        assert report[name]["keeps"] == "y-shared"
    assert report["blocks.0.attn.proj"]["detail"] == (
        "nothing: y = input(blocks.0.norm2) - input(blocks.0.norm1), both kept by those norms")
    last = max(int(k.split(".")[1]) for k in report if k.startswith("blocks."))
    assert report[f"blocks.{last}.mlp.fc2"]["keeps"] == "residual"
    assert report[f"blocks.{last}.mlp.fc2"]["detail"].startswith("nothing: y = input(norm) - ")
    assert report["patch_embed.proj"]["keeps"] == "x"   # only reshapes and a cat read it


def _saved_bytes(model, x):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    del loss
    return sum(saved.values())


def test_lean_ssf_saves_what_the_frozen_floor_saves():
    """Memory, not time: after the first step a lean ViT keeps, besides what the frozen network
    keeps, only the patch embedding's SSF input (nothing downstream keeps that one)."""
    x = torch.randn(4, 3, 32, 32)
    frozen = make_model("vit", seed=1).train()
    for p in frozen.parameters():
        p.requires_grad_(False)
    floor = _saved_bytes(frozen, x.clone().requires_grad_(True))
    lean = make_model("vit", seed=1)
    sd.apply_method(lean, "ssf")
    lean.train()
    lean(x).square().sum().backward()
    tokens = lean.patch_embed.num_patches
    embed = 4 * tokens * lean.embed_dim * 4             # (B, N, d) float32
    head = sum(p.numel() for p in lean.get_classifier().parameters()) * 4 + 4 * lean.embed_dim * 4
    assert _saved_bytes(lean, x) <= floor + embed + head
    naive = make_model("vit", seed=1)
    sd.apply_method(naive, "ssf", impl="naive")
    naive.train()
    assert _saved_bytes(naive, x) > floor + 2 * embed


def test_lean_step_makes_one_scale_check_for_the_whole_model(monkeypatch):
    """The 'may x be recovered from y' test is one decision per step, not one per site (each is
    a device sync on a GPU)."""
    import importlib
    layer_mod = importlib.import_module("ssf_deploy.layers.scale_shift")
    ssf_mod = importlib.import_module("ssf_deploy.tuners.ssf")
    calls = []
    real = layer_mod.scales_recoverable

    def counted(scales):
        calls.append(len(scales))
        return real(scales)
    monkeypatch.setattr(ssf_mod, "scales_recoverable", counted)
    monkeypatch.setattr(layer_mod, "scales_recoverable", counted)
    model = make_model("vit", seed=1)
    sd.apply_method(model, "ssf")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        model(x).sum().backward()
    n_sites = sum(1 for k, _ in model.named_parameters() if k.endswith("ssf_scale"))
    assert calls == [n_sites] * 3


def test_deepcopy_of_tuned_model_is_self_contained():
    model = make_model("efficientnet")
    sd.apply_method(model, "ssf", init_std=0.3)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in clone.named_parameters():
            if "ssf_" in k:
                p.fill_(1.0 if k.endswith("scale") else 0.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), clone.eval()
    base = unload(copy.deepcopy(model)).eval()
    with torch.no_grad():
        assert torch.allclose(clone(x), base(x), atol=1e-5)
        assert not torch.allclose(model(x), base(x), atol=1e-3)


def test_deepcopy_mid_training_links_its_own_sites():
    """A copy taken after the first lean step (EMA) trains on its own factors and links."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    model = make_model("vit", seed=1).double()
    sd.apply_method(model, "ssf", init_std=0.2)
    model.train()
    model(x).square().sum().backward()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in clone.named_parameters():
            if "ssf_" in k:
                p.mul_(1.5)
    naive = make_model("vit", seed=1).double()
    sd.apply_method(naive, "ssf", impl="naive", init_std=0.2)
    naive.load_state_dict(clone.state_dict())
    naive.train()
    grads = []
    for m in (clone, naive):
        for _ in range(2):
            m.zero_grad()
            m(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    _assert_same(*grads)
    ours = {id(m) for m in clone.modules()}
    for m in clone.modules():
        link = getattr(m, "link", None)
        if link is not None:
            assert all(id(s) in ours for s in link)


def test_unload_removes_the_folded_forwards():
    model = make_model("vit", seed=1)
    base = make_model("vit", seed=1).eval()
    sd.apply_method(model, "ssf", init="constant")
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    unload(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), base(x))


def test_cli_usage_errors_are_one_line(capsys):
    from ssf_deploy.tools import main
    assert main(["fuse", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--no-such-flag" in err[0]
    assert main(["no-such-tool"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
