"""Training data: ImageFolder trees (``train/`` + ``val/``) and an offline built-in dataset.

The built-in dataset exists so that ``ssf-deploy train`` and the tests work with no download: ten
classes of procedurally drawn shapes and textures with random colours, sizes, positions,
backgrounds and noise, so a model has to learn shape rather than colour. It is generated
deterministically and materialised once as an ImageFolder tree, written to a temp folder and
renamed into place so a crash or a concurrent run never leaves a half-written tree.

Loading and augmentation are timm's (``create_dataset``, ``create_transform``); sampling is a
``DistributedSampler`` even in one process, so the data order is a function of (seed, epoch) and
a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .errors import OutputError, SSFDeployError, describe_os_error, first_line

__all__ = ["BUILTIN_CLASSES", "builtin_dataset", "default_cache_dir", "inspect_data_dir",
           "make_loaders", "Loaders", "is_builtin_dir"]

BUILTIN_CLASSES = ("circle", "square", "triangle", "ring", "cross", "diamond",
                   "hstripes", "vstripes", "checker", "dots")
_GENERATOR = "ssf-deploy/builtin-shapes/1"   # bump when the drawing code changes
_STAMP = "builtin.json"
_IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def default_cache_dir() -> str:
    """``$SSF_DEPLOY_CACHE`` if set, else ``models/data`` (next to the default checkpoints)."""
    return os.environ.get("SSF_DEPLOY_CACHE") or os.path.join("models", "data")


# ----------------------------------------------------------------------------- built-in dataset

def _draw(cls: str, size: int, rng: np.random.RandomState):
    """One image of class ``cls``; everything but the class identity is random."""
    from PIL import Image, ImageDraw

    s = size * 4   # draw large, downsample: anti-aliased edges like a real photo
    # background: a random linear gradient between two colours
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    bg = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    # foreground colour: far enough from the mean background to stay visible
    mean_bg = (c0 + c1) / 2
    for _ in range(20):
        fg = rng.uniform(0, 255, 3)
        if np.abs(fg - mean_bg).sum() > 180:
            break
    fg = tuple(int(v) for v in fg)

    r = rng.uniform(0.22, 0.36) * s                     # half extent of the object
    cx = rng.uniform(r + 0.04 * s, s - r - 0.04 * s)
    cy = rng.uniform(r + 0.04 * s, s - r - 0.04 * s)
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls == "circle":
        draw.ellipse(box, fill=fg)
    elif cls == "square":
        draw.rectangle(box, fill=fg)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif cls == "ring":
        w = r * rng.uniform(0.25, 0.4)
        draw.ellipse(box, outline=fg, width=int(w))
    elif cls == "cross":
        w = r * rng.uniform(0.3, 0.45)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    elif cls == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif cls in ("hstripes", "vstripes", "checker", "dots"):
        period = s * rng.uniform(0.12, 0.2)
        phase = rng.uniform(0, period)
        k = np.arange(-1, int(s / period) + 2)
        edges = phase + k * period
        if cls == "hstripes":
            for e in edges:
                draw.rectangle([0, e, s, e + period / 2], fill=fg)
        elif cls == "vstripes":
            for e in edges:
                draw.rectangle([e, 0, e + period / 2, s], fill=fg)
        elif cls == "checker":
            for i, ex in enumerate(edges):
                for j, ey in enumerate(edges):
                    if (i + j) % 2 == 0:
                        draw.rectangle([ex, ey, ex + period, ey + period], fill=fg)
        else:
            rad = period * rng.uniform(0.18, 0.28)
            for ex in edges:
                for ey in edges:
                    draw.ellipse([ex - rad, ey - rad, ex + rad, ey + rad], fill=fg)
    else:  # pragma: no cover - BUILTIN_CLASSES is closed
        raise ValueError(cls)

    small = np.asarray(img.resize((size, size), Image.BILINEAR)).astype(np.float32)
    small += rng.normal(0, rng.uniform(4, 20), small.shape)        # sensor noise
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB")


def _stamp(size: int, train_per_class: int, val_per_class: int, seed: int) -> dict:
    return {"generator": _GENERATOR, "classes": list(BUILTIN_CLASSES), "size": int(size),
            "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
            "seed": int(seed)}


def is_builtin_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _STAMP))


def builtin_dataset(root: Optional[str] = None, *, size: int = 32, train_per_class: int = 60,
                    val_per_class: int = 20, seed: int = 0) -> str:
    """Path of the built-in ImageFolder tree, generating it on first use.

    ``root`` is the folder that will hold ``train/`` and ``val/`` (default
    ``<cache>/builtin``, see :func:`default_cache_dir`). An existing tree made with other
    settings or an older generator is replaced; a non-empty folder that is not ours is refused.
    """
    root = os.path.abspath(root or os.path.join(default_cache_dir(), "builtin"))
    want = _stamp(size, train_per_class, val_per_class, seed)
    stamp_path = os.path.join(root, _STAMP)
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path) as f:
                if json.load(f) == want:
                    return root
        except (OSError, ValueError):
            pass     # an unreadable stamp: the tree is regenerated below, like a stale one
    elif os.path.isdir(root) and os.listdir(root):
        raise SSFDeployError(f"{root} exists and is not a built-in dataset folder; "
                             f"choose another location")
    if size < 8 or train_per_class < 1 or val_per_class < 1:
        raise SSFDeployError("built-in dataset needs size >= 8 and at least one image per class")

    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-builtin-", dir=parent)
    except OSError as e:   # one line naming the dataset folder, not a temp name
        raise OutputError(describe_os_error(e, root)) from e
    try:
        for split, n, split_id in (("train", train_per_class, 0), ("val", val_per_class, 1)):
            for ci, cls in enumerate(BUILTIN_CLASSES):
                d = os.path.join(tmp, split, cls)
                os.makedirs(d)
                for i in range(n):
                    rng = np.random.RandomState([seed, split_id, ci, i])
                    _draw(cls, size, rng).save(os.path.join(d, f"{i:05d}.png"))
        with open(os.path.join(tmp, _STAMP), "w") as f:
            json.dump(want, f)
        old = None
        if os.path.exists(root):           # stale tree: swap, then delete the old one
            old = tempfile.mkdtemp(prefix=".old-builtin-", dir=parent)
            os.rename(root, os.path.join(old, "tree"))
        try:
            os.rename(tmp, root)
        except OSError:
            # another process won the race with an identical tree: use theirs
            if not (os.path.isfile(stamp_path) and json.load(open(stamp_path)) == want):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(describe_os_error(e, root)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ----------------------------------------------------------------------------- ImageFolder trees

def _class_dirs(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(_IMG_EXTS) for f in files):
            return True
    return False


def inspect_data_dir(data_dir: str) -> list[str]:
    """Class names of an ImageFolder tree, or a one-line error saying what is wrong with it."""
    if not data_dir or not os.path.isdir(data_dir):
        raise SSFDeployError(f"data folder not found: {data_dir}")
    classes = {}
    for split in ("train", "val"):
        d = os.path.join(data_dir, split)
        if not os.path.isdir(d):
            raise SSFDeployError(f"{data_dir} has no {split}/ folder (expected {split}/<class>/<image>)")
        names = _class_dirs(d)
        if not names:
            raise SSFDeployError(f"{d} has no class folders (expected {split}/<class>/<image>)")
        empty = [n for n in names if not _has_image(os.path.join(d, n))]
        if empty:
            raise SSFDeployError(f"class folder(s) without images in {d}: "
                                 f"{', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        raise SSFDeployError(f"train/ and val/ classes differ in {data_dir}: "
                             f"only in train: {only_t[:3] or '-'}, only in val: {only_v[:3] or '-'}")
    return classes["train"]


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: no padding, so all-reduced counts are exact."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler   # call ``set_epoch`` before each epoch
    classes: list
    data_config: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def make_loaders(data_dir: str, *, image_size: int, batch_size: int, workers: int = 0,
                 seed: int = 0, data_config: Optional[dict] = None,
                 crop_scale: Optional[Sequence[float]] = None, hflip: float = 0.5,
                 color_jitter: float = 0.4, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, pin_memory: bool = False) -> Loaders:
    """Train/val loaders for an ImageFolder tree with timm's transforms.

    ``data_config`` is what ``timm.data.resolve_data_config`` says for the model (mean, std,
    interpolation, crop_pct); ``image_size`` overrides its input size. ``batch_size`` is per
    process. ``drop_last`` drops the last incomplete training batch (a batch of one breaks
    BatchNorm, mixup needs even batches, and a constant shape is faster) unless that would leave
    no batch at all.
    """
    from timm.data import create_dataset, create_transform

    classes = inspect_data_dir(data_dir)
    if batch_size < 1:
        raise SSFDeployError(f"`batch_size` must be >= 1, got {batch_size}")
    if image_size < 8:
        raise SSFDeployError(f"`image_size` must be >= 8, got {image_size}")
    cfg = dict(data_config or {})
    common = dict(input_size=(3, image_size, image_size),
                  interpolation=cfg.get("interpolation", "bilinear"),
                  mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                  std=tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    train_tf = create_transform(**common, is_training=True, hflip=hflip, color_jitter=color_jitter,
                                scale=tuple(crop_scale) if crop_scale else None)
    val_tf = create_transform(**common, is_training=False, crop_pct=cfg.get("crop_pct", 1.0))
    class_map = {c: i for i, c in enumerate(classes)}
    try:
        train_ds = create_dataset("", root=os.path.join(data_dir, "train"), class_map=class_map,
                                  is_training=True, transform=train_tf)
        val_ds = create_dataset("", root=os.path.join(data_dir, "val"), class_map=class_map,
                                transform=val_tf)
    except RuntimeError as e:   # timm: "Found 0 images in subfolders of ..."
        raise SSFDeployError(first_line(e)) from e

    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    per_rank = len(sampler)
    train = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       pin_memory=pin_memory, drop_last=drop_last and per_rank >= batch_size,
                       persistent_workers=False)
    val = DataLoader(val_ds, batch_size=batch_size, sampler=ShardSampler(len(val_ds), rank, world_size),
                     num_workers=workers, pin_memory=pin_memory)
    return Loaders(train, val, sampler, classes, dict(common, crop_pct=cfg.get("crop_pct", 1.0)))
