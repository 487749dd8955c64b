"""Trackers: TensorBoard events and W&B offline run files, read back with TensorBoard's event reader and W&B's
record format, hold every row's metrics once per step, across a SIGKILL and resume; rows.jsonl stays the truth."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from fed_app.config import ConfigError, RunConfig
from fed_app.local.local_federation import run_config_arg
from fed_app.runs.trackers import open_tracker, wandb_history, wandb_records

from ...conftest import TINY


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]


def _killed_and_resumed(tmp_path: Path, tracker: str) -> Path:
    """A centralized run with `tracker`, SIGKILLed after its second row, then run again to the end."""
    cfg = RunConfig.from_run_config({**TINY, "epochs": 4, "tracker": tracker, "run-dir": str(tmp_path / "run")})
    cmd = [sys.executable, "-m", "fed_app.centralized", "--run-config", run_config_arg(cfg)]
    rows_file = tmp_path / "run" / "rows.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not (rows_file.exists() and len(rows_file.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "DONE").exists()
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    return tmp_path / "run"


def _scalars(events: Path, name: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(events))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(name)]


@pytest.mark.slow
def test_tensorboard_events_hold_each_rows_metrics_once_across_a_kill_and_resume(tmp_path):
    run = _killed_and_resumed(tmp_path, "tensorboard")
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    for name in ("val_accuracy", "test_loss"):
        got = _scalars(run / "tensorboard", name)
        assert [s for s, _ in got] == [0, 1, 2, 3, 4]  # every step once, though two sessions wrote events
        assert all(v == pytest.approx(r[name], rel=1e-6) for (_, v), r in zip(got, rows))
    assert [s for s, _ in _scalars(run / "tensorboard", "train_loss")] == [1, 2, 3, 4]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lr"].number_value == TINY["lr"]  # the run config, once
    assert start.session_start_info.hparams["tracker"].string_value == "tensorboard"


def test_a_resume_that_recomputes_rows_logs_no_step_twice(tmp_path):
    cfg = RunConfig.from_run_config({**TINY, "tracker": "tensorboard"})
    first = open_tracker(cfg, tmp_path, "round")
    for step in range(4):
        first.log({"round": step, "val_accuracy": step / 10})
    first.close()  # the run stopped after round 3; its last checkpoint was round 1
    resumed = open_tracker(cfg, tmp_path, "round")
    for step in (2, 3, 4):
        resumed.log({"round": step, "val_accuracy": step / 10})
    resumed.close()
    got = _scalars(tmp_path / "tensorboard", "val_accuracy")
    assert [s for s, _ in got] == [0, 1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.slow
def test_wandb_offline_run_files_hold_each_rows_metrics_once_in_one_run_across_a_kill_and_resume(tmp_path):
    run = _killed_and_resumed(tmp_path, "wandb")
    rows = {r["epoch"]: r for r in _rows(run)}
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2  # the killed session and the resumed one, both run `run`
    logged = {}
    for session in sessions:
        for step, items in wandb_history(next(session.glob("run-*.wandb"))):
            assert step not in logged  # no step twice, across both sessions
            logged[step] = items
    resumed = next(r.run for r in wandb_records(next(sessions[-1].glob("run-*.wandb")))
                   if r.WhichOneof("record_type") == "run")
    assert resumed.run_id == "run" and resumed.run_group == tmp_path.name  # one W&B run, grouped by manifest
    config = {i.key: json.loads(i.value_json) for i in resumed.config.update}
    assert config["lr"] == TINY["lr"] and config["tracker"] == "wandb"
    assert sorted(logged) == [0, 1, 2, 3, 4]
    for step, items in logged.items():
        assert items["val_accuracy"] == pytest.approx(rows[step]["val_accuracy"])


def test_a_tracker_whose_package_is_missing_is_one_sentence(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracker='wandb' needs the wandb package, which is not installed; "
                                          r"pip install -e \"\.\[track\]\" \(or tracker='none'\)\."):
        RunConfig(tracker="wandb")
