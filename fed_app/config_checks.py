"""Keys that are fine alone but not together: each combination a run cannot take, refused in one sentence with
the fix before any work. The methods, aggregation rules and server optimizers check their own (fed_app/registry.py)."""

from __future__ import annotations

import importlib.util
from typing import Any

from fed_app import registry
from fed_app.config_text import ConfigError, to_snake
from fed_app.privacy_accounting import spent_epsilon

# a RunConfig: fed_app/config.py imports this module to check itself, so it is not imported back (no circle)
Config = Any


def check_combinations(cfg: Config) -> None:
    """Raise ConfigError, in one sentence with the fix, for the first combination of keys a run cannot take."""
    if cfg.optimizer == "sparse-sgdm" and cfg.head == "none":
        raise ConfigError("run-config optimizer='sparse-sgdm' needs a step-0 head, or a random head would be "
                          "scored and masked like the backbone; set head='ridge' or head='train'.")
    if cfg.optimizer == "sparse-sgdm" and not cfg.freeze_head:
        raise ConfigError("run-config optimizer='sparse-sgdm' keeps the step-0 head frozen (the brief's "
                          "protocol), so freeze-head=false does not apply; drop it or use optimizer='sgdm'.")
    if cfg.mask_aggregation != "scores" and cfg.mask_scope != "global":
        raise ConfigError(f"run-config mask-aggregation={cfg.mask_aggregation!r} combines the clients' masks into "
                          f"one global mask, so mask-scope={cfg.mask_scope!r} does not fit; use mask-scope='global'.")
    if (cfg.attack == "none") != (cfg.attack_fraction == 0):
        raise ConfigError(f"run-config attack={cfg.attack!r} with attack-fraction={cfg.attack_fraction} "
                          f"attacks nobody; set both (e.g. attack='sign-flip' attack-fraction=0.2) or neither.")
    if cfg.attack != "none" and round(cfg.attack_fraction * cfg.num_clients) == 0:
        raise ConfigError(f"run-config attack-fraction={cfg.attack_fraction} of num-clients={cfg.num_clients} is "
                          f"no client; raise it to at least {1 / cfg.num_clients:.3g}.")
    _check_privacy(cfg)
    registry.load_builtins()  # the method, the aggregation rule and the server optimizer check their own
    registry.METHODS.get(cfg.client_algorithm).check(cfg)
    getattr(registry.AGGREGATIONS.get(cfg.aggregation), "check", lambda cfg: None)(cfg)
    registry.SERVER_OPTIMIZERS.get(cfg.server_optimizer).check(cfg)
    if cfg.tracker != "none" and importlib.util.find_spec(cfg.tracker) is None:
        raise ConfigError(f"run-config tracker={cfg.tracker!r} needs the {cfg.tracker} package, which is not "
                          f"installed; pip install -e \".[track]\" (or tracker='none').")


def _check_privacy(cfg: Config) -> None:
    """What dp (strategies/privacy.py) cannot account for, each in one sentence."""
    if cfg.dp == "none":
        return
    unfit = {"aggregation": (cfg.aggregation != "fedavg", "its noise is calibrated to a mean of clipped updates",
                             "aggregation='fedavg'"),
             "client-algorithm": (cfg.client_algorithm != "fedavg", "SCAFFOLD's control variates would travel "
                                  "unclipped and un-noised", "client-algorithm='fedavg'"),
             "mask-scope": (cfg.optimizer == "sparse-sgdm" and cfg.mask_scope == "local", "each entry would be "
                            "averaged over its own clients, not n", "mask-scope='global'"),
             "head": (cfg.head == "train", "the head rounds of step 0 would be releases it does not account for",
                      "head='logistic' (step 0's statistics are outside the accountant) or head='none'")}
    for key, (bad, why, fix) in unfit.items():
        if bad:
            value = getattr(cfg, to_snake(key))
            raise ConfigError(f"run-config dp={cfg.dp!r} does not fit {key}={value!r}: {why}; use {fix}.")
    n, k = cfg.clients_per_round, cfg.num_clients
    if cfg.dp_max_epsilon and (one := spent_epsilon(cfg.dp_noise_multiplier, n, k, cfg.dp_delta, 1)) > cfg.dp_max_epsilon:
        raise ConfigError(f"run-config dp-max-epsilon={cfg.dp_max_epsilon:g} is less than one round spends ({one:.3g} "
                          f"at dp-noise-multiplier={cfg.dp_noise_multiplier:g}, {n} of {k} clients a round); raise "
                          f"dp-max-epsilon or dp-noise-multiplier.")
    count_stddev = cfg.dp_clipped_count_stddev or cfg.clients_per_round / 20
    if cfg.dp.endswith("adaptive") and cfg.dp_noise_multiplier >= 2 * count_stddev:
        raise ConfigError(f"run-config dp={cfg.dp!r} splits dp-noise-multiplier={cfg.dp_noise_multiplier} between the "
                          f"update and the count of unclipped updates, and a count noise of {count_stddev:g} leaves "
                          f"none for the update; set dp-clipped-count-stddev above {cfg.dp_noise_multiplier / 2:g} "
                          f"(e.g. {cfg.dp_noise_multiplier:g}) or lower dp-noise-multiplier.")
