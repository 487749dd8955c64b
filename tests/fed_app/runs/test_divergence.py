"""The divergence guard: its rule on hand-written rows, and runs it stops (centralized and federated)."""

import math

import pytest

from fed_app import centralized, server_app
from fed_app.runs.divergence import divergence
from fed_app.runs.run_loop import DivergedError

from ...conftest import InProcessGrid, fl_cfg, play_server_app


def _rows(*val_losses, train=1.0):
    return [{"epoch": i, "train_loss": train, "val_loss": v} for i, v in enumerate(val_losses)]


def test_a_non_finite_loss_diverges_at_once():
    assert divergence(_rows(2.3, 1.0, train=math.nan), "epoch", final=False) == "train_loss is nan at epoch 1"
    assert divergence(_rows(2.3, math.inf), "epoch", final=False) == "val_loss is inf at epoch 1"


def test_validation_loss_far_above_its_start_diverges_at_the_second_evaluation_in_a_row_or_the_last():
    # start 0.4: the bound is max(3 x 0.4, 0.4 + 1) = 1.4
    assert divergence(_rows(0.4, 1.5), "epoch", final=False) is None  # once: it may recover
    assert divergence(_rows(0.4, 1.5, 0.5, 1.5), "epoch", final=False) is None  # it did, in between
    assert divergence(_rows(0.4, 1.5, 1.6), "epoch", final=False).startswith(
        "val_loss stayed above 1.4 (3x its step-0 value 0.4, or +1) at epoch 1 (1.5), epoch 2 (1.6)")
    assert divergence(_rows(0.4, 0.5, 1.5), "epoch", final=True) is not None  # the run ends there
    assert divergence(_rows(0.4, 1.39, 1.39), "epoch", final=True) is None
    # a random head starts near ln C: 3x that, not +1, is the bound
    assert divergence(_rows(2.3, 3.4, 6.8), "epoch", final=False) is None
    assert divergence(_rows(2.3, 7.0, 7.0), "epoch", final=False) is not None
    # rows without validation (a federated round between evaluations) leave the verdict to the next evaluation
    assert divergence(_rows(0.4, 1.5) + [{"epoch": 2, "train_loss": 3.0}], "epoch", final=False) is None


def test_a_centralized_run_that_diverges_stops_marked_diverged_never_done(tiny_cfg):
    cfg = tiny_cfg.replace(lr=50.0, epochs=4)
    run_dir = centralized.run(cfg)
    rows = run_dir.rows()
    assert not run_dir.done and run_dir.finished and run_dir.diverged == rows[-1]["diverged"]
    assert len(rows) < 5 and "at epoch" in run_dir.diverged  # stopped before its last epoch
    assert all("diverged" not in r for r in rows[:-1])
    stamp = run_dir.rows_file.stat().st_mtime_ns
    centralized.run(cfg)  # finished: not rerun
    assert run_dir.rows_file.stat().st_mtime_ns == stamp
    with pytest.raises(DivergedError, match=r"diverged \(.*\); it is marked DIVERGED, not DONE, and loses every "
                                            r"selection; lower its lr"):
        centralized.main(["--run-config", f"dataset='synthetic' model='vit-tiny-test' synthetic-train-size=3200 "
                                          f"synthetic-test-size=300 val-size=200 batch-size=32 eval-batch-size=256 "
                                          f"epochs=4 lr=50.0 device='cpu' run-dir='{run_dir.path}'"])


def test_a_federated_run_that_diverges_stops_marked_diverged(tmp_path):
    cfg = fl_cfg(tmp_path, "fl", lr=50.0, **{"num-rounds": 6, "eval-every": 1})
    play_server_app()
    run_dir = server_app.run(InProcessGrid(cfg), cfg)
    rows = run_dir.rows()
    assert run_dir.diverged and not run_dir.done and rows[-1]["diverged"] == run_dir.diverged
    assert rows[-1]["round"] < 6
