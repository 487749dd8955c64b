"""Reports: a results folder's tables (CSV, Markdown), figures (PNG) and report.md, read through experiments.tables."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.cost import accuracy_against_cost
from experiments.figures import client_classes, make_figures, mask_layers, methods_figure
from experiments.threat_figures import threat_figures
from experiments.manifest import load_manifest
from experiments.methods import level_and_method_order, methods_by_level
from experiments.paired import paired_differences, paired_table
from experiments.selection import edge_winners, select_best
from experiments.tables import NoResultsError, load_results, over_seeds, summarize, varying
from fed_app.errors import UserError

log = logging.getLogger(__name__)


def manifest_run_ids(results_dir: Path) -> set[str] | None:
    """The run ids of the manifest the runner saved, with its tuned values as they stand; None without a
    saved manifest or when its tuned values cannot be read (its tuning results are elsewhere)."""
    saved = Path(results_dir) / "manifest.yaml"
    if not saved.exists():
        return None
    try:
        return {r.run_id for r in load_manifest(saved, Path(results_dir).parent).runs}
    except UserError:
        return None


def grid_axes(results_dir: Path, df: pd.DataFrame) -> tuple[list[str], dict]:
    """The grid's axes (snake_case) and its control arm, from the manifest the runner saved; else the columns
    that vary, and no control."""
    saved = Path(results_dir) / "manifest.yaml"
    if not saved.exists():
        return varying(df), {}
    manifest = load_manifest(saved, Path(results_dir).parent, resolve_tuned=False)
    axes = [a.replace("-", "_") for a in manifest.axes]
    kinds = ["kind"] if len({r.kind for r in manifest.runs}) > 1 else []
    return kinds + [a for a in axes if a in df], manifest.control


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
    if "epsilon_mean" in table and table["epsilon_mean"].notna().any():  # dp != 'none', at each run's dp-delta
        shown["epsilon (fine-tuning rounds)"] = [_cell(round(e, 3)) for e in table["epsilon_mean"]]
    if "diverged" in table and table["diverged"].any():
        shown["diverged"] = table["diverged"].map(lambda d: f"{d} diverged" if d else "")
    return shown


def write_report(results_dir: Path, rule: str = "final") -> Path:
    """summary.csv, by_config.csv, figures/*.png and report.md in `results_dir`; the report's path. Runs are
    selected and reported at the same checkpoint `rule` ('final' or 'best-val'); another rule than 'final' writes
    beside the default report, each file's name ending in the rule (report-best-val.md, figures-best-val/)."""
    results_dir = Path(results_dir)
    suffix = "" if rule == "final" else f"-{rule}"
    df = load_results(results_dir)
    # Run folders of an earlier grid or earlier tuned values stay on disk (never deleted for the user) but are
    # not this manifest's runs: they must not enter its tables, selections or pairs.
    ids = manifest_run_ids(results_dir)
    stale = [] if ids is None else sorted(set(df["run_id"]) - ids)
    df = df[~df["run_id"].isin(stale)]
    if df.empty:
        raise NoResultsError(f"none of the runs under {results_dir} is a run of its manifest as it stands; run "
                             f"the manifest first.")
    axes, control = grid_axes(results_dir, df)
    summary = summarize(df, axes, rule)
    table = over_seeds(summary, axes)
    summary.to_csv(results_dir / f"summary{suffix}.csv", index=False)
    table.to_csv(results_dir / f"by_config{suffix}.csv", index=False)
    figures = results_dir / f"figures{suffix}"
    figures.mkdir(exist_ok=True)
    for old in figures.glob("*.png"):  # figures of axes that no longer vary must not linger
        old.unlink()
    diverged = summary[summary["diverged"].notna()]
    learned = summary[summary["diverged"].isna()]  # a diverged run's numbers are drawn nowhere
    drawn = df[df["run_id"].isin(learned["run_id"])]
    made = make_figures(drawn, learned, axes, figures)
    made += threat_figures(summary, axes, figures)  # they show diverged runs as such
    made += client_classes(results_dir, figures)
    made += [p for p in [mask_layers(results_dir, figures, learned["run_id"]), accuracy_against_cost(drawn, axes, figures)]
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
    if stale:
        lines += [f"{len(stale)} run folders here are not runs of the manifest as it stands (an earlier grid or "
                  f"earlier tuned values) and are left out: {', '.join(stale)}.", ""]
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
        diffs.to_csv(results_dir / f"paired{suffix}.csv", index=False)
        lines += ["## Each arm against its control, paired by seed", "",
                  f"Test accuracy of the arm minus its control ({', '.join(f'{k}={v}' for k, v in control.items())}, "
                  f"the same other settings) at the same seed, the mean over seeds with a 95% t-interval; where the "
                  f"interval holds zero no difference is shown.", "", paired_table(diffs), ""]
    if table["n"].max() == 1:
        lines += ["Every configuration ran one seed: its numbers carry no spread, and no difference here is shown "
                  "beyond the noise of one run.", ""]
    lines += ["## Results by configuration", "", markdown_table(shown_table(table, axes)), ""]
    if "epsilon_mean" in table and table["epsilon_mean"].notna().any():
        lines += [f"epsilon: what the run's fine-tuning rounds spend at its dp-delta, by Flower's RDP accountant at "
                  f"replace-one sensitivity 2C (strategies/privacy.py); step 0, the Fisher scores, the mask and tuning "
                  f"are outside it (each client's step-0 sums and Fisher scores reach the server as computed).", ""]
    lines += ["## Figures", ""] + [f"![{p.stem}]({figures.name}/{p.name})" for p in made]
    report = results_dir / f"report{suffix}.md"
    report.write_text("\n".join(lines) + "\n")
    return report
