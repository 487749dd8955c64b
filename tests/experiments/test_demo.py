"""`make demo` end to end: the demo manifest's five runs (centralized, FedAvg, sparse FedAvg) and report."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_demo_runs_every_demo_run_and_writes_the_report(tmp_path):
    subprocess.run(["make", "demo", f"RESULTS={tmp_path}"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    runs = [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(("centralized-", "federated-"))]
    assert len(runs) == 5 and all((p / "DONE").exists() for p in runs)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Best centralized hyperparameters by validation accuracy:** scheduler=" in report
    figures = {p.name for p in (tmp_path / "demo" / "figures").glob("*.png")}
    assert {"curves_centralized.png", "curves_federated.png", "bytes_per_round.png"} <= figures
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers == ""  # no SuperLink, SuperExec or Ray process outlives the run
