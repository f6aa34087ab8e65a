"""Cost of every tuning method, measured one way on one machine (paper Fig. 3 and Table 2).

Each row is one *method* built on the same base model. Training rows time a whole optimiser
step and record its peak memory and the bytes autograd saves for backward; inference rows time
the deployable model (``ssf-fused`` is the SSF model after :func:`ssf_deploy.fuse.fuse`).

Peak memory is measured the way each device allows it to be trusted:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights included).
* CPU: the process high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
  resident size before the model existed, in a fresh subprocess per row with glibc told to
  ``mmap`` every block >= 64 KiB, so a freed tensor leaves the resident set at once and one row's
  garbage never counts towards another's peak.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SSFDeployError

__all__ = ["ROWS", "TRAIN_ROWS", "BenchConfig", "resolve_methods", "build_row", "measure_row",
           "run_bench", "count_flops", "saved_for_backward", "table2", "targets", "format_table",
           "plot", "SCHEMA_KEYS"]

# Canonical order of rows; "base" is the inference reference, "full" the training reference.
ROWS = ("base", "full", "linear", "bias", "adapter", "vpt-shallow", "vpt-deep", "ssf",
        "ssf-naive", "frozen", "ssf-fused")
TRAIN_ROWS = tuple(r for r in ROWS if r not in ("base", "ssf-fused"))
# rows whose deployed model is the unchanged base graph: their inference cost *is* base's
SAME_AS_BASE = ("full", "linear", "bias", "frozen")
ALWAYS = ("base", "full", "ssf", "ssf-fused")
SCHEMA_KEYS = ("method", "trainable_params", "inference_params", "inference_flops",
               "train_step_ms", "train_peak_mem_mb", "infer_ms", "infer_peak_mem_mb")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
TRT_HINT = 'the TensorRT backend needs TensorRT and a GPU: pip install "ssf-deploy[tensorrt]"'
MB = 1024.0 * 1024.0
_RESULT_TAG = "SSF_BENCH_RESULT "


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

    def options(self, method: str) -> dict:
        if method in ("vpt-shallow", "vpt-deep") and self.prompts is not None:
            return {"prompts": int(self.prompts)}
        if method == "adapter" and self.adapter_dim is not None:
            return {"dim": int(self.adapter_dim)}
        return {}


# ------------------------------------------------------------------------------------------
# validation


def resolve_methods(spec: str) -> list[str]:
    """``all``, one method or a comma list; base, full, ssf and ssf-fused always come along
    so that every ratio in a report comes from the same run."""
    asked = [s.strip() for s in (spec or "all").split(",") if s.strip()]
    if not asked or "all" in asked:
        return list(ROWS)
    bad = [m for m in asked if m not in ROWS]
    if bad:
        raise SSFDeployError(f"unknown method '{bad[0]}'; choose from all, {', '.join(ROWS)}")
    want = set(asked) | set(ALWAYS)
    return [r for r in ROWS if r in want]


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SSFDeployError(f"unknown device '{device}'; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise SSFDeployError(f"unsupported device '{device}'; use cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SSFDeployError(f"device '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SSFDeployError(f"device '{device}' does not exist "
                                 f"({torch.cuda.device_count()} CUDA device(s))")
    return str(dev)


def check_backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise SSFDeployError(f"unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
            from . import engine  # noqa: F401
        except ImportError:
            raise SSFDeployError(TRT_HINT) from None
        if not device.startswith("cuda"):
            raise SSFDeployError("the TensorRT backend runs on a GPU: use --device cuda")
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SSFDeployError('the onnxruntime backend needs onnxruntime: '
                                 'pip install onnxruntime') from None
    return backend


# ------------------------------------------------------------------------------------------
# models


def _create(cfg: BenchConfig) -> nn.Module:
    from .models import create_base_model
    torch.manual_seed(cfg.seed)
    kwargs = dict(cfg.model_kwargs)
    if cfg.image_size and "img_size" not in kwargs:
        try:   # ViT-like models size their position embedding from img_size; CNNs take any size
            return create_base_model(cfg.arch, cfg.num_classes, img_size=int(cfg.image_size),
                                     **kwargs)
        except TypeError:
            pass
    return create_base_model(cfg.arch, cfg.num_classes, **kwargs)


def build_row(cfg: BenchConfig, row: str) -> tuple[Optional[nn.Module], Callable[[], nn.Module]]:
    """(model to train or None, factory of the model to deploy) for one bench row."""
    from .tuners import apply_method
    model = _create(cfg)
    if row == "base":
        return None, lambda: model
    if row == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, lambda: model
    if row in ("ssf", "ssf-naive", "ssf-fused"):
        apply_method(model, "ssf", impl="naive" if row == "ssf-naive" else "lean")
        if row == "ssf-fused":
            box = [model]
            del model

            def fused() -> nn.Module:   # the unfused model must not stay alive next to it
                from .fuse import fuse
                return fuse(box.pop())
            return None, fused
        return model, lambda: model
    apply_method(model, row, **cfg.options(row))
    return model, lambda: model


def _inputs(cfg: BenchConfig, model: nn.Module, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from .models import example_input
    x = example_input(model, batch=batch, image_size=cfg.image_size, seed=cfg.seed).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return x, y


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
# memory


class _Peak:
    """Peak memory of a region, in bytes, with the device's trustworthy counter.

    On CPU the peak is relative to ``baseline``: the resident size before the row's model
    existed, so weights count as they do in ``max_memory_allocated``.
    """

    def __init__(self, device: torch.device, baseline: Optional[int] = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline = 0 if self.cuda else (_rss() if baseline is None else baseline)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _reset_hwm()

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(max(0, _hwm() - self.baseline))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise SSFDeployError(f"/proc/self/status has no {key}: CPU peak memory needs Linux")


def _rss() -> int:
    return _status("VmRSS")


def _hwm() -> int:
    return _status("VmHWM")


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError as e:
        raise SSFDeployError(f"cannot reset the peak-RSS counter ({e}); CPU peak memory "
                             f"needs a Linux kernel with /proc/self/clear_refs") from e


def _mmap_big_blocks() -> None:
    """Ask glibc to mmap (and unmap on free) every block >= 64 KiB, so RSS tracks live tensors."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD (also stops glibc raising it)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


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
# timing


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def run(self, fn: Callable[[], None], warmup: int, iters: int,
            after_warmup: Optional[Callable[[], None]] = None) -> list[float]:
        for _ in range(warmup):
            fn()
        if after_warmup is not None:
            after_warmup()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            pairs = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in pairs]
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def _autocast(cfg: BenchConfig, device: torch.device):
    if not cfg.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_train(cfg: BenchConfig, model: nn.Module, row: str, device: torch.device,
                  baseline: Optional[int] = None) -> dict:
    """One optimiser step = forward + loss + backward + AdamW step (the paper trains with AdamW)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    # fp16 needs loss scaling; with no optimiser (the frozen floor) there is nothing to unscale
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda" and opt) else None
    x, y = _inputs(cfg, model, cfg.batch_size, device)
    if row == "frozen":
        x.requires_grad_(True)   # the floor: gradients flow through every layer, no weight grads

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(cfg, device):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()

    peak = _Peak(device, baseline)
    timer = _Timer(device)
    # warm-up >= 1: the optimiser state exists and SSF's lean policy has settled
    times = timer.run(step, max(1, cfg.warmup), cfg.iters, after_warmup=peak.reset)
    peak_bytes = peak.peak()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    with saved_for_backward(model) as saved:
        with _autocast(cfg, device):
            loss = F.cross_entropy(model(x), y)
    del loss   # only the forward graph was needed to see what it keeps
    return {"train_step_ms": statistics.median(times), "train_step_ms_all": times,
            "train_peak_mem_mb": peak_bytes / MB,
            "saved_for_backward_mb": saved["total"] / MB,
            "saved_params_mb": saved["params"] / MB,
            "saved_activations_mb": (saved["total"] - saved["params"]) / MB}


def measure_infer(cfg: BenchConfig, model: nn.Module, device: torch.device,
                  baseline: Optional[int] = None) -> dict:
    model.to(device).eval()
    x, _ = _inputs(cfg, model, cfg.batch_size, device)
    peak = _Peak(device, baseline)
    if cfg.backend == "torch":
        def fwd():
            with torch.inference_mode(), _autocast(cfg, device):
                model(x)
        times = _Timer(device).run(fwd, max(1, cfg.warmup), cfg.iters, after_warmup=peak.reset)
        return {"infer_ms": statistics.median(times), "infer_ms_all": times,
                "infer_peak_mem_mb": peak.peak() / MB}
    if cfg.backend == "onnxruntime":
        return _infer_onnxruntime(cfg, model, x, device, peak)
    return _infer_tensorrt(cfg, model, x, device)


def _export(cfg: BenchConfig, model: nn.Module, x: torch.Tensor, tmp: str) -> str:
    from .export import export_onnx
    path = os.path.join(tmp, "model.onnx")
    export_onnx(model.cpu(), path, image_size=x.shape[-1], batch_size=x.shape[0],
                dynamic_batch=False, simplify=True)
    return path


def _infer_onnxruntime(cfg, model, x, device, peak: _Peak) -> dict:
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = _export(cfg, model, x, tmp)
        del model
        gc.collect()
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda"
                     else ["CPUExecutionProvider"])
        if device.type != "cuda":
            peak.baseline = _rss()   # count the session, not the torch model it came from
        sess = ort.InferenceSession(path, providers=providers)
        feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
        times = _Timer(torch.device("cpu")).run(lambda: sess.run(None, feed), max(1, cfg.warmup),
                                                cfg.iters, after_warmup=None if device.type == "cuda"
                                                else peak.reset)
        mem = None if device.type == "cuda" else peak.peak() / MB
        return {"infer_ms": statistics.median(times), "infer_ms_all": times,
                "infer_peak_mem_mb": mem}


def _infer_tensorrt(cfg, model, x, device) -> dict:
    """Same ONNX recipe as the other backends, built into an engine and timed with CUDA events."""
    from .engine import BuildOptions, TrtRunner, build_engine
    from .export import export_proto
    from .refit import export_settings
    proto = export_proto(model.cpu(), example=x.detach().cpu(),
                       batch_size=x.shape[0], dynamic_batch=False, simplify=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    free0 = torch.cuda.mem_get_info(device)[0]
    plan, info, _ = build_engine(proto.SerializeToString(), BuildOptions(fp16=cfg.amp),
                                 export_settings(proto), source="the benchmark model")
    runner = TrtRunner(plan)
    lat = runner.latency(x, warmup=max(1, cfg.warmup), iters=cfg.iters)
    used = (free0 - torch.cuda.mem_get_info(device)[0]) / MB
    return {"infer_ms": lat["median_ms"], "infer_peak_mem_mb": max(0.0, used),
            "engine_build_seconds": info["build_seconds"]}


# ------------------------------------------------------------------------------------------
# one row


def measure_row(cfg: BenchConfig, row: str, *, train: bool = True, infer: bool = True) -> dict:
    """Every number of one row, measured in this process."""
    from .models import count_params
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gc.collect()
    baseline = None if device.type == "cuda" else _rss()
    train_model, deploy = build_row(cfg, row)
    out: dict = {"method": row, "trainable_params": None, "train_step_ms": None,
                 "train_peak_mem_mb": None, "infer_ms": None, "infer_peak_mem_mb": None}
    if train_model is not None and train:
        out["trainable_params"] = count_params(train_model)[0]
        out["train_params"] = count_params(train_model)[1]
        out.update(measure_train(cfg, train_model, row, device, baseline))
        train_model.eval()
    del train_model
    model = deploy()
    gc.collect()
    model.to(device)
    out["inference_params"] = count_params(model)[1]
    x1, _ = _inputs(cfg, model, 1, device)
    out["inference_flops"] = count_flops(model, x1)
    if infer:
        try:
            out.update(measure_infer(cfg, model, device, baseline))
        except SSFDeployError as e:
            if cfg.backend == "torch":
                raise
            out["infer_error"] = str(e)
    return out


def _worker(payload: str) -> None:
    _mmap_big_blocks()
    args = json.loads(payload)
    cfg = BenchConfig(**args["config"])
    try:
        res = measure_row(cfg, args["row"], train=args["train"], infer=args["infer"])
    except SSFDeployError as e:
        res = {"error": str(e)}
    sys.stdout.write("\n" + _RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


def _in_subprocess(cfg: BenchConfig, row: str, infer: bool, train: bool = True) -> dict:
    payload = json.dumps({"config": dataclasses.asdict(cfg), "row": row, "infer": infer,
                          "train": train})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-m", "ssf_deploy.bench", payload], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SSFDeployError(f"bench worker for '{row}' failed (exit {proc.returncode}): {tail}")
    res = json.loads(lines[-1][len(_RESULT_TAG):])
    if "error" in res:
        raise SSFDeployError(res["error"])
    return res


# ------------------------------------------------------------------------------------------
# the whole run


def run_bench(cfg: BenchConfig, rows: list[str], *, isolate: Optional[bool] = None,
              progress: bool = True) -> dict:
    """Measure ``rows``; on CPU each row runs in a fresh subprocess unless ``isolate=False``."""
    from tqdm import tqdm
    device = torch.device(cfg.device)
    if isolate is None:
        isolate = device.type == "cpu"
    if device.type == "cpu" and not isolate:
        _mmap_big_blocks()
    results = {}
    load0 = list(os.getloadavg())   # a busy machine makes CPU timings noisy: keep the evidence
    bar = tqdm(rows, desc="bench", unit="row", disable=None if progress else True, file=sys.stderr)
    for row in bar:
        bar.set_postfix_str(row)
        infer = row not in SAME_AS_BASE
        if isolate and infer and row in TRAIN_ROWS:
            # training leaves the process bigger than it found it: infer in a fresh one too
            res = _in_subprocess(cfg, row, False)
            res.update({k: v for k, v in _in_subprocess(cfg, row, True, train=False).items()
                        if k.startswith("infer")})
        elif isolate:
            res = _in_subprocess(cfg, row, infer)
        else:
            res = measure_row(cfg, row, infer=infer)
        if not infer and "base" in results:
            for k in ("infer_ms", "infer_ms_all", "infer_peak_mem_mb", "infer_error"):
                if k in results["base"]:
                    res[k] = results["base"][k]
            res["infer_same_as"] = "base"
        results[row] = res
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    bar.close()
    ordered = [results[r] for r in rows]
    report = {"model": cfg.arch, "device": cfg.device, "device_name": _device_name(device),
              "batch_size": cfg.batch_size, "image_size": _image_size(cfg),
              "num_classes": cfg.num_classes, "amp": cfg.amp, "backend": cfg.backend,
              "warmup": cfg.warmup, "iters": cfg.iters, "threads": torch.get_num_threads(),
              "isolated": bool(isolate), "torch": torch.__version__,
              "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
              "flops_note": "per image; FlopCounterMode (multiply-add = 2) + CPU attention + "
                            "elementwise mul/add/sub (1 per element) and addcmul (2)",
              "results": ordered}
    report["table2"] = table2(cfg, results)
    report["targets"] = targets(results)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _image_size(cfg: BenchConfig) -> int:
    if cfg.image_size:
        return int(cfg.image_size)
    from .models import input_size
    with torch.device("meta"):
        return int(input_size(_create(cfg))[-1])


# ------------------------------------------------------------------------------------------
# Table 2


def vit_geometry(cfg: BenchConfig) -> Optional[dict]:
    """L, d, tokens and the per-block SSF channel count of a ViT-like base (None otherwise)."""
    from .models import head_modules
    with torch.device("meta"):
        model = _create(cfg)
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "patch_embed", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or embed is None \
            or getattr(embed, "num_patches", None) is None:
        return None
    d = int(getattr(model, "embed_dim", None) or model.num_features)
    tokens = int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 0))

    def channels(mod: nn.Module) -> int:   # outputs of the ops with a linear coefficient
        c = 0
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                c += m.out_features
            elif isinstance(m, nn.modules.conv._ConvNd):
                c += m.out_channels
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                c += m.normalized_shape[0]
        return c

    per_block = [channels(b) for b in blocks]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    in_head = {id(m) for h in head_modules(model) for m in h.modules()}
    outside = 0
    for m in model.modules():
        if id(m) in in_blocks or id(m) in in_head or m is model:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm)):
            outside += _own_channels(m)
    block_macs = sum(m.in_features * m.out_features for m in blocks[0].modules()
                     if isinstance(m, nn.Linear))
    return {"L": len(blocks), "d": d, "tokens": tokens, "m": 2 * per_block[0] / d,
            "ssf_block_params": 2 * sum(per_block), "ssf_outside_params": 2 * outside,
            "block_linear_macs_per_token": block_macs}


def _own_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return m.normalized_shape[0]
    return 0


def table2_formulas(cfg: BenchConfig, geo: dict) -> dict:
    """Paper Table 2 with N^2 = tokens (class token included), in FLOPs as measured here.

    The paper's Adapter and VPT terms count multiply-adds (2Ldd' params do 2N^2Ldd' of them), so
    they are doubled; its SSF term mN^2Ld counts one op per scale or shift value and token, which
    is already one FLOP each. ``params_exact`` adds what the leading terms leave out: Adapter
    biases and the SSF sites outside the blocks (patch embedding, final norm).
    """
    L, d, T, m = geo["L"], geo["d"], geo["tokens"], geo["m"]
    dd = int(cfg.adapter_dim or 12)
    n_sh = int(cfg.prompts or 200)
    n_dp = int(cfg.prompts or 50)
    return {
        "adapter": {"symbols": f"L={L} d={d} d'={dd} N^2={T}",
                    "params_text": "2Ldd'", "flops_text": "2N^2Ldd' MACs",
                    "params": 2 * L * d * dd, "params_exact": L * (2 * d * dd + d + dd),
                    "flops": 2 * (2 * T * L * d * dd)},
        "vpt-shallow": {"symbols": f"n={n_sh} d={d} N^2={T}",
                        "params_text": "nd", "flops_text": "2n(2N^2+n)d MACs",
                        "params": n_sh * d, "params_exact": n_sh * d,
                        "flops": 2 * (2 * n_sh * (2 * T + n_sh) * d)},
        "vpt-deep": {"symbols": f"n={n_dp} L={L} d={d} N^2={T}",
                     "params_text": "nLd", "flops_text": "2n(2N^2+n)Ld MACs",
                     "params": n_dp * L * d, "params_exact": n_dp * L * d,
                     "flops": 2 * (2 * n_dp * (2 * T + n_dp) * L * d)},
        "ssf": {"symbols": f"m={m:g} L={L} d={d} N^2={T}",
                "params_text": "mLd", "flops_text": "mN^2Ld ops",
                "params": round(m * L * d),
                "params_exact": geo["ssf_block_params"] + geo["ssf_outside_params"],
                "flops": round(m * T * L * d)},
        "ssf-fused": {"symbols": "re-parameterised", "params_text": "0", "flops_text": "0",
                      "params": 0, "params_exact": 0, "flops": 0},
    }


def table2(cfg: BenchConfig, results: dict) -> Optional[dict]:
    """Measured extra params/FLOPs of the inference model over base vs the paper's formulas."""
    geo = vit_geometry(cfg)
    if geo is None or "base" not in results:
        return None
    base = results["base"]
    rows = []
    for method, f in table2_formulas(cfg, geo).items():
        if method not in results:
            continue
        r = results[method]
        extra_p = r["inference_params"] - base["inference_params"]
        extra_f = r["inference_flops"] - base["inference_flops"]
        rows.append({
            "method": method, "symbols": f["symbols"],
            "params_formula_text": f["params_text"], "flops_formula_text": f["flops_text"],
            "extra_params": extra_p, "extra_params_formula": f["params"],
            "extra_params_exact": f["params_exact"],
            "extra_params_pct_of_base": 100.0 * extra_p / base["inference_params"],
            "extra_flops": extra_f, "extra_flops_formula": f["flops"],
            "extra_flops_pct_of_base": 100.0 * extra_f / base["inference_flops"],
            "flops_measured_over_formula": (extra_f / f["flops"]) if f["flops"] else None,
        })
    return {"geometry": geo, "rows": rows,
            "note": "per image; Adapter/VPT formulas are multiply-adds (x2 = FLOPs). The paper's "
                    "VPT terms count only the attention products, not the prompts' pass through "
                    "qkv/proj/MLP, and VPT-shallow's prompts also pass all L blocks"}


