"""Client-level differential privacy for FedAvg (DP-FedAvg, McMahan et al. 2018), term for term as Flower's
strategy wrappers do it (flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping and
DifferentialPrivacyClientSideFixedClipping with its client mod; the adaptive ones but for C's step, see
`end_round_`), and the privacy it spends, by Flower's own accountant (flwr.serverapp.RdpAccountant over Google's
dp-accounting), at the sensitivity replace-one adjacency gives a sum of clipped updates (see `epsilon`).

    dp='server-fixed'   the server clips every update to L2 norm C (dp-clipping-norm)
    dp='client-fixed'   each client clips its own update (the server never sees it unclipped)
    dp='*-adaptive'     the same, C moving after each round towards the dp-target-quantile of the update norms
                        (Andrew et al. 2021; see `end_round_`)
    then                the mean of the n updates of the round, each weighing the same (Flower's accounted mode
                        requires equal weights; with equal shards it is FedAvg's example-weighted mean), plus
                        N(0, (sigma C / n)^2) on every entry the clients train (sigma: dp-noise-multiplier)

Under a global mask only the trainable entries travel: the clipping and the noise act on them alone. A dense update
carries every tensor of the model: the noise goes on the ones the clients train (not a frozen head). The noise
is drawn from (seed, round), so a resumed run adds the noise the uninterrupted one did: simulated DP, which holds
only against someone without the seed (config.json names it; with it the noise can be subtracted and each round's
cohort is known, which voids the amplification by sampling). dp-randomness='os' draws the noise and the training
cohorts from the operating system's random source instead: nothing can replay them, and a resumed run goes on
with fresh draws (its numbers differ from an uninterrupted run's; both are runs of the same mechanism).

Each round is one release of the sampled Gaussian mechanism: n of the K clients sampled without replacement; the
row's `epsilon` is what the run's fine-tuning rounds so far spend at `dp-delta` (EPSILON_COVERS), and
`dp-max-epsilon` stops a run before the round that would spend more. What stays outside it: step 0 and mask
calibration (every client's ridge or logistic sums, Fisher scores, sent as computed), the mask itself, the
tuning that chose the run's values, training metrics and client evaluation.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import torch
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.errors import UserError
from fed_app.privacy_accounting import spent_epsilon
from fed_app.flower.payload import Form, Shapes, State, split_flat
from fed_app.task.seeds import DP_COUNT, DP_NOISE, generator

EPSILON_COVERS = "the fine-tuning rounds only; step 0, the Fisher scores, the mask and tuning are outside it"


class PrivacyBudgetError(UserError, RuntimeError):
    """The next round would spend more than dp-max-epsilon: the run stops before it, its checkpoint kept."""


def clip_scale(update: dict[str, Tensor], clipping_norm: float) -> float:
    """min(1, C / ||update||), the L2 norm taken over all of its entries (Flower's FlatClip). A NaN or Inf norm is
    a ValueError: min(1, C / NaN) is 1, which would pass such an update as unclipped."""
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
    if not math.isfinite(norm):
        raise ValueError("an update with NaN or Inf entries cannot be clipped; it does not count")
    return min(1.0, clipping_norm / norm) if norm > 0 else 1.0


def clipped(update: dict[str, Tensor], clipping_norm: float) -> tuple[dict[str, Tensor], bool]:
    """`update` clipped to L2 norm C, and whether it had to be. A new dict when clipped: a received update may be
    a read-only view of a message or a file."""
    scale = clip_scale(update, clipping_norm)
    if scale == 1.0:
        return update, False
    return {k: v * scale for k, v in update.items()}, True


class DpFedAvg:
    """The run's DP: who clips, the noise added to each round's mean, and the epsilon spent after a round."""

    def __init__(self, cfg: RunConfig, state_shapes: Shapes | None = None, trainable: Iterable[str] = ()):
        # A dense update names every tensor of the model, the frozen head's too: the noise goes only on what the
        # clients train (an entry no client can move carries nothing of theirs, and noise on it is pure damage).
        self.state_shapes, self.trainable = state_shapes, frozenset(trainable)
        self.mode, self.seed = cfg.dp, cfg.seed
        self.noise_multiplier, self.clipping_norm, self.delta = cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta
        self.per_round, self.num_clients = cfg.clients_per_round, cfg.num_clients
        self.seeded, self.max_epsilon = cfg.dp_randomness == "seeded", cfg.dp_max_epsilon
        self.adaptive = cfg.dp.endswith("adaptive")
        self.target_quantile, self.clip_lr = cfg.dp_target_quantile, cfg.dp_clip_lr
        self.count_stddev = cfg.dp_clipped_count_stddev or self.per_round / 20  # Flower's default
        # Adaptive: sigma is split between the update and the count, so that the two releases together cost what
        # one Gaussian release at sigma does (Andrew et al., Theorem 1; Flower's compute_adaptive_noise_params).
        self.update_noise_multiplier = (self.noise_multiplier ** -2 - (2 * self.count_stddev) ** -2) ** -0.5 \
            if self.adaptive else self.noise_multiplier

    @property
    def clips_on_server(self) -> bool:
        return self.mode.startswith("server")

    @property
    def noise_std(self) -> float:
        """sigma C / n, Flower's compute_stdv (adaptive: the update's share of sigma, at this round's C)."""
        return self.update_noise_multiplier * self.clipping_norm / self.per_round

    def end_round_(self, clipped: int, clients: int, server_round: int) -> None:
        """Adaptive clipping's step after a round's noise: C <- C exp(-lr (b - target)), b the share of the round's
        updates left unclipped, counted with N(0, count_stddev^2) noise drawn from (seed, round). Too many
        clipped: b below the target, C grows. (Flower 1.42's wrappers put the clipped share in b's place, which
        moves C the other way: shrinking it when most updates are clipped; and they noise the mean at the new C,
        where the updates were clipped at the old one, as the paper does not.) A fixed C does not move."""
        if not self.adaptive:
            return
        g = self._generator(DP_COUNT, server_round)
        unclipped = (clients - clipped + float(torch.randn((), generator=g, dtype=torch.float64)) * self.count_stddev)
        self.clipping_norm *= math.exp(-self.clip_lr * (unclipped / clients - self.target_quantile))

    def state_dict(self) -> dict:
        """What moves from round to round (an adaptive C), for the run's checkpoint."""
        return {"clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: dict) -> None:
        self.clipping_norm = float(state["clipping_norm"])

    def add_noise_(self, mean: State, server_round: int) -> None:
        """N(0, noise_std^2) added in place to every entry of the round's mean update that the clients train,
        drawn from (seed, round) as one flat vector in the update's order (the same numbers whichever form the
        update took): all of a global mask's flat trainable entries, a dense update's trainable tensors."""
        if Form.VALUES not in mean and self.state_shapes is not None:
            named = split_flat(mean[Form.FLAT], self.state_shapes) if Form.FLAT in mean else mean
            mean = {n: v for n, v in named.items() if n in self.trainable}
        sizes = [v.numel() for v in mean.values()]
        noise = torch.randn(sum(sizes), generator=self._generator(DP_NOISE, server_round))
        noise.mul_(self.noise_std)
        for value, part in zip(mean.values(), noise.split(sizes)):
            value.add_(part.view(value.shape).to(value.device, value.dtype))

    def _generator(self, stream: int, server_round: int) -> torch.Generator:
        """The round's noise stream: from (seed, stream, round), or from the operating system (dp-randomness='os')."""
        if self.seeded:
            return generator(torch.device("cpu"), self.seed, stream, server_round)
        return torch.Generator().manual_seed(secrets.randbits(63))

    def sample(self, num_clients: int, per_round: int) -> list[int] | None:
        """A training round's cohort from the operating system's random source (dp-randomness='os'); None when
        seeded (the strategy draws it from (seed, round))."""
        if self.seeded:
            return None
        return sorted(secrets.SystemRandom().sample(range(num_clients), per_round))

    def check_budget(self, server_round: int) -> None:
        """Raise PrivacyBudgetError, in one sentence, if this round would take the run past dp-max-epsilon."""
        if self.exceeds(server_round):
            raise PrivacyBudgetError(
                f"round {server_round} would spend epsilon {self.epsilon(server_round):.3g} at "
                f"dp-delta={self.delta:g}, more than dp-max-epsilon={self.max_epsilon:g}; the run stops after round "
                f"{server_round - 1} with its checkpoint: raise dp-max-epsilon and run the same command to go on, or "
                f"set num-rounds={server_round - 1} (a new run).")

    def exceeds(self, server_round: int) -> bool:
        """Whether the rounds up to this one spend more than dp-max-epsilon (0: no budget)."""
        return bool(self.max_epsilon) and self.epsilon(server_round) > self.max_epsilon

    def epsilon(self, releases: int) -> float:
        """The epsilon at dp-delta that `releases` rounds spend (EPSILON_COVERS)."""
        return spent_epsilon(self.noise_multiplier, self.per_round, self.num_clients, self.delta, releases)
