"""Markdown tables for benchmarks/README.md from a ``ssf-deploy bench --out`` file.

    python benchmarks/summarize.py benchmarks/results/cpu_vit_small_b16.json
"""
from __future__ import annotations

import json
import sys


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def _x(v, ref):
    return "" if v is None or not ref else f"{v / ref:.2f}x"


def main(path: str) -> None:
    r = json.load(open(path))
    rows = {x["method"]: x for x in r["results"]}
    full, base, floor = rows.get("full", {}), rows.get("base", {}), rows.get("frozen", {})
    rounds = f", {r['repeat']} interleaved rounds" if r.get("repeat", 1) > 1 else ""
    print(f"{r['model']}, {r['device_name']}, batch {r['batch_size']}, {r['image_size']}px, "
          f"{'AMP' if r['amp'] else 'fp32'}{', torch.compile' if r.get('compile') else ''}, "
          f"{r['iters']} timed steps after {r['warmup']} warm-up{rounds}; load average "
          f"{r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}, other processes up to "
          f"{_f(r.get('others_cpu_max'), '.2f')} cores during timing\n")
    print("| method | trainable | GFLOPs/img | train step ms | x frozen | x full | spread "
          "| train peak MB | x frozen | x full | saved for bwd MB | infer ms | x base "
          "| infer peak MB | x base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, x in rows.items():
        same = " (=base)" if x.get("infer_same_as") else ""
        tp = x["trainable_params"]
        sp = x.get("train_step_spread")
        if sp is None and x.get("train_step_ms") is None:
            sp = x.get("infer_spread")
        print(f"| {m} | {'-' if tp is None else format(tp / 1e6, '.3f') + 'M'} | "
              f"{x['inference_flops'] / 1e9:.2f} | {_f(x['train_step_ms'], '.0f')} | "
              f"{_x(x['train_step_ms'], floor.get('train_step_ms'))} | "
              f"{_x(x['train_step_ms'], full.get('train_step_ms'))} | "
              f"{_f(None if sp is None else 100 * sp, '.0f')}{'%' if sp is not None else ''} | "
              f"{_f(x['train_peak_mem_mb'], '.0f')} | "
              f"{_x(x['train_peak_mem_mb'], floor.get('train_peak_mem_mb'))} | "
              f"{_x(x['train_peak_mem_mb'], full.get('train_peak_mem_mb'))} | "
              f"{_f(x.get('saved_for_backward_mb'), '.0f')} | "
              f"{_f(x['infer_ms'], '.0f')}{same} | {_x(x['infer_ms'], base.get('infer_ms'))} | "
              f"{_f(x['infer_peak_mem_mb'], '.0f')}{same} | "
              f"{_x(x['infer_peak_mem_mb'], base.get('infer_peak_mem_mb'))} |")
    t2 = r.get("table2")
    if t2:
        print("\n| method | extra params | formula | exact | % base | extra FLOPs/img | formula "
              "| measured/formula | % base |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for x in t2["rows"]:
            print(f"| {x['method']} | {x['extra_params']:,} | {x['params_formula_text']} = "
                  f"{x['extra_params_formula']:,} | {x['extra_params_exact']:,} | "
                  f"{x['extra_params_pct_of_base']:.2f}% | {x['extra_flops']:,} | "
                  f"{x['flops_formula_text']} = {x['extra_flops_formula']:,} | "
                  f"{_f(x['flops_measured_over_formula'], '.2f')} | "
                  f"{x['extra_flops_pct_of_base']:.2f}% |")
    if r.get("warnings"):
        print("\nWarnings of this run:\n")
        for w in r["warnings"]:
            print(f"* {w}")


if __name__ == "__main__":
    main(sys.argv[1])
