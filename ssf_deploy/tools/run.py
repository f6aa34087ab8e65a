"""``ssf-deploy run``: the main job, end to end and offline on built-in defaults.

The built-in dataset is split into two tasks — upstream shapes and downstream textures — so the
run is a real transfer: full pre-training upstream -> shared base weights -> SSF fine-tuning on the
downstream classes -> fuse -> verify -> ONNX (checker, onnxsim) -> onnxruntime top-1 on the
downstream val set -> optional cost benchmark. Everything lands in one work folder.
"""
from __future__ import annotations

import json
import os
import time

import click
import torch

from ..errors import UsageError, VerificationError


UPSTREAM = ("circle", "square", "triangle", "ring", "cross")
DOWNSTREAM = ("diamond", "hstripes", "vstripes", "checker", "dots")


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


def _evaluate(fn, loader) -> float:
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            out = fn(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            correct += int((out.argmax(-1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(total, 1)


@click.command()
@click.option("--model", "arch", default="test_resnet", show_default=True, help="timm model.")
@click.option("--model-kwargs", default="{}", show_default=True,
              help='JSON kwargs for timm.create_model, e.g. {"img_size": 32, "patch_size": 8}.')
@click.option("--image-size", default=32, show_default=True, type=int)
@click.option("--pretrain-epochs", default=10, show_default=True, type=int,
              help="Upstream full training that makes the base weights (0: random base).")
@click.option("--epochs", default=8, show_default=True, type=int, help="SSF fine-tuning epochs.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--workdir", default=os.path.join("models", "run"), show_default=True,
              type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Finish with a small side-by-side cost benchmark.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def run(arch, model_kwargs, image_size, pretrain_epochs, epochs, batch_size, workdir, seed, bench,
        as_json):
    """Train SSF, fuse, verify, export and check ONNX end to end on built-in data, offline."""
    from ..data import builtin_dataset, make_loaders
    from ..deploy import deploy
    from ..export import OrtRunner
    from ..fileio import check_writable, save_safetensors
    from ..formats import build_model, read_task
    from ..models import creation_record, resolve_arch
    from ..train import TrainConfig, train

    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not JSON: {e}") from None
    arch = resolve_arch(arch)
    check_writable(os.path.join(workdir, "model.onnx"))   # every artefact lands in workdir
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    builtin = builtin_dataset()
    upstream = _split(builtin, workdir, "upstream", UPSTREAM)
    data = _split(builtin, workdir, "downstream", DOWNSTREAM)
    say = (lambda *a, **k: None) if as_json else click.echo
    common = dict(arch=arch, model_kwargs=kwargs, image_size=image_size,
                  batch_size=batch_size, seed=seed, workers=0, progress=not as_json,
                  verbose=not as_json)

    base_file = os.path.join(workdir, "base.safetensors")
    if pretrain_epochs > 0:
        say(f"[1/4] upstream pre-training: {arch}, full training on {', '.join(UPSTREAM)}, "
            f"{pretrain_epochs} epochs")
        up = train(TrainConfig(method="full", epochs=pretrain_epochs, lr=5e-3, data=upstream,
                               out=os.path.join(workdir, "upstream.pt"), **common))
        base_model = build_model(read_task(up.checkpoint))
    else:
        say("[1/4] no pre-training: random-init base weights")
        from ..models import create_base_model
        base_model = create_base_model(arch, len(UPSTREAM), **kwargs)
    save_safetensors(base_model.state_dict(), base_file)

    say(f"[2/4] SSF fine-tuning on {', '.join(DOWNSTREAM)} from {base_file}, {epochs} epochs")
    res = train(TrainConfig(method="ssf", epochs=epochs, lr=1e-2, warmup_epochs=1, data=data,
                            pretrained_file=base_file, out=os.path.join(workdir, "ssf.pt"),
                            **common))
    model = build_model(read_task(res.checkpoint), base_weights=base_file)

    say("[3/4] fuse -> verify -> ONNX -> onnxruntime")
    from timm.data import resolve_data_config
    loaders = make_loaders(data, image_size=image_size, batch_size=batch_size, seed=seed,
                           data_config=resolve_data_config({}, model=model))  # as train() did
    val_batches = [x for x, _ in loaders.val][:4]
    rec = creation_record(model) or {}
    onnx_path = os.path.join(workdir, "model.onnx")
    report = deploy(model, val_batches, out=onnx_path, atol=1e-4, rtol=1e-3, dynamic_batch=True,
                    save_weights=os.path.join(workdir, "fused.safetensors"),
                    save_pack=os.path.join(workdir, "task.safetensors"),
                    pack_info={"arch": rec.get("arch"), "num_classes": rec.get("num_classes"),
                               "model_kwargs": rec.get("kwargs")},
                    compare_graph="always",
                    onnx_metadata={"arch": rec.get("arch") or "",
                                   "num_classes": rec.get("num_classes") or 0,
                                   "fused_from": "ssf"})
    result = report.as_dict()
    text = str(report)
    top1_torch = _evaluate(model.eval(), loaders.val)
    top1_onnx = _evaluate(OrtRunner(onnx_path), loaders.val)
    result["val_top1"] = {"unfused_pytorch": top1_torch, "fused_onnxruntime": top1_onnx,
                          "upstream_history": up.metrics.get("top1") if pretrain_epochs else None,
                          "ssf_history": res.metrics.get("top1")}
    result["trainable_params"] = res.trainable_params
    result["total_params"] = res.total_params
    say(text)
    say(f"downstream val top-1: unfused PyTorch {top1_torch:.2f}%, fused ONNX Runtime "
        f"{top1_onnx:.2f}% "
        f"(SSF trains {res.trainable_params:,} of {res.total_params:,} parameters; chance 20%)")
    if abs(top1_torch - top1_onnx) > 0:
        raise VerificationError(f"fused ONNX top-1 {top1_onnx:.2f}% differs from unfused "
                             f"{top1_torch:.2f}%")

    # INT8: the fused model is the base graph, so the standard recipe applies (reported, not gated)
    from ..quantize import quantize_onnx
    q = quantize_onnx(onnx_path, os.path.join(workdir, "model.int8.onnx"), calib=data, val=data,
                      min_agreement=0.0)
    result["int8"] = q.as_dict()
    say(f"int8 (onnxruntime QDQ, {q.calibration['images']} calibration images) vs fp32: val "
        f"top-1 {q.val['top1_int8']:.2f}% vs {q.val['top1_fp32']:.2f}%, agreement "
        f"{q.agreement:.2f}%, latency {q.latency['int8_ms']:.3f} vs {q.latency['fp32_ms']:.3f} "
        f"ms ({q.latency['ratio']:.2f}x, batch 1, interleaved median) -> {q.written}")

    if bench:
        say("[4/4] cost benchmark (tiny ViT, CPU): base, full, ssf, ssf-fused, vpt-deep side by side")
        result["bench"] = _bench(workdir, say)
    else:
        say("[4/4] benchmark skipped (--no-bench)")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["workdir"] = workdir
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"done in {result['seconds']} s; artefacts in {workdir}/: base.safetensors, "
                   f"ssf.pt, model.onnx, task.safetensors, fused.safetensors, "
                   f"model.int8.onnx")


def _bench(workdir, say) -> dict:
    """A small side-by-side run of the cost harness (ViT, since Adapter/VPT need tokens)."""
    from .. import bench as B
    from ..fileio import write_json
    cfg = B.BenchConfig(arch="test_vit", model_kwargs={"img_size": 32, "patch_size": 4},
                        num_classes=5, batch_size=16, image_size=32, device="cpu", amp=False,
                        warmup=3, iters=10, prompts=10)
    report = B.run_bench(cfg, B.resolve_methods("vpt-deep"), progress=False)
    say(B.format_table(report))
    write_json(report, os.path.join(workdir, "bench.json"))
    return {"model": report["model"], "rows": [r["method"] for r in report["results"]],
            "json": os.path.join(workdir, "bench.json")}
