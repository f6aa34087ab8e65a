#!/usr/bin/env python
"""INT8 after fusion: fused vs unfused SSF graphs under onnxruntime static quantization (CPU).

The same SSF model is exported twice -- fused (``ssf_deploy.fuse`` + ``export_onnx``: the base
graph with folded weights) and unfused (``export_proto`` of the tuned model: SSF as Mul/Add) --
and both are quantized by ``ssf_deploy.quantize.quantize_onnx`` with the same recipe and the same
calibration images. Two parts:

* **cost** (ViT-S/16 and CNNs at 224 px): node counts (exported, and as onnxruntime runs them),
  latency of all four models (fused/unfused x fp32/int8) measured interleaved in one process
  (median), checked by an independent plain ``time.perf_counter`` loop over ``session.run``, and
  top-1 agreement / logit SQNR on the builtin val images. No pretrained weights can be
  downloaded here, so these models are timm's random init with SSF factors drawn at a stated
  spread: agreement only, **no accuracy**.
* **accuracy** (the transfer study's trained tiny models: upstream pre-training on built-in
  shapes, SSF on scikit-learn digits): top-1 on the 797 held-out real digits, fp32 vs int8, for
  the fused and the unfused graph of the same checkpoint, seeds 0-2.

``--sweep`` measures the recipe choices (activation/weight types, per-channel, calibration
method, exclusions) on the fused ViT-S/16 and writes ``sweep.{json,md}``.

    python benchmarks/quantize/run.py --stage quantize                 # heavy part, cached
    flock -x /tmp/ssf-cpu.lock python benchmarks/quantize/run.py --stage latency   # timing
    python benchmarks/quantize/run.py --sweep [--stage ...]            # recipe choice
    python benchmarks/quantize/run.py --out /tmp/q --quick             # smoke test, < 1 min

``--stage all`` (default) does both parts in one go. Timing must run with nothing else
computing on the machine; the committed results ran the latency stage under ``flock -x``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, REPO)

SCHEMA = "ssf-deploy/quantize-bench/1"
NUM_CLASSES = 10
SSF_STD = 0.3          # spread of the synthetic SSF factors: scale ~ N(1, 0.3), shift ~ N(0, 0.3)

# cost part: name -> (timm arch, create_model kwargs, image size)
MODELS = {
    "vit_s16": ("vit_small_patch16_224", {}, 224),
    "resnet18": ("resnet18", {}, 224),
    "convnext_atto": ("convnext_atto", {}, 224),
}
QUICK_MODELS = {
    "vit": ("test_vit", {"img_size": 32, "patch_size": 8}, 32),
    "resnet": ("test_resnet", {}, 32),
}
TRANSFER_BACKBONES = ("vit", "convnext")
TRANSFER_SEEDS = (0, 1, 2)

# --sweep: recipe variants (name -> QuantizeConfig overrides), each on the fused ViT-S/16 (speed,
# fidelity) and on the fused transfer-study models of seed 0 (accuracy on real digits)
SWEEP = {
    "default": {},
    "8-bit-weights": {"reduce_range": False},
    "s8-activations": {"activation_type": "s8"},
    "per-tensor": {"per_channel": False},
    "entropy": {"method": "entropy"},
    "percentile": {"method": "percentile"},
    "float-softmax": {"exclude_op_types": ("Softmax",)},
    "float-layernorm": {"exclude_op_types": ("LayerNormalization",)},
    "conv-gemm-matmul-only": {"op_types": ("Conv", "Gemm", "MatMul")},
}


# ----------------------------------------------------------------------------- models

def _save_json(obj, path):
    from ssf_deploy.fileio import write_json
    write_json(obj, path)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def build_cost_model(name: str, spec: tuple, cache: str) -> dict:
    """Fused and unfused ONNX of one synthetic SSF model (cached)."""
    info_path = os.path.join(cache, f"{name}.json")
    if os.path.isfile(info_path):
        return _load_json(info_path)
    import torch
    from ssf_deploy import apply_method, create_base_model
    from ssf_deploy.export import OrtRunner, export_onnx, export_proto
    from ssf_deploy.fuse import fuse_with_report

    arch, kwargs, size = spec
    torch.manual_seed(0)
    model = create_base_model(arch, NUM_CLASSES, **kwargs)
    apply_method(model, "ssf", init_std=SSF_STD)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused, rep = fuse_with_report(model, x)
    paths = {g: os.path.join(cache, f"{name}-{g}.onnx") for g in ("fused", "unfused")}
    export_onnx(fused, paths["fused"], example=x, metadata={"arch": arch})
    _save_unfused(export_proto(model, example=x), arch, paths["unfused"])
    a, b = OrtRunner(paths["fused"])(x)[0], OrtRunner(paths["unfused"])(x)[0]
    info = {"name": name, "arch": arch, "model_kwargs": kwargs, "image_size": size,
            "weights": f"timm random init (seed 0), SSF factors ~ N(1, {SSF_STD}) / N(0, {SSF_STD})",
            "folded_sites": rep.as_dict()["folded"], "paths": paths,
            "fused_vs_unfused_fp32_max_abs": float((a - b).abs().max())}
    _save_json(info, info_path)
    return info


def _save_unfused(proto, arch: str, path: str) -> None:
    import onnx
    from ssf_deploy.fileio import atomic_path
    proto.metadata_props.add(key="ssf_deploy.arch", value=arch)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)


def _transfer_module():
    spec = importlib.util.spec_from_file_location(
        "transfer_run", os.path.join(REPO, "benchmarks", "transfer", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_transfer_models(cache: str, transfer_cache: str, seeds, quick: bool) -> list:
    """The transfer study's SSF checkpoints (trained there, or here with its own protocol)."""
    import torch
    from ssf_deploy.data import builtin_dataset
    from ssf_deploy.export import export_onnx, export_proto
    from ssf_deploy.formats import build_model, read_task
    from ssf_deploy.fuse import fuse

    T = _transfer_module()
    p = dict(T.QUICK if quick else T.FULL)
    data = T.digits_dataset(os.path.join(transfer_cache, "digits"),
                            train_per_class=p["digits_train_per_class"])
    out = []
    for backbone in TRANSFER_BACKBONES:
        weights = os.path.join(transfer_cache, f"pretrain-{backbone}.safetensors")
        if not os.path.isfile(weights):
            shapes = builtin_dataset(
                os.path.join(transfer_cache, "shapes"), size=T.IMAGE_SIZE,
                train_per_class=p["upstream_train"], val_per_class=p["upstream_val"], seed=0)
            T.pretrain_job(backbone, shapes, transfer_cache, p)
        lr = T.LRS[backbone]["ssf"]
        for seed in seeds:
            ckpt = os.path.join(transfer_cache, "runs", f"{backbone}-ssf-lr{lr:g}-s{seed}.pt")
            if not os.path.isfile(ckpt):
                os.makedirs(os.path.dirname(ckpt), exist_ok=True)
                T.finetune_job(backbone, "ssf", seed, lr, data, weights, transfer_cache, p, False)
            task = read_task(ckpt)
            model = build_model(task, base_weights=weights).eval()
            x = torch.randn(2, 3, T.IMAGE_SIZE, T.IMAGE_SIZE,
                            generator=torch.Generator().manual_seed(0))
            name = f"transfer-{backbone}-s{seed}"
            paths = {g: os.path.join(cache, f"{name}-{g}.onnx") for g in ("fused", "unfused")}
            export_onnx(fuse(model, x), paths["fused"], example=x[:1], metadata={"arch": task.arch})
            _save_unfused(export_proto(model, example=x[:1]), task.arch, paths["unfused"])
            out.append({"name": name, "backbone": backbone, "arch": task.arch, "seed": seed,
                        "checkpoint": os.path.relpath(ckpt, REPO) if ckpt.startswith(REPO)
                        else ckpt, "data": data, "paths": paths})
    return out


