"""Many tasks, one backbone: what a task bundle costs, side by side in one run.

For ViT-S/16 and ViT-B/16 (onnxruntime on the CPU, batch 16, fp32) and N synthetic SSF tasks
(N = 1, 10, 100, 1000; 100 classes each), against one task's fused model:

* latency of a mixed-task batch (every sample a random task) vs the fused model on the same
  batch: the two sessions interleaved in one process (A B A B ...), the median of the per-pair
  ratios; checked by an independent timer (whole-process wall clock of K batches minus 0 batches,
  each session in its own fresh process);
* resident memory with the bundle loaded (fresh process: session made, freed heap given back to
  the OS as ``ssf_deploy.runtime.ort_session`` does, one batch run; VmRSS, the high-water mark
  VmHWM, and the RSS at load before that trim) vs K fused models loaded in one process, K as far
  as they fit here, extrapolated linearly past that (and said so); ``--memory-only`` measures it
  again from the files a full run left;
* the time to add a task (``ssf_deploy.add_tasks``: write its row and a new graph file, then the
  gate) and to remove one;
* the design choices: the chosen layout (a producer's bias folded into the per-sample shift) vs
  the naive one (factors on top of every op), and the per-sample head (gather each sample's
  classifier) vs one matmul against every task's head.

Synthetic tasks are random SSF factors and heads on a random-init base: the benchmark measures
cost, not accuracy. Their golden probes are recorded at batch 1 (not the default 4) to keep a
1000-task ViT-B run under an hour on 2 cores; every task is still checked by the bundle's gate
against its recorded outputs, and a fixed sample of 4 against its own fused model.

    python benchmarks/bundle/run.py                       # both models, N = 1 10 100 1000
    python benchmarks/bundle/run.py --archs vit_small_patch16_224 --tasks 1 10 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# --------------------------------------------------------------------------------------------
# worker: one model in a fresh process (independent timer, memory)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def worker(args) -> None:
    import numpy as np
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # as ssf_deploy.bundle.BundleRunner's session (fold_large_constants): the task table folds
    opts.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", "0")
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
                for p in args.paths]
    load_s = time.perf_counter() - t0
    untrimmed = _status()["VmRSS"]
    # what ssf_deploy.runtime.ort_session does after making a session (release_freed_memory;
    # not imported here: the worker stays free of torch so its RSS is onnxruntime's alone)
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    task = rng.integers(0, max(1, args.ntasks), args.batch).astype(np.int64)
    t0 = time.perf_counter()
    for s in sessions:
        feeds = {"images": x, "task": task} if args.kind == "bundle" else \
            {s.get_inputs()[0].name: x}
        for _ in range(args.iters + 1):      # one batch at least: buffers and prepacking
            s.run(None, feeds)
    run_s = time.perf_counter() - t0
    st = _status()
    print(json.dumps({"load_s": load_s, "run_s": run_s, "rss": st["VmRSS"], "hwm": st["VmHWM"],
                      "rss_untrimmed": untrimmed,
                      "rss_before_load": before, "sessions": len(sessions)}))


def _spawn(paths, kind, ntasks, batch, size, iters) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--kind", kind, "--ntasks",
           str(ntasks), "--batch", str(batch), "--size", str(size), "--iters", str(iters),
           "--paths", *paths]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {r.stderr.strip().splitlines()[-1:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


# --------------------------------------------------------------------------------------------
# synthetic tasks


def synth_tasks(arch: str, base_file: str, n: int, classes: int, size: int, seed: int = 0):
    import torch

    import ssf_deploy
    from ssf_deploy.formats import Task
    from ssf_deploy.formats.provenance import base_record, record_probe
    from ssf_deploy.tuners import trainable_state_dict
    model = ssf_deploy.create_base_model(arch, classes, pretrained_file=base_file)
    ssf_deploy.apply_method(model, "ssf")
    model.eval()
    init = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    base = base_record(model, init, arch=arch, num_classes=classes, model_kwargs={},
                       image_size=size, source=f"file:{os.path.basename(base_file)}")
    params = dict(model.named_parameters())
    out = []
    t0 = time.perf_counter()
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        with torch.no_grad():
            for k, v in init.items():
                if k in params and params[k].requires_grad:
                    params[k].copy_(v + torch.randn(v.shape, generator=g) * 0.05)
        probe = record_probe(model, size, batch=1)
        out.append(Task(arch, classes, "ssf", {}, trainable_state_dict(model), source="pack",
                        extra={"base": base, "probe": probe, "image_size": size,
                               "name": f"task{i:04d}"}))
        if (i + 1) % 100 == 0:
            print(f"  {arch}: {i + 1}/{n} synthetic tasks ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    return out, model


# --------------------------------------------------------------------------------------------
# measurements


def interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds per callable, rounds interleaved (A B A B ...), and per-pair ratios."""
    for f in runs.values():           # warm-up: allocations, prepacked weights
        f()
        f()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v),
                "max_ms": 1000 * max(v)} for k, v in times.items()} | {"_times": times}


