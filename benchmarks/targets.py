"""The lean-SSF targets, read from a ``ssf-deploy bench --out`` report (and, optionally, the
independent timer's JSON for the same rows).

Targets, against the physical floor (the ``frozen`` row: no weight gradient at all):

* lean SSF train step       <= 1.05x frozen
* lean SSF train peak memory <= 1.10x frozen

    python benchmarks/targets.py benchmarks/results/cpu_vit_small_b16.json \
        --independent benchmarks/results/cpu_vit_small_b16_independent.json
"""
from __future__ import annotations

import argparse
import json

TARGETS = {"train_step_ms": 1.05, "train_peak_mem_mb": 1.10}
LABELS = {"train_step_ms": "train step", "train_peak_mem_mb": "train peak memory",
          "saved_for_backward_mb": "saved for backward"}


def ratios(report: dict) -> dict:
    rows = {r["method"]: r for r in report["results"]}
    out = {}
    for m in ("ssf", "ssf-naive", "full"):
        if m not in rows:
            continue
        for key in ("train_step_ms", "train_peak_mem_mb", "saved_for_backward_mb"):
            v = rows[m].get(key)
            for ref in ("frozen", "full"):
                r = rows.get(ref, {}).get(key)
                if v is not None and r:
                    out[(m, key, ref)] = v / r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="lean-SSF targets from a bench report")
    ap.add_argument("report")
    ap.add_argument("--independent", default=None, help="independent_timer.py --json output")
    args = ap.parse_args()
    rep = json.load(open(args.report))
    r = ratios(rep)
    print(f"{rep['model']}, batch {rep['batch_size']}, {rep['device_name']}, "
          f"{'AMP' if rep['amp'] else 'fp32'}, repeat {rep.get('repeat', 1)}")
    for key in ("train_step_ms", "train_peak_mem_mb", "saved_for_backward_mb"):
        cells = [f"{m} {r[(m, key, 'frozen')]:.3f}x frozen / {r[(m, key, 'full')]:.3f}x full"
                 for m in ("ssf", "ssf-naive", "full") if (m, key, "frozen") in r]
        print(f"  {LABELS[key]:<19} " + "; ".join(cells))
    failed = False
    for key, limit in TARGETS.items():
        v = r.get(("ssf", key, "frozen"))
        if v is None:
            print(f"  target {LABELS[key]} <= {limit:.2f}x frozen: not measured")
            continue
        ok = v <= limit
        failed |= not ok
        print(f"  target lean SSF {LABELS[key]} <= {limit:.2f}x frozen: {v:.3f}x  "
              f"{'MET' if ok else 'NOT MET'}")
    if args.independent:
        ind = json.load(open(args.independent))["median_ms"]
        rows = {x["method"]: x for x in rep["results"]}
        print("  independent timer (plain script, same rows):")
        for a, b in (("ssf", "full"), ("ssf", "frozen"), ("full", "frozen")):
            if a in ind and b in ind and rows.get(a, {}).get("train_step_ms") \
                    and rows.get(b, {}).get("train_step_ms"):
                h = rows[a]["train_step_ms"] / rows[b]["train_step_ms"]
                i = ind[a] / ind[b]
                print(f"    {a}/{b}: harness {h:.3f}  independent {i:.3f}  "
                      f"gap {100 * (h - i) / i:+.1f}%")
        for m in ("full", "ssf", "frozen"):
            if m in ind and rows.get(m, {}).get("train_step_ms"):
                print(f"    {m}: harness {rows[m]['train_step_ms']:.0f} ms, independent "
                      f"{ind[m]:.0f} ms ({100 * (rows[m]['train_step_ms'] / ind[m] - 1):+.1f}%)")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
