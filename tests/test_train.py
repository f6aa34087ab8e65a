"""Training front end: every method trains, checkpoints load weights-only, resume is exact,
torchrun DDP works on CPU (gloo), and bad input is a one-line error with exit code 2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ssf_deploy.formats import build_model, read_task
from ssf_deploy.formats.checkpoint import FORMAT
from ssf_deploy.data import builtin_dataset, make_loaders
from ssf_deploy.models import create_base_model
from ssf_deploy.tools import main
from ssf_deploy.train import TrainConfig, _seed_all, evaluate, train
from ssf_deploy.tuners import METHODS, apply_method

VIT = ("test_vit", {"patch_size": 8, "img_size": 32})
CONVNEXT = ("test_convnext", {})


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin_dataset(str(tmp_path_factory.mktemp("data") / "builtin"), size=32,
                           train_per_class=4, val_per_class=2)


def _cfg(data, tmp_path, arch_kw=VIT, method="ssf", **kw) -> TrainConfig:
    arch, model_kwargs = arch_kw
    base = dict(arch=arch, model_kwargs=dict(model_kwargs), method=method, data=data, epochs=1,
                batch_size=10, lr=3e-3, warmup_epochs=0, label_smoothing=0.0, image_size=32,
                workers=0, out=str(tmp_path / f"{arch}-{method}.pt"), progress=False,
                verbose=False)
    base.update(kw)
    return TrainConfig(**base)


def _initial_model(cfg: TrainConfig):
    """The model train() starts from: same seed, same base init, same method init."""
    _seed_all(cfg.seed)
    model = create_base_model(cfg.arch, 10, **cfg.model_kwargs)
    return apply_method(model, cfg.method, **cfg.method_options)


def _rebuilt(ckpt: str, seed: int = 0):
    _seed_all(seed)   # the frozen base of these runs is timm's random init after this seed
    return build_model(read_task(ckpt))


def _fit_loss(model, data) -> float:
    """Cross-entropy on the training images without augmentation: did the model learn them?"""
    loaders = make_loaders(data, image_size=32, batch_size=64,
                           data_config={"interpolation": "bilinear", "crop_pct": 1.0})
    loaders.val.dataset.reader.samples = loaders.train.dataset.reader.samples   # eval the train split
    model.eval()
    total = n = 0
    with torch.no_grad():
        for x, y in loaders.val:
            total += F.cross_entropy(model(x), y, reduction="sum").item()
            n += y.numel()
    return total / n


def _run_cli(args, capsys):
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("arch_kw, lr", [(VIT, 3e-3), (CONVNEXT, 1e-2)], ids=["vit", "convnext"])
def test_ssf_learns_the_builtin_data(data, tmp_path, arch_kw, lr):
    cfg = _cfg(data, tmp_path, arch_kw, epochs=12, lr=lr)
    before = _fit_loss(_initial_model(cfg), data)
    result = train(cfg)
    after = _fit_loss(_rebuilt(result.checkpoint), data)
    assert after < before - 0.05, (before, after)
    assert result.metrics["loss"][-1] < result.metrics["loss"][0]
    assert len(result.metrics["top1"]) == 12 and result.top1 == result.metrics["top1"][-1]
    assert 0 < result.trainable_params < result.total_params


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_step(data, tmp_path, method):
    cfg = _cfg(data, tmp_path, VIT, method=method, max_steps_per_epoch=1, lr=1e-2)
    init = _initial_model(cfg)
    trainable = {n for n, p in init.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in init.named_buffers()}
    init_state = init.state_dict()
    result = train(cfg)
    state = torch.load(result.checkpoint, weights_only=True)["state"]
    assert set(state) == trainable | buffers      # the delta: nothing frozen is stored
    assert any(not torch.equal(state[k], init_state[k]) for k in trainable)
    assert math.isfinite(result.metrics["loss"][0])


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_is_plain_and_rebuilds(data, tmp_path):
    cfg = _cfg(data, tmp_path, VIT, epochs=2, max_steps_per_epoch=2,
               method_options={"blocks": 1})
    result = train(cfg)
    ck = torch.load(result.checkpoint, weights_only=True)   # no allowlist needed at all
    assert ck["format"] == FORMAT and ck["arch"] == "test_vit" and ck["num_classes"] == 10
    assert ck["method"] == "ssf" and ck["options"]["blocks"] == 1 and ck["epoch"] == 2
    assert ck["model_kwargs"] == {"patch_size": 8, "img_size": 32}
    assert ck["base"]["source"] == "random-init" and ck["base"]["init_seed"] == 0
    assert set(ck["metrics"]) == {"top1", "loss"} and len(ck["metrics"]["top1"]) == 2
    assert {"optimizer", "scheduler", "scaler", "rng", "args"} <= set(ck)
    assert set(ck["rng"]) == {"torch", "cuda", "numpy", "python"}
    json.dumps(ck["args"])                                  # plain data, nothing pickled
    assert ck["args"]["arch"] == "test_vit" and ck["args"]["epochs"] == 2

    model = _rebuilt(result.checkpoint)
    trained_keys = set(ck["state"])
    own = model.state_dict()
    assert all(torch.equal(own[k], ck["state"][k]) for k in trained_keys)
    loaders = make_loaders(data, image_size=32, batch_size=16, data_config=model.pretrained_cfg)
    assert evaluate(model, loaders.val, "cpu") == pytest.approx(result.top1)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_evaluate_is_top1_percent(data):
    torch.manual_seed(0)
    model = create_base_model("test_resnet", 10)
    loaders = make_loaders(data, image_size=32, batch_size=7)
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in loaders.val:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    assert evaluate(model, loaders.val, "cpu") == pytest.approx(100.0 * correct / total)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_after_interruption_is_bit_identical(data, tmp_path, workers):
    common = dict(epochs=3, batch_size=10, warmup_epochs=1, label_smoothing=0.1, mixup=0.8,
                  cutmix=1.0, workers=workers, seed=7, lr=1e-2)
    full = train(_cfg(data, tmp_path / "full", CONVNEXT, **common))

    def interrupt(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt
    part = _cfg(data, tmp_path / "part", CONVNEXT, on_epoch_end=interrupt, **common)
    with pytest.raises(KeyboardInterrupt):
        train(part)
    assert torch.load(part.out, weights_only=True)["epoch"] == 1

    part.on_epoch_end, part.resume = None, part.out
    resumed = train(part)
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[n], b["optimizer"]["state"][k][n]) for n in s)
    assert a["scheduler"] == b["scheduler"] and b["epoch"] == 3
    assert a["metrics"] == b["metrics"] == resumed.metrics


# ----------------------------------------------------------------------------- command line

def _vit_args(data, out, *extra):
    return ["--model", "test_vit", "--model-arg", "patch_size=8", "--image-size", "32",
            "--data", data, "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "10",
            "--workers", "0", "--no-progress", "--out", str(out), *extra]


def test_cli_trains_builtin_with_default_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSF_DEPLOY_CACHE", str(tmp_path / "cache"))
    rc, out, err = _run_cli(["--model", "test_resnet", "--method", "bias", "--dataset", "builtin",
                             "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8",
                             "--image-size", "32", "--workers", "0", "--no-progress"], capsys)
    assert rc == 0, err
    assert os.path.isfile(tmp_path / "models" / "test_resnet-bias.pt")
    assert os.path.isfile(tmp_path / "cache" / "builtin" / "builtin.json")
    assert "epoch 1/1" in out and "top1" in out
    assert read_task(str(tmp_path / "models" / "test_resnet-bias.pt")).num_classes == 10


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "vit-ssf.pt"
    assert main(["train", *_vit_args(data, out)]) == 0
    return str(out)


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], err


@pytest.mark.parametrize("change, needle", [
    (["--model", "test_resnet"], "--model"),
    (["--method", "bias"], "--method"),
    (["--ssf-blocks", "1"], "method options"),
])
def test_resume_refuses_another_task(data, trained, tmp_path, capsys, change, needle):
    args = _vit_args(data, tmp_path / "new.pt", "--resume", trained)
    args = [a for a in args]
    if change[0] == "--model":
        i = args.index("--model")
        args[i + 1] = change[1]
        del args[args.index("--model-arg"):args.index("--model-arg") + 2]
    else:
        args += change
    rc, _, err = _run_cli(args, capsys)
    _assert_one_line_error(rc, err, "cannot resume", needle)
    assert not os.path.exists(tmp_path / "new.pt")


def test_resume_continues_in_place(data, trained, tmp_path, capsys):
    copy = tmp_path / "again.pt"
    copy.write_bytes(open(trained, "rb").read())
    rc, out, err = _run_cli(_vit_args(data, copy, "--resume", str(copy), "--epochs", "2")[:-2]
                            + ["--epochs", "2"], capsys)
    assert rc == 0, err
    ck = read_task(str(copy))
    assert ck.extra["epoch"] == 2 and len(ck.extra["metrics"]["top1"]) == 2


@pytest.mark.parametrize("content, needle", [
    ("truncated", "corrupt"),
    (b"\x00garbage, not a zip or pickle", "bad.pt"),
    (None, "not an ssf-deploy training checkpoint"),
    ("missing", "not found"),
])
def test_resume_bad_checkpoint(data, trained, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.pt"
    if content == "truncated":
        whole = open(trained, "rb").read()
        bad.write_bytes(whole[:len(whole) // 2])
    elif content is None:
        torch.save({"head.weight": torch.zeros(10, 64)}, bad)
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    before = bad.read_bytes() if bad.exists() else None
    rc, _, err = _run_cli(_vit_args(data, tmp_path / "out.pt", "--resume", str(bad)), capsys)
    _assert_one_line_error(rc, err, needle)
    assert not os.path.exists(tmp_path / "out.pt")
    assert (bad.read_bytes() if bad.exists() else None) == before


def _bad_tree(root, kind):
    os.makedirs(root / "train" / "a")
    if kind == "no_val":     # train/ is fine, val/ is missing
        torch.manual_seed(0)
        from PIL import Image
        Image.new("RGB", (8, 8)).save(root / "train" / "a" / "0.png")
        return
    os.makedirs(root / "val" / "a")


@pytest.mark.parametrize("case, needle", [
    ("unknown_model", "unknown timm model"),
    ("empty_dir", "no train/ folder"),
    ("no_val", "no val/ folder"),
    ("no_images", "without images"),
    ("missing_dir", "not found"),
    ("no_data", "no training data"),
    ("num_classes", "--num-classes 3"),
    ("vpt_on_convnet", "vpt-deep needs a ViT-style token sequence"),
    ("bad_model_arg", "cannot build test_vit"),
])
def test_bad_input_is_one_line_exit_2(data, tmp_path, capsys, case, needle):
    out = tmp_path / "o" / "ck.pt"
    args = _vit_args(data, out)
    if case == "unknown_model":
        args[args.index("test_vit")] = "no_such_model_xyz"
    elif case in ("empty_dir", "no_val", "no_images", "missing_dir"):
        d = tmp_path / "d"
        if case == "empty_dir":
            d.mkdir()
        elif case != "missing_dir":
            _bad_tree(d, case)
        args[args.index("--data") + 1] = str(d)
    elif case == "no_data":
        i = args.index("--data")
        del args[i:i + 2]
    elif case == "num_classes":
        args += ["--num-classes", "3"]
    elif case == "vpt_on_convnet":
        args = ["--model", "test_convnext", "--method", "vpt-deep", *args[4:]]
    elif case == "bad_model_arg":
        args += ["--model-arg", "no_such_kwarg=1"]
    rc, _, err = _run_cli(args, capsys)
    _assert_one_line_error(rc, err, needle)
    assert not out.exists()
    assert not (out.parent.exists() and os.listdir(out.parent))   # no half-written checkpoint


# ----------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_ddp_two_processes_gloo(data, tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssf_deploy.tools.train", *_vit_args(data, out), "--device", "cpu",
           "--max-steps-per-epoch", "2", "--method", "vpt-deep", "--prompts", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("epoch 1/1") == 1            # only rank 0 reports
    assert "x2" in proc.stdout                              # it really ran two processes
    ck = torch.load(out, weights_only=True)
    assert ck["epoch"] == 1 and ck["method"] == "vpt-deep"
    assert math.isfinite(ck["metrics"]["loss"][0])
    assert 0.0 <= ck["metrics"]["top1"][0] <= 100.0
    assert not any(k.startswith("module.") for k in ck["state"])


def test_pretrained_file_is_the_frozen_base(data, tmp_path):
    torch.manual_seed(123)
    donor = create_base_model("test_resnet", 1000)        # head of another size: timm drops it
    weights = tmp_path / "base.pth"
    torch.save(donor.state_dict(), weights)
    cfg = _cfg(data, tmp_path, ("test_resnet", {}), pretrained_file=str(weights),
               max_steps_per_epoch=1)
    result = train(cfg)
    ck = torch.load(result.checkpoint, weights_only=True)
    assert ck["base"]["source"] == "file:base.pth" and ck["base"]["sha256"].startswith("sha256:")
    model = build_model(read_task(result.checkpoint), base_weights=str(weights))
    own = model.state_dict()
    frozen = [k for k, v in donor.state_dict().items()
              if k not in ck["state"] and not k.startswith("fc.")]
    assert frozen and all(torch.equal(own[k], donor.state_dict()[k]) for k in frozen)
