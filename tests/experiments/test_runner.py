"""The runner: a killed manifest run restarts where it stopped and never redoes a finished run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.manifest import load_manifest

MANIFEST = """
name: tiny
kind: centralized
base: {dataset: synthetic, model: vit-tiny-test, synthetic-train-size: 3200, synthetic-test-size: 300,
       val-size: 200, batch-size: 32, device: cpu, epochs: 3}
grid:
  lr: [0.02, 0.05, 0.1]
seeds: [1]
"""


def _runner(manifest, results, *extra):
    return [sys.executable, "-m", "experiments", "run", str(manifest), "--results", str(results), *extra]


@pytest.mark.slow
def test_a_killed_manifest_run_resumes_without_redoing_finished_runs(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST)
    results = tmp_path / "results"
    runs = load_manifest(manifest, results).runs
    first_done = Path(runs[0].cfg.run_dir) / "DONE"
    proc = subprocess.Popen(_runner(manifest, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not first_done.exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_done.exists() and not (Path(runs[-1].cfg.run_dir) / "DONE").exists()
    stamp = (Path(runs[0].cfg.run_dir) / "rows.jsonl").stat().st_mtime_ns

    listing = subprocess.run(_runner(manifest, results, "--dry-run"), capture_output=True, text=True, check=True)
    assert "done" in listing.stdout and "lr=0.1" in listing.stdout
    subprocess.run(_runner(manifest, results), check=True, capture_output=True)
    assert all((Path(r.cfg.run_dir) / "DONE").exists() for r in runs)
    assert (Path(runs[0].cfg.run_dir) / "rows.jsonl").stat().st_mtime_ns == stamp  # not redone

    report = subprocess.run([sys.executable, "-m", "experiments", "report", str(results / "tiny")],
                            capture_output=True, text=True, check=True)
    text = Path(report.stdout.strip()).read_text()
    assert "Best centralized configuration by validation accuracy:** lr=" in text


def test_a_bad_manifest_stops_the_runner_before_any_run(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(MANIFEST.replace("lr: [0.02, 0.05, 0.1]", "lr: [0.02, -1.0]"))
    proc = subprocess.run(_runner(manifest, tmp_path / "results"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: manifest bad.yaml: run-config lr=-1.0 is out of range; it must be > 0.0."
    assert not (tmp_path / "results").exists()


def test_missing_cifar_fails_each_federated_run_with_the_fix_before_flower_starts(tmp_path):
    manifest = tmp_path / "offline.yaml"
    manifest.write_text(f"name: offline\nkind: federated\nbase: {{data-root: '{tmp_path / 'nowhere'}', "
                        f"download: false, model: vit-tiny-test, num-clients: 10}}\ngrid: {{local-steps: [4, 8]}}\n")
    proc = subprocess.run(_runner(manifest, tmp_path / "results"), capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 1
    assert proc.stdout.count("CIFAR-100 is not under data-root=") == 2 and "cifar-100-python" in proc.stdout
    assert "2 runs failed" in proc.stderr
    assert not list((tmp_path / "results" / "offline").glob("federated-*/rows.jsonl"))
    assert not (tmp_path / "results" / "offline" / ".flwr").exists()  # no flwr run was started
