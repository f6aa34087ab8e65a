"""The terminal table of a benchmark report: every number next to its references.

Training rows are shown against the ``frozen`` floor (no weight gradient at all, gradients
still flowing to the input: what any method that back-propagates through the whole network
pays) and against ``full`` fine-tuning; inference rows against ``base``.
"""
from __future__ import annotations

from collections import Counter

__all__ = ["format_table", "ssf_sites_summary"]

_SITE_WORDS = {
    "norm": "norms run folded (keep what a frozen norm keeps)",
    "residual": "Linears read only by a residual add keep nothing (y from the norms' inputs)",
    "y-shared": "Linears keep y, which their consumer keeps too",
    "shift-only": "keep nothing (shift in the bias)",
    "recompute": "norms recompute their output from their kept input",
    "x": "keep their own x",
    "naive": "keep x (naive)",
    "unsettled": "not settled",
}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _x(v, ref) -> str:
    # below 1 (ms or MB) a reference is measurement noise, not a scale: no ratio
    return "" if v is None or not ref or abs(ref) < 1 else f"{v / ref:.2f}x"


def ssf_sites_summary(sites: list[dict]) -> str:
    counts = Counter(s["keeps"] for s in sites)
    parts = []
    for key, n in counts.most_common():
        names = [s["site"] for s in sites if s["keeps"] == key]
        extra = f" ({', '.join(names)})" if key == "x" and n <= 3 else ""
        parts.append(f"{n} {_SITE_WORDS.get(key, key)}{extra}")
    return "; ".join(parts)


def format_table(report: dict) -> str:
    res = {r["method"]: r for r in report["results"]}
    full, base, floor = res.get("full", {}), res.get("base", {}), res.get("frozen", {})
    rounds = report.get("repeat", 1)
    timing = (f"median of {report['iters']} steps after {report['warmup']} warm-up"
              + (f", median over {rounds} interleaved rounds" if rounds > 1 else ""))
    head = (f"{report['model']} on {report['device']} ({report['device_name']}), batch "
            f"{report['batch_size']}, {report['image_size']}px, "
            f"{'AMP' if report['amp'] else 'fp32'}, inference backend {report['backend']}"
            f"{', torch.compile' if report.get('compile') else ''}, {timing}")
    load = (f"load average {report['loadavg_start'][0]:.2f} at start -> "
            f"{report['loadavg_end'][0]:.2f} at end ({report['cores']} cores); other processes "
            f"used {_fmt(report.get('others_cpu_start'), '.2f')} cores at start, up to "
            f"{_fmt(report.get('others_cpu_max'), '.2f')} during timing; "
            f"timings on the normal allocator, memory in separate "
            f"{'mmap-threshold subprocesses' if report['isolated'] else 'passes'}"
            f"{'' if report['isolated'] or report['device'].startswith('cuda') else ' (in-process: CPU peaks are rough)'}")
    cols = [("method", 11, "<"), ("train M", 7, ">"), ("infer M", 7, ">"), ("GFLOPs", 7, ">"),
            ("train ms", 9, ">"), ("/frozen", 7, ">"), ("/full", 6, ">"), ("spread", 6, ">"),
            ("train MB", 8, ">"), ("/frozen", 7, ">"), ("/full", 6, ">"), ("saved MB", 8, ">"),
            ("infer ms", 9, ">"), ("/base", 6, ">"), ("infer MB", 8, ">"), ("/base", 6, ">")]

    def line(cells):
        return " ".join(format(c, f"{a}{w}") for c, (_, w, a) in zip(cells, cols)).rstrip()

    lines = [head, load, "", line([c for c, _, _ in cols])]
    for r in report["results"]:
        same = r.get("infer_same_as")
        spread = r.get("train_step_spread")
        if spread is None and r.get("train_step_ms") is None:
            spread = r.get("infer_spread")
        lines.append(line([
            r["method"],
            _fmt(None if r.get("trainable_params") is None else r["trainable_params"] / 1e6, ".3f"),
            _fmt(None if r.get("inference_params") is None else r["inference_params"] / 1e6, ".3f"),
            _fmt(None if r.get("inference_flops") is None else r["inference_flops"] / 1e9, ".3f"),
            _fmt(r.get("train_step_ms"), ".1f"),
            _x(r.get("train_step_ms"), floor.get("train_step_ms")),
            _x(r.get("train_step_ms"), full.get("train_step_ms")),
            _fmt(None if spread is None else 100 * spread, ".0f") + ("%" if spread is not None else ""),
            _fmt(r.get("train_peak_mem_mb"), ".0f"),
            _x(r.get("train_peak_mem_mb"), floor.get("train_peak_mem_mb")),
            _x(r.get("train_peak_mem_mb"), full.get("train_peak_mem_mb")),
            _fmt(r.get("saved_for_backward_mb"), ".0f"),
            _fmt(r.get("infer_ms"), ".1f") + ("=" if same else ""),
            _x(r.get("infer_ms"), base.get("infer_ms")),
            _fmt(r.get("infer_peak_mem_mb"), ".0f") + ("=" if same else ""),
            _x(r.get("infer_peak_mem_mb"), base.get("infer_peak_mem_mb")),
        ]))
    lines.append("spread: (max - min) / median of the timed steps (train, else inference); "
                 "'=': the deployed model is the base graph, so its inference is base's")
    runtimes = sorted({r["infer_runtime"] for r in report["results"] if r.get("infer_runtime")})
    if runtimes:
        lines.append(f"inference ran on: {', '.join(runtimes)}")
    errors = [f"{r['method']}: {r['infer_error']}" for r in report["results"] if r.get("infer_error")]
    lines += [f"inference failed: {e}" for e in errors]
    for m in ("ssf", "ssf-naive"):
        if res.get(m, {}).get("ssf_sites"):
            lines.append(f"{m} sites: {ssf_sites_summary(res[m]['ssf_sites'])}")
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
    if report.get("warnings"):
        lines += [""] + [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)
