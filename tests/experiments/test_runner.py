"""The runner: a killed manifest run restarts where it stopped and never redoes a finished run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.manifest import load_manifest
from fed_app import centralized

from ..conftest import flower_processes_under, run_in_process

MANIFEST = """
name: tiny
kind: centralized
base: {dataset: synthetic, model: vit-tiny-test, synthetic-train-size: 1400, synthetic-test-size: 300,
       val-size: 200, batch-size: 32, device: cpu, epochs: 3}
grid:
  lr: [0.02, 0.05, 0.1]
seeds: [1]
"""


def _runner(manifest, results, *extra):
    return [sys.executable, "-m", "experiments", "run", str(manifest), "--results", str(results), *extra]


@pytest.mark.slow
def test_a_runner_sigkilled_mid_run_leaves_finished_runs_alone_and_another_runner_finishes_the_rest(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST)
    results = tmp_path / "results"
    runs = load_manifest(manifest, results).runs
    first, second = (Path(r.cfg.run_dir) for r in runs[:2])
    proc = subprocess.Popen(_runner(manifest, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((second / "rows.jsonl").exists()
                                          and len((second / "rows.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: its claim stays behind, its training process is told to stop
    proc.wait()
    assert (first / "DONE").exists()
    assert (second / "CLAIM").exists() and not (second / "DONE").exists()
    stamp = (first / "rows.jsonl").stat().st_mtime_ns

    listing = subprocess.run(_runner(manifest, results, "--dry-run"), capture_output=True, text=True, check=True)
    assert "done" in listing.stdout and "lr=0.1" in listing.stdout
    other = subprocess.run(_runner(manifest, results), capture_output=True, text=True, env={**os.environ,
                                                                                           "COLUMNS": "300"})
    assert other.returncode == 0, other.stdout + other.stderr
    assert all((Path(r.cfg.run_dir) / "DONE").exists() for r in runs)
    assert (first / "rows.jsonl").stat().st_mtime_ns == stamp  # a finished run is not redone
    assert {r.run_id: _rows(r.cfg.run_dir) for r in runs} == _reference(tmp_path, MANIFEST)  # the stale claim's too

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
    assert "set data-root: '/path/to/dir/containing/it' in the manifest's base" in proc.stdout  # as it was run
    assert "2 runs failed" in proc.stderr
    assert not list((tmp_path / "results" / "offline").glob("federated-*"))  # failed starts leave no folders
    assert not (tmp_path / "results" / "offline" / ".flwr").exists()  # no flwr run was started


TIMING = {"wall_time", "epoch_time"}
FOUR = MANIFEST.replace("seeds: [1]", "seeds: [1, 2]").replace("epochs: 3", "epochs: 2").replace("[0.02, 0.05, 0.1]", "[0.05, 0.1]")


def _rows(run_dir, timing=frozenset()):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING | set(timing)}
            for line in (Path(run_dir) / "rows.jsonl").read_text().splitlines()]


def _reference(tmp_path, text):
    """The (centralized) runs of `text` done one at a time in this process: id -> rows."""
    manifest = tmp_path / "reference" / "tiny.yaml"
    manifest.parent.mkdir()
    manifest.write_text(text)
    runs = load_manifest(manifest, tmp_path / "reference").runs
    for r in runs:
        centralized.run(r.cfg)
    return {r.run_id: _rows(r.cfg.run_dir) for r in runs}


@pytest.mark.slow
def test_three_runners_at_once_do_every_run_exactly_once_with_a_single_runners_results(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(FOUR)
    results = tmp_path / "results"
    procs = [subprocess.Popen(_runner(manifest, results, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "COLUMNS": "300"})
             for extra in (["--devices", "cpu,cpu"], [], [])]  # the first runner runs two at a time
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    runs = load_manifest(manifest, results).runs
    for run in runs:
        assert [r["epoch"] for r in _rows(run.cfg.run_dir)] == [0, 1, 2]  # no step twice
        assert (Path(run.cfg.run_dir) / "DONE").exists() and not (Path(run.cfg.run_dir) / "CLAIM").exists()
    trained = sum(o.count("epoch 2/2") for o in outputs)
    assert trained == len(runs)  # each run trained by exactly one runner
    reference = _reference(tmp_path, FOUR)
    for run in runs:  # a CPU slot trains on its share of the cores: sums in another order, equal to float error
        assert _rows(run.cfg.run_dir) == [pytest.approx(row, rel=1e-5) for row in reference[run.run_id]]


def test_a_device_that_is_not_there_is_one_sentence_before_any_run(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST)
    for devices, what in (("7", "'7'"), ("gpu0", "'gpu0'")):
        proc = subprocess.run(_runner(manifest, tmp_path / "results", "--devices", devices), capture_output=True,
                              text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: --devices entry {what} is not a device here (this machine has no GPU); "
                                       f"give GPU indices and/or cpu, e.g. --devices 0,1 or --devices cpu,cpu")
    assert not (tmp_path / "results").exists()


def test_a_results_folder_that_cannot_be_written_is_one_sentence_before_any_run(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(_runner(manifest, blocker / "results"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: cannot write a claim in {blocker / 'results' / 'tiny'} (")
    assert proc.stderr.strip().endswith("point --results (or run-dir) at a folder this user can write")


@pytest.mark.slow
def test_two_cpu_slots_run_two_runs_at_once(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(MANIFEST)
    results = tmp_path / "results"
    subprocess.run(_runner(manifest, results, "--devices", "cpu,cpu"), check=True, capture_output=True)
    spans = sorted(((Path(r.cfg.run_dir) / "config.json").stat().st_mtime,
                    (Path(r.cfg.run_dir) / "DONE").stat().st_mtime) for r in load_manifest(manifest, results).runs)
    assert spans[1][0] < spans[0][1]  # the second run started before the first one finished
    logs = [(Path(r.cfg.run_dir) / "run.log").read_text() for r in load_manifest(manifest, results).runs]
    assert all("epoch 3/3" in log for log in logs)  # each run's own output kept in its folder


FEDERATED = """
name: fl
kind: federated
base: {dataset: synthetic, model: vit-tiny-test, synthetic-train-size: 3200, synthetic-test-size: 300,
       val-size: 200, batch-size: 32, eval-batch-size: 256, device: cpu, num-clients: 10, fraction-train: 0.3,
       num-rounds: 10, local-steps: 8, checkpoint-every: 3, eval-every: 4}
