"""Per-run curves from rows.jsonl: test (and validation) loss and accuracy against epoch or round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(rows: list[dict[str, Any]], out: Path, x: str = "epoch", title: str = "") -> Path:
    """Two panels, loss and accuracy; one line per split present in the rows."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("test", "-"), ("val", "--")):
        pts = [r for r in rows if r.get(f"{split}_accuracy") is not None]
        if not pts:
            continue
        xs = [r[x] for r in pts]
        ax_loss.plot(xs, [r[f"{split}_loss"] for r in pts], style, marker="o", ms=3, label=split)
        ax_acc.plot(xs, [100 * r[f"{split}_accuracy"] for r in pts], style, marker="o", ms=3, label=split)
    for ax, ylabel in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
