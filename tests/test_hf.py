"""ssf-deploy on transformers models (issue 21, part 1): apply_method, fuse, verify, ONNX,
quantize, train, checkpoints/packs/base hash/golden probe and the CLI, all offline.

The references are things nobody here wrote: transformers' own model classes (the fused model
must *be* one, with its own state-dict keys), the ONNX export of the plain base model (same op
histogram), onnxruntime's outputs, and the golden outputs recorded when the task was trained.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import ssf_deploy as sd
from ssf_deploy.errors import BaseMismatchError, UsageError
from ssf_deploy.export import OrtRunner, export_proto, graph_stats
from ssf_deploy.models import batch_slice, example_input, family_of, head_modules
from ssf_deploy.tuners import unload
from ssf_deploy.tuners.ssf import find_sites

from hf_models import (ARCHS, CLASSES, fit, make, move_trainables, pretrained_bert,
                       save_folder, topic_batch)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _err(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines()
             if ln.strip() and not ln.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_core_import_needs_neither_transformers_nor_peft():
    code = ("import sys, ssf_deploy, ssf_deploy.tools, timm, torch\n"
            "m = timm.create_model('test_vit', num_classes=3, img_size=32, patch_size=8)\n"
            "ssf_deploy.apply_method(m, 'ssf'); ssf_deploy.fuse(m)\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('transformers', 'peft')]\n"
            "assert not bad, bad\n"
            "sys.modules['transformers'] = None   # as if the extra were not installed\n"
            "try:\n"
            "    ssf_deploy.create_base_model('transformers:some/model', 2)\n"
            "except ssf_deploy.UsageError as e:\n"
            "    assert 'pip install \"ssf-deploy[hf]\"' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_six_architectures_fuse_exactly_to_their_own_class_and_base_graph(arch):
    """apply_method -> fuse -> verify -> ONNX for ViT, DINOv2, Swin, ConvNeXt, the CLIP vision
    model and BERT: the fused model is the transformers class with the base's keys, matches the
    tuned model (PyTorch and onnxruntime), and its ONNX has the base export's op histogram."""
    model = make(arch)
    base = copy.deepcopy(model)
    sd.apply_method(model, "ssf")
    move_trainables(model)
    heads = head_modules(model)
    assert all(p.requires_grad for h in heads for p in h.parameters())
    assert (arch == "clip") == (not heads)       # CLIPVisionModel has no classifier
    x = example_input(model, batch=3)
    fused, report = sd.fuse_with_report(model, x)
    assert type(fused) is type(base) and not report.added and report.keys_match_base
    assert set(fused.state_dict()) == set(base.state_dict())
    assert len(report.folds) == len(find_sites(base))
    check = sd.verify(model, fused, x, atol=1e-4, rtol=0)
    assert check.passed, str(check)
    one = batch_slice(x, 0, 1)
    proto = export_proto(fused, example=one)
    assert graph_stats(proto)["ops"] == graph_stats(export_proto(base, example=one))["ops"]
    runner = OrtRunner(proto)
    onnx_check = sd.verify(model, runner, [batch_slice(x, i, i + 1) for i in range(3)],
                           atol=1e-4, rtol=1e-3)
    assert onnx_check.passed, str(onnx_check)
    assert [i.name for i in runner.session.get_inputs()] == \
        (["input_ids", "attention_mask"] if arch == "bert" else ["pixel_values"])


def _site(sites, *suffixes, block=None):
    """The first site whose name ends with one of ``suffixes`` (transformers renames modules
    between releases: ViT's ``attention.attention.query`` became ``attention.q_proj``)."""
    return next(s for s in sites if s.name.endswith(suffixes)
                and (block is None or s.block == block))


def test_sites_and_roles_follow_transformers_names():
    """The paper's Table 6 options mean the same on transformers' module names as on timm's."""
    sites = find_sites(make("vit"))
    assert not any(s.name.startswith("classifier") for s in sites)
    q = _site(sites, ".query", ".q_proj")
    assert q.role == "attn" and q.block.endswith(("layer.0", "layers.0"))
    assert _site(sites, "intermediate.dense", "mlp.fc1", block=q.block).role == "mlp"
    assert _site(sites, "layernorm_before", block=q.block).role == "norm"
    assert _site(sites, "patch_embeddings.projection").role == "embed"
    assert _site(sites, "vit.layernorm").role == "final"
    bert = find_sites(make("bert"))
    assert _site(bert, "attention.output.LayerNorm").role == "norm"
    assert _site(bert, "layer.0.output.dense").role == "mlp"
    assert _site(bert, "embeddings.LayerNorm").role == "embed"
    swin = _site(find_sites(make("swin")), ".query", ".q_proj")
    assert swin.block.endswith("layers.0.blocks.0")
    convnext = find_sites(make("convnext"))
    assert _site(convnext, "embeddings.layernorm").dim == 1          # channels_first
    assert _site(convnext, "layers.0.layernorm").dim == -1

    model = make("vit")
    sd.apply_method(model, "ssf", blocks=1, exclude=("attn",))
    names = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith("ssf_scale")}
    kept = {s.name for s in sites if s.block in (None, q.block) and s.role != "attn"}
    assert names == kept


