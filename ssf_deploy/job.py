"""The main job as one call: :func:`run_main_job`, offline on built-in data.

The built-in dataset is split into two tasks — upstream shapes and downstream textures — so the
run is a real transfer: full pre-training upstream -> shared base weights -> SSF fine-tuning on
the downstream classes -> fuse -> verify -> ONNX (checker, onnxsim) -> onnxruntime top-1 on the
downstream val set -> INT8 next to fp32 -> many tasks on one backbone (a second SSF task on the
upstream classes, both in one bundle that runs mixed-task batches, each task's val top-1 through
it next to its own model's) -> optional cost benchmark. Everything lands in one work folder;
``ssf-deploy run`` only parses options and prints.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .errors import UsageError, VerificationError

__all__ = ["MainJobConfig", "MainJobReport", "run_main_job", "UPSTREAM", "DOWNSTREAM"]

UPSTREAM = ("circle", "square", "triangle", "ring", "cross")
DOWNSTREAM = ("diamond", "hstripes", "vstripes", "checker", "dots")
ARTEFACTS = ("base.safetensors", "ssf.pt", "model.onnx", "task.safetensors", "fused.safetensors",
             "model.int8.onnx", "ssf-shapes.pt", "tasks.onnx")


@dataclass
class MainJobConfig:
    arch: str = "test_resnet"
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 32
    pretrain_epochs: int = 10          # upstream full training that makes the base (0: random)
    epochs: int = 8                    # SSF fine-tuning
    batch_size: int = 32
    workdir: str = os.path.join("models", "run")
    seed: int = 0
    bench: bool = True
    bundle: bool = True                # a second task and the two-task bundle
    progress: bool = True              # training progress bars and logs


@dataclass
class MainJobReport:
    """The deploy report's dict plus the job's own results; ``str()`` the closing line."""
    result: dict
    workdir: str

    @property
    def passed(self) -> bool:
        return bool(self.result.get("passed"))

    def as_dict(self) -> dict:
        return dict(self.result)

    def __str__(self) -> str:
        return (f"done in {self.result['seconds']} s; artefacts in {self.workdir}/: "
                f"{', '.join(ARTEFACTS)}")


def _split(builtin: str, workdir: str, name: str, classes) -> str:
    """An ImageFolder view (symlinks) of some built-in classes; timm follows the links."""
    root = os.path.join(workdir, "data", name)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for c in classes:
            link = os.path.join(root, split, c)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(builtin, split, c)), link)
    return root


class _TaskLogits(nn.Module):
    """One task's columns of a bundle, every sample of the batch asking for that task."""

    def __init__(self, runner, index: int, classes: int):
        super().__init__()
        self.runner, self.index, self.classes = runner, index, classes

    def forward(self, x):
        import numpy as np
        import torch
        out = self.runner(x, np.full(x.shape[0], self.index, dtype=np.int64))
        return torch.from_numpy(out[:, : self.classes])


