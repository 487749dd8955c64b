"""Reports: every run's rows in one DataFrame, summary tables (CSV, Markdown) and figures (PNG)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

IGNORED = {"run_dir", "seed"}  # config columns that never define a group


def load_results(results_dir: Path) -> pd.DataFrame:
    """One row per (run, epoch or round): the run's config columns, its metrics, run_id, kind, step."""
    frames = []
    for run_dir in sorted(p for p in Path(results_dir).iterdir() if (p / "rows.jsonl").exists()):
        config = json.loads((run_dir / "config.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines() if line.strip()]
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        kind = "centralized" if "epoch" in frame else "federated"
        frame["step"] = frame["epoch" if kind == "centralized" else "round"]
        for key, value in config.items():
            frame[key] = value
        frame["run_id"], frame["kind"], frame["done"] = run_dir.name, kind, (run_dir / "DONE").exists()
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no run with a rows.jsonl under {results_dir}; run a manifest first.")
    return pd.concat(frames, ignore_index=True)


def grid_axes(results_dir: Path, df: pd.DataFrame) -> list[str]:
    """The grid's axes (snake_case) from the manifest the runner saved, else the columns that vary."""
    saved = Path(results_dir) / "manifest.yaml"
    if not saved.exists():
        return varying(df)
    from experiments.manifest import load_manifest

    manifest = load_manifest(saved, Path(results_dir).parent)
    axes = [a.replace("-", "_") for a in manifest.axes]
    return (["kind"] if len({r.kind for r in manifest.runs}) > 1 else []) + [a for a in axes if a in df]


def varying(df: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs."""
    per_run = df.groupby("run_id").first()
    skip = IGNORED | {"step", "epoch", "round", "done"}
    candidates = [c for c in per_run.columns if c not in skip and not _is_metric(c)]
    return [c for c in candidates if per_run[c].astype(str).nunique() > 1]


def _is_metric(column: str) -> bool:
    return column.startswith(("train_", "val_", "test_", "bytes_", "wall_", "round_time", "learning_rate",
                              "density", "clients"))


def summarize(df: pd.DataFrame, axes: list[str] | None = None) -> pd.DataFrame:
    """Per run: final and best validation accuracy, final test accuracy and loss, steps, bytes per round,
    then the run's config (the grid axes first)."""
    axes = [a for a in (varying(df) if axes is None else axes) if a != "kind"]
    skip = {"step", "epoch", "round", "done", "run_id", "kind", "run_dir"}
    config_columns = axes + [c for c in df.columns if c not in axes and c not in skip and not _is_metric(c)]
    out = []
    for run_id, g in df.groupby("run_id", sort=True):
        g = g.sort_values("step")
        val = g.dropna(subset=["val_accuracy"]) if "val_accuracy" in g else g.iloc[:0]
        test = g.dropna(subset=["test_accuracy"]) if "test_accuracy" in g else g.iloc[:0]
        trained = g[g["step"] > 0]
        out.append({
            "run_id": run_id, "kind": g["kind"].iloc[0], "done": bool(g["done"].iloc[0]), "steps": int(g["step"].max()),
            "final_val_accuracy": val["val_accuracy"].iloc[-1] if len(val) else np.nan,
            "best_val_accuracy": val["val_accuracy"].max() if len(val) else np.nan,
            "final_test_accuracy": test["test_accuracy"].iloc[-1] if len(test) else np.nan,
            "final_test_loss": test["test_loss"].iloc[-1] if len(test) else np.nan,
            "bytes_per_round": trained["bytes_received"].mean() if "bytes_received" in trained else np.nan,
            **{c: g[c].iloc[0] for c in config_columns},
        })
    return pd.DataFrame(out)


def over_seeds(summary: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of each grid point's accuracies."""
    metrics = ["final_val_accuracy", "best_val_accuracy", "final_test_accuracy"]
    keys = axes or ["kind"]
    grouped = summary.groupby(keys, dropna=False)[metrics]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std")).join(
        grouped.size().rename("seeds"))
    return table.reset_index()


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in df.values]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(df.columns)] + lines[1:])


def best_centralized(summary: pd.DataFrame) -> pd.Series | None:
    """The centralized run with the best validation accuracy (never the test accuracy)."""
    central = summary[summary["kind"] == "centralized"].dropna(subset=["best_val_accuracy"])
    return None if central.empty else central.loc[central["best_val_accuracy"].idxmax()]


def write_report(results_dir: Path) -> Path:
    """summary.csv, by_config.csv, figures/*.png and report.md in `results_dir`; the report's path."""
    results_dir = Path(results_dir)
    df = load_results(results_dir)
    axes = grid_axes(results_dir, df)
    summary = summarize(df, axes)
    table = over_seeds(summary, axes)
    summary.to_csv(results_dir / "summary.csv", index=False)
    table.to_csv(results_dir / "by_config.csv", index=False)
    figures = results_dir / "figures"
    figures.mkdir(exist_ok=True)
    for old in figures.glob("*.png"):  # figures of axes that no longer vary must not linger
        old.unlink()
    from experiments.figures import make_figures

    made = make_figures(df, summary, axes, figures)
    lines = [f"# Report: {results_dir.name}", "", f"{summary['run_id'].nunique()} runs "
             f"({int(summary['done'].sum())} finished). Accuracies in %, test accuracy at the last step.", ""]
    best = best_centralized(summary)
    if best is not None:
        central = summary[summary["kind"] == "centralized"]
        tuned = [a for a in axes if a in central and central[a].astype(str).nunique() > 1]
        chosen = ", ".join(f"{a.replace('_', '-')}={best[a]}" for a in tuned) or best["run_id"]
        lines += [f"**Best centralized hyperparameters by validation accuracy:** {chosen}: validation "
                  f"{100 * best['best_val_accuracy']:.2f}%, test {100 * best['final_test_accuracy']:.2f}%.", ""]
    shown = table.copy()
    for col in [c for c in shown.columns if "accuracy" in c]:
        shown[col] = (100 * shown[col]).round(2)
    lines += ["## Results by configuration (mean and std over seeds)", "", markdown_table(shown), ""]
    lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in made]
    report = results_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
