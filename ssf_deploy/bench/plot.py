"""Figure 3 of the paper, from a report: training time and memory, test time and memory."""
from __future__ import annotations

from ..errors import UsageError
from ..fileio import atomic_path

__all__ = ["plot"]


def plot(report: dict, path: str) -> None:
    """Figure-3 style: training time, training memory, test time, test memory."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError('`plot` needs matplotlib: pip install "ssf-deploy[bench]"') from e
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
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