# ----------------------------------------------------------------------------- quantize stage

def quantize_graphs(name: str, paths: dict, cache: str, *, calib: str, val: Optional[str],
                    overrides: Optional[dict] = None, tag: str = "", allow: bool = True) -> dict:
    """Quantize each graph with the same recipe; the int8 files and reports are cached.

    ``allow=False`` (the latency/report stages) only reads the cache: quantizing is heavy work
    that must not run while the machine is held exclusively for timing."""
    from ssf_deploy.quantize import quantize_onnx
    out = {}
    for graph, path in paths.items():
        key = f"{name}-{graph}{'-' + tag if tag else ''}"
        rep_path = os.path.join(cache, key + ".int8.json")
        q_path = os.path.join(cache, key + ".int8.onnx")
        if os.path.isfile(rep_path) and os.path.isfile(q_path):
            out[graph] = _load_json(rep_path)
            continue
        if not allow:
            raise SystemExit(f"{key}: not quantized yet, run --stage quantize first")
        t0 = time.perf_counter()
        r = quantize_onnx(path, q_path, calib=calib, val=val, min_agreement=0.0, latency_runs=0,
                          **(overrides or {}))
        d = r.as_dict()
        d["int8_path"] = q_path
        _save_json(d, rep_path)
        out[graph] = d
        print(f"  quantized {key}: {time.perf_counter() - t0:.0f} s, agreement "
              f"{d['agreement']:.2f}%", flush=True)
    return out