# ------------------------------------------------------------------------------------------
# targets (memory-lean SSF)


def targets(results: dict) -> Optional[dict]:
    """The lean-SSF goals, checked on numbers of this run only."""
    need = ("ssf", "full")
    if not all(k in results and results[k].get("train_step_ms") is not None for k in need):
        return None
    ssf, full = results["ssf"], results["full"]
    out = {"ssf_over_full_peak": ssf["train_peak_mem_mb"] / full["train_peak_mem_mb"],
           "ssf_over_full_step": ssf["train_step_ms"] / full["train_step_ms"],
           "ssf_over_full_saved": ssf["saved_for_backward_mb"] / full["saved_for_backward_mb"]}
    out["peak_le_0.7x_full"] = out["ssf_over_full_peak"] <= 0.7
    out["step_le_0.65x_full"] = out["ssf_over_full_step"] <= 0.65
    if "ssf-naive" in results and results["ssf-naive"].get("train_step_ms") is not None:
        naive = results["ssf-naive"]
        out["naive_over_full_peak"] = naive["train_peak_mem_mb"] / full["train_peak_mem_mb"]
        out["naive_over_full_step"] = naive["train_step_ms"] / full["train_step_ms"]
        out["naive_over_full_saved"] = naive["saved_for_backward_mb"] / full["saved_for_backward_mb"]
    if "frozen" in results and results["frozen"].get("saved_for_backward_mb"):
        floor = results["frozen"]["saved_for_backward_mb"]
        out["ssf_over_frozen_saved"] = ssf["saved_for_backward_mb"] / floor
        out["saved_within_10pct_of_frozen"] = abs(out["ssf_over_frozen_saved"] - 1.0) <= 0.10
    return out