class _Logits(nn.Module):
    """An onnxruntime runner seen as a module, so the one top-1 loop (``train.evaluate``)
    scores it like the PyTorch model."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, x):
        return self.runner(x)[0]


def run_main_job(cfg: Optional[MainJobConfig] = None, *,
                 say: Optional[Callable[[str], None]] = None) -> MainJobReport:
    """Run the main job; ``say`` receives the stage lines and reports as they happen. Raises
    :class:`~ssf_deploy.errors.VerificationError` when the fused ONNX does not score what the
    unfused model scores."""
    from .bench import BenchConfig, format_table, resolve_methods, run_bench
    from .data import builtin_dataset, make_loaders
    from .deploy import deploy
    from .fileio import check_writable, save_safetensors, write_json
    from .formats import build_model, read_task
    from .models import create_base_model, creation_record, resolve_arch
    from .quantize import quantize_onnx
    from .runtime import OrtRunner, data_config
    from .train import TrainConfig, evaluate, train

    cfg = cfg or MainJobConfig()
    say = say or (lambda msg: None)
    if not isinstance(cfg.model_kwargs, dict):
        raise UsageError("`model_kwargs` must be a JSON object (a dict)")
    arch = resolve_arch(cfg.arch)
    work = cfg.workdir
    check_writable(os.path.join(work, "model.onnx"))   # every artefact lands in workdir
    os.makedirs(work, exist_ok=True)
    t_start = time.perf_counter()
    builtin = builtin_dataset()
    upstream = _split(builtin, work, "upstream", UPSTREAM)
    data = _split(builtin, work, "downstream", DOWNSTREAM)
    common = dict(arch=arch, model_kwargs=cfg.model_kwargs, image_size=cfg.image_size,
                  batch_size=cfg.batch_size, seed=cfg.seed, workers=0, progress=cfg.progress,
                  verbose=cfg.progress)

    base_file = os.path.join(work, "base.safetensors")
    up = None
    if cfg.pretrain_epochs > 0:
        say(f"[1/5] upstream pre-training: {arch}, full training on {', '.join(UPSTREAM)}, "
            f"{cfg.pretrain_epochs} epochs")
        up = train(TrainConfig(method="full", epochs=cfg.pretrain_epochs, lr=5e-3, data=upstream,
                               out=os.path.join(work, "upstream.pt"), **common))
        base_model = build_model(read_task(up.checkpoint))
    else:
        say("[1/5] no pre-training: random-init base weights")
        base_model = create_base_model(arch, len(UPSTREAM), **cfg.model_kwargs)
    save_safetensors(base_model.state_dict(), base_file)

    say(f"[2/5] SSF fine-tuning on {', '.join(DOWNSTREAM)} from {base_file}, {cfg.epochs} epochs")
    res = train(TrainConfig(method="ssf", epochs=cfg.epochs, lr=1e-2, warmup_epochs=1, data=data,
                            pretrained_file=base_file, out=os.path.join(work, "ssf.pt"),
                            **common))
    model = build_model(read_task(res.checkpoint), base_weights=base_file)

    say("[3/5] fuse -> verify -> ONNX -> onnxruntime")
    loaders = make_loaders(data, image_size=cfg.image_size, batch_size=cfg.batch_size,
                           seed=cfg.seed, data_config=data_config(model=model))  # as train() did
    val_batches = [x for x, _ in loaders.val][:4]
    rec = creation_record(model) or {}
    onnx_path = os.path.join(work, "model.onnx")
    report = deploy(model, val_batches, out=onnx_path, atol=1e-4, rtol=1e-3, dynamic_batch=True,
                    save_weights=os.path.join(work, "fused.safetensors"),
                    save_pack=os.path.join(work, "task.safetensors"),
                    pack_info={"arch": rec.get("arch"), "num_classes": rec.get("num_classes"),
                               "model_kwargs": rec.get("kwargs")},
                    compare_graph="always",
                    onnx_metadata={"arch": rec.get("arch") or "",
                                   "num_classes": rec.get("num_classes") or 0,
                                   "fused_from": "ssf"})
    result = report.as_dict()
    top1_torch = evaluate(model.eval(), loaders.val, "cpu")
    top1_onnx = evaluate(_Logits(OrtRunner(onnx_path)), loaders.val, "cpu")
    result["val_top1"] = {"unfused_pytorch": top1_torch, "fused_onnxruntime": top1_onnx,
                          "upstream_history": up.metrics.get("top1") if up else None,
                          "ssf_history": res.metrics.get("top1")}
    result["trainable_params"] = res.trainable_params
    result["total_params"] = res.total_params
    say(str(report))
    say(f"downstream val top-1: unfused PyTorch {top1_torch:.2f}%, fused ONNX Runtime "
        f"{top1_onnx:.2f}% (SSF trains {res.trainable_params:,} of {res.total_params:,} "
        f"parameters; chance 20%)")
    if abs(top1_torch - top1_onnx) > 0:
        raise VerificationError(f"fused ONNX top-1 {top1_onnx:.2f}% differs from unfused "
                                f"{top1_torch:.2f}%", MainJobReport(result, work))

    # INT8: the fused model is the base graph, so the standard recipe applies (reported, not gated)
    q = quantize_onnx(onnx_path, os.path.join(work, "model.int8.onnx"), calib=data, val=data,
                      min_agreement=0.0)
    result["int8"] = q.as_dict()
    say(f"int8 (onnxruntime QDQ, {q.calibration['images']} calibration images) vs fp32: val "
        f"top-1 {q.val['top1_int8']:.2f}% vs {q.val['top1_fp32']:.2f}%, agreement "
        f"{q.agreement:.2f}%, latency {q.latency['int8_ms']:.3f} vs {q.latency['fp32_ms']:.3f} "
        f"ms ({q.latency['ratio']:.2f}x, batch 1, interleaved median) -> {q.written}")

    if cfg.bundle:
        result["bundle"] = _bundle_step(cfg, common, work, base_file, upstream, model,
                                        loaders, top1_torch, say)
    else:
        say("[4/5] bundle skipped")

    if cfg.bench:
        say("[5/5] cost benchmark (tiny ViT, CPU): base, full, ssf, ssf-fused, vpt-deep side by "
            "side")
        bcfg = BenchConfig(arch="test_vit", model_kwargs={"img_size": 32, "patch_size": 4},
                           num_classes=5, batch_size=16, image_size=32, device="cpu", amp=False,
                           warmup=3, iters=10, prompts=10)
        bench = run_bench(bcfg, resolve_methods("vpt-deep"), progress=False)
        say(format_table(bench))
        write_json(bench, os.path.join(work, "bench.json"))
        result["bench"] = {"model": bench["model"], "rows": [r["method"] for r in bench["results"]],
                           "json": os.path.join(work, "bench.json")}
    else:
        say("[5/5] benchmark skipped")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["workdir"] = work
    return MainJobReport(result, work)


def _bundle_step(cfg, common, work, base_file, upstream, textures, loaders, top1_textures,
                 say) -> dict:
    """Many tasks, one backbone: a second SSF task (the upstream shapes, on the same base), both
    tasks in one bundle; each task's val top-1 through the bundle next to its own model's."""
    from .bundle import BundleRunner, bundle
    from .data import make_loaders
    from .formats import build_model, read_task
    from .runtime import data_config
    from .train import TrainConfig, evaluate, train

    say(f"[4/5] many tasks, one backbone: SSF on {', '.join(UPSTREAM)} as a second task, then "
        f"both in one bundle (mixed-task batches)")
    res = train(TrainConfig(method="ssf", epochs=cfg.epochs, lr=1e-2, warmup_epochs=1,
                            data=upstream, pretrained_file=base_file,
                            out=os.path.join(work, "ssf-shapes.pt"), **common))
    shapes = build_model(read_task(res.checkpoint), base_weights=base_file)
    path = os.path.join(work, "tasks.onnx")
    rep = bundle([os.path.join(work, "ssf.pt"), res.checkpoint], out=path,
                 names=["textures", "shapes"], base_weights=base_file)
    say(str(rep))
    up = make_loaders(upstream, image_size=cfg.image_size, batch_size=cfg.batch_size,
                      seed=cfg.seed, data_config=data_config(model=shapes))
    runner = BundleRunner(path)
    top1 = {}
    for name, model, val, own in (("textures", textures, loaders.val, top1_textures),
                                  ("shapes", shapes, up.val, None)):
        t = runner.tasks[name]
        own = evaluate(model.eval(), val, "cpu") if own is None else own
        via = evaluate(_TaskLogits(runner, int(t["index"]), int(t["num_classes"])), val, "cpu")
        top1[name] = {"own_model": own, "bundle": via}
        say(f"  {name}: val top-1 {via:.2f}% through the bundle, {own:.2f}% with its own model")
    if any(v["own_model"] != v["bundle"] for v in top1.values()):
        raise VerificationError("a task scores differently through the bundle than with its own "
                                "model")
    return {"path": path, "passed": rep.passed, "tasks": rep.tasks, "val_top1": top1,
            "gate": {k: v for k, v in rep.gate.as_dict().items() if k != "tasks"},
            "graph": {k: rep.graph[k] for k in ("nodes", "base_nodes", "extra_nodes")},
            "row_bytes": rep.sizes["row_bytes"], "backbone_bytes": rep.sizes["backbone_bytes"]}
