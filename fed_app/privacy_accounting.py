"""The epsilon a DP run's rounds spend, by Flower's RDP accountant (flwr.serverapp.RdpAccountant over Google's
dp-accounting): a leaf, so that a config check can refuse a budget before any work, and strategies/privacy.py
states each row's epsilon, from the same numbers."""

from __future__ import annotations

import functools

# Replace-one adjacency (the one dp-accounting's without-replacement sampling takes): a neighbouring federation
# swaps one client's clipped update, +C for -C at worst, so the sum moves by 2C. The accountant's noise multiplier
# is the noise's std over that sensitivity: sigma C / 2C = sigma / 2 (google/differential-privacy#378).
REPLACE_ONE_SENSITIVITY = 2.0


@functools.lru_cache(maxsize=4096)
def spent_epsilon(noise_multiplier: float, per_round: int, num_clients: int, delta: float, releases: int) -> float:
    """The epsilon at `delta` of `releases` rounds of the sampled Gaussian mechanism: `per_round` of `num_clients`
    sampled without replacement, noise std `noise_multiplier` x C on a sum whose replace-one sensitivity is 2C
    (Flower's RDP accountant, handed sigma / 2; an adaptive run's two releases split sigma so that together they
    cost one at sigma, Andrew et al. Theorem 1, and the count's replace-one sensitivity, 1, halves it alike)."""
    # imported by a dp run only: the accountant's import (dp-accounting, 0.25 s) stays out of every other process
    from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant,
                                SamplingMethod)

    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_clients,
                                             neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                             sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    event = GaussianPrivacyEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY, per_round, num_clients)
    accountant.compose(event, releases)
    return accountant.get_epsilon(delta)
