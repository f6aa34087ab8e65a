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


@pytest.mark.parametrize("family,options", [
    ("vit", {}), ("swin", {}), ("convnext", {}), ("resnet", {}), ("efficientnet", {}),
    ("mixer", {}), ("vit", {"scalar_scale": True}), ("vit", {"shift": False}),
    ("vit", {"scale": False}), ("resnet", {"bias_free": True})])
def test_lean_gradients_equal_naive(family, options):
    grads = []
    for impl in ("naive", "lean"):
        # float64: a ResNet's scale gradients are sums with heavy cancellation, and fp32 rounding
        # differs between any two summation orders; in float64 both paths must agree tightly.
        model = make_model(family, seed=1).double()
        sd.apply_method(model, "ssf", impl=impl, init_std=0.2, **options)
        model.train()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
        for _ in range(2):   # the second step uses what the first one learned about the sites
            model.zero_grad()
            model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    naive, lean = grads
    scale = max(g.abs().max().item() for g in naive.values())
    for k in naive:
        torch.testing.assert_close(lean[k], naive[k], rtol=1e-9, atol=1e-10 * scale, msg=k)


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


def test_cli_usage_errors_are_one_line(capsys):
    from ssf_deploy.tools import main
    assert main(["fuse", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--no-such-flag" in err[0]
    assert main(["no-such-tool"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
