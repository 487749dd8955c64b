"""RunConfig: every run-config key, its type and default, its id and how it is read (the values each key takes:
fed_app/config_values.py; combinations: config_checks.py; the text of keys and values and the sentences for bad
ones: config_text.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fed_app.config_checks import check_combinations
from fed_app.config_text import (ConfigError, bad_pair_message, coerce, to_kebab, to_snake,  # noqa: F401 (re-exported)
                                 unknown_key_message)
from fed_app.config_values import check_values

# Keys that do not change a run's numbers: left out of its id, and free to differ when a run resumes
# (claim_token and session were RunConfig keys once: run folders of then still hold them).
NOT_RESULTS = frozenset({"run_dir", "transport", "tracker", "claim_token", "session",
                         "dp_max_epsilon"})  # a budget says where a run stops, not what its rounds compute
# Keys added after run ids were first given, with their defaults: at the default a key stays out of the id.
ADDED_LATER = {"num_malicious_clients": 0, "multi_krum_selected": 1, "trim_beta": 0.2, "attack": "none",
               "attack_fraction": 0.0, "attack_scale": 10.0, "dp": "none", "dp_noise_multiplier": 1.0,
               "dp_clipping_norm": 1.0, "dp_delta": 1e-5, "dp_target_quantile": 0.5, "dp_clip_lr": 0.2,
               "dp_clipped_count_stddev": 0.0, "dp_max_epsilon": 0.0, "dp_randomness": "seeded"}

# Keys that the commands set in Flower's run config for the ServerApp (the one way into it), not a run's
# settings, so not RunConfig's: the claim the command holds on the run (fed_app/runs/claims.py), which the
# ServerApp adopts, and the folder through which one simulation takes its runs (fed_app/local/session.py).
PLUMBING = ("claim-token", "session")


@dataclass(frozen=True)
class RunConfig:
    """One run's configuration; defaults mirror [tool.flwr.app.config] in pyproject.toml."""

    # data
    dataset: str = "cifar100"
    data_root: str = "~/.cache/fedit/data"
    download: bool = True
    image_size: int = 224  # dataset='imagefolder': images resized and center-cropped to this, kept as uint8
    val_size: int = 5000
    split_seed: int = 0
    synthetic_train_size: int = 50000
    synthetic_test_size: int = 10000
    augment: bool = True
    # model and numerics
    model: str = "vit-small-dino"
    model_weights: str = ""
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    # optimization
    seed: int = 42
    batch_size: int = 64
    eval_batch_size: int = 512
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    step_size: int = 3
    gamma: float = 0.5
    # model editing: step 0 (head), mask calibration, sparse fine-tuning
    optimizer: str = "sgdm"
    head: str = "none"
    head_epochs: int = 1
    logistic_lambda: float = 1e-2  # head='logistic': L2 penalty lam/2 ||W||^2 beside the mean cross-entropy
    head_iterations: int = 100  # head='logistic': L-BFGS steps at most (in FL each evaluation is one query round)
    ridge_lambda: float = 1.0
    ridge_calibrate: bool = True
    freeze_head: bool = True
    sparsity: float = 0.9
    calibration_rounds: int = 5
    mask_rule: str = "least-sensitive"
    mask_threshold: str = "per-layer"  # magnitude and random rules: each tensor keeps its share (TaLoS), or 'global'
    fisher_mode: str = "sampled"
    fisher_samples: int = 1024
    fisher_chunk: int = 32
    mask_damping: float = 0.1
    # federated (FedAvg on Flower)
    num_rounds: int = 200
    rounds_scaling: bool = False
    local_steps: int = 4
    round_scheduler: str = "constant"
    partition: str = "iid"
    classes_per_client: int = 10
    dirichlet_alpha: float = 0.5
    num_clients: int = 100
    fraction_train: float = 0.1
    eval_every: int = 10
    fraction_evaluate: float = 0.0
    test_every: int = 10
    checkpoint_every: int = 10
    on_client_failure: str = "retry"
    max_retries: int = 2
    round_timeout: float = 600.0
    transport: str = "files"
    head_rounds: int = 10
    calibration_fraction: float = 1.0
    mask_scope: str = "global"
    mask_aggregation: str = "scores"  # global mask from summed client scores, or the clients' own masks combined
    mask_quorum: float = 0.5  # mask-aggregation='vote': the share of clients that must train an entry
    # extensions (fed_app/registry.py): a client objective, an aggregation rule, modules that register more
    client_objective: str = "cross-entropy"
    aggregation: str = "fedavg"
    # robust aggregation rules (strategies/robust.py), named as Flower's strategies name them
    num_malicious_clients: int = 0  # krum, multi-krum, bulyan: f, the clients a round that may be Byzantine
    multi_krum_selected: int = 1  # multi-krum: how many of the best-scored updates are averaged
    trim_beta: float = 0.2  # trimmed-mean: the share cut from each end of every coordinate
    # attacks to measure them against (fed_app/task/attacks.py): a seeded share of the clients is malicious
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0  # sign-flip: -s x the update; scaled: s x; gaussian: s x its RMS per entry
    # client-level differential privacy, as Flower's wrappers (strategies/privacy.py)
    dp: str = "none"
    dp_noise_multiplier: float = 1.0  # sigma: the noise's std is sigma x dp-clipping-norm / clients a round
    dp_clipping_norm: float = 1.0  # C: each client's update is scaled down to at most this L2 norm (adaptive: at first)
    dp_delta: float = 1e-5  # the delta at which each row's epsilon is stated
    dp_target_quantile: float = 0.5  # adaptive: the share of updates C should leave unclipped (Andrew et al.)
    dp_clip_lr: float = 0.2  # adaptive: C <- C exp(-lr (noisy unclipped share - target)) after each round
    dp_clipped_count_stddev: float = 0.0  # adaptive: the noise on the count of unclipped updates; 0: n / 20 (Flower's)
    dp_max_epsilon: float = 0.0  # a run stops before the round that would spend more (0: no budget)
    dp_randomness: str = "seeded"  # the noise and the cohorts: from (seed, round), or 'os' (not replayable)
    # federated method (strategies/method.py: its hooks, checks and the keys it reads): 'fedavg' or 'scaffold'
    client_algorithm: str = "fedavg"
    prox_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 added to the client objective
    # server optimizer (strategies/server_opt.py): the mean client delta as a negative pseudo-gradient
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    plugins: str = ""
    # outputs
    run_dir: str = ""
    tracker: str = "none"  # live tracking beside rows.jsonl: none | tensorboard | wandb (fed_app/runs/trackers.py)

    def __post_init__(self) -> None:
        check_values(self)
        check_combinations(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower's context.run_config or CLI overrides); unknown keys fail, the
        commands' PLUMBING keys are left to `plumbing`."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in PLUMBING:
                continue
            name = to_snake(key)
            if name not in known:
                raise ConfigError(unknown_key_message(key, [to_kebab(n) for n in known]))
            values[name] = coerce(key, value, known[name].type)
        return cls(**values)

    @property
    def total_rounds(self) -> int:
        """num-rounds, times 4/J under rounds-scaling so that total local steps match J=4's."""
        return max(1, round(self.num_rounds * 4 / self.local_steps)) if self.rounds_scaling else self.num_rounds

    @property
    def clients_per_round(self) -> int:
        return share_of(self.fraction_train, self.num_clients)

    @property
    def head_frozen(self) -> bool:
        """Whether a step-0 head is fitted and then kept frozen (rather than trained with the backbone)."""
        return self.head != "none" and self.freeze_head

    @property
    def calibration_clients(self) -> int:
        return share_of(self.calibration_fraction, self.num_clients)

    @property
    def evaluate_clients(self) -> int:
        return share_of(self.fraction_evaluate, self.num_clients)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case keys, as Flower's --run-config and pyproject.toml spell them."""
        return {to_kebab(k): v for k, v in self.to_dict().items()}

    def run_id(self) -> str:
        """Stable id of everything that shapes the results (where they go and how models travel excluded; a key
        added since ids were first given, at its default, too: the runs of before keep their folders)."""
        payload = {k: v for k, v in self.to_dict().items()
                   if k not in NOT_RESULTS and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return digest[:10]


def plumbing(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The PLUMBING keys of a run config (Flower's, a session's or a command line's), '' where not set."""
    return {key: str(run_config.get(key, "")) for key in PLUMBING}


def share_of(fraction: float, total: int) -> int:
    """How many of `total` clients a fraction stands for: round(fraction * total), at least one."""
    return max(1, round(fraction * total))


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse 'lr=0.01 partition="iid"' exactly as `flwr run --run-config` does; a pair that is not valid TOML is
    named, with how to write it."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text]) if text.strip() else {}
    except Exception as err:  # flwr raises click.ClickException for bad TOML values
        raise ConfigError(bad_pair_message(text, parse_config_args, {f.name: f for f in fields(RunConfig)})) from err
