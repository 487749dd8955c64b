"""Paired statistics: each arm of a study against its control over the same seeds (the seeds pair them: same
shards, client sampling, batch order), as the mean paired difference in test accuracy with a 95% t-interval."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

CONFIDENCE = 0.95


def paired_differences(summary: pd.DataFrame, axes: list[str], control: dict[str, object]) -> pd.DataFrame:
    """One row per arm: the configuration that differs from a control configuration (the manifest's `control`
    values, e.g. {optimizer: sgdm}) and agrees with it on every other axis that applies to the control. Columns:
    arm, control, n (seeds both ran), mean and interval of arm minus control test accuracy, and the verdict."""
    axes = [a for a in axes if a not in ("kind", "seed")]
    keys = {k.replace("-", "_"): v for k, v in control.items()}
    runs = summary.dropna(subset=["test_accuracy"])
    runs = runs[runs["diverged"].isna()] if "diverged" in runs else runs
    is_control = pd.Series(True, index=runs.index)
    for key, value in keys.items():
        is_control &= runs[key].astype(str) == str(value) if key in runs else False
    controls, arms = runs[is_control], runs[~is_control]
    out = []
    for values, arm in arms.groupby(axes, dropna=False, sort=True) if axes else []:
        values = dict(zip(axes, values if isinstance(values, tuple) else (values,)))
        first = controls
        for a in axes:  # the control agrees with the arm wherever the control's key applies
            if a in keys:
                continue
            first = first[first[a].isna() | (first[a].astype(str) == str(values[a]))]
        if first.empty or first.groupby(axes, dropna=False).ngroups != 1:
            continue  # no control, or several that fit: nothing to pair with
        paired = arm.set_index("seed")["test_accuracy"].to_frame("arm").join(
            first.set_index("seed")["test_accuracy"].rename("control"), how="inner")
        out.append({"arm": _label(values, axes), "control": _label(first.iloc[0], axes), **_interval(
            paired["arm"] - paired["control"])})
    return pd.DataFrame(out, columns=["arm", "control", "n", "mean", "low", "high", "verdict"])


def _interval(diff: pd.Series) -> dict:
    n, mean = len(diff), float(diff.mean()) if len(diff) else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan, "verdict": "one seed: no interval"}
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    verdict = "no difference shown" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    return {"n": n, "mean": mean, "low": low, "high": high, "verdict": verdict}


def _label(values, axes: list[str]) -> str:
    shown = []
    for a in axes:
        v = values[a]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        v = int(v) if isinstance(v, float) and v.is_integer() and abs(v) >= 1 else v
        shown.append(f"{a.replace('_', '-')}={v}")
    return " ".join(shown) or "-"


def paired_table(diffs: pd.DataFrame) -> str:
    """The paired differences as markdown, in percentage points."""
    lines = ["| arm | control | n | arm - control (pp) | 95% interval (pp) | |", "|---|---|---|---|---|---|"]
    for _, r in diffs.iterrows():
        interval = "-" if math.isnan(r["low"]) else f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]"
        lines.append(f"| {r['arm']} | {r['control']} | {r['n']} | {100 * r['mean']:+.2f} | {interval} | {r['verdict']} |")
    return "\n".join(lines)
