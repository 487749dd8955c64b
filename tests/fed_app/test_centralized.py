"""Centralized baseline: it learns, writes its run files, resumes bit-identically after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fed_app import centralized
from fed_app.config import ConfigError, RunConfig
from fed_app.task.train import make_scheduler

from ..conftest import TINY

TIMING = {"wall_time", "epoch_time"}


def _overrides(cfg_dict):
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in cfg_dict.items())


def test_a_run_learns_and_writes_config_rows_checkpoint_curves_done(tiny_cfg):
    cfg = tiny_cfg.replace(epochs=5)
    run_dir = centralized.run(cfg)
    rows = run_dir.rows()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[-1]["test_accuracy"] > 0.25  # 25x chance on synthetic data after 5 tiny epochs
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert json.loads(run_dir.config_file.read_text()) == cfg.to_dict()
    assert run_dir.done and (run_dir.path / "curves.png").stat().st_size > 0
    assert run_dir.load_checkpoint()["epoch"] == 5
    stamp = run_dir.rows_file.stat().st_mtime_ns
    centralized.run(cfg)  # done: not rerun
    assert run_dir.rows_file.stat().st_mtime_ns == stamp


def test_a_run_dir_of_another_config_is_refused_before_any_work(tiny_cfg):
    centralized.run(tiny_cfg.replace(epochs=1))
    with pytest.raises(ConfigError, match=r"holds a run with lr=0.05, not 0.1; pick another run-dir"):
        centralized.run(tiny_cfg.replace(epochs=1, lr=0.1))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_rows_and_weights(tmp_path):
    settings = {**TINY, "epochs": 5, "synthetic-train-size": 2200, "val-size": 200}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(run_dir):
        return [sys.executable, "-m", "fed_app.centralized", "--run-config",
                _overrides({**settings, "run-dir": str(run_dir)})]

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = killed / "rows.jsonl"
        if rows.exists() and len(rows.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "DONE").exists(), "the run finished before it could be killed"
    subprocess.run(command(killed), check=True, env=env, capture_output=True)

    def load(run_dir):
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (run_dir / "rows.jsonl").read_text().splitlines()]
        return rows, torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]

    rows_a, weights_a = load(tmp_path / "whole")
    rows_b, weights_b = load(killed)
    assert rows_a == rows_b and len(rows_a) == 6
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_cli_reports_a_bad_key_in_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fed_app.centralized", "--run-config", "lrr=0.1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown run-config key 'lrr' (did you mean 'lr'?); every key, with its "
                                   "default, is in [tool.flwr.app.config] of pyproject.toml.")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["cosine", "warmup-cosine", "step", "exponential", "constant"])
def test_every_scheduler_follows_its_shape_over_the_run(name):
    cfg = RunConfig(scheduler=name, epochs=6, lr=1.0, warmup_epochs=1, step_size=2, gamma=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected_at = {  # lr at the start of epoch 0, 1, 3 and in the last step
        "cosine": (1.0, 0.933, 0.5, 0.0007),
        "warmup-cosine": (0.1, 1.0, 0.655, 0.001),
        "step": (1.0, 1.0, 0.5, 0.25),
        "exponential": (1.0, 0.5, 0.125, 0.0167),
        "constant": (1.0, 1.0, 1.0, 1.0),
    }[name]
    assert lrs[0] == pytest.approx(expected_at[0], abs=2e-3)
    assert lrs[10] == pytest.approx(expected_at[1], abs=2e-3)
    assert lrs[30] == pytest.approx(expected_at[2], abs=2e-3)
    assert lrs[59] == pytest.approx(expected_at[3], abs=2e-3)
