"""SSF against PEFT's LoRA and IA3, side by side in one run, on a tiny BERT and a tiny ViT.

Every adapter goes through PEFT's own API (``get_peft_model``, ``merge_and_unload``); SSF is
``ssf_deploy.peft``. Per model and method:

* trainable parameters (PEFT's ``get_nb_trainable_parameters``);
* train step time: ``zero_grad + forward + cross-entropy + backward + AdamW``, every method's
  model built once, methods interleaved round by round (A B C .. A B C ..), the median of all
  timed steps, as this process's CPU time (one torch thread: the work done, which other
  processes on a shared machine do not inflate) and as wall time (load average recorded);
* train peak memory: each row in its own subprocess (the project's CPU counter,
  ``ssf_deploy.bench.measure.Peak``: VmHWM minus the resident size before the model existed,
  glibc told to return freed blocks), never in a timing process;
* merge error: max |logit| difference between ``merge_and_unload()`` and the unmerged model on
  the test inputs;
* extra ONNX nodes: the project's export recipe (TorchScript exporter, onnxsim) of the merged
  model, and of the unmerged one, minus the nodes of the plain base model's export;
* test accuracy on the tiny downstream task, at the learning rate (of a small sweep) that was
  best on the validation split.

Offline stand-in for pretrained weights: each tiny model is first trained in full on an
upstream task, then every method adapts that same base to a different downstream task --
BERT: topic classification where each topic owns a slice of a 1000-token vocabulary, downstream
the slices rotated by half a slice (other topics over the same words); ViT: the built-in shapes
dataset (``ssf_deploy.data.builtin_dataset``), upstream classes 0-4, downstream classes 5-9
(test images from a second draw of the dataset). ``full`` (all weights) and ``head`` (the
classifier only) are reference rows.

    python benchmarks/peft/run.py                 # ~25 min on 2 shared CPU cores
    python benchmarks/peft/run.py --quick         # a smoke run (tests use it)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METHODS = ("full", "head", "ssf", "lora", "lora-all", "ia3")
ADAPTERS = ("ssf", "lora", "lora-all", "ia3")
MEM_TAG = "PEFT_BENCH_MEMORY "

SIZES = {   # tiny, and tinier for --quick
    False: {"bert": dict(vocab=1000, hidden=64, layers=2, heads=4, ffn=128, length=32,
                         classes=8, upstream=2048, train=512, val=512, test=1024,
                         upstream_steps=300, epochs=10),
            "vit": dict(hidden=64, layers=2, heads=4, ffn=128, image=32, patch=4, classes=5,
                        per_class=60, val_per_class=20, test_per_class=40, upstream_steps=300,
                        epochs=15),
            "lrs": {"full": (3e-4, 1e-3), "head": (1e-2, 3e-2), "ssf": (3e-3, 1e-2, 3e-2),
                    "lora": (3e-3, 1e-2, 3e-2), "lora-all": (3e-3, 1e-2, 3e-2),
                    "ia3": (3e-3, 1e-2, 3e-2)},
            "batch": 32, "rounds": 7, "steps": 10, "warmup": 2, "mem_steps": 3},
    True: {"bert": dict(vocab=200, hidden=32, layers=2, heads=2, ffn=64, length=16, classes=4,
                        upstream=256, train=64, val=64, test=64, upstream_steps=20, epochs=2),
           "vit": dict(hidden=32, layers=2, heads=2, ffn=64, image=32, patch=8, classes=5,
                       per_class=4, val_per_class=2, test_per_class=2, upstream_steps=10,
                       epochs=2),
           "lrs": {m: (1e-2,) for m in METHODS},
           "batch": 16, "rounds": 2, "steps": 2, "warmup": 1, "mem_steps": 1},
}


# ------------------------------------------------------------------------------------ data

def topic_batch(n, seed, *, vocab, length, classes, signal=0.3, shift=0):
    """Topic classification: class c owns a vocabulary slice (rotated by ``shift``); each token
    comes from the class's slice with probability ``signal``, else from the whole vocabulary."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    width = (vocab - 1) // classes
    own = labels[:, None] * width + torch.randint(0, width, (n, length), generator=g)
    own = 1 + (own + shift) % (vocab - 1)
    noise = torch.randint(1, vocab, (n, length), generator=g)
    ids = torch.where(torch.rand(n, length, generator=g) < signal, own, noise)
    ids[:, 0] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _images(root, split, classes):
    from PIL import Image
    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, split, cls)
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as img:
                a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            xs.append(torch.from_numpy(a).permute(2, 0, 1))
            ys.append(label)
    return (torch.stack(xs) - 0.5) / 0.5, torch.tensor(ys)


