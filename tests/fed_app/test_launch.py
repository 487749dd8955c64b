"""`make run` (python -m fed_app.launch): SIGHUP (a closed terminal) stops everything it started and releases its
claim, the claim refuses a second federation on a live run, and the rerun ends with the uninterrupted run's rows
and weights. (SIGTERM takes the same path, fed_app/cli.py: tested here in a child process, and on the runner with
its federation in tests/experiments/test_runner.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fed_app.local.local_federation import run_config_arg

from ..conftest import fl_cfg, flower_processes_under, run_in_process

SETTINGS = {"num-rounds": 10, "local-steps": 8, "checkpoint-every": 3, "eval-every": 4}
TIMING = {"wall_time", "round_time"}


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "rows.jsonl").read_text().splitlines()]


def _launch(cfg, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fed_app.launch", "--run-config", run_config_arg(cfg)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One reference run, in process, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("reference")
    return run_in_process(fl_cfg(root, "whole", **SETTINGS))


@pytest.mark.slow
def test_sighup_stops_every_process_and_releases_the_claim_and_the_rerun_ends_as_the_uninterrupted_run(
        tmp_path, uninterrupted):
    signum = signal.SIGHUP  # the terminal that ran `make run` was closed
    cfg = fl_cfg(tmp_path, "cut", **SETTINGS)
    cut = Path(cfg.run_dir)
    proc = _launch(cfg, tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (cut / "CLAIM").exists():
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "fed_app.launch", "--run-config", run_config_arg(cfg)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 2 and f"run {cut} is being run by" in second.stderr  # no second federation
    while time.time() < deadline and not ((cut / "rows.jsonl").exists()
                                          and len((cut / "rows.jsonl").read_text().splitlines()) >= 4):
        time.sleep(0.05)
    assert not (cut / "DONE").exists(), "the run finished before it could be stopped"
    os.kill(proc.pid, signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, output[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in output
    assert flower_processes_under(tmp_path / "results" / ".flwr") == []  # SuperLink, SuperExec, Ray: all gone
    rows = len((cut / "rows.jsonl").read_text().splitlines())
    time.sleep(3)
    assert len((cut / "rows.jsonl").read_text().splitlines()) == rows < 11  # nobody writes the run any more
    assert not (cut / "CLAIM").exists() and not (cut / "DONE").exists()
    rerun = _launch(cfg, tmp_path)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert _rows(cut) == _rows(uninterrupted)
    a = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_unwind_a_command_as_ctrl_c_does(tmp_path, signum):
    """What every command does on either signal (fed_app/cli.py): its `finally` blocks run (here: a file is
    written), then it exits with 128 + the signal and says how to resume."""
    marker = tmp_path / "unwound"
    code = ("import os, signal, time\nfrom fed_app.cli import exit_on_user_error\n"
            "def main():\n    try:\n        os.kill(os.getpid(), %d)\n        time.sleep(30)\n"
            "    finally:\n        open(%r, 'w').write('yes')\nexit_on_user_error(main)\n" % (signum, str(marker)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signum and marker.read_text() == "yes"
    assert proc.stderr.strip() == f"stopped by {signal.Signals(signum).name}; rerun the same command to resume"