# ----------------------------------------------------------------------------- latency stage

def _sessions(paths: dict, threads: Optional[int]):
    from ssf_deploy.quantize import _session
    return {k: _session(open(p, "rb").read(), threads) for k, p in paths.items()}


def independent_timer(paths: dict, x: np.ndarray, runs: int, threads: Optional[int],
                      passes: int = 5) -> dict:
    """A second, independent method: fresh sessions with onnxruntime's default options, a
    plain perf_counter loop per session.

    Each pass times ``runs`` consecutive ``session.run`` calls per session (mean per call), the
    sessions one after another; the reported figure is the median of the pass means.
    """
    import onnxruntime as ort
    sessions = {}
    for k, p in paths.items():
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sessions[k] = ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    means = {k: [] for k in sessions}
    for k, s in sessions.items():           # warm-up
        for _ in range(5):
            s.run(None, feeds[k])
    for _ in range(passes):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds[k])
            means[k].append(1e3 * (time.perf_counter() - t0) / runs)
    return {k: statistics.median(v) for k, v in means.items()}


def time_models(paths: dict, image_size: int, runs: int, threads: Optional[int],
                independent_runs: int) -> dict:
    """Harness (interleaved medians) and the independent timer, batch 1, the same input."""
    from ssf_deploy.quantize import measure_latency
    x = np.random.RandomState(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    sessions = _sessions(paths, threads)
    with _OtherCpu() as h_cpu:
        harness = measure_latency(sessions, x, runs=runs, warmup=5)
    del sessions
    with _OtherCpu() as i_cpu:
        indep = independent_timer(paths, x, independent_runs, threads)
    return {"harness": {k: v["median_ms"] for k, v in harness.items()},
            "harness_detail": harness, "independent": indep,
            "other_cpu": {"harness_pct": h_cpu.pct, "independent_pct": i_cpu.pct},
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


class _OtherCpu:
    """Share of the machine's CPU time used by other processes during a block (Linux).

    Busy jiffies of all CPUs from /proc/stat minus this process's own CPU time: the part of the
    measurement that competed with something else (0 % = nothing else ran)."""

    def __enter__(self):
        self._t0, self._busy0, self._own0 = time.time(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = max(time.time() - self._t0, 1e-9)
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        self.pct = max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1)))

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


# ----------------------------------------------------------------------------- reports

def _ratio(lat: dict, num: str, den: str) -> float:
    return lat[num] / lat[den]


