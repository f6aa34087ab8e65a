"""Fine-tuning loop: one code path for CPU, one GPU and ``torchrun`` multi-GPU (DDP).

The recipe is the paper's (Sec. 4.1): AdamW, cosine decay with linear warm-up (stepped per
iteration), label smoothing, mixup/cutmix -- all timm's implementations. Only the parameters the
tuning method left trainable reach the optimizer.

Resuming is exact: the checkpoint written after every epoch holds the optimizer, scheduler,
scaler and RNG states, and every epoch's randomness (data order, augmentation, dropout, mixup,
dataloader worker seeds) is derived from ``(seed, epoch, rank)``. So a run interrupted after
epoch k and resumed ends with bit-identical trainable state to an uninterrupted run, also under
DDP where only rank 0's RNG state is saved.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import builtin_dataset, inspect_data_dir, is_builtin_dir, make_loaders
from .errors import SSFDeployError, first_line
from .fileio import check_writable, plain as _plain
from .formats.checkpoint import (FORMAT, load_checkpoint, save_checkpoint, serialized_size,
                                 task_record)
from .formats.provenance import base_record, describe_base
from .models import (check_finite, count_params, create_base_model, creation_record, input_size,
                     logits_of, resolve_arch, sized_kwargs)
from .runtime import data_config
from .tuners import apply_method, load_trainable_state, method_of, trainable_state_dict

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "default_out"]

DATASETS = ("builtin",)


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI maps its flags 1:1 onto these fields."""
    arch: str
    method: str = "ssf"
    method_options: dict = field(default_factory=dict)   # e.g. {"blocks": 6} for ssf
    model_kwargs: dict = field(default_factory=dict)     # extra timm.create_model kwargs
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    data: Optional[str] = None          # ImageFolder tree with train/ and val/
    dataset: Optional[str] = None       # "builtin": generated offline (see ssf_deploy.data)
    num_classes: Optional[int] = None   # inferred from the data when None
    epochs: int = 10
    batch_size: int = 32                # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    image_size: Optional[int] = None    # default: the model's input size
    workers: int = 0
    seed: int = 0
    out: Optional[str] = None           # default models/<arch>-<method>.pt (or --resume's file)
    resume: Optional[str] = None
    device: str = "auto"                # auto | cpu | cuda
    amp: bool = True                    # fp16 autocast + GradScaler; CUDA only
    max_steps_per_epoch: Optional[int] = None
    crop_scale: Optional[tuple] = None  # RandomResizedCrop area range; None: timm's (builtin: 0.5-1)
    hflip: float = 0.5                  # horizontal-flip probability (0 for digits, text...)
    color_jitter: float = 0.4
    progress: bool = True               # tqdm bar (rank 0)
    compile: bool = False               # torch.compile the training forward
    verbose: bool = True                # one line per epoch (rank 0)
    # called on every rank after each epoch's checkpoint: fn(epoch_done, metrics); not saved
    on_epoch_end: Optional[Callable[[int, dict], None]] = field(default=None, repr=False,
                                                                compare=False)

    def as_args(self) -> dict:
        """Plain-container copy for the checkpoint (``weights_only`` loadable)."""
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name != "on_epoch_end"})


@dataclass
class TrainResult:
    checkpoint: str
    arch: str
    method: str
    num_classes: int
    epochs: int                         # epochs completed (including resumed ones)
    metrics: dict                       # {"top1": [per epoch, %], "loss": [per epoch]}
    top1: Optional[float]               # last epoch's val top-1 (%)
    trainable_params: int
    total_params: int


def default_out(arch: str, method: str) -> str:
    return os.path.join("models", f"{arch.replace('/', '_').replace(':', '_')}-{method}.pt")


# ----------------------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # we called init_process_group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()


def _setup_dist(device_kind: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a one-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owns)


