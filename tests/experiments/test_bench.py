"""The benchmark command prints its table (timings themselves are never asserted)."""

import subprocess
import sys

import pytest

from experiments.bench.grid import group_by_cost, projected_seconds
from fed_app.config import RunConfig

from ..conftest import background_command


def test_bench_fisher_prints_a_table_with_the_three_methods():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "fisher", "--samples", "8", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    for method in ("exact per-sample (vmap)", "per-sample backward loop", "batch shortcut (not exact)"):
        assert f"| {method} |" in out


def test_bench_data_prints_preparation_and_training_rates():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "data"], capture_output=True, text=True,
                         check=True).stdout
    assert "| prepare batches at 224 px" in out and "| training step incl. preparation (vit-tiny-test, 32 px, eager)" in out
    assert "32 px, torch.compile; compiling took" in out


def _bench(*args):
    return [sys.executable, "-m", "experiments", "bench", *args]


@background_command("bench-round")
def _bench_round(folder):
    return _bench("round", "--local-steps", "4", "--rounds", "4", "--warmup", "1", "--run-config",
                  "num-clients=10 synthetic-train-size=1200")


@pytest.mark.slow
@pytest.mark.background("bench-round")
def test_bench_round_prints_limit_flower_and_ratio_for_dense_and_sparse(background):
    out = background.output("bench-round")
    assert "| J=4, dense |" in out and "| J=4, sparse-sgdm (sparsity 0.9) |" in out
    assert "J=4: sparse / dense upload: 0.091" in out  # 10% of the backbone; the frozen step-0 head stays put


@background_command("bench-stock")
def _bench_stock(folder):
    return _bench("round", "--against", "stock", "--repeats", "1", "--local-steps", "2", "--rounds", "4", "--warmup",
                  "1", "--run-config", "num-clients=10 fraction-train=0.3 synthetic-train-size=1500")


@pytest.mark.slow
@pytest.mark.background("bench-stock")
def test_bench_round_against_the_stock_app_and_by_phase(background):
    out = background.output("bench-stock")
    assert "| J=2, dense |" in out and "files / stock" in out  # the stock app ran, beside both transports
    assert "| nodes' partition ids (query round; the server's task builds meanwhile) |" in out
    assert "| start-up (SuperLink, simulation, ServerApp) |" in out
    assert "| J=2, dense, stock Flower app |" in out and "| J=2, dense, fedit, messages |" in out  # CPU by process
    assert "| J=2, files |" in out and "| J=2, messages |" in out and "client_train" in out  # by phase


def test_grid_groups_runs_that_cost_the_same_per_round():
    base = RunConfig(model="vit-tiny-test")
    runs = [base.replace(local_steps=j, partition=p, seed=s) for j in (4, 16) for p in ("iid", "noniid")
            for s in (1, 2)] + [base.replace(optimizer="sparse-sgdm", head="ridge")]
    groups = group_by_cost(runs)
    assert [len(g) for g in groups] == [4, 4, 1]
    assert [{c.local_steps for c in g} for g in groups] == [{4}, {16}, {4}]


def test_projection_counts_every_round_and_each_evaluation_on_the_server_schedule():
    cfg = RunConfig(num_rounds=500, local_steps=16, rounds_scaling=True, eval_every=10, test_every=0)
    # 125 rounds; validation at rounds 0, 10, ..., 120 and the last (125): 14; test at rounds 0 and 125: 2
    assert projected_seconds(cfg, round_s=2.0, fixed_s=30.0, val_s=1.0, test_s=3.0) == 30 + 125 * 2 + 14 + 6
    cfg = cfg.replace(test_every=50)  # and at 50, 100
    assert projected_seconds(cfg, round_s=2.0, fixed_s=30.0, val_s=1.0, test_s=3.0) == 30 + 125 * 2 + 14 + 12


@background_command("bench-grid")
def _bench_grid(folder):
    manifest = folder / "m.yaml"
    manifest.write_text("name: m\nkind: federated\nbase: {num-clients: 10, fraction-train: 0.2, num-rounds: 40}\n"
                        "grid: {partition: [iid, noniid], classes-per-client: [5]}\nseeds: [1, 2]\n")
    return _bench("grid", "--manifest", str(manifest), "--rounds", "4", "--warmup", "1", "--against", "stock",
                  "--run-config", "synthetic-train-size=1500")


@pytest.mark.slow
@pytest.mark.background("bench-grid")
def test_bench_grid_measures_once_per_cost_group_and_prints_the_projection(background):
    out = background.output("bench-grid")
    assert "| all runs | 4 | 160 |" in out and "projected wall time of the whole manifest:" in out
    assert "| runs that cost alike | start-up (SuperLink, simulation, ServerApp) |" in out
    assert "| all runs | stock Flower app |" in out and "| all runs | fedit, a run of its own |" in out
    assert "| all runs | fedit, a later run of a session |" in out  # the runner's later runs skip start-up


def test_bench_refuses_a_warmup_that_leaves_no_steady_rounds():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "round", "--rounds", "4", "--warmup", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--warmup 2 with --rounds 4 leaves no steady rounds" in out.stderr
