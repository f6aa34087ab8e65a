"""SSF as a PEFT method (issue 21, part 2), against PEFT's own verbs and files.

Runs at both ends of the supported PEFT range: the installed (upper) end here, the lower end in a
subprocess on the folder ``$SSF_DEPLOY_HF_LOW`` (``.ci/run`` installs it there with ``pip install
--target``); the test that does so says how to set it up when the folder is missing.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
import ssf_deploy.peft as ssf_peft   # noqa: E402  (registers SSF with PEFT)
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils import PeftType  # noqa: E402
from ssf_deploy.export import export_proto, graph_stats  # noqa: E402
from ssf_deploy.models import batch_slice, call_model, example_input, logits_of  # noqa: E402
from ssf_deploy.peft import SSFConfig, SSFLayer, SSFModel  # noqa: E402
from ssf_deploy.peft.registration import (LOWER_END, PEFT_RANGE,  # noqa: E402
                                          add_enum_member, check_version)

from hf_models import ARCHS, make, move_trainables, pretrained_bert, topic_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arch: str, **kw) -> SSFConfig:
    if arch == "bert":
        return SSFConfig(task_type="SEQ_CLS", **kw)
    return SSFConfig(modules_to_save=None if arch == "clip" else ["classifier"], **kw)


def _tuned(arch: str, seed: int = 0, **kw):
    model = get_peft_model(make(arch, seed), _config(arch, **kw))
    move_trainables(model)
    return model.eval()


def _out(model, x):
    with torch.no_grad():
        return logits_of(call_model(model, x))


# ---------------------------------------------------------------------------- registration

def test_registration_adds_a_real_enum_member_once():
    assert PeftType.SSF == "SSF" and PeftType("SSF") is PeftType.SSF
    assert PeftType["SSF"] is PeftType.SSF and PeftType.SSF in list(PeftType)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SSF"] is SSFConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SSF"] is SSFModel
    n = len(PeftType)
    ssf_peft.register(SSFConfig, SSFModel)            # idempotent
    assert len(PeftType) == n and add_enum_member(PeftType, "SSF", "SSF") is PeftType.SSF


def test_only_the_tested_peft_range_is_accepted():
    low, high = PEFT_RANGE
    check_version(peft.__version__)
    check_version(low.lstrip(">="))
    for bad in ("0.17.1", high.lstrip("<") + ".0", "1.0.0"):
        with pytest.raises(ImportError, match="pip install"):
            check_version(bad)


def test_the_extras_pin_the_tested_range():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    pin = "peft" + ",".join(PEFT_RANGE)
    assert pin in extras["hf"] and pin in extras["dev"]       # CI installs dev
    tf = next(d for d in extras["hf"] if d.startswith("transformers"))
    assert tf in extras["dev"] and tf.startswith("transformers>=" + ".".join(
        LOWER_END["transformers"].split(".")[:2]) + ",")


# ---------------------------------------------------------------------------- config

def test_default_config_covers_every_biased_linear_and_every_norm_but_the_head():
    model = make("bert")
    expected = {n for n, m in model.named_modules()
                if (isinstance(m, nn.Linear) and m.bias is not None and n != "classifier")
                or isinstance(m, nn.LayerNorm)}
    tuned = get_peft_model(model, SSFConfig(task_type="SEQ_CLS"))
    got = {n.replace("base_model.model.", "") for n, m in tuned.named_modules()
           if isinstance(m, SSFLayer)}
    assert got == expected and len(got) == 2 * 8 + 2   # 2 layers x 8, embeddings LN, pooler
    conv = get_peft_model(make("convnext"), SSFConfig())
    dims = {n.removeprefix("base_model.model."): m.dim for n, m in conv.named_modules()
            if isinstance(m, SSFLayer)}
    assert dims["convnext.embeddings.layernorm"] == 1 and dims["convnext.layernorm"] == -1
    assert dims["convnext.encoder.stages.0.layers.0.dwconv"] == 1


def test_config_options_follow_peft_and_the_paper():
    def layers(cfg, arch="vit"):
        m = get_peft_model(make(arch), cfg)
        return {n.removeprefix("base_model.model."): mod for n, mod in m.named_modules()
                if isinstance(mod, SSFLayer)}
    names = [n for n, _ in make("vit").named_modules()]
    qkv = ("q_proj", "k_proj", "v_proj") if any(n.endswith("q_proj") for n in names) \
        else ("query", "key", "value")                      # transformers renamed them
    pattern = next(n for n in names if n.endswith(".0")).split(".")[-2]   # "layer" / "layers"
    got = set(layers(SSFConfig(target_modules=[qkv[0], qkv[2]])))
    assert got == {n for n in names if n.endswith((qkv[0], qkv[2]))} and len(got) == 4
    excl = layers(SSFConfig(exclude_modules=list(qkv)))
    assert excl and not any(n.endswith(qkv) for n in excl)
    first = layers(SSFConfig(target_modules=[qkv[0], "fc1", "dense"], layers_to_transform=[0],
                             layers_pattern=pattern))
    assert first and all(f"{pattern}.0." in n for n in first)
    one = next(iter(layers(SSFConfig(scale=False)).values()))
    assert not len(one.ssf_scale) and len(one.ssf_shift)
    assert next(iter(layers(SSFConfig(scalar_scale=True)).values())).ssf_scale["default"].numel() == 1
    ident = get_peft_model(make("vit"), SSFConfig(init_ssf_weights="constant",
                                                 modules_to_save=["classifier"])).eval()
    x = example_input(ident.base_model.model, batch=2)
    with ident.disable_adapter():
        base = _out(ident, x)
    assert torch.equal(_out(ident, x), base)            # constant init: identity
    for bad in (dict(init_ssf_weights="xavier"), dict(scale=False, shift=False),
                dict(init_std=-1.0)):
        with pytest.raises(ValueError):
            SSFConfig(**bad)
    with pytest.raises(ValueError, match="cannot tune"):
        get_peft_model(make("bert"), SSFConfig(target_modules=["word_embeddings"]))


def test_print_trainable_parameters_counts_factors_and_head(capsys):
    model = get_peft_model(make("vit"), SSFConfig(modules_to_save=["classifier"]))
    model.print_trainable_parameters()
    factors = sum(2 * m.channels for m in model.modules() if isinstance(m, SSFLayer))
    head = sum(p.numel() for p in make("vit").classifier.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == factors + head
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- save, load, merge

@pytest.mark.parametrize("arch", ["vit", "bert"])
def test_saved_adapter_follows_peft_layout_and_reloads_bit_for_bit(arch, tmp_path):
    model = _tuned(arch)
    model.save_pretrained(str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "SSF" and cfg["target_modules"] is None
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all(".ssf_" in k or "classifier" in k for k in saved)
    reloaded = PeftModel.from_pretrained(make(arch), str(tmp_path)).eval()
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = example_input(model.base_model.model, batch=3)
    assert torch.equal(_out(model, x), _out(reloaded, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_is_the_base_class_with_its_keys_and_exact(arch):
    reference = make(arch)
    model = _tuned(arch)
    x = example_input(model.base_model.model, batch=3, seed=7)
    before = _out(model, x)
    merged = model.merge_and_unload()
    assert type(merged) is type(reference)
    assert set(merged.state_dict()) == set(reference.state_dict())
    assert not any(isinstance(m, SSFLayer) for m in merged.modules())
    assert (_out(merged.eval(), x) - before).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["vit", "bert"])
def test_merged_onnx_has_the_base_op_histogram(arch):
    base = make(arch)
    merged = _tuned(arch).merge_and_unload().eval()
    x = batch_slice(example_input(base, batch=1), 0, 1)
    got, want = graph_stats(export_proto(merged, example=x)), graph_stats(export_proto(base, example=x))
    assert got["ops"] == want["ops"] and got["nodes"] == want["nodes"]


def test_unload_disable_and_unmerge_give_the_base_back_exactly():
    base = make("vit")
    x = example_input(base, batch=2)
    plain = _out(base, x)
    model = _tuned("vit")
    tuned = _out(model, x)
    with model.disable_adapter():   # modules_to_save: the original head is used again too
        assert torch.equal(_out(model, x), plain)
    model.merge_adapter()
    assert (_out(model, x) - tuned).abs().max() <= 1e-4
    model.unmerge_adapter()
    assert torch.equal(_out(model, x), tuned)
    unloaded = model.unload()
    theirs, mine = base.state_dict(), unloaded.state_dict()
    assert set(mine) == set(theirs)
    # the head is PEFT's modules_to_save (which copy unload() keeps differs between releases)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("classifier."))


def test_two_adapters_merge_in_the_order_the_forward_applies_them():
    model = get_peft_model(make("vit"), SSFConfig(modules_to_save=["classifier"], init_std=0.2))
    model.add_adapter("second", SSFConfig(init_std=0.2))
    model.base_model.set_adapter(["default", "second"])
    layer = next(m for m in model.modules() if isinstance(m, SSFLayer))
    assert set(layer.ssf_scale) == {"default", "second"}
    x = example_input(model.base_model.model, batch=2)
    both = _out(model.eval(), x)
    merged = model.merge_and_unload(adapter_names=["default", "second"])
    assert type(merged) is type(make("vit"))
    assert (_out(merged.eval(), x) - both).abs().max() <= 1e-4


def test_a_merge_that_needs_new_parameters_is_refused_and_changes_nothing():
    """A shift after a bias-less Linear whose consumer is GELU has nowhere exact to go."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.GELU(), nn.Linear(8, 2))
    model = get_peft_model(net, SSFConfig(target_modules=["0"], init_std=0.5))
    x = torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _out(model, x)
    with pytest.raises(ValueError, match="example_inputs"):   # a plain module: no sizes known
        model.merge_and_unload()
    with pytest.raises(ValueError, match="exactly"):
        model.merge_and_unload(example_inputs=x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_out(model, x), out)
    # a consumer that can absorb it (Linear): merged exactly into the next layer
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 2))
    model = get_peft_model(net, SSFConfig(target_modules=["0"], init_std=0.5))
    out = _out(model, x)
    merged = model.merge_and_unload(example_inputs=x)
    assert isinstance(merged, nn.Sequential) and merged[0].bias is None
    assert (merged(x) - out).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- training