def load_info() -> dict:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return {"loadavg_1m": float(one), "loadavg_5m": float(five), "cpus": os.cpu_count()}


def run_arch(arch: str, ns: list, args, work: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    import ssf_deploy
    from ssf_deploy.fileio import save_safetensors
    from ssf_deploy.formats.pack import save_pack

    size, batch, classes = 224, args.batch, args.classes
    os.makedirs(work, exist_ok=True)
    base_file = os.path.join(work, "base.safetensors")
    base = ssf_deploy.create_base_model(arch, classes, init_seed=0)
    save_safetensors(base.state_dict(), base_file)
    del base
    t0 = time.perf_counter()
    tasks, tuned = synth_tasks(arch, base_file, max(ns) + 1, classes, size)
    res = {"arch": arch, "synth_seconds": round(time.perf_counter() - t0, 1), "rows": []}
    # the pack a task ships as (file size: the memory target's unit)
    ssf_deploy.load_trainable_state(tuned, tasks[0].state)
    pack = os.path.join(work, "task0.safetensors")
    save_pack(tuned, pack, arch=arch, num_classes=classes)
    res["pack_bytes"] = os.path.getsize(pack)
    # one task deployed alone: the fused model, through the deploy pipeline (checked)
    fused_path = os.path.join(work, "fused.onnx")
    model = ssf_deploy.build_model(ssf_deploy.read_task(pack), base_weights=base_file)
    x0 = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ssf_deploy.deploy(model, [x0], out=fused_path, dynamic_batch=True, compare_graph="never")
    res["fused_bytes"] = os.path.getsize(fused_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # sessions timed in turn must not spin-wait after a run: the spinning threads of one would
    # steal the cores the next one runs on (both would slow down, and the ratio drift to 1)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", "0")
    fused = ort.InferenceSession(fused_path, opts, providers=["CPUExecutionProvider"])
    fin = fused.get_inputs()[0].name
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)

    for n in ns:
        out = os.path.join(work, f"n{n}", "tasks.onnx")
        t0 = time.perf_counter()
        rep = ssf_deploy.bundle(tasks[:n], out=out, base_weights=base_file,
                                check_fused=min(n, 4), batch_size=32)
        row = {"tasks": n, "build_seconds": round(time.perf_counter() - t0, 1),
               "stages": rep.seconds, "gate": {k: v for k, v in rep.gate.as_dict().items()
                                               if k != "tasks"},
               "graph_nodes": rep.graph["nodes"], "base_nodes": rep.graph["base_nodes"],
               "row_bytes": rep.sizes["row_bytes"], "backbone_bytes": rep.sizes["backbone_bytes"]}
        task = rng.integers(0, n, batch).astype(np.int64)
        t0 = time.perf_counter()
        sess = ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"])
        row["session_seconds"] = round(time.perf_counter() - t0, 2)
        lat = interleaved({"bundle": lambda: sess.run(None, {"images": x, "task": task}),
                           "fused": lambda: fused.run(None, {fin: x})}, args.rounds)
        times = lat.pop("_times")
        row["latency"] = lat
        row["ratio"] = statistics.median(a / b for a, b in zip(times["bundle"], times["fused"]))
        row["load"] = load_info()     # the ratio is per interleaved pair; the load says how busy
        sess = None   # free the session before the next size
        print(f"  {arch} N={n}: bundle {lat['bundle']['median_ms']:.0f} ms vs fused "
              f"{lat['fused']['median_ms']:.0f} ms -> {row['ratio']:.3f}x", file=sys.stderr)
        row["memory"] = _spawn([out], "bundle", n, batch, size, 0)
        res["rows"].append(row)

    # memory: K fused models in one process, as many as fit (the rest extrapolated)
    mem = []
    for k in args.fused_counts:
        mem.append({"models": k, **_spawn([fused_path] * k, "fused", 1, batch, size, 0)})
    res["fused_memory"] = mem
    ks = [m["models"] for m in mem]
    rss = [m["rss"] for m in mem]
    per = (rss[-1] - rss[0]) / (ks[-1] - ks[0]) if len(ks) > 1 else float("nan")
    res["fused_rss_per_model"] = per
    res["fused_rss_one"] = rss[0]

    # independent timer: each model alone in a fresh process, wall clock of K batches minus 0
    n = max(ns)
    big = os.path.join(work, f"n{n}", "tasks.onnx")
    k = args.independent_iters
    per = {"bundle": [], "fused": [], "bundle_wall": [], "fused_wall": []}
    for _ in range(args.independent_rounds):   # B0 Bk F0 Fk, round after round
        for kind, paths in (("bundle", [big]), ("fused", [fused_path])):
            zero = _spawn(paths, kind, n, batch, size, 0)
            many = _spawn(paths, kind, n, batch, size, k)
            per[kind].append(1000 * (many["run_s"] - zero["run_s"]) / k)
            per[f"{kind}_wall"].append(1000 * (many["wall_s"] - zero["wall_s"]) / k)
    ind = {kind: {"ms_per_batch": statistics.median(per[kind]),
                  "wall_ms_per_batch": statistics.median(per[f"{kind}_wall"]),
                  "rounds_ms": [round(v) for v in per[kind]]} for kind in ("bundle", "fused")}
    ind["ratio"] = statistics.median(a / b for a, b in zip(per["bundle"], per["fused"]))
    ind["ratio_wall"] = statistics.median(a / b for a, b in zip(per["bundle_wall"],
                                                                 per["fused_wall"]))
    ind["tasks"], ind["iters"], ind["rounds"] = n, k, args.independent_rounds
    res["independent"] = ind

    # tasks come and go: add one to the largest bundle, then remove it again
    for check in (False, True):
        t0 = time.perf_counter()
        rep = ssf_deploy.add_tasks(big, [tasks[n]], names=[f"added-{int(check)}"],
                                   base_weights=base_file, check_fused=check)
        total = time.perf_counter() - t0
        res.setdefault("add", []).append({"to_tasks": n, "fused_check": check,
                                          "seconds": round(total, 3), "stages": rep.seconds})
        t0 = time.perf_counter()
        rep = ssf_deploy.remove_tasks(big, [f"added-{int(check)}"])
        res.setdefault("remove", []).append({"from_tasks": n + 1,
                                             "seconds": round(time.perf_counter() - t0, 3),
                                             "stages": rep.seconds})

    # design choices at N = 10: naive layout vs chosen, per-sample head vs every head
    nv = min(10, max(ns))
    naive = os.path.join(work, "naive", "tasks.onnx")
    ssf_deploy.bundle(tasks[:nv], out=naive, base_weights=base_file, check_fused=1,
                      fold_bias=False)
    chosen = os.path.join(work, f"n{nv}", "tasks.onnx") if nv in ns else None
    if chosen is None:
        chosen = os.path.join(work, "chosen", "tasks.onnx")
        ssf_deploy.bundle(tasks[:nv], out=chosen, base_weights=base_file, check_fused=1)
    task = rng.integers(0, nv, batch).astype(np.int64)
    s_naive = ort.InferenceSession(naive, opts, providers=["CPUExecutionProvider"])
    s_chosen = ort.InferenceSession(chosen, opts, providers=["CPUExecutionProvider"])
    lat = interleaved({"chosen": lambda: s_chosen.run(None, {"images": x, "task": task}),
                       "naive": lambda: s_naive.run(None, {"images": x, "task": task}),
                       "fused": lambda: fused.run(None, {fin: x})}, args.rounds)
    times = lat.pop("_times")
    res["design"] = {
        "tasks": nv, "latency": lat,
        "chosen_vs_fused": statistics.median(a / b for a, b in zip(times["chosen"],
                                                                    times["fused"])),
        "naive_vs_fused": statistics.median(a / b for a, b in zip(times["naive"],
                                                                   times["fused"])),
        "naive_nodes": len(__import__("onnx").load(naive, load_external_data=False).graph.node)}
    res["heads"] = head_choice(int(tuned.get_classifier().in_features), classes, batch)
    return res


def head_choice(d: int, c: int, batch: int, tasks: int = 1000) -> dict:
    """Per-sample classifier: gather each sample's head ([B, D, C]) vs one matmul against every
    task's head ([D, N*C]) and keep the sample's columns, at N = 1000 (numpy, one thread)."""
    import numpy as np
    rng = np.random.default_rng(0)
    heads = rng.standard_normal((tasks, d, c)).astype(np.float32)
    flat = np.ascontiguousarray(heads.transpose(1, 0, 2).reshape(d, tasks * c))
    feats = rng.standard_normal((batch, d)).astype(np.float32)
    task = rng.integers(0, tasks, batch)

    def gather():
        return np.matmul(feats[:, None, :], heads[task])[:, 0]

    def every():
        return (feats @ flat).reshape(batch, tasks, c)[np.arange(batch), task]

    assert np.allclose(gather(), every(), atol=1e-3)
    t = interleaved({"gather": gather, "every": every}, 20)
    t.pop("_times")
    return {"tasks": tasks, "features": d, "classes": c, "batch": batch,
            "gather_ms": t["gather"]["median_ms"], "every_head_ms": t["every"]["median_ms"],
            "every_head_bytes_read": heads.nbytes, "gather_bytes_read": int(batch * d * c * 4)}


def markdown(results: dict) -> str:
    lines = [f"# Bundle cost (generated by benchmarks/bundle/run.py on {results['date']})", "",
             f"{results['machine']}; onnxruntime {results['onnxruntime']}, batch "
             f"{results['batch']}, fp32, {results['rounds']} interleaved rounds; load average "
             f"at start {results['load_start']['loadavg_1m']:.2f}, at end "
             f"{results['load_end']['loadavg_1m']:.2f} ({results['load_start']['cpus']} CPUs).",
             ""]
    for r in results["archs"]:
        pack = r["pack_bytes"]
        lines += [f"## {r['arch']}", "",
                  f"task pack {pack / 1e6:.2f} MB; fused model {r['fused_bytes'] / 1e6:.1f} MB; "
                  f"one fused model resident {r['fused_rss_one'] / 1e6:.0f} MB, each further "
                  f"one {r['fused_rss_per_model'] / 1e6:.0f} MB", "",
                  "| N tasks | mixed batch / fused | bundle ms | fused ms | bundle resident MB "
                  "| N fused models MB | target MB (base + 1.2 N pack) | session s | gate "
                  "(max err vs recorded / fused) | load 1m |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            n = row["tasks"]
            nf = r["fused_rss_one"] + (n - 1) * r["fused_rss_per_model"]
            measured = [m for m in r["fused_memory"] if m["models"] == n]
            nf_txt = (f"{measured[0]['rss'] / 1e6:.0f}" if measured else
                      f"{nf / 1e6:.0f} (extrapolated)")
            target = r["fused_rss_one"] + 1.2 * n * pack
            g = row["gate"]
            lines.append(
                f"| {n} | {row['ratio']:.3f}x | {row['latency']['bundle']['median_ms']:.0f} | "
                f"{row['latency']['fused']['median_ms']:.0f} | "
                f"{row['memory']['rss'] / 1e6:.0f} (peak {row['memory']['hwm'] / 1e6:.0f}"
                + (f"; {row['memory']['rss_untrimmed'] / 1e6:.0f} untrimmed at load"
                   if "rss_untrimmed" in row["memory"] else "") + ") | "
                f"{nf_txt} | {target / 1e6:.0f} | {row['session_seconds']:.1f} | "
                f"{g['max_abs_vs_recorded']:.1e} / {g['max_abs_vs_fused']:.1e} | "
                f"{row.get('load', {}).get('loadavg_1m', float('nan')):.1f} |")
        again = [row for row in r["rows"] if "ratio_again" in row]
        for row in again:
            lines += ["", f"Measured again (`--memory-only`, {results.get('memory_measured')}, "
                          f"load {row['load_again']['loadavg_1m']:.1f}): N = {row['tasks']} "
                          f"mixed batch / fused {row['ratio_again']:.3f}x "
                          f"({row['latency_again']['bundle']['median_ms']:.0f} vs "
                          f"{row['latency_again']['fused']['median_ms']:.0f} ms); the memory "
                          f"columns above are from that run too."]
        ind = r["independent"]
        lines += ["", f"Independent timer (each model alone in a fresh process, {ind['iters']} "
                      f"batches minus 0, N = {ind['tasks']}, {ind.get('rounds', 1)} interleaved "
                      f"rounds, median of the per-round ratios): bundle "
                      f"{ind['bundle']['ms_per_batch']:.0f} ms, fused "
                      f"{ind['fused']['ms_per_batch']:.0f} ms per batch -> {ind['ratio']:.3f}x "
                      f"(whole-process wall clock: {ind['ratio_wall']:.3f}x).", ""]
        for a in r["add"]:
            st = a["stages"]
            lines.append(f"Add a task to {a['to_tasks']} (fused check {a['fused_check']}): "
                         f"{a['seconds']:.2f} s in all; writing its row and the new graph "
                         f"{st.get('write', 0) + st.get('commit', 0):.3f} s, the gate "
                         f"{st.get('gate', 0):.2f} s"
                         + (f", its fused reference {st.get('fused references', 0):.2f} s"
                            if a["fused_check"] else "") + ".")
        for a in r["remove"]:
            lines.append(f"Remove a task from {a['from_tasks']}: {a['seconds']:.2f} s.")
        d = r["design"]
        lines += ["", f"Design (N = {d['tasks']}): chosen layout {d['chosen_vs_fused']:.3f}x the "
                      f"fused model, naive layout {d['naive_vs_fused']:.3f}x "
                      f"({d['naive_nodes']} nodes vs {r['rows'][0]['graph_nodes']}).",
                  f"Per-sample head at N = {r['heads']['tasks']}: gather "
                  f"{r['heads']['gather_ms']:.2f} ms vs every head "
                  f"{r['heads']['every_head_ms']:.2f} ms per batch "
                  f"({r['heads']['every_head_bytes_read'] / 1e6:.0f} MB read).", ""]
    return "\n".join(lines)


def run_gpu(args) -> dict:
    """TensorRT on one GPU: the bundle engine vs the fused model's engine, same batch, same
    precision (the per-sample multiply-adds are pointwise: TensorRT fuses them into the layers
    around them), and the time a task takes to reach the engine by refit."""
    import torch

    import ssf_deploy
    from ssf_deploy.bundle.engine import build_bundle_engine, refit_bundle_engine
    from ssf_deploy.engine import build_checked_engine
    from ssf_deploy.fileio import save_safetensors
    from ssf_deploy.formats.pack import save_pack
    arch, size, classes, n = args.archs[0], 224, args.classes, min(args.tasks[-1], 10)
    work = os.path.join(args.work, "gpu-" + arch)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    base_file = os.path.join(work, "base.safetensors")
    save_safetensors(ssf_deploy.create_base_model(arch, classes, init_seed=0).state_dict(),
                     base_file)
    tasks, tuned = synth_tasks(arch, base_file, n + 1, classes, size)
    bundle_path = os.path.join(work, "tasks.onnx")
    ssf_deploy.bundle(tasks[:n], out=bundle_path, base_weights=base_file, check_fused=2)
    ssf_deploy.load_trainable_state(tuned, tasks[0].state)
    pack = os.path.join(work, "task0.safetensors")
    save_pack(tuned, pack, arch=arch, num_classes=classes)
    fused_path = os.path.join(work, "fused.onnx")
    model = ssf_deploy.build_model(ssf_deploy.read_task(pack), base_weights=base_file)
    ssf_deploy.deploy(model, [torch.randn(2, 3, size, size)], out=fused_path,
                      dynamic_batch=True, compare_graph="never")
    out = {"arch": arch, "tasks": n, "batch": args.batch, "gpu": torch.cuda.get_device_name(0),
           "rows": []}
    for fp16 in (False, True):
        kw = dict(fp16=fp16, min_batch=1, opt_batch=args.batch, max_batch=max(32, args.batch),
                  iters=100)
        fused = build_checked_engine(fused_path, os.path.join(work, f"fused{int(fp16)}.plan"),
                                     **kw)
        plan = os.path.join(work, f"tasks{int(fp16)}.plan")
        bundle = build_bundle_engine(bundle_path, plan, capacity=n + 1, **kw)
        out["rows"].append({
            "precision": "fp16" if fp16 else "fp32",
            "fused_ms": fused.latency["median_ms"], "bundle_ms": bundle.build.latency["median_ms"],
            "ratio": bundle.build.latency["median_ms"] / fused.latency["median_ms"],
            "gate_max_abs_vs_recorded": bundle.gate.worst("recorded"),
            "fused_build_s": fused.build["build_seconds"],
            "bundle_build_s": bundle.build.build["build_seconds"]})
    t0 = time.perf_counter()
    ssf_deploy.add_tasks(bundle_path, [tasks[n]], base_weights=base_file, check_fused=False)
    add_s = time.perf_counter() - t0
    ref = refit_bundle_engine(os.path.join(work, "tasks0.plan"), bundle_path)
    out["add_task"] = {"bundle_seconds": round(add_s, 3), "refit": ref.refit,
                       "gate_passed": ref.gate.passed}
    return out


def memory_only(args) -> None:
    """Resident memory again, from the files of the last full run (same bundles, same fused
    model), into its results: the memory rows need no timing-quiet machine."""
    path = os.path.join(args.out, "results.json")
    with open(path) as f:
        results = json.load(f)
    for r in results["archs"]:
        work = os.path.join(args.work, r["arch"])
        fused_path = os.path.join(work, "fused.onnx")
        for row in r["rows"]:
            row["memory"] = _spawn([os.path.join(work, f"n{row['tasks']}", "tasks.onnx")],
                                   "bundle", row["tasks"], results["batch"], 224, 0)
        r["fused_memory"] = [{"models": m["models"], **_spawn([fused_path] * m["models"],
                                                              "fused", 1, results["batch"], 224,
                                                              0)} for m in r["fused_memory"]]
        ks = [m["models"] for m in r["fused_memory"]]
        rss = [m["rss"] for m in r["fused_memory"]]
        r["fused_rss_one"] = rss[0]
        r["fused_rss_per_model"] = (rss[-1] - rss[0]) / (ks[-1] - ks[0])
        # and the largest bundle's latency again, interleaved with the fused model as before
        import numpy as np
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes",
                                      "0")
        row = r["rows"][-1]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((results["batch"], 3, 224, 224)).astype(np.float32)
        task = rng.integers(0, row["tasks"], results["batch"]).astype(np.int64)
        sb = ort.InferenceSession(os.path.join(work, f"n{row['tasks']}", "tasks.onnx"), opts,
                                  providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(fused_path, opts, providers=["CPUExecutionProvider"])
        lat = interleaved({"bundle": lambda: sb.run(None, {"images": x, "task": task}),
                           "fused": lambda: sf.run(None, {sf.get_inputs()[0].name: x})},
                          args.rounds)
        times = lat.pop("_times")
        row["latency_again"] = lat
        row["ratio_again"] = statistics.median(a / b for a, b in zip(times["bundle"],
                                                                     times["fused"]))
        row["load_again"] = load_info()
        sb = sf = None
        print(f"  {r['arch']}: memory measured again; N={row['tasks']} again: "
              f"{row['ratio_again']:.3f}x", file=sys.stderr)
    results["memory_measured"] = time.strftime("%Y-%m-%d %H:%M")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results) + "\n")
    print(markdown(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="bundle", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--ntasks", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--archs", nargs="+", default=["vit_small_patch16_224",
                                                   "vit_base_patch16_224"])
    ap.add_argument("--tasks", nargs="+", type=int, default=[1, 10, 100, 1000])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fused-counts", nargs="+", type=int, default=[1, 2, 4, 10])
    ap.add_argument("--independent-iters", type=int, default=4)
    ap.add_argument("--independent-rounds", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(ROOT, "models", "bench-bundle"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--gpu", action="store_true",
                    help="TensorRT engines on the GPU instead (first --archs, N <= 10): "
                         "results/gpu_bundle.json")
    ap.add_argument("--memory-only", action="store_true",
                    help="Measure resident memory again for the bundles and fused model an "
                         "earlier run left in --work, and update its results")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.memory_only:
        return memory_only(args)
    if args.gpu:
        res = run_gpu(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_bundle.json"), "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(json.dumps(res, indent=1, default=float))
        return
    import onnxruntime as ort
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
               platform.machine(), "onnxruntime": ort.__version__, "batch": args.batch,
               "rounds": args.rounds, "load_start": load_info(), "archs": []}
    try:
        with open("/proc/cpuinfo") as f:
            results["machine"] = next(ln.split(":", 1)[1].strip() for ln in f
                                      if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    os.makedirs(args.out, exist_ok=True)
    for arch in args.archs:     # written after every architecture: a long run keeps what it has
        work = os.path.join(args.work, arch)
        shutil.rmtree(work, ignore_errors=True)
        results["archs"].append(run_arch(arch, sorted(args.tasks), args, work))
        results["load_end"] = load_info()
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