def write_markdown(res: dict, path: str) -> None:
    meta = res["meta"]
    lines = ["# INT8 after fusion: fused vs unfused SSF graphs (onnxruntime, CPU)", "",
             f"Generated by `{meta['command']}` ({meta['cpu']}, onnxruntime "
             f"{meta['versions']['onnxruntime']}, {meta['threads']}). Recipe: "
             f"{_recipe_text(meta['recipe'])}.", ""]
    if res.get("cost"):
        lines += ["## Cost: ViT-S/16 and CNNs at 224 px, batch 1 (agreement only, no accuracy)",
                  "", "Random-init timm weights with SSF factors drawn at a stated spread (no "
                  "pretrained weights offline): agreement and logit SQNR on the "
                  f"{res['cost'][0]['fused']['holdout']['images']} builtin val images measure "
                  "how faithfully int8 reproduces fp32, they are **not** accuracy.", "",
                  "| Model | Graph | ONNX nodes fp32 / int8 (QDQ) | as run by ORT fp32 / int8 "
                  "(int8 kernels + Q/DQ + float) | fp32 ms | int8 ms | int8/fp32 (harness) | "
                  "int8/fp32 (independent) | agreement | logit SQNR |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in res["cost"]:
            lat = row.get("latency")
            for g in ("fused", "unfused"):
                q, n = row[g], row[g]["nodes"]
                cells = [row["arch"], g, f"{n['fp32']} / {n['int8']}",
                         f"{n['runtime_fp32']} / {n['runtime_int8']} ({n['int8_kernels']} + "
                         f"{n['conversions']} + {n['float_ops']})"]
                if lat:
                    h, i = lat["harness"], lat["independent"]
                    cells += [f"{h[g + '-fp32']:.2f}", f"{h[g + '-int8']:.2f}",
                              f"{_ratio(h, g + '-int8', g + '-fp32'):.2f}x",
                              f"{_ratio(i, g + '-int8', g + '-fp32'):.2f}x"]
                else:
                    cells += ["-"] * 4
                cells += [f"{q['holdout']['agreement']:.1f}%",
                          f"{q['holdout']['logit_sqnr_db']:.1f} dB"]
                lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"{row['arch']}: {_load_text(row['latency'])}" for row in res["cost"]
                         if row.get("latency") and _load_text(row["latency"])]
        lines += ["", "Unfused vs fused latency (same precision, harness): " + "; ".join(
            f"{row['arch']} fp32 {_ratio(row['latency']['harness'], 'unfused-fp32', 'fused-fp32'):.2f}x, "
            f"int8 {_ratio(row['latency']['harness'], 'unfused-int8', 'fused-int8'):.2f}x"
            for row in res["cost"] if row.get("latency")) + ".", ""]
    if res.get("accuracy"):
        lines += ["## Accuracy: the transfer study's trained SSF models (real digits)", "",
                  "Top-1 (%) on the 797 held-out scikit-learn digits; calibration on 64 training "
                  "digits; fused and unfused ONNX of the same checkpoint.", "",
                  "| Model | Seed | Graph | ONNX nodes fp32 / int8 | fp32 top-1 | int8 top-1 | "
                  "drop (pt) | agreement |", "|---|---|---|---|---|---|---|---|"]
        for row in res["accuracy"]:
            for g in ("fused", "unfused"):
                v, n = row[g]["val"], row[g]["nodes"]
                lines.append(f"| {row['arch']} | {row['seed']} | {g} | {n['fp32']} / {n['int8']} "
                             f"| {v['top1_fp32']:.2f} | {v['top1_int8']:.2f} | "
                             f"{v['top1_drop']:+.2f} | {v['agreement']:.2f}% |")
        lines += [""]
        for b, s in res["accuracy_summary"].items():
            lines.append(f"- **{b}** (mean over seeds): int8 drop fused {s['fused_drop_mean']:+.2f} "
                         f"pt, unfused {s['unfused_drop_mean']:+.2f} pt; agreement fused "
                         f"{s['fused_agreement_mean']:.2f}%, unfused "
                         f"{s['unfused_agreement_mean']:.2f}%.")
        lines += [""]
    lines += ["Everything per model (reports, op histograms, timing detail): `results.json`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _recipe_text(r: dict) -> str:
    excl = ", ".join(r["exclude_op_types"] + r["exclude_nodes"]) or "nothing excluded"
    return (f"`quant_pre_process` + `quantize_static` {r['format']}, "
            f"{r['activation_type'].upper()} activations / {r['weight_type'].upper()} weights "
            f"{'per channel' if r['per_channel'] else 'per tensor'}, {r['calibration']} "
            f"calibration, {excl}")


def write_sweep_markdown(res: dict, path: str) -> None:
    meta, lat = res["meta"], res.get("latency")
    cost = res["targets"][0]
    lines = ["# Recipe sweep", "",
             f"Generated by `{meta['command']}` ({meta['cpu']}, onnxruntime "
             f"{meta['versions']['onnxruntime']}, {meta['threads']}). Each variant changes one "
             "thing from the default recipe and is applied to the fused models below, calibrated "
             "on the same images.", "",
             f"## {res['arch']} at {res['image_size']} px, batch 1: speed and fidelity", "",
             f"Weights: {res['weights']}. Agreement and logit SQNR on the builtin val images "
             "measure fidelity to fp32, not accuracy. `QDQ sim` is the same int8 model run "
             "with no graph optimisation (the quantization grid alone, no int8 kernels). Latency: "
             "fp32 and every variant interleaved in one loop (median), and an independent plain "
             "perf_counter loop.", "",
             "| Variant | int8 kernels + Q/DQ + float ops | int8 ms | int8/fp32 (harness) | "
             "int8/fp32 (independent) | agreement | logit SQNR | QDQ sim SQNR |",
             "|---|---|---|---|---|---|---|---|"]
    for v, per in res["variants"].items():
        r = per[cost]
        if "skipped" in r:
            lines.append(f"| `{v}` | n/a: {r['skipped']} |" + " |" * 6)
            continue
        n, h = r["nodes"], r["holdout"]
        cells = [f"`{v}`", f"{n['int8_kernels']} + {n['conversions']} + {n['float_ops']}"]
        if lat and v in lat["harness"]:
            cells += [f"{lat['harness'][v]:.1f}", f"{_ratio(lat['harness'], v, 'fp32'):.2f}x",
                      f"{_ratio(lat['independent'], v, 'fp32'):.2f}x"]
        else:
            cells += ["-"] * 3
        cells += [f"{h['agreement']:.1f}%", f"{h['logit_sqnr_db']:.1f} dB",
                  f"{h.get('qdq_simulated_sqnr_db', float('nan')):.1f} dB"]
        lines.append("| " + " | ".join(cells) + " |")
    if lat:
        lines += ["", f"fp32: {lat['harness']['fp32']:.1f} ms (harness), "
                      f"{lat['independent']['fp32']:.1f} ms (independent). {_load_text(lat)}"]
    others = res["targets"][1:]
    if others:
        lines += ["", "## Trained transfer-study models (seed 0): top-1 on the 797 test digits", "",
                  "fp32 -> int8 top-1 (%), agreement with fp32, logit SQNR (int8 kernels / QDQ "
                  "simulated).", "",
                  "| Variant | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for v, per in res["variants"].items():
            cells = []
            for t in others:
                r = per[t]
                if "skipped" in r:
                    cells.append("n/a")
                    continue
                q, h = r["val"], r["holdout"]
                cells.append(f"{q['top1_fp32']:.2f} -> {q['top1_int8']:.2f} "
                             f"({-q['top1_drop']:+.2f}), {q['agreement']:.1f}%, "
                             f"{h['logit_sqnr_db']:.1f} / {h['qdq_simulated_sqnr_db']:.1f} dB")
            lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    lines += [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _load_text(lat: dict) -> str:
    o = lat.get("other_cpu")
    if not o:
        return ""
    return (f"Other processes used {o['harness_pct']:.0f} % (harness) and "
            f"{o['independent_pct']:.0f} % (independent timer) of the machine's CPU time "
            f"while these were measured.")


def _meta(args, threads) -> dict:
    import onnxruntime
    import timm
    import torch
    from ssf_deploy.quantize import QuantizeConfig
    shown = os.path.relpath(args.out, REPO) if args.out.startswith(REPO + os.sep) else args.out
    cmd = "python benchmarks/quantize/run.py --out " + shown + (" --sweep" if args.sweep else "") \
        + (" --quick" if args.quick else "")
    return {"schema": SCHEMA, "command": cmd, "quick": args.quick,
            "cpu": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "threads": f"{threads} onnxruntime threads" if threads
            else "onnxruntime's default thread count",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "timm": timm.__version__, "onnxruntime": onnxruntime.__version__},
            "recipe": QuantizeConfig().recipe(), "ssf_std": SSF_STD}


# ----------------------------------------------------------------------------- sweep

def run_sweep(args, models, names, cache, meta, quantize_stage, latency_stage) -> dict:
    """Every SWEEP variant on the fused cost model (latency, fidelity) and on the fused
    transfer models of seed 0 (top-1 on real digits); variants an op type does not apply to
    (no Softmax in a ConvNeXt) are skipped."""
    from ssf_deploy.errors import UsageError
    name = names[0]
    info = build_cost_model(name, models[name], cache)
    targets = [(name, info["paths"]["fused"], "builtin", None)]
    tm_path = os.path.join(cache, "transfer-models.json")
    if os.path.isfile(tm_path) and not args.no_accuracy:
        targets += [(m["name"], m["paths"]["fused"], m["data"], m["data"])
                    for m in _load_json(tm_path) if m["seed"] == 0]
    results = {}
    for v, over in SWEEP.items():
        results[v] = {}
        for tname, path, calib, val in targets:
            try:
                extra = dict(over, eval_images=10_000) if val else over
                results[v][tname] = quantize_graphs(tname, {"fused": path}, cache, calib=calib,
                                                    val=val, overrides=extra, tag=f"sweep-{v}",
                                                    allow=quantize_stage)["fused"]
            except UsageError as e:
                results[v][tname] = {"skipped": str(e)}
    res = {"meta": meta, "arch": info["arch"], "image_size": info["image_size"],
           "weights": info["weights"], "targets": [t[0] for t in targets], "variants": results}
    lat_path = os.path.join(cache, f"{name}-sweep.latency.json")
    if latency_stage:
        paths = {"fp32": info["paths"]["fused"]}
        paths.update({v: r[name]["int8_path"] for v, r in results.items()
                      if "int8_path" in r[name]})
        lat = time_models(paths, info["image_size"], args.runs, args.threads,
                          args.independent_runs)
        _save_json(lat, lat_path)
    if args.stage == "quantize":
        return res
    if not os.path.isfile(lat_path):
        raise SystemExit("no sweep timing yet: run --sweep --stage latency first")
    res["latency"] = _load_json(lat_path)
    _save_json(res, os.path.join(args.out, "sweep.json"))
    write_sweep_markdown(res, os.path.join(args.out, "sweep.md"))
    print(open(os.path.join(args.out, "sweep.md")).read())
    return res


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--cache", default=None,
                    help="ONNX files and int8 reports (default models/quantize; --quick: <out>/cache)")
    ap.add_argument("--transfer-cache", default=None,
                    help="the transfer study's cache (default models/transfer; --quick: in --cache)")
    ap.add_argument("--stage", choices=["all", "quantize", "latency", "report"], default="all",
                    help="quantize: models + int8 (cached); latency: timing (cached); report: "
                         "results from the cache; all: everything")
    ap.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    ap.add_argument("--sweep", action="store_true", help="recipe sweep on the fused ViT-S/16")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the transfer-study part")
    ap.add_argument("--no-cost", action="store_true", help="skip the ViT-S/CNN cost part")
    ap.add_argument("--seeds", default=None, help="transfer seeds (default 0,1,2; --quick 0)")
    ap.add_argument("--runs", type=int, default=100, help="interleaved timing rounds")
    ap.add_argument("--independent-runs", type=int, default=30,
                    help="calls per pass of the independent timer")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--quick", action="store_true", help="tiny models, few runs (smoke test)")
    args = ap.parse_args(argv)

    args.out = os.path.abspath(args.out)
    models = QUICK_MODELS if args.quick else MODELS
    names = args.models.split(",") if args.models else list(models)
    for n in names:
        if n not in models:
            ap.error(f"unknown model {n!r}; choose from {', '.join(models)}")
    if args.quick:
        args.runs, args.independent_runs = min(args.runs, 5), min(args.independent_runs, 3)
    cache = os.path.abspath(args.cache or (os.path.join(args.out, "cache") if args.quick
                                           else os.path.join(REPO, "models", "quantize")))
    tcache = os.path.abspath(args.transfer_cache or (os.path.join(cache, "transfer") if args.quick
                                                     else os.path.join(REPO, "models", "transfer")))
    os.makedirs(cache, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    quantize_stage = args.stage in ("all", "quantize")
    latency_stage = args.stage in ("all", "latency")
    meta = _meta(args, args.threads)
    t_start = time.perf_counter()

    if args.sweep:
        return run_sweep(args, models, names, cache, meta, quantize_stage, latency_stage)

    cost = []
    for name in ([] if args.no_cost else names):
        info = build_cost_model(name, models[name], cache)
        print(f"{name}: fused / unfused ONNX ready", flush=True)
        row = dict(info)
        row.update(quantize_graphs(name, info["paths"], cache, calib="builtin", val=None,
                                   allow=quantize_stage))
        cost.append(row)
    accuracy, summary = [], {}
    if not args.no_accuracy:
        seeds = tuple(int(v) for v in args.seeds.split(",")) if args.seeds else \
            (0,) if args.quick else TRANSFER_SEEDS
        built = os.path.join(cache, "transfer-models.json")
        if quantize_stage:
            tm = build_transfer_models(cache, tcache, seeds, args.quick)
            _save_json(tm, built)
        else:
            tm = _load_json(built)
        for m in tm:
            row = {k: m[k] for k in ("name", "backbone", "arch", "seed", "checkpoint")}
            row.update(quantize_graphs(m["name"], m["paths"], cache, calib=m["data"],
                                       val=m["data"], overrides={"eval_images": 10_000},
                                       allow=quantize_stage))
            accuracy.append(row)
        for b in TRANSFER_BACKBONES:
            rows = [r for r in accuracy if r["backbone"] == b]
            if rows:
                summary[rows[0]["arch"]] = {
                    f"{g}_{k}_mean": statistics.fmean(r[g]["val"][src] for r in rows)
                    for g in ("fused", "unfused")
                    for k, src in (("drop", "top1_drop"), ("agreement", "agreement"))}
    if args.stage == "quantize":
        print(f"quantize stage done in {time.perf_counter() - t_start:.0f} s; now time with "
              f"--stage latency under flock -x")
        return {"cost": cost, "accuracy": accuracy}
    for row in cost:
        lat_path = os.path.join(cache, f"{row['name']}.latency.json")
        if latency_stage:
            paths = {f"{g}-fp32": row["paths"][g] for g in ("fused", "unfused")}
            paths.update({f"{g}-int8": row[g]["int8_path"] for g in ("fused", "unfused")})
            lat = time_models(paths, row["image_size"], args.runs, args.threads,
                              args.independent_runs)
            _save_json(lat, lat_path)
        elif os.path.isfile(lat_path):
            lat = _load_json(lat_path)
        else:
            raise SystemExit(f"{row['name']}: no timing yet, run --stage latency first")
        row["latency"] = lat
        h = lat["harness"]
        print(f"{row['arch']}: fused int8/fp32 {h['fused-int8'] / h['fused-fp32']:.2f}x, "
              f"unfused {h['unfused-int8'] / h['unfused-fp32']:.2f}x", flush=True)
    meta["runtime_s"] = round(time.perf_counter() - t_start, 1)
    res = {"meta": meta, "cost": cost, "accuracy": accuracy, "accuracy_summary": summary}
    _save_json(res, os.path.join(args.out, "results.json"))
    write_markdown(res, os.path.join(args.out, "results.md"))
    print(open(os.path.join(args.out, "results.md")).read())
    return res


if __name__ == "__main__":
    main()