def _resolve_device(name: str, d: Optional[_Dist] = None) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SSFDeployError("`device` cuda requested but no CUDA GPU is available (use cpu)")
        if d is not None and d.enabled:
            return torch.device("cuda", d.local_rank)
        return torch.device(name)
    if name != "cpu":
        raise SSFDeployError(f"`device` must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def _all_sum(values: list[float], device: torch.device, d: _Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- RNG

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)   # also seeds every CUDA device


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2 ** 31 - 1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": str(np_state[0]),
                  "state": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[:torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["state"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


# ----------------------------------------------------------------------------- model

def _model_kwargs(arch: str, cfg: TrainConfig) -> tuple[dict, int]:
    return sized_kwargs(arch, cfg.model_kwargs, cfg.image_size)


def _build_model(arch: str, num_classes: int, kwargs: dict, cfg: TrainConfig) -> nn.Module:
    random_base = not (cfg.pretrained or cfg.pretrained_file)
    try:
        model = create_base_model(arch, num_classes, pretrained=cfg.pretrained,
                                  pretrained_file=cfg.pretrained_file,
                                  init_seed=cfg.seed if random_base else None, **kwargs)
    except SSFDeployError:
        raise
    except (TypeError, ValueError, AssertionError) as e:
        raise SSFDeployError(f"cannot build {arch}: {first_line(e)}") from None
    apply_method(model, cfg.method, **cfg.method_options)
    return model


def _probe(model: nn.Module, size: int, device: torch.device) -> list[str]:
    """One throw-away training forward/backward; returns trainable parameters it never touched.

    DDP must be told about unused parameters. The probe also settles state that models set up
    lazily on their first forward (SSF's lean-backward policy decides per site whether to keep
    the input or recover it from the output), so a fresh and a resumed run take their first real
    step in the same numerical regime -- without it resume would differ in the last bits.
    Buffers (BatchNorm statistics) are restored, so the probe leaves no trace in the model.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            out = model(torch.zeros(2, 3, size, size, device=device))
            outs = out if isinstance(out, (tuple, list)) else [logits_of(out)]
            sum(o.float().sum() for o in outs).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        model.train(was_training)
    return unused


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp: bool = False) -> float:
    """Top-1 accuracy in percent; summed over all ranks when running under DDP."""
    device = torch.device(device)
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = model.training
    model.eval()
    correct = total = 0
    ctx = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx:
                out = logits_of(model(x))
            correct += int((out.argmax(-1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([correct, total], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        correct, total = t.tolist()
    return 100.0 * correct / total if total else float("nan")


# ----------------------------------------------------------------------------- resume

_RESUME_KEYS = ("arch", "num_classes", "method", "options", "state", "epoch", "optimizer",
                "scheduler", "rng", "metrics")


def _read_resume(path: str) -> dict:
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SSFDeployError(f"cannot resume from {path}: not an ssf-deploy training checkpoint")
    missing = [k for k in _RESUME_KEYS if k not in ckpt]
    if missing:
        raise SSFDeployError(f"cannot resume from {path}: it lacks {', '.join(missing)} "
                             f"(only checkpoints written by 'ssf-deploy train' resume)")
    check_finite(_resume_tensors(ckpt), f"cannot resume from {path}")
    return ckpt


def _resume_tensors(ckpt: dict):
    """(name, tensor) for every tensor a resume loads: the trainable state, the optimizer's
    moments, the AMP scaler's scale."""
    state = ckpt.get("state")
    if isinstance(state, dict):
        yield from ((f"state.{k}", v) for k, v in state.items())
    opt = ckpt.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("state"), dict):
        for index, entry in opt["state"].items():
            if isinstance(entry, dict):
                yield from ((f"optimizer.state.{index}.{k}", v) for k, v in entry.items())
    scaler = ckpt.get("scaler")
    if isinstance(scaler, dict):
        yield from ((f"scaler.{k}", v) for k, v in scaler.items())


def _check_resume(ckpt: dict, path: str, *, arch: str, method: str, options: dict,
                  num_classes: int, model_kwargs: dict, base: dict) -> None:
    def refuse(what, theirs, ours):
        raise SSFDeployError(f"cannot resume from {path}: it was trained with {what} {theirs!r}, "
                             f"this run asks for {ours!r}")
    if ckpt["arch"] != arch:
        refuse("`arch`", ckpt["arch"], arch)
    if ckpt["method"] != method:
        refuse("`method`", ckpt["method"], method)
    if int(ckpt["num_classes"]) != num_classes:
        refuse("`num_classes`", int(ckpt["num_classes"]), num_classes)
    if _plain(ckpt["options"]) != _plain(options):
        refuse("method options", ckpt["options"], options)
    if _plain(ckpt.get("model_kwargs") or {}) != _plain(model_kwargs):
        refuse("model kwargs", ckpt.get("model_kwargs"), model_kwargs)
    theirs = (ckpt.get("base") or {}).get("sha256")
    if theirs != base["sha256"]:
        refuse("base weights", f"{theirs} ({describe_base(ckpt.get('base'))})",
               f"{base['sha256']} ({describe_base(base)})")


# ----------------------------------------------------------------------------- training

def _data_dir(cfg: TrainConfig, d: _Dist) -> str:
    if cfg.data and cfg.dataset:
        raise SSFDeployError("give either `data` or `dataset`, not both")
    if cfg.dataset:
        if cfg.dataset not in DATASETS:
            raise SSFDeployError(f"unknown `dataset` {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
        if d.main:
            path = builtin_dataset()
        d.barrier()   # rank 0 generates, the others then find it ready
        if not d.main:
            path = builtin_dataset()
        return path
    if not cfg.data:
        raise SSFDeployError("no training data: give `data` (a folder with train/ and val/) "
                             "or `dataset` builtin")
    return cfg.data


def _check_numbers(cfg: TrainConfig) -> None:
    for name, value, ok in (("`epochs`", cfg.epochs, cfg.epochs >= 1),
                            ("`batch_size`", cfg.batch_size, cfg.batch_size >= 1),
                            ("`lr`", cfg.lr, cfg.lr > 0),
                            ("`weight_decay`", cfg.weight_decay, cfg.weight_decay >= 0),
                            ("`warmup_epochs`", cfg.warmup_epochs, cfg.warmup_epochs >= 0),
                            ("`min_lr`", cfg.min_lr, cfg.min_lr >= 0),
                            ("`label_smoothing`", cfg.label_smoothing, 0 <= cfg.label_smoothing < 1),
                            ("`mixup`", cfg.mixup, cfg.mixup >= 0),
                            ("`cutmix`", cfg.cutmix, cfg.cutmix >= 0),
                            ("`workers`", cfg.workers, cfg.workers >= 0),
                            ("`max_steps_per_epoch`", cfg.max_steps_per_epoch,
                             cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1)):
        if not ok:
            raise SSFDeployError(f"{name} out of range: {value}")


@dataclass
class _Run:
    """Everything a training run sets up once (timm train.py's setup, as one object)."""
    cfg: TrainConfig
    d: _Dist
    device: torch.device
    arch: str
    num_classes: int
    model_kwargs: dict
    size: int
    out: str
    model: nn.Module
    net: nn.Module
    options: dict
    base: dict
    trainable: int
    total: int
    loaders: object
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    amp: bool
    mixup_fn: object
    criterion: nn.Module
    metrics: dict = field(default_factory=lambda: {"top1": [], "loss": []})
    start: int = 0


def _setup(cfg: TrainConfig, d: _Dist) -> _Run:
    """Data, model (+ its base record), optimiser, schedule, loss, and the resumed state."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    device = _resolve_device(cfg.device, d)
    arch = resolve_arch(cfg.arch)
    out = cfg.out or (cfg.resume if cfg.resume else default_out(arch, cfg.method))
    if d.main:   # before the work: not after an epoch of it
        check_writable(out)
    resume = _read_resume(cfg.resume) if cfg.resume else None
    data_dir = _data_dir(cfg, d)
    classes = inspect_data_dir(data_dir)
    num_classes = int(cfg.num_classes or len(classes))
    if num_classes != len(classes):
        raise SSFDeployError(f"`num_classes` {num_classes} but {data_dir} has "
                             f"{len(classes)} classes")
    model_kwargs, size = _model_kwargs(arch, cfg)

    _seed_all(cfg.seed)   # same initial weights (random head, SSF/prompt init) on every rank
    model = _build_model(arch, num_classes, model_kwargs, cfg)
    if input_size(model)[0] < 1:   # a text model (transformers)
        raise SSFDeployError(f"{arch} is a text model; 'train' reads image folders: fine-tune it "
                             f"with transformers.Trainer and ssf_deploy.peft, or your own loop "
                             f"and ssf_deploy.save_task")
    options = method_of(model)["options"]
    rec = creation_record(model) or {}
    # the frozen base never changes while training: hash it once, before the first step
    base = base_record(model, trainable_state_dict(model), arch=arch, num_classes=num_classes,
                       model_kwargs=model_kwargs, image_size=size, source=rec.get("source", "?"),
                       init_seed=rec.get("init_seed"))
    if resume is not None:
        _check_resume(resume, cfg.resume, arch=arch, method=cfg.method, options=options,
                      num_classes=num_classes, model_kwargs=model_kwargs, base=base)
    trainable, total = count_params(model)

    crop_scale = cfg.crop_scale or ((0.5, 1.0) if is_builtin_dir(data_dir) else None)
    loaders = make_loaders(data_dir, image_size=size, batch_size=cfg.batch_size,
                           workers=cfg.workers, seed=cfg.seed,
                           data_config=data_config(model=model),   # or its family's
                           crop_scale=crop_scale, hflip=cfg.hflip,
                           color_jitter=cfg.color_jitter, rank=d.rank, world_size=d.world,
                           drop_last=True, pin_memory=device.type == "cuda")
    steps = len(loaders.train)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise SSFDeployError(f"{data_dir}/train has fewer images than one batch per process "
                             f"(`batch_size` {cfg.batch_size})")

    model.to(device)
    net: nn.Module = model
    try:
        unused = _probe(model, size, device)
    except (RuntimeError, AssertionError, ValueError) as e:   # e.g. a size the model refuses
        raise SSFDeployError(f"{arch} cannot run a training step at {size}px: {first_line(e)}") \
            from None
    if unused and d.main and cfg.verbose:
        print(f"note: {len(unused)} trainable parameter(s) get no gradient, e.g. {unused[0]}",
              flush=True)
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(unused))
    if cfg.compile:
        net = torch.compile(net)

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps
    warmup = min(int(round(cfg.warmup_epochs * steps)), max(total_steps - 1, 0))
    # timm warns that a one-step cosine "has no effect"; here that only means warm-up fills
    # the run (e.g. --epochs 1 with --warmup-epochs 1), which the user asked for
    sched_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = sched_log.level
    sched_log.setLevel(logging.ERROR)
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1),
                                      lr_min=cfg.min_lr, warmup_t=warmup,
                                      warmup_lr_init=max(cfg.min_lr, cfg.lr * 1e-3),
                                      warmup_prefix=True, t_in_epochs=False)
    finally:
        sched_log.setLevel(level)
    amp = bool(cfg.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                         label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    run = _Run(cfg, d, device, arch, num_classes, model_kwargs, size, out, model, net, options,
               base, trainable, total, loaders, steps, optimizer, scheduler, scaler, amp,
               mixup_fn, criterion)
    if resume is not None:
        _restore(run, resume)
    if d.main:   # room for the first checkpoint, before an epoch of work is spent on it
        check_writable(out, need={out: _checkpoint_bytes(run)})
    return run


def _checkpoint_bytes(run: _Run) -> int:
    """The size of the next checkpoint, serialized into a byte counter (nothing is written).

    Before the first step the optimizer holds no state yet: AdamW's (a step and two moments per
    parameter) is stood in for by one-element tensors, whose missing bytes are added; the count
    is then right to within the zip alignment of each record."""
    ck = _checkpoint(run, run.start)
    missing = 0
    if not run.optimizer.state:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        ck["optimizer"]["state"] = {
            i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros(1, dtype=p.dtype),
                "exp_avg_sq": torch.zeros(1, dtype=p.dtype)}
            for i, p in enumerate(params) if p.requires_grad}
        missing = sum(2 * (p.numel() - 1) * p.element_size() for p in params if p.requires_grad)
    return serialized_size(ck) + missing


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_optimizer_state(run: _Run, saved, path: str) -> None:
    """Refuse an optimizer state that ``load_state_dict`` would accept but the first step would
    crash on (or silently misuse): other groups, other parameter counts, moments of another
    shape or type, hyper-parameters that are not numbers."""
    def refuse(why: str):
        raise SSFDeployError(f"cannot resume from {path}: optimizer state {why}")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or \
            not isinstance(saved.get("param_groups"), list):
        refuse("is not {'state': {...}, 'param_groups': [...]}")
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = run.optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        refuse(f"has {len(saved['param_groups'])} parameter group(s), this run "
               f"{len(groups)}")
    for gi, (theirs, ours) in enumerate(zip(saved["param_groups"], groups)):
        if not isinstance(theirs, dict) or not isinstance(theirs.get("params"), list):
            refuse(f"group {gi} is malformed")
        if len(theirs["params"]) != len(ours["params"]):
            refuse(f"group {gi} holds {len(theirs['params'])} parameters, this run "
                   f"{len(ours['params'])}")
        for key in ("lr", "weight_decay", "eps", "initial_lr"):
            if key in theirs and not _is_number(theirs[key]):
                refuse(f"group {gi} '{key}' is {theirs[key]!r}, not a number")
        betas = theirs.get("betas")
        if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2
                                      and all(_is_number(b) for b in betas)):
            refuse(f"group {gi} 'betas' is {betas!r}, not two numbers")
        for index, p in zip(theirs["params"], ours["params"]):
            entry = saved["state"].get(index)
            if entry is None:
                continue
            name = names.get(id(p), f"#{index}")
            if not isinstance(entry, dict):
                refuse(f"for {name} is a {type(entry).__name__}, not a dict")
            for key, v in entry.items():
                if key == "step":
                    ok = _is_number(v) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                    if not ok:
                        refuse(f"'step' of {name} is {v!r}, not a number")
                elif not isinstance(v, torch.Tensor):
                    refuse(f"'{key}' of {name} is a {type(v).__name__}, not a tensor")
                elif tuple(v.shape) != tuple(p.shape) or not v.is_floating_point():
                    refuse(f"'{key}' of {name} is a {v.dtype} tensor of shape "
                           f"{tuple(v.shape)}, the parameter is {tuple(p.shape)}")


def _check_scheduler_state(run: _Run, saved, path: str) -> None:
    """Each field the scheduler has must hold the type it has (timm's ``load_state_dict``
    copies whatever it is given into the scheduler's attributes)."""
    def refuse(why: str):
        raise SSFDeployError(f"cannot resume from {path}: scheduler state {why}")
    if not isinstance(saved, dict):
        refuse(f"is a {type(saved).__name__}, not a dict")
    ours = _plain(run.scheduler.state_dict())
    for key, v in saved.items():
        if key not in ours:
            continue     # a field another timm version had: harmless
        mine = ours[key]
        if mine is None or v is None:
            continue
        same = (_is_number(mine) and _is_number(v)) or type(v) is type(mine)
        if isinstance(mine, list) and isinstance(v, list):
            same = len(v) == len(mine) and all(_is_number(x) == _is_number(y)
                                               for x, y in zip(v, mine))
        if not same:
            refuse(f"'{key}' is {v!r}, expected something like {mine!r}")


def _restore(run: _Run, resume: dict) -> None:
    """Load a checkpoint's trainable state, optimiser, schedule, scaler and RNG into ``run``,
    each checked first: a malformed one is refused in one line before any step is taken."""
    cfg = run.cfg
    epoch = resume["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        raise SSFDeployError(f"cannot resume from {cfg.resume}: 'epoch' is {epoch!r}, not a "
                             f"number of epochs")
    metrics = resume["metrics"]
    if not isinstance(metrics, dict) or not all(
            isinstance(metrics.get(k, []), list) and all(_is_number(v) for v in metrics.get(k, []))
            for k in run.metrics):
        raise SSFDeployError(f"cannot resume from {cfg.resume}: 'metrics' is not a dict of "
                             f"lists of numbers")
    _check_optimizer_state(run, resume["optimizer"], cfg.resume)
    _check_scheduler_state(run, resume["scheduler"], cfg.resume)
    try:
        load_trainable_state(run.model, resume["state"])
        run.optimizer.load_state_dict(resume["optimizer"])
        run.scheduler.load_state_dict(dict(resume["scheduler"]))
        if run.amp and resume.get("scaler"):
            run.scaler.load_state_dict(resume["scaler"])
        _set_rng_state(resume["rng"])
        run.start = int(resume["epoch"])
        run.metrics = {k: [float(v) for v in resume["metrics"].get(k, [])] for k in run.metrics}
    except SSFDeployError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise SSFDeployError(f"cannot resume from {cfg.resume}: {type(e).__name__}: "
                             f"{first_line(e)}") from None
    if run.d.main and cfg.verbose:
        print(f"resumed {cfg.resume} after epoch {run.start}/{cfg.epochs}", flush=True)


def _checkpoint(run: _Run, epoch_done: int) -> dict:
    """What is saved after every epoch: the task (trainable state), how to rebuild and check its
    base, golden probe outputs, and everything an exact resume needs."""
    cfg = run.cfg
    return {**task_record(run.model, image_size=run.size, base=run.base), "epoch": epoch_done,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": _plain(run.scheduler.state_dict()), "scaler": run.scaler.state_dict(),
            "rng": _rng_state(), "args": cfg.as_args(), "classes": list(run.loaders.classes),
            "metrics": {k: list(v) for k, v in run.metrics.items()}}


def _train_one_epoch(run: _Run, epoch: int) -> tuple[float, float, float]:
    """One epoch; returns (mean loss over all ranks, images seen over all ranks, seconds)."""
    from tqdm import tqdm

    cfg, d, device = run.cfg, run.d, run.device
    _seed_all(_epoch_seed(cfg.seed, epoch, d.rank))
    run.loaders.train_sampler.set_epoch(epoch)
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=run.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (d.main and cfg.progress), dynamic_ncols=True)
    for step, (x, y) in enumerate(run.loaders.train):
        if step >= run.steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if run.mixup_fn is not None:
            if x.shape[0] % 2:       # timm's batch mixup pairs samples up
                x, y = x[:-1], y[:-1]
            x, y = run.mixup_fn(x, y)
        with torch.autocast("cuda", dtype=torch.float16) if run.amp else nullcontext():
            loss = run.criterion(logits_of(run.net(x)), y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step_update(num_updates=epoch * run.steps + step + 1)
        loss_sum += loss.detach().double() * x.shape[0]
        seen += x.shape[0]
        if bar.disable is False:
            rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    loss_total, n_total = _all_sum([float(loss_sum), float(seen)], device, d)
    epoch_loss = loss_total / max(n_total, 1)
    if not math.isfinite(epoch_loss):
        raise SSFDeployError(f"training diverged: loss is {epoch_loss} in epoch {epoch + 1} "
                             f"(try a lower `lr`)")
    return epoch_loss, n_total, elapsed


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune ``cfg.arch`` with ``cfg.method``; a checkpoint is written after every epoch."""
    _check_numbers(cfg)
    d = _setup_dist(_resolve_device(cfg.device).type)
    try:
        run = _setup(cfg, d)
        if d.main and cfg.verbose:
            print(f"training {run.arch} with {cfg.method}: {run.trainable:,} of {run.total:,} "
                  f"parameters trainable, {run.num_classes} classes, "
                  f"{len(run.loaders.train.dataset)} train / {len(run.loaders.val.dataset)} val "
                  f"images at {run.size}px, {run.steps} steps/epoch, device {run.device}"
                  f"{f' x{d.world}' if d.enabled else ''}{', amp' if run.amp else ''}; base "
                  f"{describe_base(run.base)}", flush=True)

        if run.start >= cfg.epochs and d.main:   # nothing left: still honour --out
            if os.path.abspath(run.out) != os.path.abspath(cfg.resume):
                save_checkpoint(_checkpoint(run, run.start), run.out)

        for epoch in range(run.start, cfg.epochs):
            epoch_loss, n_total, elapsed = _train_one_epoch(run, epoch)
            top1 = evaluate(run.net, run.loaders.val, run.device, amp=run.amp)
            run.metrics["loss"].append(epoch_loss)
            run.metrics["top1"].append(top1)
            if d.main:
                save_checkpoint(_checkpoint(run, epoch + 1), run.out)
                if cfg.verbose:
                    print(f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f}  top1 "
                          f"{top1:.2f}%  lr {run.optimizer.param_groups[0]['lr']:.2e}  "
                          f"{n_total / max(elapsed, 1e-9):.0f} img/s  -> {run.out}", flush=True)
            d.barrier()   # nobody runs ahead (or exits) before the checkpoint is on disk
            if cfg.on_epoch_end is not None:
                cfg.on_epoch_end(epoch + 1, {k: list(v) for k, v in run.metrics.items()})

        m = run.metrics
        return TrainResult(checkpoint=run.out, arch=run.arch, method=cfg.method,
                           num_classes=run.num_classes, epochs=max(run.start, cfg.epochs),
                           metrics=m, top1=m["top1"][-1] if m["top1"] else None,
                           trainable_params=run.trainable, total_params=run.total)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
