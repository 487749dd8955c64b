"""Reports: every run's rows in one DataFrame, summary tables (CSV, Markdown) and figures (PNG)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.cost import accuracy_against_cost, run_cost
from experiments.selection import edge_winners, select_best
from experiments.paired import paired_differences, paired_table
from fed_app.applicability import key_applies
from fed_app.errors import UserError

log = logging.getLogger(__name__)

IGNORED = {"run_dir", "seed", "claim_token", "session", "tracker"}  # config columns that never define a group
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
        rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines() if line.strip()]
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


def grid_axes(results_dir: Path, df: pd.DataFrame) -> tuple[list[str], dict]:
    """The grid's axes (snake_case) and its control arm, from the manifest the runner saved; else the columns
    that vary, and no control."""
    saved = Path(results_dir) / "manifest.yaml"
    if not saved.exists():
        return varying(df), {}
    from experiments.manifest import load_manifest

    manifest = load_manifest(saved, Path(results_dir).parent, resolve_tuned=False)
    axes = [a.replace("-", "_") for a in manifest.axes]
    kinds = ["kind"] if len({r.kind for r in manifest.runs}) > 1 else []
    return kinds + [a for a in axes if a in df], manifest.control


def varying(df: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs."""
    per_run = df.groupby("run_id").first()
    skip = IGNORED | {"step", "epoch", "round", "done", "diverged"}
    candidates = [c for c in per_run.columns if c not in skip and not _is_metric(c)]
    return [c for c in candidates if per_run[c].astype(str).nunique() > 1]


def _is_metric(column: str) -> bool:
    return column.startswith(("train_", "val_", "test_", "bytes_", "wall_", "round_time", "learning_rate",
                              "density", "clients", "client_loss", "client_accuracy", "task_", "head_temperature", "head_loss", "head_evaluations",
                              "head_gradient", "step0_", "profile_"))


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
    grouped = by_key[METRICS]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std")).join(
        by_key["test_accuracy"].count().rename("n")).join(by_key["diverged"].count().rename("diverged"))
    return table.reset_index()


SERVER_STEPS = {"fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}


def method_name(run: pd.Series) -> str:
    """A federated run's remedy for client drift, as papers name it: 'FedAvg', 'FedProx mu=0.01', 'SCAFFOLD',
    'FedAdam', or a combination ('SCAFFOLD + FedAdam')."""
    def value(key: str, default):
        v = run.get(key, default)
        return default if v is None or (isinstance(v, float) and np.isnan(v)) else v

    parts = ["SCAFFOLD"] if value("client_algorithm", "fedavg") == "scaffold" else []
    if float(value("prox_mu", 0.0)) > 0:
        parts.append(f"FedProx mu={float(value('prox_mu', 0.0)):g}")
    step = value("server_optimizer", "fedavg")
    parts += [SERVER_STEPS[step]] if step in SERVER_STEPS else []
    return " + ".join(parts) or "FedAvg"


def heterogeneity_level(run: pd.Series) -> tuple[int, float, str]:
    """(order, strength, label) of a federated run's label skew: pathological shards 'Nc=1' first, then
    Dirichlet 'alpha=0.1' by alpha, then 'iid' last (most to least skewed within each protocol)."""
    if run.get("partition") == "noniid":
        nc = int(run["classes_per_client"])
        return 0, nc, f"Nc={nc}"
    if run.get("partition") == "dirichlet":
        alpha = float(run["dirichlet_alpha"])
        return 1, alpha, f"Dirichlet alpha={alpha:g}"
    return 2, 0.0, "iid"


def methods_by_level(summary: pd.DataFrame) -> pd.DataFrame | None:
    """Test accuracy per remedy and heterogeneity level over the federated runs (mean, std, n over seeds and
    any other settings sharing both), levels from most to least skewed and FedAvg first; None unless at least
    two remedies were run."""
    runs = summary[summary["kind"] == "federated"].dropna(subset=["test_accuracy"])
    if runs.empty:
        return None
    levels = runs.apply(heterogeneity_level, axis=1)
    runs = runs.assign(method=runs.apply(method_name, axis=1), level_key=levels.map(lambda v: v[:2]),
                       level=levels.map(lambda v: v[2]))
    if runs["method"].nunique() < 2:
        return None
    stats = runs.groupby(["level_key", "level", "method"])["test_accuracy"].agg(["mean", "std", "count"])
    stats = stats.reset_index().rename(columns={"count": "n"})
    stats["first"] = stats["method"] != "FedAvg"
    return stats.sort_values(["level_key", "first", "method"]).drop(columns=["level_key", "first"])


def level_and_method_order(stats: pd.DataFrame) -> tuple[list[str], list[str]]:
    """methods_by_level's levels (most skewed first) and methods (FedAvg first), as the table and figure show them."""
    methods = stats.sort_values("method", key=lambda m: m != "FedAvg", kind="stable")["method"]
    return list(dict.fromkeys(stats["level"])), list(dict.fromkeys(methods))


def method_table(stats: pd.DataFrame) -> str:
    """methods_by_level as markdown: a row per remedy, a column per level, mean ± std (n) in %."""
    levels, methods = level_and_method_order(stats)
    cells = {(r["method"], r["level"]): _pm(r["mean"], r["std"], int(r["n"])) for _, r in stats.iterrows()}
    table = pd.DataFrame([[m] + [cells.get((m, lv), "-") for lv in levels] for m in methods],
                         columns=["method"] + levels)
    return markdown_table(table)


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in df.values]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(df.columns)] + lines[1:])


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    """'84.12 ± 0.31 (n=3)'; a single run has no std."""
    if pd.isna(mean):
        return "-"
    spread = "" if pd.isna(std) else f" ± {scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f}{spread} (n={n})"


