"""Naming the federated runs of a remedies study: the method (FedAvg, FedProx, SCAFFOLD, server optimizers) and
the heterogeneity level of each, and test accuracy per method and level."""

from __future__ import annotations

import numpy as np
import pandas as pd

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
