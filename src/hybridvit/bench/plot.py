"""The paper's Figure 1: measured speed against (paper) ImageNet top-1."""

from __future__ import annotations

from pathlib import Path

from .throughput import BenchResult


def plot_speed_accuracy(rows: list[BenchResult], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[str, list[BenchResult]] = {}  # one curve per family and implementation (backend, precision)
    for r in rows:
        if r.paper_top1 is not None:
            variant = r.name.split("(")[-1].rstrip(")") if "(" in r.name else ""
            family = r.model.split("_")[0]
            series.setdefault(f"{r.source} {variant} [{family}]".replace("  ", " "), []).append(r)
    annotated = next((label for label in series if label.startswith("hybridvit")), None)  # names on one curve
    for label, members in series.items():
        members.sort(key=lambda r: r.paper_top1)
        ours = label.startswith("hybridvit")
        ax.plot([r.images_per_second for r in members], [r.paper_top1 for r in members],
                "o-" if ours else "s--", label=label, linewidth=2 if ours else 1)
        if label == annotated:
            for r in members:
                ax.annotate(r.name, (r.images_per_second, r.paper_top1), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="images / second (measured)", ylabel="ImageNet top-1 (%, from the papers)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
