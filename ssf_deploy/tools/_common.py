"""Option handling shared by fuse/verify/refit: checkpoint or pack -> tuned model, inputs."""
from __future__ import annotations

import json
import os
from typing import Optional

import click
import torch

from ..errors import UsageError
from ..formats import Task, build_model, read_task
from ..models import example_input, input_size


def load_task(ckpt: Optional[str], pack: Optional[str]) -> Task:
    if ckpt and pack:
        raise UsageError("give a checkpoint or --pack, not both")
    if not ckpt and not pack:
        raise UsageError("give a checkpoint (CKPT) or --pack task.safetensors")
    task = read_task(pack or ckpt)
    if pack and task.source != "pack":
        raise UsageError(f"--pack {pack} is not a task pack (it reads as a {task.source} "
                         f"checkpoint): pass it as CKPT")
    return task


def tuned_model(task: Task, arch, num_classes, base_weights, pretrained=False,
                allow_base_mismatch=False):
    model = build_model(task, arch=arch, num_classes=num_classes, base_weights=base_weights,
                        pretrained=pretrained, allow_base_mismatch=allow_base_mismatch)
    from ..anchor import anchor_of
    anchor = anchor_of(model)
    if str(anchor.get("base_status", "")).endswith("overridden"):
        click.echo(f"WARNING: base {anchor['base']}; outputs are NOT anchored to the trained "
                   f"model's base", err=True)
    return model


def image_size_for(task: Task, override: Optional[int]) -> Optional[int]:
    """``--image-size`` if given, else the size the task was trained at (None: model default)."""
    if override is not None:
        if override < 1:
            raise UsageError(f"--image-size must be >= 1, got {override}")
        return override
    return task.image_size


def base_options(fn):
    """--base-weights / --pretrained / --allow-base-mismatch, shared by fuse, verify, refit."""
    for opt in reversed([
        click.option("--base-weights", type=click.Path(dir_okay=False),
                     help="Base model weights (.safetensors/.pth), offline; checked against the "
                          "base hash recorded at training."),
        click.option("--pretrained", is_flag=True, help="Fetch base weights from the timm hub."),
        click.option("--allow-base-mismatch", is_flag=True,
                     help="Deploy even if the base is not the one the task was trained on (or "
                          "cannot be checked); reported loudly, packs refused."),
    ]):
        fn = opt(fn)
    return fn


def make_inputs(spec: str, model, batch_size: int, image_size: Optional[int],
                seed: int = 0) -> list[torch.Tensor]:
    """``N`` -> N seeded random batches; ``DIR`` -> images from a folder, model's eval transform."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if spec is None or str(spec).isdigit():
        n = int(spec or 2)
        if n < 1:
            raise UsageError("--inputs N must be >= 1")
        return [example_input(model, batch=batch_size, image_size=image_size, seed=seed + i)
                for i in range(n)]
    if not os.path.isdir(spec):
        raise UsageError(f"--inputs must be a number of random batches or a folder of images: "
                         f"{spec!r} is neither")
    if input_size(model)[0] < 1:
        raise UsageError(f"--inputs {spec}: a folder of images, but {type(model).__name__} is a "
                         f"text model (pass a number of random batches)")
    from ..runtime import eval_transform, image_files, load_images
    chw = (3, image_size, image_size) if image_size else input_size(model)
    files = image_files(spec)
    if not files:
        raise UsageError(f"no images found under {spec}")
    x = load_images(files[: 8 * batch_size], eval_transform(model=model, chw=chw))
    return list(x.split(batch_size))


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def progress_printer(enabled: bool):
    """Stage lines on stderr (stdout stays clean for --json)."""
    if not enabled:
        return None
    return lambda msg: click.echo(f"  {msg}", err=True)