# ------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A local ViT folder (config + weights, as save_pretrained writes it): the offline stand-in
    for a hub id, weights moved off their init like a trained base."""
    return save_folder("vit", str(tmp_path_factory.mktemp("hf") / "vit"), weights=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ssf_deploy.data import builtin_dataset
    return builtin_dataset(str(tmp_path_factory.mktemp("data") / "builtin"), size=32,
                           train_per_class=8, val_per_class=2)


@pytest.fixture(scope="module")
def vit_task(vit_folder, data, tmp_path_factory):
    """ssf-deploy train on a transformers ViT named by a local folder (--pretrained)."""
    from ssf_deploy.train import TrainConfig, train
    out = str(tmp_path_factory.mktemp("task") / "vit.pt")
    result = train(TrainConfig(arch=f"transformers:{vit_folder}", method="ssf", data=data,
                               pretrained=True,
                               epochs=4, batch_size=16, lr=1e-2, warmup_epochs=0,
                               label_smoothing=0.0, hflip=0.0, color_jitter=0.0, workers=0,
                               out=out, progress=False, verbose=False, seed=5))
    return out, result


def test_ssf_trains_a_transformers_vit_on_the_builtin_images(vit_task):
    _, result = vit_task
    loss = result.metrics["loss"]
    assert loss[-1] < loss[0] - 0.05, loss
    assert result.trainable_params < result.total_params / 2


def test_checkpoint_records_base_hash_and_probe_and_the_cli_deploys_it(vit_task, tmp_path,
                                                                        capsys):
    from ssf_deploy.formats.checkpoint import load_checkpoint
    from ssf_deploy.tools import main
    ckpt, _ = vit_task
    ck = load_checkpoint(ckpt)
    assert ck["arch"].startswith("transformers:") and ck["base"]["source"] == "hf-folder:vit"
    assert ck["probe"]["shape"] == [4, 3, 32, 32] and ck["probe"]["logits"].shape == (4, 10)
    out, pack = str(tmp_path / "vit.onnx"), str(tmp_path / "vit.pack.safetensors")
    assert main(["fuse", ckpt, "--pretrained", "--out", out, "--save-pack", pack,
                 "--compare-graph", "always", "--strict-graph", "--json"]) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["onnx"]["same_graph_as_base"]
    assert report["anchor"]["probe"] == "recorded"
    assert report["anchor"]["base"].startswith("verified")
    assert main(["verify", ckpt, "--pretrained", "--onnx", out]) == 0
    assert main(["verify", "--pack", pack, "--pretrained"]) == 0
    capsys.readouterr()
    # another base (a different seed) is refused, naming both hashes
    other = tmp_path / "other.safetensors"
    from ssf_deploy.fileio import save_safetensors
    arch = ck["arch"]
    save_safetensors(sd.create_base_model(arch, 10, init_seed=99).state_dict(), str(other))
    assert main(["fuse", ckpt, "--base-weights", str(other)]) == 2
    assert "sha256:" in _err(capsys)
    # INT8 through onnxruntime with the family's eval transform
    q = str(tmp_path / "vit.int8.onnx")
    assert main(["quantize", out, "--calib", "builtin", "--out", q, "--min-agreement", "0",
                 "--latency-runs", "0", "--calib-images", "16", "--eval-images", "16"]) == 0
    assert os.path.isfile(q)


def test_a_random_transformers_base_is_redrawn_bit_for_bit(vit_folder):
    """The base hash of a task trained from scratch rests on this."""
    arch = f"transformers:{vit_folder}"
    a = sd.create_base_model(arch, 3, init_seed=7).state_dict()
    b = sd.create_base_model(arch, 3, init_seed=7).state_dict()
    c = sd.create_base_model(arch, 3, init_seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_image_transforms_take_the_family_data_config(tmp_path):
    """Every image transform (quantize's calibration, engine inputs, --inputs DIR, training)
    goes through runtime.data_config, which asks the family: the folder's image processor
    config, not timm's defaults."""
    import json

    from timm.data import create_transform
    from ssf_deploy.runtime import data_config, eval_transform
    folder = save_folder("vit", str(tmp_path / "vit"))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 2},
                  f)
    arch = f"transformers:{folder}"
    by_arch = data_config(arch, chw=(3, 32, 32))
    by_model = data_config(model=sd.create_base_model(arch, 3), chw=(3, 32, 32))
    assert by_arch == by_model
    assert by_arch["mean"] == (0.1, 0.2, 0.3) and by_arch["std"] == (0.4, 0.5, 0.6)
    assert by_arch["interpolation"] == "bilinear" and by_arch["input_size"] == (3, 32, 32)
    assert repr(eval_transform(arch, chw=(3, 32, 32))) == \
        repr(create_transform(**by_arch, is_training=False))


