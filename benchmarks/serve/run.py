"""Serving throughput, side by side in one run: the task bundle behind `ssf-deploy serve` under
mixed-task traffic vs one fused model behind the same server serving one task.

One server process serves both models of one repository (`tasks`: the bundle, `fused`: task 0
fused into the base, `ssf_deploy.fuse` + ONNX export). Closed-loop load: C client threads each
send one-image requests back to back; rounds alternate bundle / fused (after a warm-up round of
each) so that machine noise falls on both. Per round:

* client timer (the headline): answered images / wall time of the round; per-request latency
  (p50, p99) with a plain `time.perf_counter()` around each HTTP call;
* server statistics (the independent check): the replica's own count of images in the batches
  that started during the round, over its own clock from the first batch's start to the last
  batch's end (`GET /<model>/stats?since=`), and the images per batch it formed.

ViT-S/16 (vit_small_patch16_224, random init, offline), 224 px, fp32, onnxruntime CPU.
Writes results/serve_cpu_vit_small.{json,txt}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tasks(work: str, arch: str, n: int, classes: list, size: int):
    """A random-init base and ``n`` trained-like SSF tasks on it (perturbed factors/heads)."""
    import ssf_deploy
    from ssf_deploy.fileio import save_safetensors
    from ssf_deploy.formats.checkpoint import save_task
    torch.manual_seed(0)
    base = ssf_deploy.create_base_model(arch, classes[0])
    path = os.path.join(work, "base.safetensors")
    save_safetensors(base.state_dict(), path)
    tasks, models = [], []
    for i in range(n):
        m = ssf_deploy.create_base_model(arch, classes[i % len(classes)], pretrained_file=path)
        ssf_deploy.apply_method(m, "ssf")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, p in m.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        t = os.path.join(work, f"task{i}.pt")
        save_task(m.eval(), t, image_size=size)
        tasks.append(t)
        models.append(m.eval())
    return path, tasks, models


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_round(client, tasks: list, clients: int, per_client: int, seed: int, images) -> dict:
    lat, errors = [], []
    lock = threading.Lock()

    def worker(k):
        rng = np.random.default_rng(seed * 1000 + k)
        mine = []
        for _ in range(per_client):
            task = tasks[int(rng.integers(len(tasks)))]
            x = images[int(rng.integers(len(images)))]
            t0 = time.perf_counter()
            try:
                client.infer(task, x)
                mine.append(time.perf_counter() - t0)
            except Exception as e:          # counted, never hidden
                with lock:
                    errors.append(str(e))
        with lock:
            lat.extend(mine)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    since = time.time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = client.stats(since=since)["window"]
    server_span = st["last_end"] - st["first_start"] if st.get("batches") else float("nan")
    return {"answered": len(lat), "errors": len(errors), "error_examples": errors[:3],
            "wall_s": wall, "images_per_s_client": len(lat) / wall,
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "max_ms": max(lat) * 1e3 if lat else float("nan"),
            "server_images": st.get("images", 0), "server_span_s": server_span,
            "images_per_s_server": st.get("images", 0) / server_span if server_span else None,
            "server_mean_batch": st.get("mean_images_per_batch"),
            "server_max_distinct_tasks": st.get("max_distinct_tasks_in_a_batch"),
            "latencies_ms": [round(v * 1e3, 2) for v in lat]}


def loadavg() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="per client per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per model")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads per replica")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_cpu_vit_small"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: serve the repository an earlier run prepared there")
    args = ap.parse_args(argv)

    import ssf_deploy
    from ssf_deploy.export import export_onnx
    from ssf_deploy.serve import ServeClient, write_triton_repo

    work = args.work or tempfile.mkdtemp(prefix="ssf-serve-bench-")
    repo = os.path.join(work, "repo")
    os.makedirs(work, exist_ok=True)
    classes = [10, 100, 37, 200]
    t0 = time.perf_counter()
    load_start = loadavg()
    names = [f"t{i}" for i in range(args.tasks)]
    if args.reuse and os.path.isdir(repo):
        return serve_and_measure(args, work, repo, names, classes, t0, load_start, None)
    base, tasks, models = make_tasks(work, args.arch, args.tasks, classes, args.size)
    bundle = os.path.join(work, "bundle", "tasks.onnx")
    rep = ssf_deploy.bundle(tasks, out=bundle, base_weights=base, names=names, check_fused=1,
                            batch_size=8)
    x = torch.randn(2, 3, args.size, args.size)
    fused_path = os.path.join(work, "fused", "fused.onnx")
    os.makedirs(os.path.dirname(fused_path), exist_ok=True)
    export_onnx(ssf_deploy.fuse(models[0], x), fused_path, example=x[:1], dynamic_batch=True)
    shutil.rmtree(repo, ignore_errors=True)
    write_triton_repo(bundle, repo, model="tasks", max_batch_size=args.max_batch_size)
    write_triton_repo(fused_path, repo, model="fused", task_name="t0",
                      max_batch_size=args.max_batch_size)
    print(f"prepared in {time.perf_counter() - t0:.0f} s: bundle of {args.tasks} tasks, "
          f"fused t0", flush=True)
    return serve_and_measure(args, work, repo, names, classes, t0, load_start,
                             rep.graph.get("nodes"))


def serve_and_measure(args, work, repo, names, classes, t0, load_start, nodes) -> int:
    from ssf_deploy.serve import ServeClient
    prep_s = time.perf_counter() - t0

    port = free_port()
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "ssf_deploy", "serve", repo, "--port",
                             str(port), "--threads", str(args.threads)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    bundle_client = ServeClient(url, "tasks", timeout=120)
    fused_client = ServeClient(url, "fused", timeout=120)
    try:
        end = time.monotonic() + 600
        while not (bundle_client.ready() and fused_client.ready()):
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"server did not start: see {log.name}")
            time.sleep(0.5)
        rng = np.random.default_rng(0)
        images = [rng.standard_normal((1, 3, args.size, args.size)).astype(np.float32)
                  for _ in range(16)]
        setups = {"bundle (mixed tasks)": (bundle_client, names),
                  "fused (one task)": (fused_client, ["t0"])}
        rounds = {k: [] for k in setups}
        for k, (c, ts) in setups.items():          # warm-up, not reported
            run_round(c, ts, args.clients, 2, 999, images)
        for r in range(args.rounds):
            order = list(setups) if r % 2 == 0 else list(setups)[::-1]
            for k in order:
                c, ts = setups[k]
                res = run_round(c, ts, args.clients, args.requests, r, images)
                res["load_after"] = loadavg()
                rounds[k].append(res)
                print(f"round {r} {k}: {res['images_per_s_client']:.2f} img/s client, "
                      f"{res['images_per_s_server'] or float('nan'):.2f} img/s server, p50 "
                      f"{res['p50_ms']:.0f} ms p99 {res['p99_ms']:.0f} ms, "
                      f"errors {res['errors']}, load {res['load_after']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    summary = {}
    for k, rs in rounds.items():
        lat = [v for r in rs for v in r["latencies_ms"]]
        ans = sum(r["answered"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        simg = sum(r["server_images"] for r in rs)
        span = sum(r["server_span_s"] for r in rs)
        summary[k] = {"images_per_s_client": ans / wall, "images_per_s_server": simg / span,
                      "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                      "p99_over_p50": pct(lat, 99) / pct(lat, 50),
                      "errors": sum(r["errors"] for r in rs), "answered": ans,
                      "server_mean_batch": float(np.mean([r["server_mean_batch"] for r in rs])),
                      "server_max_distinct_tasks": max(r["server_max_distinct_tasks"] or 0
                                                      for r in rs),
                      "client_vs_server": (ans / wall) / (simg / span) - 1}
    b, f = summary["bundle (mixed tasks)"], summary["fused (one task)"]
    ratio_c = b["images_per_s_client"] / f["images_per_s_client"]
    ratio_s = b["images_per_s_server"] / f["images_per_s_server"]
    targets = {"bundle_over_fused_images_per_s": ratio_c, "target_ratio": 0.85,
               "ratio_met": ratio_c >= 0.85,
               "p99_under_2x_p50": {k: v["p99_over_p50"] < 2 for k, v in summary.items()}}
    result = {"setup": {"arch": args.arch, "image_size": args.size, "tasks": args.tasks,
                        "classes": [classes[i % len(classes)] for i in range(args.tasks)],
                        "clients": args.clients, "requests_per_client_per_round": args.requests,
                        "images_per_request": 1, "rounds": args.rounds,
                        "max_batch_size": args.max_batch_size, "ort_threads": args.threads,
                        "server": "ssf-deploy serve (Ray Serve), one replica per model",
                        "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch": torch.__version__,
                        "load_average_at_start": load_start, "load_average_at_end": loadavg(),
                        "prepare_seconds": round(prep_s, 1),
                        "bundle_graph_nodes": nodes},
              "summary": summary, "ratio_server_stats": ratio_s, "targets": targets,
              "rounds": rounds}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"ViT-S/16 224 px fp32, onnxruntime CPU ({os.cpu_count()} cores), "
             f"{args.tasks} tasks, {args.clients} closed-loop clients x 1-image requests, "
             f"max_batch_size {args.max_batch_size}, {args.rounds} interleaved rounds x "
             f"{args.clients * args.requests} requests per model",
             f"load average at start {load_start}, at end {loadavg()} (shared machine)", "",
             "| served | images/s (client timer) | images/s (server stats) | p50 ms | p99 ms | "
             "p99/p50 | mean batch | max tasks in a batch | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['images_per_s_client']:.2f} | {v['images_per_s_server']:.2f} "
                     f"| {v['p50_ms']:.0f} | {v['p99_ms']:.0f} | {v['p99_over_p50']:.2f} | "
                     f"{v['server_mean_batch']:.2f} | {v['server_max_distinct_tasks']} | "
                     f"{v['errors']} |")
    lines += ["", f"bundle / fused images/s: {ratio_c:.3f} (client timer), {ratio_s:.3f} "
                  f"(server statistics); target >= 0.85: {'met' if ratio_c >= 0.85 else 'MISSED'}",
              "client timer vs server statistics: " + ", ".join(
                  f"{k} {v['client_vs_server'] * 100:+.1f}%" for k, v in summary.items()),
              "p99 < 2 x p50: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}"
                                            for k, ok in targets["p99_under_2x_p50"].items())]
    with open(args.out + ".txt", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
