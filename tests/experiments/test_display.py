"""The runner's display: in a real terminal (tmux) at 80 and 120 columns each running run's label, bar, epoch of
total, time left and validation accuracy stay on one line; piped, every event is one plain line; a rerun says
what is done, what resumes from which checkpoint and what starts."""

import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.manifest import load_manifest
from experiments.display import say_plan

MANIFEST = """
name: shown
kind: centralized
base: {dataset: synthetic, model: vit-tiny-test, synthetic-train-size: 800, synthetic-test-size: 100,
       val-size: 100, batch-size: 32, device: cpu, epochs: 4, scheduler: warmup-cosine}
grid:
  lr: [0.05]
  warmup-epochs: [1]
  weight-decay: [0.0005]
seeds: [1]
"""


def _manifest(tmp_path):
    path = tmp_path / "shown.yaml"
    path.write_text(MANIFEST)
    return path


def _command(manifest, results):
    return f"{sys.executable} -m experiments run {manifest} --results {results}"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux, the terminal the display is tested in")
def test_in_a_terminal_of_80_or_120_columns_the_running_runs_line_shows_its_bar_step_time_and_accuracy(tmp_path):
    manifest, cwd = _manifest(tmp_path), Path(__file__).resolve().parents[2]
    sessions = {width: f"fedit-{width}-{tmp_path.name}" for width in (80, 120)}
    for width, name in sessions.items():
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(width), "-y", "30", "-c", str(cwd),
                        f"{_command(manifest, tmp_path / str(width))}; sleep 600"], check=True)
    try:
        seen = {}
        deadline = time.monotonic() + 240
        while len(seen) < len(sessions) and time.monotonic() < deadline:
            time.sleep(1)
            for width, name in sessions.items():
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True,
                                        text=True).stdout
                # the run's line: its label, the bar, 'k/4' epochs, the time left and 'val x%', in one line
                line = next((ln for ln in screen.splitlines() if re.search(r"lr=0\.05.*━.* [1-3]/4 .*val \d", ln)),
                            None)
                if line is not None:
                    seen[width] = line
        assert set(seen) == set(sessions), f"no run line with bar, epoch and accuracy: {seen}"
        for width, line in seen.items():
            assert len(line.rstrip()) <= width
            assert re.search(r"(\d+:\d\d|--:--) val \d+\.\d%", line)  # the time left (once known), the accuracy
    finally:
        for name in sessions.values():
            subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_piped_every_event_is_one_plain_line_and_a_rerun_says_what_is_done(tmp_path):
    manifest, results = _manifest(tmp_path), tmp_path / "results"
    first = subprocess.run(_command(manifest, results).split(), capture_output=True, text=True, check=True)
    lines = first.stdout.splitlines()
    assert lines[0] == "shown: 1 runs: 0 done, 0 diverged, 0 to resume, 1 to start"
    assert re.fullmatch(r"centralized-\w{10} lr=0\.05 warmup-epochs=1 weight-decay=0\.0005: starts", lines[1])
    epochs = [ln for ln in lines if re.fullmatch(r"centralized-\w{10} epoch \d/4 .*", ln)]
    assert len(epochs) == 5 and "val_accuracy" in epochs[-1]  # each row once, on one line
    assert not any("━" in ln or ln.startswith(" ") for ln in lines)  # no bar, no wrapped continuation
    again = subprocess.run(_command(manifest, results).split(), capture_output=True, text=True, check=True)
    assert again.stdout.splitlines()[0] == "shown: 1 runs: 1 done, 0 diverged, 0 to resume, 0 to start"


def test_a_rerun_names_each_run_it_resumes_and_the_checkpoint_it_resumes_after(tmp_path, caplog):
    manifest = load_manifest(_manifest(tmp_path), tmp_path / "results")
    run = manifest.runs[0]
    Path(run.cfg.run_dir).mkdir(parents=True)
    torch.save({"epoch": 2, "model": {}}, Path(run.cfg.run_dir) / "checkpoint.pt")
    with caplog.at_level(logging.INFO, logger="experiments.display"):
        say_plan(manifest, list(manifest.runs))
    assert caplog.messages == ["shown: 1 runs: 0 done, 0 diverged, 1 to resume, 0 to start",
                               f"{run.run_id} lr=0.05 warmup-epochs=1 weight-decay=0.0005: resumes after epoch 2"]
