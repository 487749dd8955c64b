"""The epsilon a DP run states holds: at replace-one sensitivity 2C it is never below the exact epsilon of the
Gaussian mechanism (computed here from its definition, independently of any accountant), it matches values
checked by hand, a budget stops a run before the round that would pass it (its checkpoint kept, the same command
resumes it), and dp-randomness='os' draws noise and cohorts nobody can replay."""

import json
import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fed_app.config import ConfigError, RunConfig
from strategies.fedavg import sample_partitions
from fed_app.privacy_accounting import spent_epsilon
from strategies.privacy import DpFedAvg, PrivacyBudgetError, clip_scale

from ..conftest import fl_cfg, run_in_process

pytestmark = pytest.mark.usefixtures("server_app_identity")


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which a mu-GDP mechanism is (epsilon, delta)-DP (Dong, Roth, Su 2019, Corollary 2.13:
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)). T releases of the Gaussian mechanism with
    sensitivity S and noise std s compose exactly to mu = sqrt(T) S / s."""
    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 500.0)


@pytest.mark.parametrize("sigma,rounds", [(4.0, 10), (2.0, 50), (8.0, 200)])
def test_without_sampling_the_epsilon_bounds_the_exact_one_at_sensitivity_2c(sigma, rounds):
    # every client every round: no amplification, so the exact epsilon is the Gaussian mechanism's. Replace-one
    # moves the sum of clipped updates by up to 2C and the noise's std is sigma C: mu = sqrt(T) 2 / sigma.
    exact = exact_gaussian_epsilon(math.sqrt(rounds) * 2 / sigma, 1e-5)
    stated = spent_epsilon(sigma, 10, 10, 1e-5, rounds)
    assert exact <= stated <= 1.5 * exact  # RDP is an upper bound, and not a loose one here
    halved = exact_gaussian_epsilon(math.sqrt(rounds) / sigma, 1e-5)  # sensitivity C: what was stated before
    assert halved < exact  # ...which understated it


def test_the_epsilon_matches_values_checked_by_hand():
    # K=100, 10 a round, 200 rounds, delta 1e-5: dp-accounting's without-replacement RDP at sigma / 2
    # (issue 32, google/differential-privacy#378): sigma 1 -> about 158, sigma 2 -> about 20.7, which is what
    # sigma 1 was stated as when the sensitivity was taken as C.
    assert spent_epsilon(1.0, 10, 100, 1e-5, 200) == pytest.approx(158, rel=0.02)
    assert spent_epsilon(2.0, 10, 100, 1e-5, 200) == pytest.approx(20.7, rel=0.02)
    # sampling 10 of 100 amplifies: far below the same rounds with every client in each
    assert spent_epsilon(2.0, 10, 100, 1e-5, 200) < spent_epsilon(2.0, 100, 100, 1e-5, 200) / 3


def test_a_budget_stops_the_run_before_the_round_that_would_pass_it_and_the_same_command_resumes(tmp_path):
    settings = {"dp": "server-fixed", "dp-noise-multiplier": 1.5, "dp-clipping-norm": 0.5, "num-rounds": 6,
                "checkpoint-every": 5, "eval-every": 2}
    whole = run_in_process(fl_cfg(tmp_path, "whole", **settings))
    spent = [json.loads(line).get("epsilon") for line in (whole / "rows.jsonl").read_text().splitlines()]
    budget = (spent[3] + spent[4]) / 2  # round 4 would pass it
    cut = fl_cfg(tmp_path, "cut", **settings, **{"dp-max-epsilon": budget})
    with pytest.raises(PrivacyBudgetError) as err:
        run_in_process(cut)
    assert str(err.value).startswith(f"round 4 would spend epsilon {spent[4]:.3g} at dp-delta=1e-05, more than "
                                     f"dp-max-epsilon={budget:g}; the run stops after round 3 with its checkpoint")
    folder = tmp_path / "cut"
    assert [json.loads(line)["round"] for line in (folder / "rows.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["round"] == 3  # not on schedule: kept for this
    assert not (folder / "DONE").exists()
    run_in_process(cut.replace(dp_max_epsilon=0.0))  # the same run (a budget is not in its id), resumed
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_one_round_already_passes_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"dp-max-epsilon=0.01 is less than one round spends"):
        fl_cfg(tmp_path, "poor", dp="server-fixed", **{"dp-max-epsilon": 0.01})  # the config itself: no folder made
    assert not (tmp_path / "poor").exists()


def test_os_randomness_draws_noise_and_cohorts_that_the_seed_does_not_give(tmp_path):
    cfg = fl_cfg(tmp_path, "os", dp="server-fixed", **{"dp-randomness": "os"})
    seeded = DpFedAvg(cfg.replace(dp_randomness="seeded"))
    os_random = DpFedAvg(cfg)

    def noise(privacy):
        mean = {"w": torch.zeros(1000)}
        privacy.add_noise_(mean, 1)
        return mean["w"]

    assert torch.equal(noise(seeded), noise(seeded))  # replayable from (seed, round)
    a, b = noise(os_random), noise(os_random)
    assert not torch.equal(a, b) and a.std().item() == pytest.approx(os_random.noise_std, rel=0.1)
    assert seeded.sample(10, 3) is None
    cohorts = {tuple(os_random.sample(10, 3)) for _ in range(20)}
    assert len(cohorts) > 5 and all(len(set(c)) == 3 and max(c) < 10 for c in cohorts)
    assert len(cohorts - {tuple(sample_partitions(cfg.seed, 1, 10, 3))}) >= len(cohorts) - 1


@pytest.mark.parametrize("key", ["lr", "dp-noise-multiplier", "dp-clipping-norm", "round-timeout", "trim-beta",
                                 "dp-max-epsilon"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_key_refuses_nan_and_inf_in_one_sentence(key, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert str(err.value) == f"run-config {key}={value!r} is not a finite number; give a finite value."


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_update_with_nan_or_inf_is_never_taken_for_unclipped(bad):
    assert clip_scale({"w": torch.tensor([3.0, 4.0])}, 1.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_scale({"w": torch.tensor([3.0, bad])}, 1.0)  # min(1, C / NaN) was 1: "unclipped"