# ------------------------------------------------------------------------------------------
# output


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _ratio(v, ref) -> str:
    return "" if v is None or not ref else f" ({v / ref:.2f}x)"


def format_table(report: dict) -> str:
    res = {r["method"]: r for r in report["results"]}
    full, base = res.get("full", {}), res.get("base", {})
    head = (f"{report['model']} on {report['device']} ({report['device_name']}), batch "
            f"{report['batch_size']}, {report['image_size']}px, "
            f"{'AMP' if report['amp'] else 'fp32'}, inference backend {report['backend']}, "
            f"median of {report['iters']} after {report['warmup']} warm-up")
    cols = [("method", 11), ("train M", 8), ("infer M", 8), ("GFLOPs", 7),
            ("train ms (x full)", 19), ("train MB (x full)", 18), ("saved MB", 9),
            ("infer ms (x base)", 18), ("infer MB (x base)", 18)]
    lines = [head, " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(cols))]
    for r in report["results"]:
        cells = [
            r["method"],
            _fmt(None if r["trainable_params"] is None else r["trainable_params"] / 1e6, ".3f"),
            f"{r['inference_params'] / 1e6:.3f}",
            f"{r['inference_flops'] / 1e9:.3f}",
            _fmt(r["train_step_ms"], ".1f") + _ratio(r["train_step_ms"], full.get("train_step_ms")),
            _fmt(r["train_peak_mem_mb"], ".0f")
            + _ratio(r["train_peak_mem_mb"], full.get("train_peak_mem_mb")),
            _fmt(r.get("saved_for_backward_mb"), ".0f"),
            _fmt(r["infer_ms"], ".1f") + _ratio(r["infer_ms"], base.get("infer_ms")),
            _fmt(r["infer_peak_mem_mb"], ".0f")
            + _ratio(r["infer_peak_mem_mb"], base.get("infer_peak_mem_mb")),
        ]
        lines.append(" ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                              for i, (c, (_, w)) in enumerate(zip(cells, cols))))
    t2 = report.get("table2")
    if t2:
        lines += ["", "Table 2 check (extra over base, inference model, per image)",
                  f"{'method':<12} {'params':>10} {'formula':>10} {'exact':>10} {'% base':>7} "
                  f"{'FLOPs':>13} {'formula':>13} {'meas/form':>9} {'% base':>8}  symbols"]
        for r in t2["rows"]:
            lines.append(
                f"{r['method']:<12} {r['extra_params']:>10,} {r['extra_params_formula']:>10,} "
                f"{r['extra_params_exact']:>10,} {r['extra_params_pct_of_base']:>6.2f}% "
                f"{r['extra_flops']:>13,} {r['extra_flops_formula']:>13,} "
                f"{_fmt(r['flops_measured_over_formula'], '.2f'):>9} "
                f"{r['extra_flops_pct_of_base']:>7.2f}%  {r['symbols']}")
        lines.append(f"note: {t2['note']}")
    tg = report.get("targets")
    if tg:
        def ok(flag):
            return "MET" if flag else "NOT MET"
        lines += ["", "Lean SSF targets (this run):",
                  f"  train peak  ssf/full = {tg['ssf_over_full_peak']:.2f}  (<= 0.70: "
                  f"{ok(tg['peak_le_0.7x_full'])})"
                  + (f"; naive/full = {tg['naive_over_full_peak']:.2f}"
                     if "naive_over_full_peak" in tg else ""),
                  f"  train step  ssf/full = {tg['ssf_over_full_step']:.2f}  (<= 0.65: "
                  f"{ok(tg['step_le_0.65x_full'])})"
                  + (f"; naive/full = {tg['naive_over_full_step']:.2f}"
                     if "naive_over_full_step" in tg else "")]
        if "ssf_over_frozen_saved" in tg:
            lines.append(f"  saved for backward  ssf/frozen floor = {tg['ssf_over_frozen_saved']:.2f}"
                         f"  (within 10%: {ok(tg['saved_within_10pct_of_frozen'])})")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Figure-3 style: training time, training memory, test time, test memory."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SSFDeployError('--plot needs matplotlib: pip install "ssf-deploy[bench]"') from None
    res = report["results"]
    train = [r for r in res if r["train_step_ms"] is not None]
    infer = [r for r in res if r["infer_ms"] is not None and r.get("infer_same_as") is None]
    panels = [("Training time (ms/step)", train, "train_step_ms"),
              ("Training memory (MB)", train, "train_peak_mem_mb"),
              ("Test time (ms/batch)", infer, "infer_ms"),
              ("Test memory (MB)", infer, "infer_peak_mem_mb")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (title, rows, key) in zip(axes, panels):
        rows = [r for r in rows if r.get(key) is not None]
        names = [r["method"] for r in rows]
        vals = [r[key] for r in rows]
        colors = ["tab:red" if n.startswith("ssf") else "tab:gray" if n in ("frozen", "base")
                  else "tab:blue" for n in names]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{report['model']}, batch {report['batch_size']}, {report['device_name']}, "
                 f"{'AMP' if report['amp'] else 'fp32'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    _worker(sys.argv[1])
