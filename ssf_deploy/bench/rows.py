"""The rows of a benchmark: which models one run compares, built identically in every process."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["ROWS", "TRAIN_ROWS", "SAME_AS_BASE", "ALWAYS", "BACKENDS", "BenchConfig",
           "resolve_methods", "check_device", "check_backend", "create_model", "image_size",
           "build_row", "fuse_to_file", "inputs", "warmup_steps"]

# Canonical order of rows; "base" is the inference reference, "full" the training reference and
# "frozen" (every weight frozen, gradients still flow to the input) the floor of any method that
# back-propagates through the whole network.
ROWS = ("base", "full", "linear", "bias", "adapter", "vpt-shallow", "vpt-deep", "ssf",
        "ssf-naive", "frozen", "ssf-fused")
TRAIN_ROWS = tuple(r for r in ROWS if r not in ("base", "ssf-fused"))
# rows whose deployed model is the unchanged base graph: their inference cost *is* base's
SAME_AS_BASE = ("full", "linear", "bias", "frozen")
ALWAYS = ("base", "full", "ssf", "frozen", "ssf-fused")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
TRT_HINT = 'the TensorRT backend needs TensorRT and a GPU: pip install "ssf-deploy[tensorrt]"'


@dataclass
class BenchConfig:
    arch: str = "vit_base_patch16_224"
    num_classes: int = 100
    batch_size: int = 16
    image_size: Optional[int] = None
    device: str = "cpu"
    amp: bool = False
    backend: str = "torch"
    warmup: int = 2
    iters: int = 10
    prompts: Optional[int] = None
    adapter_dim: Optional[int] = None
    model_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    compile: bool = False        # torch.compile the trained / inferred model (torch backend)

    def options(self, method: str) -> dict:
        if method in ("vpt-shallow", "vpt-deep") and self.prompts is not None:
            return {"prompts": int(self.prompts)}
        if method == "adapter" and self.adapter_dim is not None:
            return {"dim": int(self.adapter_dim)}
        return {}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def warmup_steps(cfg: BenchConfig) -> int:
    """At least 1 (the optimizer state exists and the lean SSF sites have settled after it);
    with --compile at least 3 (compilation, and a recompile once the graph is known)."""
    return max(3 if cfg.compile else 1, cfg.warmup)


# ------------------------------------------------------------------------------------------
# validation


def resolve_methods(spec: str) -> list[str]:
    """``all``, one method or a comma list; base, full, ssf, frozen and ssf-fused always come
    along so that every ratio in a report comes from the same run."""
    asked = [s.strip() for s in (spec or "all").split(",") if s.strip()]
    if not asked or "all" in asked:
        return list(ROWS)
    bad = [m for m in asked if m not in ROWS]
    if bad:
        raise UsageError(f"unknown method '{bad[0]}'; choose from all, {', '.join(ROWS)}")
    want = set(asked) | set(ALWAYS)
    return [r for r in ROWS if r in want]


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"unknown device '{device}'; use cpu or cuda[:N]") from e
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device '{device}'; use cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device '{device}' does not exist "
                             f"({torch.cuda.device_count()} CUDA device(s))")
        if dev.index is None:   # one device for everything: name it
            dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def check_backend(backend: str, device: str) -> str:
    """The inference runtime must exist and must run on ``device`` (never CPU timings labelled
    as CUDA): onnxruntime on CUDA needs the CUDA execution provider."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    cuda = device.startswith("cuda")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
            from .. import engine  # noqa: F401
        except ImportError as e:
            raise UsageError(TRT_HINT) from e
        if not cuda:
            raise UsageError("the TensorRT backend runs on a GPU: use `device` cuda")
    if backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UsageError("the onnxruntime backend needs onnxruntime: "
                             "pip install onnxruntime") from e
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(f"`device` {device} with `backend` onnxruntime needs the CUDA "
                             f"execution provider, and this onnxruntime offers only "
                             f"{', '.join(ort.get_available_providers())}: "
                             f"pip install onnxruntime-gpu, or use `device` cpu")
    return backend


# ------------------------------------------------------------------------------------------
# models


def create_model(cfg: BenchConfig, *, num_classes: Optional[int] = None) -> nn.Module:
    """The base model of this config: same kwargs as train/export (``sized_kwargs``), seeded."""
    from ..models import create_base_model, sized_kwargs
    kwargs, _ = sized_kwargs(cfg.arch, cfg.model_kwargs, cfg.image_size)
    torch.manual_seed(cfg.seed)
    return create_base_model(cfg.arch, num_classes or cfg.num_classes, **kwargs)


def image_size(cfg: BenchConfig) -> int:
    from ..models import sized_kwargs
    return sized_kwargs(cfg.arch, cfg.model_kwargs, cfg.image_size)[1]


def build_row(cfg: BenchConfig, row: str, fused_weights: Optional[str] = None
              ) -> tuple[Optional[nn.Module], Callable[[], nn.Module]]:
    """(model to train or None, factory of the model to deploy) for one bench row.

    ``ssf-fused`` is the base architecture built fresh and loaded with the folded weights of
    ``fused_weights`` (a safetensors file from :func:`fuse_to_file`), exactly as ``base`` is
    built: the process measuring it never traced or fused anything. Without the file the SSF
    model is fused here.
    """
    from ..tuners import apply_method
    if row not in ROWS:
        raise UsageError(f"unknown bench row '{row}'")
    if row == "ssf-fused":
        if fused_weights is not None:
            def load() -> nn.Module:
                from safetensors.torch import load_file
                model = create_model(cfg)
                model.load_state_dict(load_file(fused_weights), strict=True)
                return model
            return None, load

        def fuse_here() -> nn.Module:
            from ..fuse import fuse
            return fuse(_ssf_model(cfg))
        return None, fuse_here
    model = create_model(cfg)
    if row == "base":
        return None, lambda: model
    if row == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, lambda: model
    if row in ("ssf", "ssf-naive"):
        apply_method(model, "ssf", impl="naive" if row == "ssf-naive" else "lean")
        return model, lambda: model
    apply_method(model, row, **cfg.options(row))
    return model, lambda: model


def _ssf_model(cfg: BenchConfig) -> nn.Module:
    from ..tuners import apply_method
    model = create_model(cfg)
    apply_method(model, "ssf")
    return model


def fuse_to_file(cfg: BenchConfig, path: str) -> None:
    """Fuse the ``ssf`` row's model and save the folded base weights for ``ssf-fused``."""
    from ..fileio import save_safetensors
    from ..fuse import fuse
    fused = fuse(_ssf_model(cfg))
    save_safetensors(fused.state_dict(), path)


def inputs(cfg: BenchConfig, model: nn.Module, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from ..models import example_input
    x = example_input(model, batch=batch, image_size=image_size(cfg), seed=cfg.seed).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return x, y
