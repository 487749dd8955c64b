"""The benchmark command prints its table (timings themselves are never asserted)."""

import subprocess
import sys


def test_bench_fisher_prints_a_table_with_the_three_methods():
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "fisher", "--samples", "8", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    for method in ("exact per-sample (vmap)", "per-sample backward loop", "batch shortcut (not exact)"):
        assert f"| {method} |" in out
