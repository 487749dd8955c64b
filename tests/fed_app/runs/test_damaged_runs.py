"""Damaged run folders recover or explain, centralized and federated: a checkpoint cut in half gives way to the
one before it and a torn last row is dropped, ending equal to an uninterrupted run; a disk that fills up (a
file-size limit, in a child process) stops the run with one sentence, its last good checkpoint kept, and the same
command resumes to the uninterrupted end once there is room."""

import json
import logging
import resource
import signal
import subprocess
import sys

import pytest
import torch

from fed_app import centralized, server_app
from fed_app.config import RunConfig
from fed_app.local.local_federation import run_config_arg
from fed_app.runs.rundir import RunDir

from ...conftest import TINY, InProcessGrid, fl_cfg

TIMING = {"wall_time", "epoch_time", "round_time", "task_builds"}
SMALL = {**TINY, "synthetic-train-size": 800, "val-size": 100}  # a few seconds an epoch


def _rows(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in RunDir(run_dir).rows()]


def _model(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _same_model(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _damage(run_dir, key):
    """A copy of checkpoint.pt cut in half, and a row cut mid-write at the end of rows.jsonl."""
    checkpoint = run_dir / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with open(run_dir / "rows.jsonl", "a") as f:
        f.write(f'{{"{key}": 9, "train_lo')


def _stop_at_row(monkeypatch, key, step):
    """The process stops (as if killed) when it is about to write row `step`."""
    append = RunDir.append_row

    def append_or_stop(self, row):
        if row[key] == step:
            raise KeyboardInterrupt
        append(self, row)

    monkeypatch.setattr(RunDir, "append_row", append_or_stop)


def test_a_centralized_run_with_a_cut_checkpoint_and_a_torn_row_resumes_to_the_uninterrupted_end(
        tmp_path, monkeypatch, caplog):
    cfg = {**SMALL, "epochs": 4}
    whole = centralized.run(RunConfig.from_run_config({**cfg, "run-dir": str(tmp_path / "whole")}))
    cut = RunConfig.from_run_config({**cfg, "run-dir": str(tmp_path / "cut")})
    with monkeypatch.context() as patch:
        _stop_at_row(patch, "epoch", 3)  # checkpoints at epochs 0, 1, 2 were written
        with pytest.raises(KeyboardInterrupt):
            centralized.run(cut)
    assert torch.load(tmp_path / "cut" / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    _damage(tmp_path / "cut", "epoch")
    with caplog.at_level(logging.WARNING, logger="fed_app.runs.rundir"):
        centralized.run(cut)
    said = caplog.text
    assert "checkpoint.pt cannot be read" in said and "from its previous checkpoint" in said
    assert "rows.jsonl is cut short" in said
    assert _rows(tmp_path / "cut") == _rows(whole.path)
    assert _same_model(_model(tmp_path / "cut"), _model(whole.path))


def _limited(limit):
    """A child process whose files cannot grow past `limit` bytes: a write beyond it fails with EFBIG, as on a
    full disk (SIGXFSZ ignored, so the write fails instead of killing the process)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _disk_fills_then_resumes(command, run_dir, limit, whole, key):
    full = subprocess.run(command, capture_output=True, text=True, preexec_fn=_limited(limit))
    assert full.returncode == 2, full.stderr[-2000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [f"error: {run_dir / 'checkpoint.pt'} could not be written (File too large); the run stops here "
                      f"with its files as they were and its last checkpoint kept: make room on that disk (or raise "
                      f"the file-size limit) and run the same command to resume."]
    assert not (run_dir / "checkpoint.pt.tmp").exists() and not (run_dir / "DONE").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)[key] == 0  # the last good one, readable
    again = subprocess.run(command, capture_output=True, text=True)  # room again: the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert _rows(run_dir) == _rows(whole) and _same_model(_model(run_dir), _model(whole))


def test_a_centralized_run_that_fills_the_disk_stops_in_one_sentence_and_resumes(tmp_path):
    cfg = {**SMALL, "epochs": 2}
    whole = centralized.run(RunConfig.from_run_config({**cfg, "run-dir": str(tmp_path / "whole")}))
    # epoch 0's checkpoint holds no momentum yet, the later ones do: room for the first only
    limit = int(0.75 * (tmp_path / "whole" / "checkpoint.pt").stat().st_size)
    run_dir = tmp_path / "full"
    cfg = RunConfig.from_run_config({**cfg, "run-dir": str(run_dir)})
    command = [sys.executable, "-m", "fed_app.centralized", "--run-config", run_config_arg(cfg)]
    _disk_fills_then_resumes(command, run_dir, limit, whole.path, "epoch")


@pytest.mark.usefixtures("server_app_identity")
def test_a_scaffold_run_with_a_cut_checkpoint_and_a_torn_row_resumes_to_the_uninterrupted_end(tmp_path, caplog):
    """SCAFFOLD: the clients kept the control variates a resume from the older checkpoint needs."""
    settings = {"client-algorithm": "scaffold", "checkpoint-every": 1, "fraction-train": 0.5}
    whole = fl_cfg(tmp_path, "whole", **settings)
    server_app.run(InProcessGrid(whole), whole)
    cut = fl_cfg(tmp_path, "cut", **settings)
    with pytest.raises(RuntimeError, match="went away"):  # 5 clients a round: stops inside round 4
        server_app.run(InProcessGrid(cut, fail_after=3 * 5 + 4), cut)
    assert torch.load(tmp_path / "cut" / "checkpoint.prev.pt", weights_only=True)["round"] == 2
    _damage(tmp_path / "cut", "round")
    with caplog.at_level(logging.WARNING, logger="fed_app.runs.rundir"):
        server_app.run(InProcessGrid(cut), cut)
    assert "from its previous checkpoint" in caplog.text and "rows.jsonl is cut short" in caplog.text
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    assert _same_model(_model(tmp_path / "cut"), _model(tmp_path / "whole"))


def test_a_federated_run_that_fills_the_disk_stops_in_one_sentence_and_resumes(tmp_path):
    settings = {"server-optimizer": "fedadam", "server-lr": 0.01, "num-rounds": 2, "transport": "messages"}
    whole = fl_cfg(tmp_path, "whole", **settings)
    subprocess.run([sys.executable, "-c", _IN_PROCESS, json.dumps(whole.to_run_config())], check=True)
    # round 0's checkpoint is the model alone; from round 1 on FedAdam's two moments join it
    model_bytes = sum(t.numel() * 4 for t in _model(tmp_path / "whole").values())
    run_dir = tmp_path / "full"
    cfg = fl_cfg(tmp_path, "full", **settings)
    command = [sys.executable, "-c", _IN_PROCESS, json.dumps(cfg.to_run_config())]
    _disk_fills_then_resumes(command, run_dir, 2 * model_bytes, tmp_path / "whole", "round")


# A federated run in a process of its own (the real ServerApp and ClientApp, in process), as a command runs it.
_IN_PROCESS = """
import json, sys
from fed_app.cli import exit_on_user_error
from fed_app.config import RunConfig
from fed_app.in_process import run_in_process
exit_on_user_error(lambda: run_in_process(RunConfig.from_run_config(json.loads(sys.argv[1]))) and None)
"""


_HALF_ROW = """
import resource, signal, sys
from pathlib import Path
from fed_app.cli import exit_on_user_error
from fed_app.runs.rundir import RunDir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
run = RunDir(Path(sys.argv[1]))
run.append_row({"epoch": 0, "val_accuracy": 0.1})
room = run.rows_file.stat().st_size + 10  # ten bytes of the next row fit, the rest does not
resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))
exit_on_user_error(lambda: run.append_row({"epoch": 1, "val_accuracy": 0.2, "note": "x" * 100}))
"""


def test_a_row_the_disk_cuts_short_is_taken_back_whole(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _HALF_ROW, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'rows.jsonl'} could not be written")
    assert (tmp_path / "rows.jsonl").read_text() == '{"epoch": 0, "val_accuracy": 0.1}\n'  # no half row
