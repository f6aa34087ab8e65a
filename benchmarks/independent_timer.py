"""Train-step timing with no benchmark-harness code: a plain check of ``ssf-deploy bench``.

One process, the allocator as it comes, every model built once, rows interleaved round by round
(A B C A B C ...). A step is exactly ``zero_grad + forward + cross-entropy + backward + AdamW``;
the reported number is the median of all timed steps of a row. Only ``ssf_deploy.apply_method``
is used, to put SSF into the model: the thing being measured, not the measuring.

    python benchmarks/independent_timer.py --model vit_small_patch16_224 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import ssf_deploy


def build(row: str, arch: str, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    if row == "frozen":          # the floor: no weight gradients, gradients reach the input
        for p in model.parameters():
            p.requires_grad_(False)
    elif row == "ssf":
        ssf_deploy.apply_method(model, "ssf")                  # lean (the default)
    elif row == "ssf-naive":
        ssf_deploy.apply_method(model, "ssf", impl="naive")    # x * scale + shift, as upstream
    elif row != "full":
        raise SystemExit(f"unknown row {row!r}: full, ssf, ssf-naive, frozen")
    return model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--rows", default="full,ssf,frozen")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--json", dest="json_path", default=None, help="also write results here")
    args = ap.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        raise SystemExit("unset MALLOC_MMAP_THRESHOLD_: this timer uses the normal allocator")

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    size = timm.create_model(args.model, pretrained=False).pretrained_cfg["input_size"][-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, size, size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
    runs = {}
    for row in rows:
        model = build(row, args.model, args.num_classes, seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        inp = x.clone().requires_grad_(row == "frozen")
        net = torch.compile(model) if args.compile else model
        runs[row] = (net, opt, inp)

    def step(row: str) -> None:
        net, opt, inp = runs[row]
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        inp.grad = None
        loss = F.cross_entropy(net(inp), y)
        loss.backward()
        if opt is not None:
            opt.step()

    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {r: [] for r in rows}
    first: dict[str, float] = {}
    for k in range(args.rounds):
        for row in rows:
            for i in range(args.warmup):
                t0 = time.perf_counter()
                step(row)
                if k == 0 and i == 0:
                    first[row] = (time.perf_counter() - t0) * 1e3
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(row)
                times[row].append((time.perf_counter() - t0) * 1e3)
    load1 = os.getloadavg()[0]

    med = {r: statistics.median(v) for r, v in times.items()}
    print(f"{args.model}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
          f"{'torch.compile, ' if args.compile else ''}median of {args.rounds} x {args.steps} "
          f"steps (after {args.warmup} warm-up per round); load average {load0:.2f} -> {load1:.2f}")
    print(f"{'row':<10} {'step ms':>9} {'x full':>7} {'x frozen':>9} {'min':>8} {'max':>8}"
          + (f" {'1st step ms':>12}" if args.compile else ""))
    for r in rows:
        print(f"{r:<10} {med[r]:>9.1f} "
              f"{(med[r] / med['full']) if 'full' in med else float('nan'):>7.3f} "
              f"{(med[r] / med['frozen']) if 'frozen' in med else float('nan'):>9.3f} "
              f"{min(times[r]):>8.1f} {max(times[r]):>8.1f}"
              + (f" {first[r]:>12.0f}" if args.compile else ""))
    if args.json_path:
        out = {"model": args.model, "batch_size": args.batch_size, "compile": args.compile,
               "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
               "warmup": args.warmup, "loadavg_start": load0, "loadavg_end": load1,
               "torch": torch.__version__, "median_ms": med, "all_ms": times,
               "first_step_ms": first if args.compile else None}
        tmp = args.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json_path)
        print(f"wrote {args.json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
