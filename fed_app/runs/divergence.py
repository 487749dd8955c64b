"""The divergence guard: whether a run's rows say it has stopped learning for good, in one sentence.

A run has diverged when a loss in its newest row is not finite, or when its validation loss is above
max(3 x its step-0 value, its step-0 value + 1 nat) at two evaluations in a row, or at its last one. The bound is
relative to where the run started (a pretrained head starts low, a random one near ln C), and the second
evaluation keeps one noisy evaluation from ending a run that recovers. Such a run is marked DIVERGED in its
folder and in its last row (never DONE), loses every selection and is listed apart in the report."""

from __future__ import annotations

import math
from typing import Any

FACTOR, MARGIN, PATIENCE = 3.0, 1.0, 2
LOSSES = ("train_loss", "val_loss", "test_loss")


def divergence(rows: list[dict[str, Any]], key: str, final: bool) -> str | None:
    """Why the run whose rows (step 0 first, the newest last) these are has diverged, or None; `final`: the
    newest row is the run's last step."""
    newest = rows[-1]
    for name in LOSSES:
        value = newest.get(name)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{name} is {value} at {key} {newest[key]}"
    start = rows[0].get("val_loss")
    if not isinstance(start, (int, float)) or not math.isfinite(start) or "val_loss" not in newest:
        return None
    bound = max(FACTOR * start, start + MARGIN)
    evaluated = [r for r in rows[1:] if isinstance(r.get("val_loss"), (int, float))]
    recent = evaluated[-(1 if final else PATIENCE):]
    if len(recent) == (1 if final else PATIENCE) and all(r["val_loss"] > bound for r in recent):
        where = ", ".join(f"{key} {r[key]} ({r['val_loss']:.3g})" for r in recent)
        return f"val_loss stayed above {bound:.3g} (3x its step-0 value {start:.3g}, or +1) at {where}"
    return None
