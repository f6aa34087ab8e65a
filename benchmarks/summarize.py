"""Markdown tables for benchmarks/README.md from a ``ssf-deploy bench --json`` file.

    python benchmarks/summarize.py benchmarks/results/cpu_vit_small_b16.json
"""
from __future__ import annotations

import json
import sys


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def main(path: str) -> None:
    r = json.load(open(path))
    rows = {x["method"]: x for x in r["results"]}
    full, base = rows.get("full", {}), rows.get("base", {})
    print(f"{r['model']}, {r['device_name']}, batch {r['batch_size']}, {r['image_size']}px, "
          f"{'AMP' if r['amp'] else 'fp32'}, {r['iters']} timed iters after {r['warmup']} warm-up, "
          f"load average {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}\n")
    print("| method | trainable | GFLOPs/img | train step ms (x full) | train peak MB (x full) "
          "| saved for bwd MB (x full) | infer ms (x base) | infer peak MB (x base) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(v, ref):
        return "" if v is None or not ref else f" ({v / ref:.2f}x)"
    for m, x in rows.items():
        same = " (=base)" if x.get("infer_same_as") else ""
        tp = x["trainable_params"]
        print(f"| {m} | {'-' if tp is None else format(tp / 1e6, '.3f') + 'M'} | "
              f"{x['inference_flops'] / 1e9:.2f} | "
              f"{_f(x['train_step_ms'], '.0f')}{ratio(x['train_step_ms'], full.get('train_step_ms'))} | "
              f"{_f(x['train_peak_mem_mb'], '.0f')}"
              f"{ratio(x['train_peak_mem_mb'], full.get('train_peak_mem_mb'))} | "
              f"{_f(x.get('saved_for_backward_mb'), '.0f')}"
              f"{ratio(x.get('saved_for_backward_mb'), full.get('saved_for_backward_mb'))} | "
              f"{_f(x['infer_ms'], '.0f')}{ratio(x['infer_ms'], base.get('infer_ms'))}{same} | "
              f"{_f(x['infer_peak_mem_mb'], '.0f')}"
              f"{ratio(x['infer_peak_mem_mb'], base.get('infer_peak_mem_mb'))}{same} |")
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
    tg = r.get("targets")
    if tg:
        print("\n" + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                  for k, v in tg.items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
