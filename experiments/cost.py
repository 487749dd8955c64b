"""The whole bill of each federated run: bytes the clients uploaded (step 0 and calibration included, which
row 0 holds) and wall time, and the test accuracy bought with them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.figures import _distinct, _label, plt


def with_cumulative_cost(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with each row's `upload_so_far`: bytes received by the server up to and including that row (row 0:
    step 0's queries and calibration's Fisher scores)."""
    received = df["bytes_received"] if "bytes_received" in df else pd.Series(0.0, index=df.index)
    ordered = df.assign(received=received.fillna(0.0)).sort_values(["run_id", "step"])
    return df.assign(upload_so_far=ordered.groupby("run_id")["received"].cumsum())


def run_cost(g: pd.DataFrame) -> dict[str, float]:
    """A run's bill (its rows sorted by step): bytes uploaded in all, of which in step 0; wall time in all."""
    received = g["bytes_received"].fillna(0.0) if "bytes_received" in g else pd.Series(0.0, index=g.index)
    return {"upload_total": float(received.sum()), "upload_step0": float(received[g["step"] == 0].sum()),
            "wall_time_total": float(g["wall_time"].max()) if "wall_time" in g else float("nan")}


def accuracy_against_cost(df: pd.DataFrame, axes: list[str], out: Path) -> Path | None:
    """Test accuracy against cumulative upload and against wall time, one line per configuration (mean over
    its seeds at each tested step); None without federated runs tested at least twice."""
    runs = df[(df["kind"] == "federated")].dropna(subset=["test_accuracy"]) if "test_accuracy" in df else df[:0]
    if runs.empty or runs.groupby("run_id").size().max() < 2 or "bytes_received" not in df:
        return None
    costed = with_cumulative_cost(df[df["kind"] == "federated"]).dropna(subset=["test_accuracy"])
    if "wall_time" not in costed:
        costed = costed.assign(wall_time=float("nan"))
    shown = _distinct(costed.groupby("run_id").first(), [a for a in axes if a not in ("kind", "seed")])
    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, g in costed.groupby(shown, dropna=False) if shown else [((), costed)]:
        mean = g.groupby("step")[["upload_so_far", "wall_time", "test_accuracy"]].mean()
        label = _label(g.iloc[0], shown) or "all runs"
        ax_bytes.plot(mean["upload_so_far"] / 2**20, 100 * mean["test_accuracy"], marker=".", label=label)
        ax_time.plot(mean["wall_time"], 100 * mean["test_accuracy"], marker=".", label=label)
    ax_bytes.set_xlabel("MiB uploaded by the clients so far (step 0 and calibration included)")
    ax_time.set_xlabel("wall time (s)")
    for ax in (ax_bytes, ax_time):
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
    handles, labels = ax_bytes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Test accuracy against what it cost: upload and time")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(out / "accuracy_by_cost.png", dpi=110)
    plt.close(fig)
    return out / "accuracy_by_cost.png"