def _cell(value) -> str:
    """A config value as written in a manifest: empty when the key does not apply, 5 rather than 5.0."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return str(value)


def shown_table(table: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """by_config as the report shows it: the configuration's applicable keys, then mean ± std (n)."""
    keys = ["kind"] + [a for a in axes if a not in ("kind", "seed")]
    shown = table[keys].astype(object).map(_cell)
    shown.columns = [k.replace("_", "-") for k in keys]
    for metric, name, scale in (("val_accuracy", "val acc %", 100), ("test_accuracy", "test acc %", 100),
                                ("test_loss", "test loss", 1), ("step0_test_accuracy", "step-0 test acc %", 100)):
        shown[name] = [_pm(m, s, n, scale, 2 if scale == 100 else 3)
                       for m, s, n in zip(table[f"{metric}_mean"], table[f"{metric}_std"], table["n"])]
    if (table["kind"] == "federated").any():  # the whole upload, and the part step 0 and calibration took
        shown["upload MiB (step 0)"] = [f"{t / 2**20:.1f} ({z / 2**20:.1f})" if t > 0 else "" for t, z in
                                        zip(table["upload_total_mean"], table["upload_step0_mean"])]
    if "diverged" in table and table["diverged"].any():
        shown["diverged"] = table["diverged"].map(lambda d: f"{d} diverged" if d else "")
    return shown


def write_report(results_dir: Path, rule: str = "final") -> Path:
    """summary.csv, by_config.csv, figures/*.png and report.md in `results_dir`; the report's path. Runs are
    selected and reported at the same checkpoint `rule` ('final' or 'best-val')."""
    results_dir = Path(results_dir)
    df = load_results(results_dir)
    axes, control = grid_axes(results_dir, df)
    summary = summarize(df, axes, rule)
    table = over_seeds(summary, axes)
    summary.to_csv(results_dir / "summary.csv", index=False)
    table.to_csv(results_dir / "by_config.csv", index=False)
    figures = results_dir / "figures"
    figures.mkdir(exist_ok=True)
    for old in figures.glob("*.png"):  # figures of axes that no longer vary must not linger
        old.unlink()
    from experiments.figures import client_classes, make_figures, mask_layers, methods_figure

    diverged = summary[summary["diverged"].notna()]
    learned = summary[summary["diverged"].isna()]  # a diverged run's numbers are drawn nowhere
    drawn = df[df["run_id"].isin(learned["run_id"])]
    made = make_figures(drawn, learned, axes, figures)
    made += client_classes(results_dir, figures)
    made += [p for p in [mask_layers(results_dir, figures), accuracy_against_cost(drawn, axes, figures)]
             if p is not None]
    where = {"final": "at each run's last evaluated step", "best-val": "at each run's best-validation step"}[rule]
    lines = [f"# Report: {results_dir.name}", "", f"{summary['run_id'].nunique()} runs "
             f"({int(summary['done'].sum())} finished, {len(diverged)} diverged). Checkpoint rule `{rule}`: configurations are selected by "
             f"validation accuracy and reported by test accuracy, both {where}; mean ± std over n seeds. Step 0 is "
             f"the model after step 0 (head) and mask calibration, before any fine-tuning.", ""]
    for kind in ("centralized", "federated"):
        best = select_best(table, kind)
        if best is None or (table["kind"] == kind).sum() < 2:
            continue
        rows = table[table["kind"] == kind]
        tuned = [a for a in axes if a in rows and rows[a].astype(str).nunique() > 1]
        chosen = ", ".join(f"{a.replace('_', '-')}={best[a]}" for a in tuned if pd.notna(best[a])) or "-"
        edges = edge_winners(rows, best, tuned)
        flag = f" **At the edge of its grid:** {'; '.join(edges)}." if edges else ""
        lines += [f"**Best {kind} configuration by validation accuracy:** {chosen}: validation "
                  f"{_pm(best['val_accuracy_mean'], best['val_accuracy_std'], best['n'])}, test "
                  f"{_pm(best['test_accuracy_mean'], best['test_accuracy_std'], best['n'])}.{flag}", ""]
    if len(diverged):
        lines += [f"## Diverged runs ({len(diverged)})", "", "Stopped by the divergence guard (marked DIVERGED, not "
                  "DONE): they lose every selection and are drawn in no figure.", "",
                  markdown_table(diverged[["run_id", *[a for a in axes if a in diverged and a != "kind"], "diverged"]]
                                 .astype(object).map(_cell)), ""]
    remedies = methods_by_level(learned)
    if remedies is not None:
        lines += ["## Test accuracy per method and heterogeneity level", "", method_table(remedies), ""]
        made.append(methods_figure(remedies, figures))
    if control:
        diffs = paired_differences(summary, axes, control)
        diffs.to_csv(results_dir / "paired.csv", index=False)
        lines += ["## Each arm against its control, paired by seed", "",
                  f"Test accuracy of the arm minus its control ({', '.join(f'{k}={v}' for k, v in control.items())}, "
                  f"the same other settings) at the same seed, the mean over seeds with a 95% t-interval; where the "
                  f"interval holds zero no difference is shown.", "", paired_table(diffs), ""]
    if table["n"].max() == 1:
        lines += ["Every configuration ran one seed: its numbers carry no spread, and no difference here is shown "
                  "beyond the noise of one run.", ""]
    lines += ["## Results by configuration", "", markdown_table(shown_table(table, axes)), ""]
    lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in made]
    report = results_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
