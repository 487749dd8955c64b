"""FedAvg's aggregation rule, registered as aggregation='fedavg': the example-weighted mean of the clients'
deltas, added one client at a time in float32 (WeightedSum), and how a run picks its rule (`aggregation_rule`).
The robust rules are strategies/robust.py's."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.registry import AGGREGATIONS


@AGGREGATIONS.register("fedavg")
class WeightedSum:
    """sum_i w_i * delta_i / W, added one client at a time in the order given, in float32 (W known up front).
    With masks, each entry is averaged over the clients whose mask trains it: sum_i w_i m_i d_i / sum_i w_i m_i,
    0 where none does (mask-scope 'local': a client's frozen entries are not zero updates)."""

    def __init__(self, total_weight: float, masked: bool = False):
        self.total, self.masked = float(total_weight), masked
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}

    def add(self, delta: dict[str, Tensor], weight: float, mask: dict[str, Tensor] | None = None) -> None:
        for name, value in delta.items():
            if name not in self.sums:  # not setdefault: it would build (and fault in) a zero model every add
                self.sums[name] = torch.zeros_like(value, dtype=torch.float32)
                if self.masked:
                    self.weights[name] = torch.zeros_like(self.sums[name])
            total = self.sums[name]
            if not self.masked:
                total.add_(value.float(), alpha=weight / self.total)
                continue
            total.add_(value.float() * mask[name], alpha=weight)
            self.weights[name].add_(mask[name].float(), alpha=weight)

    def result(self) -> dict[str, Tensor]:
        if not self.masked:
            return self.sums
        return {n: torch.where(self.weights[n] > 0, s / self.weights[n].clamp_min(1e-30), 0.0)
                for n, s in self.sums.items()}


def aggregation_rule(cfg: RunConfig):
    """The run's aggregation rule (`aggregation`) with the settings it declares taken from `cfg`: called with
    (total weight, masked) it gives a round's sum, `.add(delta, weight, mask)` then `.result()`."""
    rule = AGGREGATIONS.get(cfg.aggregation)
    return functools.partial(rule, **{k: getattr(cfg, k) for k in getattr(rule, "settings", ())})


def weighted_average(deltas: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """sum_i w_i * delta_i / sum_i w_i per tensor, accumulated in float32 in the given order."""
    total = WeightedSum(sum(weights))
    for delta, w in zip(deltas, weights):
        total.add(delta, w)
    return total.result()


def masked_average(deltas: list[dict[str, Tensor]], masks: list[dict[str, Tensor]],
                   weights: list[float]) -> dict[str, Tensor]:
    """Each entry averaged over the clients whose mask trains it (see WeightedSum)."""
    total = WeightedSum(sum(weights), masked=True)
    for delta, mask, w in zip(deltas, masks, weights):
        total.add(delta, w, mask)
    return total.result()