def make_data(name, s, cache):
    """{"upstream": (x, y), "train", "val", "test"}: downstream splits use other classes."""
    if name == "bert":
        kw = dict(vocab=s["vocab"], length=s["length"], classes=s["classes"])
        half = (s["vocab"] - 1) // s["classes"] // 2
        return {"upstream": topic_batch(s["upstream"], 10, **kw),
                "train": topic_batch(s["train"], 11, shift=half, **kw),
                "val": topic_batch(s["val"], 12, shift=half, **kw),
                "test": topic_batch(s["test"], 13, shift=half, **kw)}
    from ssf_deploy.data import BUILTIN_CLASSES, builtin_dataset
    up, down = BUILTIN_CLASSES[:5], BUILTIN_CLASSES[5:]
    a = builtin_dataset(os.path.join(cache, f"builtin-{s['per_class']}"), size=s["image"],
                        train_per_class=s["per_class"], val_per_class=s["val_per_class"], seed=0)
    b = builtin_dataset(os.path.join(cache, f"builtin-test-{s['test_per_class']}"),
                        size=s["image"], train_per_class=1,
                        val_per_class=s["test_per_class"], seed=1)
    return {"upstream": _images(a, "train", up), "train": _images(a, "train", down),
            "val": _images(a, "val", down), "test": _images(b, "val", down)}


def take(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def size_of(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def forward(model, x):
    out = model(**x) if isinstance(x, dict) else model(pixel_values=x)
    return out.logits


# ------------------------------------------------------------------------------------ models

def make_base(name, s, classes):
    import transformers as T
    if name == "bert":
        cfg = T.BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           intermediate_size=s["ffn"], max_position_embeddings=s["length"],
                           num_labels=classes, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        return T.BertForSequenceClassification(cfg)
    cfg = T.ViTConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                      image_size=s["image"], patch_size=s["patch"], num_labels=classes)
    return T.ViTForImageClassification(cfg)


def names_ending(model, *suffixes):
    """Module-name suffixes present in ``model`` (transformers renames modules between
    releases: query/value or q_proj/v_proj)."""
    names = [n for n, _ in model.named_modules()]
    return sorted({s for s in suffixes if any(n.endswith(s) for n in names)})


def with_method(base, method, name):
    """``base`` (a copy) set up for ``method`` through PEFT's API (or plainly for full/head)."""
    from peft import IA3Config, LoraConfig, get_peft_model
    import ssf_deploy.peft  # noqa: F401  (registers SSF)
    from ssf_deploy.peft import SSFConfig
    model = copy.deepcopy(base)
    head = {"task_type": "SEQ_CLS"} if name == "bert" else {"modules_to_save": ["classifier"]}
    if method == "full":
        return model.train()
    if method == "head":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        return model.train()
    if method == "ssf":
        cfg = SSFConfig(**head)
    elif method == "lora":
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **head,
                         target_modules=names_ending(model, "query", "value", "q_proj", "v_proj"))
    elif method == "lora-all":
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                         **head)
    elif method == "ia3":
        ffn = names_ending(model, "output.dense", "fc2")   # PEFT's own default for BERT
        cfg = IA3Config(target_modules=names_ending(model, "key", "value", "k_proj", "v_proj")
                        + ffn, feedforward_modules=ffn, **head)
    else:
        raise SystemExit(f"unknown method {method!r}")
    return get_peft_model(model, cfg).train()


