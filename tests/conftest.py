"""Shared test fixtures: tiny members of many timm families, GPU/TensorRT skip markers."""
from __future__ import annotations

import functools

import pytest
import timm
import torch

# family -> (timm name, create_model kwargs, image size). Tiny so the suite stays fast.
FAMILIES = {
    "vit": ("test_vit", dict(img_size=32, patch_size=8), 32),
    "deit": ("deit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=32,
                                           num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                                  window_size=4, img_size=32), 32),
    "convnext": ("test_convnext", {}, 32),
    "resnet": ("test_resnet", {}, 32),
    "efficientnet": ("test_efficientnet", {}, 32),
    "mixer": (None, {}, 32),     # built from the class: timm's mixer names fix the width
    "resmlp": (None, {}, 32),
}
TRANSFORMERS = ("vit", "deit", "swin")


def make_model(family: str, num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (deterministic for ``seed``)."""
    torch.manual_seed(seed)
    arch, kwargs, _ = FAMILIES[family]
    if family == "mixer":
        from timm.models.mlp_mixer import MlpMixer
        return MlpMixer(num_classes=num_classes, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    if family == "resmlp":
        from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
        return MlpMixer(num_classes=num_classes, img_size=32, patch_size=8, num_blocks=2,
                        embed_dim=32, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)
    return timm.create_model(arch, num_classes=num_classes, **kwargs)


def image_size(family: str) -> int:
    return FAMILIES[family][2]


@functools.lru_cache(None)
def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return has_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none present)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT + GPU: pip install \"ssf-deploy[tensorrt]\"")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_tensorrt():
            item.add_marker(skip_trt)


@pytest.fixture
def tmp_models(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: one thread avoids OpenMP spin contention. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
