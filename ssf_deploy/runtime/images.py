"""Images from a folder through timm's eval transform (another model family's data config where
the model has one): the one walk and the one extension list (INT8 calibration, engine inputs,
``--inputs DIR`` of fuse/verify all read the same files)."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from ..errors import CheckpointError, UsageError, first_line
from ..families import family_for, family_of

__all__ = ["IMAGE_EXTS", "image_files", "data_config", "eval_transform", "load_images",
           "ImageBatches"]

# what PIL opens and image folders hold in practice; one list, so no tool skips files another reads
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def image_files(folder: str) -> list[str]:
    """Every image under ``folder``, sorted; follows links (class folders often are symlinks,
    the main job's own data split is)."""
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder, followlinks=True)
                  for f in fs if f.lower().endswith(IMAGE_EXTS))


def _meta_model(arch: str):
    """``arch`` built on the meta device: its data config without weights or a download."""
    import timm
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")    # timm's deprecation notice for old names
            return timm.create_model(arch, pretrained=False, num_classes=2)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsageError(f"unknown timm model '{arch}' (see timm.list_models())") from e
        raise UsageError(f"cannot build timm model '{arch}' for its data config: "
                         f"{first_line(e)}") from e


def data_config(arch: Optional[str] = None, *, model=None, chw: Optional[Sequence[int]] = None
                ) -> dict:
    """timm's data config (mean, std, crop, interpolation) of ``model`` or of ``arch``, at the
    input size ``chw`` (C, H, W) when given: what training evaluated with. A model of another
    family (:mod:`ssf_deploy.families`; e.g. transformers: its image processor's normalisation)
    gives its own."""
    from timm.data import resolve_data_config
    family = family_of(model) if model is not None else family_for(arch)
    if family is not None:
        cfg = family.data_config(model, arch=arch)
    else:
        if model is None:
            if not arch:
                raise UsageError("the eval transform needs `arch` (a timm architecture) or "
                                 "`model`")
            model = _meta_model(arch)
        cfg = resolve_data_config({}, model=model)
    if chw is not None:
        cfg["input_size"] = tuple(int(v) for v in chw)
    return cfg


def eval_transform(arch: Optional[str] = None, *, model=None,
                   chw: Optional[Sequence[int]] = None):
    """timm's eval transform (see :func:`data_config`)."""
    from timm.data import create_transform
    return create_transform(**data_config(arch, model=model, chw=chw), is_training=False)


def load_images(files: Sequence[str], transform) -> torch.Tensor:
    """``files`` through ``transform`` as one float32 (N, C, H, W) tensor; an unreadable file
    is one line naming it."""
    from PIL import Image
    tensors = []
    for f in files:
        try:
            with Image.open(f) as img:
                tensors.append(transform(img.convert("RGB")))
        except OSError as e:
            raise CheckpointError(f"cannot read image {f}: {first_line(e)}") from e
    if not tensors:
        raise UsageError("no images to load")
    return torch.stack(tensors).float()


class ImageBatches:
    """Batches of ``batch_size`` images from ``folder`` through ``transform``, read lazily.

    At most ``limit`` images; a last partial batch is dropped (TensorRT calibrates with a fixed
    batch). Refuses a folder without images or with fewer than one batch.
    """

    def __init__(self, folder: str, transform, batch_size: int, *, limit: Optional[int] = None):
        if not os.path.isdir(folder):
            raise UsageError(f"{folder} is not a folder of images")
        files = image_files(folder)
        if limit is not None:
            files = files[: max(1, int(limit))]
        if not files:
            raise UsageError(f"no images ({'/'.join(IMAGE_EXTS)}) found under {folder}")
        if len(files) < batch_size:
            raise UsageError(f"{folder} has {len(files)} image(s), fewer than one batch of "
                             f"{batch_size}")
        self.folder, self.transform, self.batch_size = folder, transform, int(batch_size)
        self.files = files[: len(files) // self.batch_size * self.batch_size]

    def __len__(self) -> int:
        return len(self.files) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self.files), self.batch_size):
            yield load_images(self.files[i:i + self.batch_size], self.transform)
