"""Loading helpers shared by fuse/verify/refit: checkpoints or packs -> tuned model, inputs."""
from __future__ import annotations

import json
import os
from typing import Optional

import click
import torch

from ..checkpoint import Task, build_model, read_task
from ..errors import SSFDeployError
from ..models import example_input, input_size


def load_task(ckpt: Optional[str], pack: Optional[str]) -> Task:
    if ckpt and pack:
        raise SSFDeployError("give a checkpoint or --pack, not both")
    if not ckpt and not pack:
        raise SSFDeployError("give a checkpoint (CKPT) or --pack task.safetensors")
    if pack:
        from ..pack import read_pack
        return read_pack(pack)
    from ..pack import is_pack
    if is_pack(ckpt):
        from ..pack import read_pack
        return read_pack(ckpt)
    return read_task(ckpt)


def tuned_model(task: Task, arch, num_classes, base_weights, pretrained=False):
    if task.source == "pack" and not base_weights and not pretrained:
        raise SSFDeployError("a pack holds only the task: pass --base-weights FILE "
                             "(or --pretrained to fetch the base from the timm hub)")
    return build_model(task, arch=arch, num_classes=num_classes, base_weights=base_weights,
                       pretrained=pretrained)


def make_inputs(spec: str, model, batch_size: int, image_size: Optional[int],
                seed: int = 0) -> list[torch.Tensor]:
    """``N`` -> N seeded random batches; ``DIR`` -> images from a folder, model's eval transform."""
    if spec is None or str(spec).isdigit():
        n = int(spec or 2)
        if n < 1:
            raise SSFDeployError("--inputs N must be >= 1")
        return [example_input(model, batch=batch_size, image_size=image_size, seed=seed + i)
                for i in range(n)]
    if not os.path.isdir(spec):
        raise SSFDeployError(f"--inputs must be a number of random batches or a folder of images: "
                             f"{spec!r} is neither")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    if image_size:
        cfg["input_size"] = (3, image_size, image_size)
    else:
        cfg["input_size"] = input_size(model)
    tf = create_transform(**cfg, is_training=False)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(spec) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    if not files:
        raise SSFDeployError(f"no images found under {spec}")
    tensors = []
    for f in files[: 8 * batch_size]:
        try:
            tensors.append(tf(Image.open(f).convert("RGB")))
        except OSError as e:
            raise SSFDeployError(f"cannot read image {f}: {e}") from None
    x = torch.stack(tensors)
    return list(x.split(batch_size))


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)