def test_export_cli_names_a_local_transformers_folder(vit_folder, tmp_path, capsys):
    from ssf_deploy.tools import main
    out = str(tmp_path / "base.onnx")
    assert main(["export", "--model", f"transformers:{vit_folder}", "--num-classes", "3",
                 "--out", out, "--json"]) == 0
    assert '"nodes"' in capsys.readouterr().out


def test_pretrained_from_a_local_folder_is_checked_like_hub_weights(tmp_path, capsys):
    from ssf_deploy.formats import build_model, read_task
    from ssf_deploy.formats.checkpoint import save_task
    folder = save_folder("vit", str(tmp_path / "vit-weights"), weights=True, seed=4)
    arch = f"transformers:{folder}"
    model = sd.create_base_model(arch, 3, pretrained=True)
    reference = make("vit", seed=4)
    for k, v in reference.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(model.state_dict()[k], v), k
    sd.apply_method(model, "ssf")
    move_trainables(model)
    ckpt = str(tmp_path / "t.pt")
    save_task(model, ckpt)
    task = read_task(ckpt)
    assert task.base["source"] == "hf-folder:vit-weights"
    with pytest.raises(UsageError, match="`pretrained`"):
        build_model(task)
    rebuilt = build_model(task, pretrained=True)
    x = example_input(model, batch=2)
    assert sd.verify(model, rebuilt, x, atol=0, rtol=0).passed
    # a size the checkpoint's position embeddings do not have: refused, not re-initialised
    with pytest.raises(BaseMismatchError, match="random"):
        sd.create_base_model(arch, 3, pretrained=True, image_size=64)


def test_text_model_task_deploys_with_token_inputs(tmp_path):
    """BERT pre-trained upstream (a local save_pretrained folder), SSF-trained with a plain loop
    on another topic task (ssf-deploy train reads images), saved as a task with a token golden
    probe, deployed to ONNX with input_ids/attention_mask and verified by the CLI."""
    from ssf_deploy.formats import build_model, read_task
    from ssf_deploy.formats.checkpoint import save_task
    from ssf_deploy.tools import main
    folder = str(tmp_path / "bert")
    pretrained_bert().save_pretrained(folder)
    model = sd.create_base_model(f"transformers:{folder}", CLASSES, pretrained=True)
    sd.apply_method(model, "ssf")
    losses = fit(model, *topic_batch(96, seed=0, shift=9), steps=36, lr=1e-2)
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses[::6]
    ckpt = str(tmp_path / "bert.pt")
    save_task(model.eval(), ckpt)
    task = read_task(ckpt)
    assert task.probe["kind"] == "tokens" and task.probe["shape"] == [4, 16]
    assert task.base["source"] == "hf-folder:bert"
    assert family_of(build_model(task, pretrained=True)) is not None
    out = str(tmp_path / "bert.onnx")
    assert main(["fuse", ckpt, "--pretrained", "--out", out, "--dynamic-batch", "--quiet"]) == 0
    assert main(["verify", ckpt, "--pretrained", "--onnx", out]) == 0


def test_bad_transformers_input_is_one_line_and_exit_2(data, tmp_path, capsys):
    from ssf_deploy.tools import main
    out = str(tmp_path / "x.onnx")
    assert main(["export", "--model", "transformers:", "--num-classes", "3", "--out", out]) == 2
    assert "names no model" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--model", f"transformers:{empty}", "--num-classes", "3",
                 "--out", out]) == 2
    assert "config.json" in _err(capsys)
    bert = save_folder("bert", str(tmp_path / "bert"))
    assert main(["train", "--model", f"transformers:{bert}", "--data", data,
                 "--out", str(tmp_path / "b.pt"), "--epochs", "1", "--workers", "0"]) == 2
    assert "text model" in _err(capsys)
    clip = save_folder("clip", str(tmp_path / "clip"))   # a vision tower: no classifier class
    assert main(["export", "--model", f"transformers:{clip}", "--num-classes", "3",
                 "--out", out]) == 2
    assert "classification model" in _err(capsys)
    capsys.readouterr()
    assert not os.path.exists(out)
