"""Measuring one row: FLOPs, parameters, train-step time, peak memory, saved-for-backward bytes.

Time and memory are measured in separate passes (:func:`measure_task`), because what makes a
memory number trustworthy on the CPU slows the computation down:

* time: :func:`ssf_deploy.runtime.time_calls` (``time.perf_counter`` per step on the CPU,
  ``torch.cuda.Event`` pairs on CUDA), with the allocator as every user has it;
* memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* memory, CPU: the process high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  minus the resident size before the row's model existed, with glibc told to ``mmap`` every
  block >= 64 KiB so a freed tensor leaves the resident set at once (:func:`.meters.mmap_big_blocks`;
  in its own subprocess, see :mod:`.isolate`). That setting costs 30-65 % in step time, which is
  why no timing is ever taken under it.
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SSFDeployError
from ..runtime.timing import time_calls, warm_up
from .meters import MB, Peak, rss
from .rows import BenchConfig, build_row, inputs, warmup_steps

__all__ = ["TASKS", "count_flops", "flop_mapping", "saved_for_backward", "measure_train",
           "measure_infer", "measure_task"]
# (what is measured, how): every row gets the ones that apply to it
TASKS = ("train-time", "infer-time", "train-memory", "infer-memory")


# ------------------------------------------------------------------------------------------
# FLOPs


def _elementwise(n_per_elem: int):
    def count(*args, out_shape=None, **kwargs) -> int:
        return n_per_elem * math.prod(out_shape) if out_shape is not None else 0
    return count


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_mapping() -> dict:
    """FlopCounterMode's formulas plus what it leaves out but SSF/Adapter/VPT add: the CPU
    fused-attention kernel and elementwise mul/add (1 FLOP per output element, addcmul 2)."""
    aten = torch.ops.aten
    mapping = {aten.mul: _elementwise(1), aten.add: _elementwise(1), aten.sub: _elementwise(1),
               aten.addcmul: _elementwise(2)}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa
    return mapping


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Inference FLOPs of one forward of ``x`` (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    try:   # its module tracker trips over grad-requiring views made under no_grad (VPT prompts)
        for p, _ in flags:
            p.requires_grad_(False)
        with counter, torch.no_grad():
            model(x)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------
# saved for backward


@contextlib.contextmanager
def saved_for_backward(model: Optional[nn.Module] = None):
    """Bytes of the tensors autograd keeps for backward, each storage counted once.

    Yields a dict filled on exit: ``total`` and ``params`` (storages owned by ``model``'s
    parameters/buffers, which exist anyway; the rest are activations).
    """
    owned = set()
    if model is not None:
        owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
                 if t.device.type != "meta"}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.nbytes() and t.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    out = {"total": 0, "params": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["total"] = sum(storages.values())
    out["params"] = sum(n for p, n in storages.items() if p in owned)


# ------------------------------------------------------------------------------------------
# one pass


def _autocast(cfg: BenchConfig, device: torch.device):
    if not cfg.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _train_step(cfg: BenchConfig, model: nn.Module, row: str, device: torch.device):
    """One optimiser step = zero_grad + forward + loss + backward + AdamW step."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    # fp16 needs loss scaling; with no optimiser (the frozen floor) there is nothing to unscale
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda" and opt) else None
    net = torch.compile(model) if cfg.compile else model
    x, y = inputs(cfg, model, cfg.batch_size, device)
    if row == "frozen":
        x.requires_grad_(True)   # the floor: gradients flow through every layer, no weight grads

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(cfg, device):
            loss = F.cross_entropy(net(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()
    return step, opt, x, y


def measure_train(cfg: BenchConfig, model: nn.Module, row: str, device: torch.device,
                  what: str, baseline: Optional[int] = None) -> dict:
    """``what="time"``: every timed step's ms; ``"memory"``: peak of one steady-state step and
    the bytes one forward saves for backward."""
    step, opt, x, y = _train_step(cfg, model, row, device)
    if what == "time":
        t = time_calls(step, cfg.iters, warmup=warmup_steps(cfg), device=device)
        out = {"train_step_ms_all": t.ms}
        if cfg.compile:
            out["train_first_step_ms"] = t.first_ms
        return out
    peak = Peak(device, baseline)
    warm_up(step, warmup_steps(cfg), device)
    peak.reset()
    step()
    out = {"train_peak_mem_mb": peak.peak() / MB}
    if cfg.compile:   # compiled graphs save through their own mechanism: not observable here
        return out
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    with saved_for_backward(model) as saved:
        with _autocast(cfg, device):
            loss = F.cross_entropy(model(x), y)
    del loss   # only the forward graph was needed to see what it keeps
    out.update({"saved_for_backward_mb": saved["total"] / MB,
                "saved_params_mb": saved["params"] / MB,
                "saved_activations_mb": (saved["total"] - saved["params"]) / MB})
    return out


def measure_infer(cfg: BenchConfig, model: nn.Module, device: torch.device, what: str,
                  baseline: Optional[int] = None) -> dict:
    model.to(device).eval()
    x, _ = inputs(cfg, model, cfg.batch_size, device)
    if cfg.backend == "onnxruntime":
        from .backends import infer_onnxruntime
        return infer_onnxruntime(cfg, model, x, device, what)
    if cfg.backend == "tensorrt":
        from .backends import infer_tensorrt
        return infer_tensorrt(cfg, model, x, device, what)
    net = torch.compile(model) if cfg.compile else model

    def fwd():
        with torch.inference_mode(), _autocast(cfg, device):
            net(x)
    if what == "time":
        t = time_calls(fwd, cfg.iters, warmup=warmup_steps(cfg), device=device)
        out = {"infer_ms_all": t.ms, "infer_runtime": f"torch {device}"}
        if cfg.compile:
            out["infer_first_ms"] = t.first_ms
        return out
    peak = Peak(device, baseline)
    warm_up(fwd, warmup_steps(cfg), device)
    peak.reset()
    fwd()
    return {"infer_peak_mem_mb": peak.peak() / MB}


# ------------------------------------------------------------------------------------------
# one task of one row


def measure_task(cfg: BenchConfig, row: str, task: str, fused_weights: Optional[str] = None
                 ) -> dict:
    """One of :data:`TASKS` for one row, in this process, on a freshly built model.

    Memory tasks also count what does not depend on the machine: parameters, FLOPs and, for
    the SSF rows, what each site keeps for backward.
    """
    from ..models import count_params
    if task not in TASKS:
        raise SSFDeployError(f"unknown bench task '{task}'")
    kind, what = task.split("-")
    device = torch.device(cfg.device)
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        gc.collect()
        baseline = None if device.type == "cuda" else rss()
        train_model, deploy = build_row(cfg, row, fused_weights)
        out: dict = {}
        if kind == "train":
            if train_model is None:
                raise SSFDeployError(f"bench row '{row}' has no training step")
            trainable, total = count_params(train_model)
            out.update({"trainable_params": trainable, "train_params": total})
            out.update(measure_train(cfg, train_model, row, device, what, baseline))
            if what == "memory" and row in ("ssf", "ssf-naive"):
                from ..tuners.ssf import lean_report
                out["ssf_sites"] = lean_report(train_model)
            train_model.eval()
            del train_model
            model = deploy() if what == "memory" else None
        else:
            del train_model
            model = deploy()
            gc.collect()
            out.update(measure_infer(cfg, model, device, what, baseline))
        if what == "memory":
            model.to(device)
            out["inference_params"] = count_params(model)[1]
            x1, _ = inputs(cfg, model, 1, device)
            out["inference_flops"] = count_flops(model, x1)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
