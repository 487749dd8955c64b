"""The privacy and robustness studies' figures: test accuracy against epsilon (privacy.yaml) and per aggregation
rule x attack (robustness.yaml). Drawn when the summary holds DP runs, or varies both the rule and the attack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullLocator

from experiments.figures import _distinct, _label, _save, _save_with_legend, plt


def threat_figures(summary: pd.DataFrame, axes: list[str], out: Path) -> list[Path]:
    made = []
    if "epsilon" in summary and summary["epsilon"].notna().any():
        made.append(accuracy_against_epsilon(summary, axes, out))
    if {"aggregation", "attack"} <= set(axes) and summary["attack"].astype(str).nunique() > 1:
        made.append(accuracy_by_rule_and_attack(summary, axes, out))
    return made


def accuracy_against_epsilon(summary: pd.DataFrame, axes: list[str], out: Path) -> Path:
    """Test accuracy against the epsilon a run spent (at its checkpoint), one line per configuration of the other
    axes (mean ± std over seeds at each noise multiplier), and the same configuration without DP (dp='none') as a
    dashed line in its colour: what the privacy costs."""
    failed = summary["diverged"].notna() if "diverged" in summary else pd.Series(False, index=summary.index)
    private = summary[summary["epsilon"].notna() & ~failed]  # a diverged run stopped early: it spent less
    lost = summary[summary["epsilon"].notna() & failed]
    others = _distinct(private, [a for a in axes if a not in ("seed", "kind") and not a.startswith("dp")])
    groups = list(private.groupby(others, dropna=False)) if others else [((), private)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        colour = plt.get_cmap("tab10").colors[i % 10]
        stats = g.groupby("dp_noise_multiplier").agg(epsilon=("epsilon", "mean"), mean=("test_accuracy", "mean"),
                                                     std=("test_accuracy", "std"), n=("test_accuracy", "count"))
        stats = stats.sort_values("epsilon")
        label = _label(pd.Series(dict(zip(others, key))), others) or "DP"
        spread = 100 * stats["std"].fillna(0) if stats["n"].max() > 1 else None  # no spread from one seed
        ax.errorbar(stats["epsilon"], 100 * stats["mean"], yerr=spread, marker="o", capsize=3, color=colour,
                    label=label)
        gone = lost
        for a, v in zip(others, key):
            gone = gone[gone[a].astype(str) == str(v)]
        for sigma, d in gone.groupby("dp_noise_multiplier"):  # said where the point is (or would be, at the bottom)
            where = stats.loc[sigma] if sigma in stats.index else None
            x = where["epsilon"] if where is not None else d["epsilon"].max()
            y = 100 * where["mean"] if where is not None else 0
            ax.annotate(f"{len(d)} diverged", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=colour)
            if where is None:
                ax.plot([x], [y], marker="x", color=colour, clip_on=False)
        plain = summary[((summary["dp"] == "none") if "dp" in summary else summary["epsilon"].isna()) & ~failed]
        for a, v in zip(others, key):
            plain = plain[plain[a].astype(str) == str(v)]
        if len(plain):
            ax.axhline(100 * plain["test_accuracy"].mean(), linestyle="--", color=colour, alpha=0.7,
                       label=f"{label}, no DP")
    if "step0_test_accuracy" in summary and summary["step0_test_accuracy"].notna().any():  # where fine-tuning began
        ax.axhline(100 * summary["step0_test_accuracy"].mean(), linestyle=":", color="grey",
                   label="step 0, before fine-tuning (mean)")
    ax.set_xscale("log")
    spent = sorted(set(private["epsilon"].round(2)))
    ax.set_xticks(spent, [f"{e:g}" for e in spent])  # the epsilons the grid spent, not a log scale's minor labels
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("epsilon spent by the fine-tuning rounds (at each run's dp-delta; lower is more private;\n"
                  "step 0, the Fisher scores, the mask and tuning are not counted)")
    n = sorted(set(private.groupby([*others, "dp_noise_multiplier"], dropna=False).size().tolist()))
    ax.set_ylabel("test accuracy (%)" + (", one seed" if n == [1] else f", mean ± std, n={n[-1]} seeds"))
    ax.grid(alpha=0.3)
    ax.set_title("Test accuracy against epsilon")
    return _save_with_legend(fig, ax, out / "accuracy_against_epsilon.png", ncol=2)


def accuracy_by_rule_and_attack(summary: pd.DataFrame, axes: list[str], out: Path) -> Path:
    """A heatmap per configuration of the other axes (e.g. dense and sparse): rows the aggregation rules, columns
    the attacks (with their fraction), each cell the mean test accuracy over the seeds that did not diverge
    (± std), and how many diverged: the mean under sign flipping is the cell that shows why robust rules exist."""
    s = summary.copy()
    fraction = s["attack_fraction"] if "attack_fraction" in s else pd.Series(np.nan, index=s.index)
    s["threat"] = [a if a == "none" or pd.isna(f) else f"{a} {100 * f:.0f}%" for a, f in zip(s["attack"], fraction)]
    s["failed"] = s["diverged"].notna() if "diverged" in s else False
    panels_by = _distinct(s, [a for a in axes if a not in ("seed", "kind", "aggregation", "attack", "attack_fraction")])
    panels = list(s.groupby(panels_by, dropna=False)) if panels_by else [((), s)]
    columns = ["none"] + sorted(set(s["threat"]) - {"none"})
    rules = list(dict.fromkeys(["fedavg", *sorted(set(s["aggregation"]) - {"fedavg"})]))
    top = 100 * s.loc[~s["failed"], "test_accuracy"].max()
    fig, axs = plt.subplots(1, len(panels), figsize=(1.5 * len(columns) * len(panels) + 2.5, 0.65 * len(rules) + 1.8),
                            squeeze=False, sharey=True)
    for ax, (key, g) in zip(axs[0], panels):
        learned = g[~g["failed"]]
        mean = learned.pivot_table(index="aggregation", columns="threat", values="test_accuracy", aggfunc="mean")
        std = learned.pivot_table(index="aggregation", columns="threat", values="test_accuracy", aggfunc="std")
        failed = g.pivot_table(index="aggregation", columns="threat", values="failed", aggfunc="sum")
        mean, std, failed = (t.reindex(index=rules, columns=columns) for t in (mean, std, failed))
        image = ax.imshow(100 * mean.fillna(0).values, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=20)
        ax.set_yticks(range(len(rules)), rules)
        for (i, j), v in np.ndenumerate(mean.values):
            lost = int(failed.values[i, j]) if not np.isnan(failed.values[i, j]) else 0
            spread = std.values[i, j]
            text = "" if np.isnan(v) else f"{100 * v:.1f}" + ("" if np.isnan(spread) else f"\n±{100 * spread:.1f}")
            text += f"\n{lost} diverged" if lost else ""
            light = not np.isnan(v) and 100 * v > 0.6 * top
            ax.text(j, i, text.strip() or "-", ha="center", va="center", color="k" if light else "w", fontsize=7)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(_label(pd.Series(dict(zip(panels_by, key))), panels_by) or "test accuracy", fontsize=9)
    fig.colorbar(image, ax=axs[0].tolist(), label="test accuracy (%), runs that did not diverge")
    fig.suptitle("Test accuracy: aggregation rule x attack (mean ± std over seeds)")
    return _save(fig, out / "accuracy_by_rule_and_attack.png")