def test_training_folds_layernorm_sites_and_matches_the_plain_affine():
    """A LayerNorm site trains as layer_norm(x, scale*w, scale*b + shift) (no extra activation
    kept); its outputs and gradients are those of the plain scale/shift after the norm."""
    from ssf_deploy.layers.scale_shift import ssf_mode
    model = _tuned("vit").train()
    x = example_input(model.base_model.model, batch=2)
    grads = []
    for mode in ("lean", "naive"):
        model.zero_grad()
        with ssf_mode(mode):
            out = _out_grad(model, x)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None and ".ssf_" in n})
    assert grads[0].keys() == grads[1].keys() and any("layernorm" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


def _out_grad(model, x):
    return logits_of(call_model(model, x))



def test_ssf_trains_bert_through_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments
    x, y = topic_batch(96, seed=0, shift=9)   # another task over the upstream vocabulary

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i],
                    "labels": y[i]}

    model = get_peft_model(pretrained_bert(), SSFConfig(task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32,
                             num_train_epochs=12, learning_rate=1e-2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 30 and sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"


def test_ssf_trains_a_vit_on_the_builtin_images(tmp_path):
    from ssf_deploy.data import builtin_dataset, make_loaders
    data = builtin_dataset(str(tmp_path / "builtin"), size=32, train_per_class=8, val_per_class=2)
    loaders = make_loaders(data, image_size=32, batch_size=20, hflip=0.0, color_jitter=0.0)
    torch.manual_seed(0)
    from transformers import ViTForImageClassification
    cfg = copy.deepcopy(make("vit").config)
    cfg.num_labels = 10
    model = get_peft_model(ViTForImageClassification(cfg), SSFConfig(modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(4):
        for xb, yb in loaders.train:
            loss = nn.functional.cross_entropy(model(pixel_values=xb).logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, losses


# ---------------------------------------------------------------------------- the lower end

LOW_ENV = "SSF_DEPLOY_HF_LOW"


def test_the_lower_end_of_the_supported_range():
    """This file again, on the oldest supported PEFT (and transformers), in a subprocess."""
    if os.environ.get("SSF_DEPLOY_HF_LOW_RUN"):
        pytest.skip("this is the lower-end run itself")
    folder = os.environ.get(LOW_ENV)
    if not folder or not os.path.isdir(folder):
        pytest.skip(f"set {LOW_ENV} to a folder holding the lower end: pip install --no-deps "
                    f"--target DIR " + " ".join(f"{k}=={v}" for k, v in LOWER_END.items())
                    + " (.ci/run does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([folder, ROOT]), SSF_DEPLOY_HF_LOW_RUN="1")
    code = "import peft, transformers; print(peft.__version__, transformers.__version__)"
    versions = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, cwd=ROOT).stdout.split()
    assert versions == [LOWER_END["peft"], LOWER_END["transformers"]], versions
    assert PEFT_RANGE[0] == ">=" + LOWER_END["peft"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_peft.py"], env=env, capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
