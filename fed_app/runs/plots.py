"""Per-run curves from rows.jsonl: test (and validation) loss and accuracy against epoch or round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fed_app.config import RunConfig  # noqa: E402


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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def run_title(cfg: RunConfig, kind: str) -> str:
    """What a run is, in a line: 'federated 2c8ec27c2d: FedAvg, sparse-sgdm at sparsity 0.9 (head ridge),
    noniid Nc=5, J=4, lr 0.01'."""
    parts = []
    if kind == "federated":
        parts.append({"fedavg": "FedAvg", "scaffold": "SCAFFOLD"}.get(cfg.client_algorithm, cfg.client_algorithm)
                     + (f" + {cfg.server_optimizer}" if cfg.server_optimizer != "fedavg" else "")
                     + (f", prox-mu {cfg.prox_mu}" if cfg.prox_mu else ""))
    parts.append(f"{cfg.optimizer} at sparsity {cfg.sparsity}" if cfg.optimizer == "sparse-sgdm" else cfg.optimizer)
    if cfg.head != "none":
        parts[-1] += f" (head {cfg.head})"
    if kind == "federated":
        skew = {"iid": "iid", "noniid": f"noniid Nc={cfg.classes_per_client}",
                "dirichlet": f"Dirichlet alpha={cfg.dirichlet_alpha}"}[cfg.partition]
        parts += [skew, f"J={cfg.local_steps}"]
    parts.append(f"lr {cfg.lr}, seed {cfg.seed}")
    return f"{kind} {cfg.run_id()}: {', '.join(parts)}"