def trainable(model):
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def upstream(name, s, data, seed=0):
    """Full training on the upstream task: the stand-in for pretrained weights."""
    torch.manual_seed(seed)
    x, y = data["upstream"]
    model = make_base(name, s, int(y.max()) + 1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(s["upstream_steps"]):
        idx = torch.randint(0, size_of(x), (32,), generator=g)
        loss = F.cross_entropy(forward(model, take(x, idx)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def downstream_base(up, name, s, classes, seed=1):
    """The upstream model with a new classifier for the downstream classes."""
    torch.manual_seed(seed)
    base = make_base(name, s, classes)
    own = base.state_dict()
    base.load_state_dict({k: v for k, v in up.state_dict().items()
                          if not k.startswith("classifier.")} |
                         {k: v for k, v in own.items() if k.startswith("classifier.")})
    return base.eval()


# ------------------------------------------------------------------------------------ runs

def accuracy(model, x, y, batch=256):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([forward(model, take(x, slice(i, i + batch))).argmax(-1)
                          for i in range(0, size_of(x), batch)])
    return float((pred == y).float().mean())


def fit(model, data, epochs, lr, batch, seed=0):
    x, y = data["train"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(size_of(x), generator=g)
        for i in range(0, size_of(x) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(forward(model, take(x, idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def sweep(base, name, method, data, s, cfg):
    """Train at each learning rate; keep the one best on val."""
    best = None
    for lr in cfg["lrs"][method]:
        torch.manual_seed(0)
        model = fit(with_method(base, method, name), data, s["epochs"], lr, cfg["batch"])
        val = accuracy(model, *data["val"])
        if best is None or val > best[1]:
            best = (lr, val, model)
    lr, val, model = best
    return model, {"lr": lr, "val_acc": val, "test_acc": accuracy(model, *data["test"])}


def onnx_nodes(model, example):
    from ssf_deploy.export import export_proto, graph_stats
    return graph_stats(export_proto(model.eval(), example=example))


def merge_report(model, base_stats, x_test, example, method):
    """Merge error and ONNX node counts of the unmerged and merged model vs the base export."""
    if method not in ADAPTERS:
        stats = onnx_nodes(model, example)
        return {"merge_max_abs": None, "extra_nodes_unmerged": stats["nodes"] - base_stats["nodes"],
                "extra_nodes_merged": stats["nodes"] - base_stats["nodes"],
                "merged_ops_equal_base": stats["ops"] == base_stats["ops"]}
    model.eval()
    inner = model.base_model.model
    unmerged = onnx_nodes(inner, example)
    with torch.no_grad():
        before = forward(model, x_test)
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        after = forward(merged, x_test)
    stats = onnx_nodes(merged, example)
    return {"merge_max_abs": float((after - before).abs().max()),
            "extra_nodes_unmerged": unmerged["nodes"] - base_stats["nodes"],
            "extra_nodes_merged": stats["nodes"] - base_stats["nodes"],
            "merged_ops_equal_base": stats["ops"] == base_stats["ops"],
            "merged_class": type(merged).__name__}


def time_rows(base, name, methods, data, cfg):
    """Median step time per method: every model built once, methods interleaved per round."""
    x, y = data["train"]
    idx = torch.arange(cfg["batch"])
    xb, yb = take(x, idx), y[idx]
    models = {m: with_method(base, m, name) for m in methods}
    opts = {m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4)
            for m, mod in models.items()}
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}

    def step(m):
        opts[m].zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(models[m], xb), yb)
        loss.backward()
        opts[m].step()

    for _ in range(cfg["rounds"]):
        for m in methods:
            for _ in range(cfg["warmup"]):
                step(m)
            for _ in range(cfg["steps"]):
                t0, c0 = time.perf_counter(), time.process_time()
                step(m)
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    return {m: {"step_ms": 1e3 * statistics.median(v), "steps_timed": len(v),
                "spread_ms": [1e3 * min(v), 1e3 * max(v)],
                "cpu_step_ms": 1e3 * statistics.median(cpu[m]),
                "cpu_spread_ms": [1e3 * min(cpu[m]), 1e3 * max(cpu[m])]}
            for m, v in times.items()}


# ------------------------------------------------------------------------------------ memory

def memory_worker(payload):
    """In a fresh process (glibc told to unmap freed blocks): peak RSS of a few training steps
    above the resident size before the model existed."""
    from ssf_deploy.bench.measure import Peak, mmap_big_blocks, rss
    mmap_big_blocks()
    args = json.loads(payload)
    cfg = SIZES[args["quick"]]
    s = cfg[args["model"]]
    x, y = torch.load(args["batch"], weights_only=True)
    from safetensors.torch import load_file
    state = load_file(args["weights"])
    import ssf_deploy.peft  # noqa: F401  (imports done before the baseline)
    import peft  # noqa: F401
    baseline = rss()
    base = make_base(args["model"], s, args["classes"])
    base.load_state_dict(state)
    model = with_method(base, args["method"], args["model"])
    del base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    peak = Peak(torch.device("cpu"), baseline=baseline)
    peak.reset()
    for _ in range(cfg["mem_steps"]):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(model, x), y).backward()
        opt.step()
    print(MEM_TAG + json.dumps({"peak_mb": peak.peak() / 2 ** 20}), flush=True)


def memory_rows(base, name, methods, data, cfg, quick, tmp):
    from ssf_deploy.bench.isolate import MEMORY_ENV
    from ssf_deploy.fileio import save_safetensors
    weights = os.path.join(tmp, f"{name}.safetensors")
    save_safetensors(base.state_dict(), weights)
    x, y = data["train"]
    idx = torch.arange(cfg["batch"])
    batch = os.path.join(tmp, f"{name}-batch.pt")
    torch.save((take(x, idx), y[idx]), batch)
    env = dict(os.environ, **MEMORY_ENV)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = {}
    for m in methods:
        payload = json.dumps({"model": name, "method": m, "weights": weights, "batch": batch,
                              "classes": int(y.max()) + 1, "quick": quick})
        r = subprocess.run([sys.executable, __file__, "--memory-worker", payload,
                            "--threads", str(torch.get_num_threads())], env=env,
                           capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MEM_TAG)]
        if r.returncode or not lines:
            raise SystemExit(f"memory worker {name}/{m} failed: {r.stderr.strip()[-500:]}")
        out[m] = json.loads(lines[-1][len(MEM_TAG):])
    return out


# ------------------------------------------------------------------------------------ main

def run_model(name, cfg, methods, quick, cache, tmp, say):
    s = cfg[name]
    t0 = time.perf_counter()
    data = make_data(name, s, cache)
    classes = int(data["train"][1].max()) + 1
    say(f"{name}: data ready ({time.perf_counter() - t0:.0f} s); upstream training")
    base = downstream_base(upstream(name, s, data), name, s, classes)
    example = take(data["test"][0], slice(0, 1))
    base_stats = onnx_nodes(base, example)
    _, total = trainable(base)
    rows = {}
    for m in methods:
        say(f"{name}/{m}: learning-rate sweep {cfg['lrs'][m]}")
        model, res = sweep(base, name, m, data, s, cfg)
        res["trainable"], res["total"] = trainable(with_method(base, m, name))
        res.update(merge_report(model, base_stats, data["test"][0], example, m))
        rows[m] = res
    say(f"{name}: timing, {cfg['rounds']} interleaved rounds")
    for m, t in time_rows(base, name, methods, data, cfg).items():
        rows[m].update(t)
    say(f"{name}: memory, one subprocess per method")
    for m, t in memory_rows(base, name, methods, data, cfg, quick, tmp).items():
        rows[m].update(t)
    return {"base_params": total, "base_onnx_nodes": base_stats["nodes"],
            "sizes": s, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def table(results) -> str:
    lines = ["| model | method | trainable params | step CPU time ms (wall) | CPU time vs full "
             "| peak memory (MB) | merge error (max abs) | extra ONNX nodes, unmerged / merged "
             "| test acc (lr) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results["models"].items():
        rows = res["rows"]
        full = rows.get("full", {}).get("cpu_step_ms")
        for m, r in rows.items():
            share = 100.0 * r["trainable"] / r["total"]
            ratio = f"{r['cpu_step_ms'] / full:.2f}x" if full else "-"
            err = "-" if r["merge_max_abs"] is None else f"{r['merge_max_abs']:.1e}"
            nodes = "-" if m not in ADAPTERS else \
                f"+{r['extra_nodes_unmerged']} / +{r['extra_nodes_merged']}" + \
                ("" if r["merged_ops_equal_base"] else " (other ops)")
            lines.append(f"| {name} | {m} | {r['trainable']:,} ({share:.2f} %) | "
                         f"{r['cpu_step_ms']:.1f} ({r['step_ms']:.1f}) | {ratio} | "
                         f"{r['peak_mb']:.1f} | {err} | {nodes} | "
                         f"{100 * r['test_acc']:.1f} % ({r['lr']:g}) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--models", default="bert,vit")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one lr: a smoke run")
    ap.add_argument("--no-plain-timer", action="store_true",
                    help="skip the independent plain-timer check")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)   # tiny models on a shared box: no OpenMP spinning
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        raise SystemExit("unset MALLOC_MMAP_THRESHOLD_: timings use the normal allocator")
    cfg = SIZES[args.quick]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    os.makedirs(args.out, exist_ok=True)

    def say(msg):
        print(f"  {msg}", file=sys.stderr, flush=True)

    import peft
    import transformers
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__},
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_start": os.getloadavg(), "quick": args.quick, "models": {},
               "note": "shared machine: other engineers' test runs were running; timings are "
                       "medians of interleaved rounds"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as tmp:
        cache = os.path.join(os.environ.get("SSF_DEPLOY_CACHE") or tmp, "peft-bench")
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results["models"][name] = run_model(name, cfg, methods, args.quick, cache, tmp, say)
    results["load_average_end"] = os.getloadavg()
    if not args.no_plain_timer and {"ssf", "lora", "full"} <= set(methods):
        say("independent plain timer (bert: ssf, lora, full)")
        r = subprocess.run([sys.executable, os.path.join(HERE, "plain_timer.py"),
                            "--threads", str(args.threads)] + (["--quick"] if args.quick else []),
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if r.returncode:
            raise SystemExit(f"plain timer failed: {r.stderr.strip()[-500:]}")
        plain = json.loads(r.stdout.strip().splitlines()[-1])
        rows = results["models"].get("bert", {}).get("rows", {})
        if rows:   # the ratios to full, CPU time and wall time, harness vs plain timer
            plain["vs_harness"] = {}
            for clock, mine, theirs in (("cpu", "cpu_step_ms", "cpu_ms"), ("wall", "step_ms", "ms")):
                for k in ("ssf", "lora"):
                    h = rows[k][mine] / rows["full"][mine]
                    p = plain[theirs][k] / plain[theirs]["full"]
                    plain["vs_harness"][f"{k}/full {clock}"] = {
                        "harness": h, "plain": p, "apart_pct": 100 * abs(p / h - 1)}
        results["plain_timer"] = plain
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = table(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