grid:
  lr: [0.05]
seeds: [1]
"""


@pytest.mark.slow
def test_sigterm_stops_the_runner_and_its_federation_and_the_rerun_ends_as_the_uninterrupted_run(tmp_path):
    manifest = tmp_path / "fl.yaml"
    manifest.write_text(FEDERATED)
    results = tmp_path / "results"
    run_dir = Path(load_manifest(manifest, results).runs[0].cfg.run_dir)
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.Popen(_runner(manifest, results), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "rows.jsonl").exists()
                                          and len((run_dir / "rows.jsonl").read_text().splitlines()) >= 4):
        time.sleep(0.05)
    assert not (run_dir / "DONE").exists(), "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert flower_processes_under(results / "fl" / ".flwr") == []  # SuperLink, SuperExec, Ray: all gone
    rows = len((run_dir / "rows.jsonl").read_text().splitlines())
    time.sleep(3)
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == rows < 11
    assert not (run_dir / "CLAIM").exists()
    rerun = subprocess.run(_runner(manifest, results), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr
    assert "round 10/10" in rerun.stdout and "INFO:" not in rerun.stdout  # each row logged once, plainly
    reference = run_in_process(load_manifest(manifest, tmp_path / "reference").runs[0].cfg)
    assert _rows(run_dir, {"round_time"}) == _rows(reference, {"round_time"})
    a = torch.load(reference / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
