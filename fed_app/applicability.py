"""Which run-config keys shape a run: some only one kind (centralized or federated), some only when another
key says so (sparsity under optimizer='sparse-sgdm', classes-per-client under partition='noniid'). Reports
label and group runs by these alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fed_app.config import RunConfig
from fed_app.config_values import CHOICES
from fed_app.registry import AGGREGATIONS, MASK_RULES, METHODS, SERVER_OPTIMIZERS

# Keys that shape only one kind of run, and keys that shape a run only when another key says so.
ONLY_FOR_KIND: dict[str, frozenset[str]] = {
    "centralized": frozenset({"epochs", "scheduler", "warmup_epochs", "step_size", "gamma", "head_epochs"}),
    "federated": frozenset({"num_rounds", "rounds_scaling", "local_steps", "round_scheduler", "partition",
                            "classes_per_client", "dirichlet_alpha", "num_clients", "fraction_train", "eval_every",
                            "fraction_evaluate",
                            "test_every", "checkpoint_every", "on_client_failure", "max_retries", "round_timeout",
                            "transport", "head_rounds", "calibration_fraction", "mask_scope", "mask_aggregation",
                            "mask_quorum", "client_objective",
                            "aggregation", "prox_mu", "client_algorithm", "server_optimizer", "server_lr", "server_momentum", "server_beta1",
                            "server_beta2", "server_tau", "num_malicious_clients", "multi_krum_selected", "trim_beta", "attack",
                            "attack_fraction", "attack_scale", "dp", "dp_noise_multiplier", "dp_clipping_norm",
                            "dp_delta", "dp_target_quantile", "dp_clip_lr", "dp_clipped_count_stddev",
                            "dp_max_epsilon", "dp_randomness"}),
}
SENSITIVITY_RULES = ("least-sensitive", "most-sensitive")
ONLY_WHEN: dict[str, Any] = {  # key -> condition on the run's values (a mapping, e.g. a saved config.json)
    "data_root": lambda c: c["dataset"] in ("cifar100", "cifar10", "imagefolder"),
    "download": lambda c: c["dataset"] in ("cifar100", "cifar10"),
    "image_size": lambda c: c["dataset"] == "imagefolder",
    "synthetic_train_size": lambda c: c["dataset"] == "synthetic",
    "synthetic_test_size": lambda c: c["dataset"] == "synthetic",
    "warmup_epochs": lambda c: c["scheduler"] == "warmup-cosine",
    "step_size": lambda c: c["scheduler"] == "step",
    "gamma": lambda c: c["scheduler"] in ("step", "exponential"),
    "head_epochs": lambda c: c["head"] == "train",
    "head_rounds": lambda c: c["head"] == "train",
    "ridge_lambda": lambda c: c["head"] == "ridge",
    "logistic_lambda": lambda c: c["head"] == "logistic",
    "head_iterations": lambda c: c["head"] == "logistic",
    "ridge_calibrate": lambda c: c["head"] == "ridge",
    "freeze_head": lambda c: c["head"] != "none",
    "sparsity": lambda c: c["optimizer"] == "sparse-sgdm",
    "calibration_rounds": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "mask_threshold": lambda c: c["optimizer"] == "sparse-sgdm" and not _uses_fisher(c["mask_rule"]),
    "mask_rule": lambda c: c["optimizer"] == "sparse-sgdm",
    "mask_scope": lambda c: c["optimizer"] == "sparse-sgdm",
    "calibration_fraction": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "fisher_mode": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "fisher_samples": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "fisher_chunk": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "mask_damping": lambda c: c["optimizer"] == "sparse-sgdm" and _uses_fisher(c["mask_rule"]),
    "classes_per_client": lambda c: c["partition"] == "noniid",
    "dirichlet_alpha": lambda c: c["partition"] == "dirichlet",
    "mask_aggregation": lambda c: c["optimizer"] == "sparse-sgdm" and c.get("mask_scope", "global") == "global",
    "mask_quorum": lambda c: c["optimizer"] == "sparse-sgdm" and c.get("mask_aggregation", "scores") == "vote",
    "attack_fraction": lambda c: c["attack"] != "none",
    "attack_scale": lambda c: c["attack"] in ("sign-flip", "scaled", "gaussian"),
    "dp_noise_multiplier": lambda c: c["dp"] != "none",
    "dp_clipping_norm": lambda c: c["dp"] != "none",
    "dp_delta": lambda c: c["dp"] != "none",
    "dp_max_epsilon": lambda c: c.get("dp", "none") != "none",
    "dp_randomness": lambda c: c.get("dp", "none") != "none",
    "dp_target_quantile": lambda c: c["dp"].endswith("adaptive"),
    "dp_clip_lr": lambda c: c["dp"].endswith("adaptive"),
    "dp_clipped_count_stddev": lambda c: c["dp"].endswith("adaptive"),
}

# Keys a registered entry declares it reads (its `settings`), by the run-config key that picks the entry: they
# shape a run only when that key names an entry declaring them (prox-mu under a FedAvg-family method,
# server-tau under FedAdam, FedYogi or FedAdagrad).
DECLARED_BY = {"client_algorithm": METHODS, "server_optimizer": SERVER_OPTIMIZERS, "aggregation": AGGREGATIONS}


def _uses_fisher(rule: str) -> bool:
    """Whether mask rule `rule` scores Fisher sensitivity (a registered rule says so; unknown ones may)."""
    if rule in SENSITIVITY_RULES:
        return True
    found = MASK_RULES.find(rule)
    return rule not in CHOICES["mask_rule"] and (found is None or found.needs_fisher)


def applies(cfg: RunConfig, name: str, kind: str) -> bool:
    """Whether key `name` (snake_case) shapes a run of this `kind` (centralized or federated) with this
    config: e.g. sparsity only under optimizer='sparse-sgdm', epochs only in centralized runs."""
    return key_applies(name, kind, cfg.to_dict())


def key_applies(name: str, kind: str, values: Mapping[str, Any]) -> bool:
    """`applies` for a mapping of snake_case values (a saved config.json; missing keys take their defaults)."""
    other = "federated" if kind == "centralized" else "centralized"
    if name in ONLY_FOR_KIND[other]:
        return False
    values = {**_DEFAULTS, **values}
    for picker, entries in DECLARED_BY.items():
        if any(name in getattr(entries.get(entry), "settings", ()) for entry in entries):
            chosen = entries.find(values[picker])  # a plugin's entry not imported here: assume it reads the key
            return chosen is None or name in getattr(chosen, "settings", ())
    condition = ONLY_WHEN.get(name)
    return condition is None or condition(values)


_DEFAULTS = RunConfig().to_dict()  # (building it registers the built-in methods and server optimizers)
