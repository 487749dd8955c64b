"""Byzantine-robust aggregation rules, registered under `aggregation`, each the rule of Flower's strategy of the
same name (flwr.serverapp.strategy: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) applied to the clients'
updates: `median`, `trimmed-mean`, `krum`, `multi-krum`, `bulyan`.

Flower's strategies take the clients' models; fedit's clients send their deltas from the one global model. The
rules are the same on either: a coordinate's median, trimmed mean or closest values, and the distance between
two clients, do not change when the global model is added to every update (tests/strategies/test_robust.py
checks each against Flower's strategy on the same replies). Unlike FedAvg's sum, a robust rule needs every
update of the round at once: they are kept, flat, until the round's last reply.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fed_app.config import ConfigError, RunConfig
from fed_app.registry import AGGREGATIONS


class AllUpdates:
    """Every client's update of the round, flat (n x d, float32), then one rule over them (`combine`)."""

    settings: tuple[str, ...] = ()  # the run-config keys (snake_case) the rule reads

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ConfigError, in one sentence with the fix, for a run this rule cannot aggregate."""
        if cfg.optimizer == "sparse-sgdm" and cfg.mask_scope == "local":
            raise ConfigError(f"run-config aggregation={cfg.aggregation!r} needs every client's update at full size, "
                              f"and mask-scope='local' sends each client its own entries; use mask-scope='global' "
                              f"or aggregation='fedavg'.")

    def __init__(self, total_weight: float, masked: bool = False, **settings):
        self.__dict__.update(settings)  # the run's values of the keys in `settings`
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.updates: list[Tensor] = []
        self.weights: list[float] = []

    def add(self, delta: dict[str, Tensor], weight: float, mask: dict[str, Tensor] | None = None) -> None:
        if not self.names:
            self.names, self.shapes = list(delta), [v.shape for v in delta.values()]
        self.updates.append(torch.cat([delta[n].float().reshape(-1) for n in self.names]))
        self.weights.append(float(weight))

    def result(self) -> dict[str, Tensor]:
        flat = self.combine(torch.stack(self.updates), torch.tensor(self.weights, dtype=torch.float64))
        return dict(zip(self.names, (p.reshape(s) for p, s in zip(flat.split([s.numel() for s in self.shapes]),
                                                                  self.shapes))))

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        raise NotImplementedError


def coordinate_median(updates: Tensor) -> Tensor:
    """numpy's median along the clients: the middle value, or the mean of the two middle values."""
    ordered = updates.sort(dim=0).values
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


CHUNK_BYTES = 64 * 2**20  # the most a pairwise distance's working copy takes (n x chunk float64)


def squared_distances(updates: Tensor) -> Tensor:
    """n x n squared L2 distances between the rows of `updates` (n x d float32), summed in float64 over chunks
    of columns: at most CHUNK_BYTES of working memory, where a float64 copy of all of them would be n x d x 8
    bytes (100 ViT-S/16 updates: 17 GB, beside the 8.8 GB they hold)."""
    n, d = updates.shape
    columns = max(1, CHUNK_BYTES // (8 * n))
    total = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, columns):
        chunk = updates[:, start:start + columns].double()
        total += torch.cdist(chunk, chunk).square()
    return total


def multi_krum(updates: Tensor, malicious: int, keep: int) -> list[int]:
    """The `keep` clients whose n - f - 2 nearest other updates lie closest (squared L2 summed), best first."""
    distances = squared_distances(updates)
    nearest = max(1, len(updates) - malicious - 2)
    distances.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    scores = distances.sort(dim=1).values[:, :nearest].sum(dim=1)
    return scores.argsort(stable=True)[:keep].tolist()


@AGGREGATIONS.register("median")
class Median(AllUpdates):
    """Each coordinate's median over the clients, unweighted (Flower's FedMedian)."""

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        return coordinate_median(updates)


@AGGREGATIONS.register("trimmed-mean")
class TrimmedMean(AllUpdates):
    """Each coordinate's mean after its int(beta * n) smallest and largest values are cut, unweighted (Flower's
    FedTrimmedAvg)."""

    settings = ("trim_beta", "num_malicious_clients")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        n, f = cfg.clients_per_round, cfg.num_malicious_clients
        if int(cfg.trim_beta * n) < max(f, 1):
            raise ConfigError(f"run-config aggregation='trimmed-mean' with trim-beta={cfg.trim_beta} cuts "
                              f"{int(cfg.trim_beta * n)} of the {n} clients a round from each end, fewer than "
                              f"num-malicious-clients={f} (and at least one); raise trim-beta to at least "
                              f"{max(f, 1) / n:.3g}.")

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        cut = int(self.trim_beta * len(updates))
        return updates.sort(dim=0).values[cut:len(updates) - cut].mean(dim=0)


def check_clients(cfg: RunConfig, times: int) -> None:
    """The rule's guarantee needs n >= times x f + 3 clients a round: Krum 2f + 3 (Blanchard et al. 2017), Bulyan
    4f + 3 (El Mhamdi et al. 2018)."""
    f, n = cfg.num_malicious_clients, cfg.clients_per_round
    if n < times * f + 3:
        raise ConfigError(f"run-config aggregation={cfg.aggregation!r} with num-malicious-clients={f} needs at least "
                          f"{times * f + 3} clients a round ({times}f + 3), and num-clients={cfg.num_clients} with "
                          f"fraction-train={cfg.fraction_train} samples {n}; raise fraction-train or lower "
                          f"num-malicious-clients.")


@AGGREGATIONS.register("krum")
class Krum(AllUpdates):
    """The one update closest to its n - f - 2 nearest others (Flower's Krum)."""

    settings = ("num_malicious_clients",)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_clients(cfg, 2)

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        return updates[multi_krum(updates, self.num_malicious_clients, 1)[0]]


@AGGREGATIONS.register("multi-krum")
class MultiKrum(AllUpdates):
    """The example-weighted mean of the `multi-krum-selected` updates Krum scores best (Flower's MultiKrum)."""

    settings = ("num_malicious_clients", "multi_krum_selected")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_clients(cfg, 2)
        n = cfg.clients_per_round
        if cfg.multi_krum_selected > n:
            raise ConfigError(f"run-config multi-krum-selected={cfg.multi_krum_selected} is more than the {n} clients a "
                              f"round (num-clients={cfg.num_clients}, fraction-train={cfg.fraction_train}); select at "
                              f"most {n}.")

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        chosen = multi_krum(updates, self.num_malicious_clients, self.multi_krum_selected)
        w = weights[chosen] / weights[chosen].sum()
        return (updates[chosen].double() * w[:, None]).sum(dim=0).float()


@AGGREGATIONS.register("bulyan")
class Bulyan(AllUpdates):
    """Multi-Krum keeps n - 2f updates; each coordinate is then the mean of the n - 4f of them closest to their
    median (Flower's Bulyan, which needs n >= 4f + 3)."""

    settings = ("num_malicious_clients",)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_clients(cfg, 4)

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        f, n = self.num_malicious_clients, len(updates)
        if n < 4 * f + 3:
            raise ValueError(f"aggregation='bulyan' with num-malicious-clients={f} needs at least {4 * f + 3} "
                             f"clients a round, and this round has {n}")
        kept = updates[multi_krum(updates, f, n - 2 * f)]
        closest = (kept - coordinate_median(kept)).abs().argsort(dim=0, stable=True)[:n - 4 * f]
        return kept.gather(0, closest).mean(dim=0)
