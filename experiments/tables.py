"""Every run's rows in one DataFrame, and the tables made from it: one row per run at a checkpoint rule, one
per configuration over seeds. What the report, the selection of tuned values and the miniature's summary read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.cost import run_cost
from fed_app.applicability import key_applies
from fed_app.errors import UserError
from fed_app.runs.rundir import read_rows

# config columns that never define a group (claim_token, session: in the config.json of runs made before the
# commands' plumbing left RunConfig)
IGNORED = {"run_dir", "seed", "claim_token", "session", "tracker"}
RULES = ("final", "best-val")  # which step of a run is selected on and reported: the last, or best validation


class NoResultsError(UserError, FileNotFoundError):
    """A results folder without any run's rows."""


def load_results(results_dir: Path) -> pd.DataFrame:
    """One row per (run, epoch or round): the run's config columns, its metrics, run_id, kind, step. A config
    key that does not shape the run (e.g. sparsity of a dense run, epochs of a federated one) is left empty."""
    if not Path(results_dir).is_dir():
        raise NoResultsError(f"results folder {results_dir} does not exist; give results/<manifest name> of a "
                             f"manifest that has run.")
    frames = []
    for run_dir in sorted(p for p in Path(results_dir).iterdir() if (p / "rows.jsonl").exists()):
        config = json.loads((run_dir / "config.json").read_text())
        rows = read_rows(run_dir / "rows.jsonl")  # a torn last line (a run cut mid-write) left out
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        kind = "centralized" if "epoch" in frame else "federated"
        frame["step"] = frame["epoch" if kind == "centralized" else "round"]
        for key, value in config.items():
            frame[key] = value if key_applies(key, kind, config) else None
        frame["run_id"], frame["kind"], frame["done"] = run_dir.name, kind, (run_dir / "DONE").exists()
        diverged = run_dir / "DIVERGED"
        frame["diverged"] = diverged.read_text() if diverged.exists() else None
        frames.append(frame)
    if not frames:
        raise NoResultsError(f"no run with a rows.jsonl under {results_dir}; run a manifest first.")
    return pd.concat(frames, ignore_index=True)


def varying(df: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs."""
    per_run = df.groupby("run_id").first()
    skip = IGNORED | {"step", "epoch", "round", "done", "diverged"}
    candidates = [c for c in per_run.columns if c not in skip and not _is_metric(c)]
    return [c for c in candidates if per_run[c].astype(str).nunique() > 1]


def _is_metric(column: str) -> bool:
    return column.startswith(("train_", "val_", "test_", "bytes_", "wall_", "round_time", "learning_rate",
                              "density", "clients", "client_loss", "client_accuracy", "task_", "head_temperature", "head_loss", "head_evaluations",
                              "head_gradient", "step0_", "profile_", "epsilon", "attackers", "clipped",
                              "clipping_norm"))


def checkpoint_row(g: pd.DataFrame, rule: str) -> pd.Series | None:
    """The row of one run (sorted by step) that `rule` selects among rows with both validation and test
    metrics: the last one ('final'), or the one with the best validation accuracy ('best-val', earliest on ties)."""
    if rule not in RULES:
        raise ValueError(f"checkpoint rule {rule!r} is not one of {', '.join(RULES)}.")
    both = g.dropna(subset=[c for c in ("val_accuracy", "test_accuracy") if c in g]) if "val_accuracy" in g else g[:0]
    both = both[both["step"] > 0] if (both["step"] > 0).any() else both
    if both.empty or "test_accuracy" not in both:
        return None
    return both.iloc[-1] if rule == "final" else both.loc[both["val_accuracy"].idxmax()]


def summarize(df: pd.DataFrame, axes: list[str] | None = None, rule: str = "final") -> pd.DataFrame:
    """Per run, at the checkpoint `rule` selects: its step, validation accuracy, test accuracy and loss; the
    step-0 test numbers (after step 0 and calibration); bytes per round; then the run's config (axes first)."""
    axes = [a for a in (varying(df) if axes is None else axes) if a != "kind"]
    skip = {"step", "epoch", "round", "done", "diverged", "run_id", "kind", "run_dir"}
    config_columns = axes + [c for c in df.columns if c not in axes and c not in skip and not _is_metric(c)]
    out = []
    for run_id, g in df.groupby("run_id", sort=True):
        g = g.sort_values("step")
        chosen = checkpoint_row(g, rule)
        start = g[g["step"] == 0]
        trained = g[g["step"] > 0]
        out.append({
            "run_id": run_id, "kind": g["kind"].iloc[0], "done": bool(g["done"].iloc[0]),
            "diverged": g["diverged"].iloc[0] if "diverged" in g else None, "steps": int(g["step"].max()),
            "checkpoint": np.nan if chosen is None else int(chosen["step"]),
            **{m: np.nan if chosen is None else chosen[m] for m in ("val_accuracy", "test_accuracy", "test_loss")},
            # dp != 'none': the privacy its model at that checkpoint spent (at the run's dp-delta)
            **({"epsilon": np.nan if chosen is None else chosen["epsilon"]} if "epsilon" in g else {}),
            **{f"step0_{m}": start[m].iloc[0] if len(start) and m in start else np.nan
               for m in ("test_accuracy", "test_loss")},
            "bytes_per_round": trained["bytes_received"].mean() if "bytes_received" in trained else np.nan,
            **run_cost(g),
            **{c: g[c].iloc[0] for c in config_columns},
        })
    return pd.DataFrame(out)


METRICS = ["val_accuracy", "test_accuracy", "test_loss", "step0_test_accuracy", "step0_test_loss", "upload_total",
           "upload_step0", "wall_time_total"]


def over_seeds(summary: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean, std and n over seeds of each configuration's metrics (at the summary's checkpoint rule)."""
    keys = ["kind"] + [a for a in axes if a not in ("kind", "seed")]
    by_key = summary.groupby(keys, dropna=False)
    grouped = by_key[METRICS + (["epsilon"] if "epsilon" in summary else [])]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std")).join(
        by_key["test_accuracy"].count().rename("n")).join(by_key["diverged"].count().rename("diverged"))
    return table.reset_index()
