"""What values each run-config key takes, checked one key at a time: the choices of the keys that pick a thing
(or a name a plugin registered), and the numeric bounds. Keys that are fine alone but not together:
fed_app/config_checks.py."""

from __future__ import annotations

import math
from typing import Any

from fed_app import registry
from fed_app.config_text import ConfigError, to_kebab

# a RunConfig: fed_app/config.py imports this module to check itself, so it is not imported back (no circle)
Config = Any

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar100", "cifar10", "imagefolder", "synthetic", "digits"),
    "model": ("vit-small-dino", "vit-tiny-test"),
    "precision": ("auto", "bf16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "scheduler": ("cosine", "warmup-cosine", "step", "exponential", "constant"),
    "optimizer": ("sgdm", "sparse-sgdm"),
    "head": ("none", "train", "logistic", "ridge"),
    "mask_rule": ("least-sensitive", "most-sensitive", "lowest-magnitude", "highest-magnitude", "random"),
    "fisher_mode": ("sampled", "empirical", "batch"),
    "mask_threshold": ("per-layer", "global"),
    "partition": ("iid", "noniid", "dirichlet"),
    "on_client_failure": ("retry", "fail"),
    "transport": ("files", "messages"),
    "mask_scope": ("global", "local"),
    "round_scheduler": ("constant", "cosine"),
    "client_objective": ("cross-entropy",),
    "aggregation": ("fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"),
    "tracker": ("none", "tensorboard", "wandb"),
    "server_optimizer": ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "mask_aggregation": ("scores", "vote", "intersection", "union", "vote-rank"),
    "client_algorithm": ("fedavg", "scaffold"),
    "attack": ("none", "sign-flip", "scaled", "gaussian", "label-flip"),
    "dp": ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"),
    "dp_randomness": ("seeded", "os"),
}
# Keys whose values may also be names that a module in `plugins` registered (fed_app/registry.py).
REGISTERED = {"mask_rule": "MASK_RULES", "client_objective": "OBJECTIVES", "aggregation": "AGGREGATIONS",
              "client_algorithm": "METHODS", "server_optimizer": "SERVER_OPTIMIZERS"}

# (lowest allowed, whether the lowest is excluded); checked for numeric fields named here.
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "val_size": (0, False),
    "synthetic_train_size": (1, False),
    "synthetic_test_size": (1, False),
    "image_size": (8, False),
    "batch_size": (1, False),
    "eval_batch_size": (1, False),
    "lr": (0.0, True),
    "momentum": (0.0, False),
    "weight_decay": (0.0, False),
    "epochs": (1, False),
    "warmup_epochs": (0, False),
    "step_size": (1, False),
    "gamma": (0.0, True),
    "head_epochs": (1, False),
    "ridge_lambda": (0.0, False),
    "logistic_lambda": (0.0, False),
    "head_iterations": (1, False),
    "sparsity": (0.0, False),
    "calibration_rounds": (1, False),
    "fisher_samples": (1, False),
    "fisher_chunk": (1, False),
    "mask_damping": (0.0, False),
    "num_rounds": (1, False),
    "local_steps": (1, False),
    "classes_per_client": (1, False),
    "dirichlet_alpha": (0.0, True),
    "num_clients": (1, False),
    "fraction_train": (0.0, True),
    "eval_every": (1, False),
    "test_every": (0, False),
    "checkpoint_every": (1, False),
    "max_retries": (0, False),
    "round_timeout": (0.0, True),
    "head_rounds": (1, False),
    "calibration_fraction": (0.0, True),
    "fraction_evaluate": (0.0, False),
    "server_lr": (0.0, True),
    "prox_mu": (0.0, False),
    "mask_quorum": (0.0, True),
    "server_momentum": (0.0, False),
    "server_beta1": (0.0, False),
    "server_beta2": (0.0, False),
    "server_tau": (0.0, True),
    "num_malicious_clients": (0, False),
    "multi_krum_selected": (1, False),
    "trim_beta": (0.0, False),
    "attack_fraction": (0.0, False),
    "attack_scale": (0.0, True),
    "dp_noise_multiplier": (0.0, True),
    "dp_clipping_norm": (0.0, True),
    "dp_delta": (0.0, True),
    "dp_target_quantile": (0.0, False),
    "dp_clip_lr": (0.0, True),
    "dp_clipped_count_stddev": (0.0, False),
    "dp_max_epsilon": (0.0, False),
}


# (highest allowed, whether the highest is excluded)
UPPER_BOUNDS: dict[str, tuple[float, bool]] = {
    "momentum": (1.0, True),
    "sparsity": (1.0, True),
    "fraction_train": (1.0, False),
    "calibration_fraction": (1.0, False),
    "fraction_evaluate": (1.0, False),
    "server_momentum": (1.0, True),
    "mask_quorum": (1.0, False),
    "server_beta1": (1.0, True),
    "server_beta2": (1.0, True),
    "classes_per_client": (100, False),  # CIFAR-100 and the synthetic set both have 100 classes
    "trim_beta": (0.5, True),
    "attack_fraction": (1.0, True),
    "dp_delta": (1.0, True),
    "dp_target_quantile": (1.0, False),
}


def check_values(cfg: Config) -> None:
    """Raise ConfigError, in one sentence with the fix, for the first key whose value it cannot take."""
    for name, value in vars(cfg).items():  # NaN passes every bound (each comparison is False); Inf most
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run-config {to_kebab(name)}={value!r} is not a finite number; give a finite value.")
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value in choices or (name in REGISTERED and _registered(cfg, name, value)):
            continue
        if name == "model" and _is_timm_model(value):
            continue
        more = ", or a name that a module in plugins registers" if name in REGISTERED else ""
        if name == "model":
            more = ", or a timm model name with its pretrained tag (e.g. 'vit_small_patch14_dinov2.lvd142m')"
        raise ConfigError(f"run-config {to_kebab(name)}={value!r} is not one of {', '.join(choices)}{more}; "
                          f"pick one of those.")
    for name, (low, strict) in LOWER_BOUNDS.items():
        value = getattr(cfg, name)
        if value < low or (strict and value == low):
            relation = ">" if strict else ">="
            raise ConfigError(f"run-config {to_kebab(name)}={value!r} is out of range; it must be {relation} {low}.")
    for name, (high, strict) in UPPER_BOUNDS.items():
        value = getattr(cfg, name)
        if value > high or (strict and value == high):
            relation = "<" if strict else "<="
            raise ConfigError(f"run-config {to_kebab(name)}={value!r} is out of range; it must be {relation} {high}.")


def _registered(cfg: Config, name: str, value: str) -> bool:
    """Whether a module named in `plugins` (imported here, in every process that reads a config) registered
    `value` for key `name`."""
    registry.load_builtins()
    try:
        registry.load_plugins(cfg.plugins)
    except ImportError as err:
        raise ConfigError(f"run-config plugins={cfg.plugins!r} cannot be imported ({err}); name modules "
                          f"importable where the app runs, comma-separated.") from None
    return getattr(registry, REGISTERED[name]).find(value) is not None


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)
