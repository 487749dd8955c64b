"""The benchmark command prints its table (timings themselves are never asserted)."""

import subprocess
import sys

import pytest


def test_bench_fisher_prints_a_table_with_the_three_methods():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "fisher", "--samples", "8", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    for method in ("exact per-sample (vmap)", "per-sample backward loop", "batch shortcut (not exact)"):
        assert f"| {method} |" in out


def test_bench_data_prints_preparation_and_training_rates():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "data"], capture_output=True, text=True,
                         check=True).stdout
    assert "| prepare batches at 224 px" in out and "| training step incl. preparation" in out


@pytest.mark.slow
def test_bench_round_prints_limit_flower_and_ratio_for_dense_and_sparse():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "round", "--rounds", "4", "--warmup", "1",
                          "--run-config", "num-clients=20 synthetic-train-size=2500"],
                         capture_output=True, text=True, check=True).stdout
    assert "| dense |" in out and "| sparse-sgdm (sparsity 0.9) |" in out and "sparse / dense upload: 0.1" in out
