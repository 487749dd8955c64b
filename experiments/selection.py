"""Selection on validation: the configuration a search picks (a diverged one losing to every other), and
whether it won at the edge of its grid."""

from __future__ import annotations

import pandas as pd


def select_best(table: pd.DataFrame, kind: str | None = None) -> pd.Series | None:
    """The configuration with the best mean validation accuracy (never the test accuracy), of one kind; one
    whose run diverged at any seed loses to every other."""
    rows = table if kind is None else table[table["kind"] == kind]
    rows = rows.dropna(subset=["val_accuracy_mean"])
    if "diverged" in rows and (rows["diverged"] == 0).any():
        rows = rows[rows["diverged"] == 0]
    return None if rows.empty else rows.loc[rows["val_accuracy_mean"].idxmax()]


def equals(column: pd.Series, value) -> pd.Series:
    """Where a results column holds `value`: numerically for a number (a column with gaps is float, so
    classes-per-client 5 reads back as 5.0), as text otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return pd.to_numeric(column, errors="coerce") == float(value)
    return column.astype(str) == str(value)


# Hyperparameters a search tunes (not arms of a comparison, like sparsity): where a winner at an edge means a
# grid to extend.
TUNABLE = {"lr", "weight_decay", "momentum", "epochs", "step_size", "gamma", "server_lr", "server_momentum",
           "server_tau", "prox_mu", "logistic_lambda", "ridge_lambda", "head_epochs", "head_rounds"}


def edge_winners(rows: pd.DataFrame, best: pd.Series, keys: list[str]) -> list[str]:
    """For each numeric hyperparameter of `keys` (snake_case) tried at three or more values among the rows that
    share `best`'s values of the other keys (its own sub-grid), where `best` took the lowest or highest:
    'lr=0.01 is the highest tried; add 0.03' (the grid's spacing, continued)."""
    notes = []
    for key in [k for k in keys if k in TUNABLE]:
        same = rows
        for other in [k for k in keys if k != key and k in rows]:  # a key that does not apply: empty in both
            value = best.get(other)
            same = same[same[other].isna()] if pd.isna(value) else same[equals(same[other], value)]
        tried = sorted({float(v) for v in same[key].dropna() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if len(tried) < 3 or pd.isna(best.get(key)) or float(best[key]) not in (tried[0], tried[-1]):
            continue
        edge, inner = (tried[-1], tried[-2]) if float(best[key]) == tried[-1] else (tried[0], tried[1])
        beyond = edge * edge / inner if edge > 0 and inner > 0 else 2 * edge - inner  # log grid, else linear
        side = "highest" if edge == tried[-1] else "lowest"
        notes.append(f"{key.replace('_', '-')}={edge:g} is the {side} tried; add {beyond:.3g}")
    return notes
