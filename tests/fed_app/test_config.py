"""RunConfig: defaults equal pyproject's, kebab keys, one-sentence errors."""

import tomllib
from pathlib import Path

import pytest

from fed_app.applicability import applies
from fed_app.config import PLUMBING, ConfigError, RunConfig, parse_overrides, plumbing

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_holds_every_key_with_the_dataclass_default():
    flwr_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_config == {**RunConfig().to_run_config(), **{key: "" for key in PLUMBING}}
    assert RunConfig.from_run_config(flwr_config) == RunConfig()  # the commands' keys are not a run's
    assert plumbing({**flwr_config, "claim-token": "abc"}) == {"claim-token": "abc", "session": ""}


def test_overrides_parse_like_flwr_and_coerce_ints_to_floats():
    cfg = RunConfig.from_run_config(parse_overrides("lr=1 epochs=3 scheduler='step' augment=false"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert (cfg.epochs, cfg.scheduler, cfg.augment) == (3, "step", False)


@pytest.mark.parametrize("overrides, words", [
    ({"lrr": 0.1}, ["'lrr'", "did you mean 'lr'"]),
    ({"epochs": "ten"}, ["epochs='ten'", "must be an int"]),
    ({"learning-rate": 0.1}, ["'learning-rate'", "did you mean 'lr'?"]),  # the initials of its words
    ({"rounds": 5}, ["'rounds'", "did you mean 'num-rounds' or"]),  # its last word
    ({"scheduler": "linear"}, ["scheduler='linear'", "cosine"]),
    ({"batch-size": 0}, ["batch-size=0", ">= 1"]),
    ({"lr": 0.0}, ["lr=0.0", "> 0"]),
    ({"momentum": 1.0}, ["momentum=1.0", "< 1.0"]),
    ({"sparsity": 1.0}, ["sparsity=1.0", "< 1.0"]),
    ({"optimizer": "sparse-sgdm"}, ["optimizer='sparse-sgdm'", "head='ridge'"]),  # a random head would be masked
    ({"optimizer": "sparse-sgdm", "head": "ridge", "freeze-head": False}, ["freeze-head=false", "frozen"]),
])
def test_bad_key_or_value_is_one_sentence_naming_it(overrides, words):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(overrides)
    message = str(err.value)
    assert "\n" not in message and message.endswith((".", "?", ")."))
    for word in words:
        assert word in message


def test_run_id_is_stable_and_ignores_run_dir():
    a = RunConfig.from_run_config({"lr": 0.1, "seed": 1})
    b = RunConfig.from_run_config({"seed": 1, "lr": 0.1, "run-dir": "/elsewhere"})
    assert a.run_id() == b.run_id() != RunConfig().run_id()


def test_a_key_applies_only_to_the_runs_it_shapes():
    dense = RunConfig(head="ridge")
    sparse = RunConfig(optimizer="sparse-sgdm", head="ridge", mask_rule="random")
    assert not applies(dense, "sparsity", "federated") and applies(sparse, "sparsity", "federated")
    assert not applies(sparse, "calibration_rounds", "centralized") and not applies(sparse, "fisher_mode", "federated")
    assert applies(sparse, "mask_threshold", "federated")  # the random rule: one round, thresholded per layer
    fisher = sparse.replace(mask_rule="least-sensitive")
    assert applies(fisher, "calibration_rounds", "centralized") and not applies(fisher, "mask_threshold", "federated")
    assert applies(dense, "epochs", "centralized") and not applies(dense, "epochs", "federated")
    assert not applies(dense, "local_steps", "centralized") and applies(dense, "local_steps", "federated")
    assert not applies(dense, "classes_per_client", "federated")
    assert applies(RunConfig(partition="noniid"), "classes_per_client", "federated")
    assert applies(dense, "freeze_head", "federated") and not applies(RunConfig(), "freeze_head", "federated")
    assert not applies(dense, "warmup_epochs", "centralized") and applies(dense, "lr", "centralized")


def test_bad_fl_values_fail_before_any_round():
    with pytest.raises(ConfigError, match="partition='pathological' is not one of iid, noniid, dirichlet"):
        RunConfig.from_run_config({"partition": "pathological"})
    with pytest.raises(ConfigError, match="local-steps=0 is out of range"):
        RunConfig.from_run_config({"local-steps": 0})
    with pytest.raises(ConfigError, match="fraction-train=1.5 is out of range; it must be <= 1.0"):
        RunConfig.from_run_config({"fraction-train": 1.5})


def test_rounds_scaling_keeps_total_local_steps_equal_across_j():
    for j, rounds in [(4, 500), (8, 250), (16, 125)]:
        cfg = RunConfig(num_rounds=500, local_steps=j, rounds_scaling=True)
        assert cfg.total_rounds == rounds and cfg.total_rounds * j == 2000
    assert RunConfig(num_rounds=500, local_steps=16).total_rounds == 500


@pytest.mark.parametrize("text, message", [
    ("lr=0.1 partition=noniid", "run-config partition=noniid is not valid: text goes in quotes, so write "
                                "partition='noniid' (numbers and true/false go without)."),
    ("num-rounds=ten", "run-config num-rounds=ten is not valid: num-rounds takes an int, e.g. num-rounds=200."),
    ("augment=yes", "run-config augment=yes is not valid: augment takes true or false, e.g. augment=true."),
    ("data-root=/data/cifar", "run-config data-root=/data/cifar is not valid: text goes in quotes, so write "
                              "data-root='/data/cifar' (numbers and true/false go without)."),
])
def test_a_malformed_pair_is_named_with_how_to_write_it(text, message):
    with pytest.raises(ConfigError) as err:
        parse_overrides(text)
    assert str(err.value) == message


@pytest.mark.parametrize("via, fix", [
    ("", "pass --run-config \"data-root='/path/to/dir/containing/it'\""),
    ("make", "add RUN_CONFIG=\"data-root='/path/to/dir/containing/it'\" to the make command"),
    ("manifest", "set data-root: '/path/to/dir/containing/it' in the manifest's base"),
])
def test_the_fix_is_phrased_the_way_the_user_gives_values(via, fix, monkeypatch, tmp_path):
    from fed_app.errors import CONFIG_FROM, DataError
    from fed_app.task.data import read_cifar100

    monkeypatch.setenv(CONFIG_FROM, via)
    with pytest.raises(DataError) as err:
        read_cifar100(str(tmp_path), download=False)
    assert fix in str(err.value)


def test_a_key_added_later_stays_out_of_the_run_id_at_its_default_so_earlier_runs_keep_their_folders():
    import hashlib
    import json

    from fed_app.config import ADDED_LATER, NOT_RESULTS

    cfg = RunConfig(lr=0.03, partition="noniid")
    before = {k: v for k, v in cfg.to_dict().items() if k not in NOT_RESULTS and k not in ADDED_LATER}
    assert cfg.run_id() == hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
    assert cfg.replace(aggregation="krum", num_malicious_clients=1).run_id() != \
        cfg.replace(aggregation="krum").run_id()  # set, it is part of what the run is
