"""Only damage is damage: a checkpoint the disk will not give back (EIO, EACCES) or a load that runs out of memory
stops the run with every file as it was, rows.jsonl included; a checkpoint cut short or corrupt is kept as
`<name>.bad`, never overwritten; every truncation and bit flip of a real checkpoint either loads or is damage; and a
run whose last row was torn after its final checkpoint redoes that row, never DONE with a row missing."""

import errno
import logging
import os
import random

import pytest
import torch

from fed_app import centralized, server_app
from fed_app.config import RunConfig
from fed_app.runs.files import read_torch
from fed_app.runs.rundir import DamagedRunError, RunDir, UnreadableError

from ...conftest import InProcessGrid, fl_cfg
from .test_damaged_runs import SMALL, _model, _rows, _same_model


def _run(path):
    """A run stopped after epoch 2: three rows, checkpoints at epochs 1 and 2."""
    run = RunDir(path)
    path.mkdir()
    for epoch in range(3):
        run.append_row({"epoch": epoch, "val_accuracy": 0.1 * epoch})
        run.save_checkpoint({"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}})
    return run


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _refuse_open(monkeypatch, names, code):
    """Opening these files fails with `code`, as a failing disk (EIO) or a file the user cannot read (EACCES;
    the tests run as root, where chmod 000 does not stop a read)."""
    real_open = os.open

    def failing_open(file, *args, **kwargs):
        if os.fspath(file).rsplit("/", 1)[-1] in names:
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)


@pytest.mark.parametrize("names, code", [({"checkpoint.pt", "checkpoint.prev.pt"}, errno.EIO),
                                         ({"checkpoint.pt"}, errno.EIO), ({"checkpoint.pt"}, errno.EACCES)])
def test_a_checkpoint_the_disk_will_not_read_stops_the_run_in_one_sentence_with_nothing_changed(
        tmp_path, monkeypatch, names, code):
    run = _run(tmp_path / "run")
    before = _files(run.path)
    with monkeypatch.context() as patch:
        _refuse_open(patch, names, code)
        with pytest.raises(UnreadableError) as caught:
            run.resume("epoch")
    assert str(caught.value) == (f"{run.checkpoint_file} could not be read ({os.strerror(code)}); the "
                                 f"run stops here with its files as they were: fix the disk or the file's permissions "
                                 f"and run the same command to resume.")
    assert _files(run.path) == before  # three rows, both checkpoints: not emptied, not overwritten, no .bad


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError(),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 1000000 bytes.")])
def test_a_load_that_fails_for_want_of_memory_or_a_flaky_disk_is_not_damage(tmp_path, monkeypatch, error):
    run = _run(tmp_path / "run")
    before = _files(run.path)

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(UnreadableError if isinstance(error, OSError) else type(error)):
        run.resume("epoch")
    assert _files(run.path) == before


def test_a_damaged_checkpoint_is_kept_as_bad_and_a_later_one_never_overwrites_it(tmp_path, caplog):
    run = _run(tmp_path / "run")
    cuts = []
    for _ in range(2):
        data = run.checkpoint_file.read_bytes()
        cuts.append(data[: len(data) // 2])
        run.checkpoint_file.write_bytes(cuts[-1])
        with caplog.at_level(logging.WARNING, logger="fed_app.runs.rundir"):
            checkpoint = run.resume("epoch")
        run.append_row({"epoch": checkpoint["epoch"] + 1, "val_accuracy": 0.0})
        run.save_checkpoint({"epoch": checkpoint["epoch"] + 1, "model": {"w": torch.zeros(3)}})
    assert (run.path / "checkpoint.pt.bad").read_bytes() == cuts[0]
    assert (run.path / "checkpoint.pt.2.bad").read_bytes() == cuts[1]
    assert "checkpoint.pt cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive" in caplog.text


def test_every_cut_and_bit_flip_of_a_real_checkpoint_loads_or_is_damage(tmp_path):
    """What torch raises on a checkpoint cut short or corrupt is matched: nothing else escapes."""
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "wall_time": 1.5, "config": {"lr": 0.1, "scheduler": None}})
    data, path, rng = run.checkpoint_file.read_bytes(), tmp_path / "copy.pt", random.Random(0)
    copies = [data[:n] for n in range(0, len(data), 13)]
    for _ in range(600):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        copies.append(bytes(flipped))
    damaged = 0
    for copy in copies:
        path.write_bytes(copy)
        try:
            read_torch(path)
        except DamagedRunError:
            damaged += 1
    assert damaged > len(copies) // 3  # most cuts and many flips are damage; the rest load


def _stop_before_done(monkeypatch):
    """The process stops (as if killed) after the final row and checkpoint, before DONE."""
    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "mark_done", stop)


def _tear_last_row(run_dir):
    text = (run_dir / "rows.jsonl").read_text()
    (run_dir / "rows.jsonl").write_text(text[: text.rindex("\n", 0, -1) + 1 + 20])


def test_a_row_torn_after_the_final_checkpoint_is_redone_from_the_checkpoint_before_it(tmp_path, monkeypatch, caplog):
    cfg = {**SMALL, "epochs": 3}
    whole = centralized.run(RunConfig.from_run_config({**cfg, "run-dir": str(tmp_path / "whole")}))
    cut = RunConfig.from_run_config({**cfg, "run-dir": str(tmp_path / "cut")})
    with monkeypatch.context() as patch:
        _stop_before_done(patch)
        with pytest.raises(KeyboardInterrupt):
            centralized.run(cut)
    _tear_last_row(tmp_path / "cut")  # epoch 3's row
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 3
    with caplog.at_level(logging.WARNING, logger="fed_app.runs.rundir"):
        centralized.run(cut)
    assert "checkpoint.pt is at epoch 3 but rows.jsonl is whole only up to epoch 2" in caplog.text
    assert (tmp_path / "cut" / "DONE").exists()
    assert _rows(tmp_path / "cut") == _rows(whole.path)  # 4 rows, epoch 3 redone
    assert _same_model(_model(tmp_path / "cut"), _model(whole.path))


def test_a_checkpoint_without_rows_behind_it_starts_the_run_over(tmp_path):
    run = _run(tmp_path / "run")
    run.rows_file.write_text("")  # the rows are gone: no checkpoint can be resumed without leaving rows missing
    assert run.resume("epoch") is None


def test_starting_over_keeps_every_row_and_checkpoint_aside_never_empties_them(tmp_path):
    run = _run(tmp_path / "run")  # rows 0-2, checkpoints at epochs 1 and 2
    lines = run.rows_file.read_text().splitlines()
    run.rows_file.write_text(lines[1] + "\n" + lines[2] + "\n")  # row 0 lost: no checkpoint has its rows behind it
    assert run.resume("epoch") is None
    kept = {p.name for p in run.path.iterdir()}
    assert {"rows.jsonl.bad", "checkpoint.pt.bad", "checkpoint.prev.pt.bad"} <= kept  # nothing erased
    assert (run.path / "rows.jsonl.bad").read_text().splitlines() == lines[1:]
    assert read_torch(run.path / "checkpoint.pt.bad")["epoch"] == 2


def test_a_done_run_whose_last_row_was_lost_resumes_and_redoes_it(tmp_path):
    cfg = RunConfig.from_run_config({**SMALL, "epochs": 3, "run-dir": str(tmp_path / "run")})
    done = centralized.run(cfg)
    whole = _rows(done.path)
    lines = done.rows_file.read_text().splitlines()
    done.rows_file.write_text("\n".join(lines[:-1]) + "\n")  # a copy that lost the tail, DONE still there
    assert not done.finished_whole("epoch", 3) and not done.done  # unmarked: the run is not finished
    centralized.run(cfg)
    assert done.done and _rows(done.path) == whole  # epoch 3 redone, from the checkpoint before it


@pytest.mark.usefixtures("server_app_identity")
def test_a_federated_row_torn_after_the_final_checkpoint_is_redone_from_the_checkpoint_before_it(tmp_path,
                                                                                                monkeypatch):
    """Checkpoints at rounds 2 and 4 of 4 (FedAdam's moments in them): row 4 torn, rounds 3 and 4 are redone."""
    settings = {"server-optimizer": "fedadam", "server-lr": 0.01}
    whole = fl_cfg(tmp_path, "whole", **settings)
    server_app.run(InProcessGrid(whole), whole)
    cut = fl_cfg(tmp_path, "cut", **settings)
    with monkeypatch.context() as patch:
        _stop_before_done(patch)
        with pytest.raises(KeyboardInterrupt):
            server_app.run(InProcessGrid(cut), cut)
    _tear_last_row(tmp_path / "cut")
    server_app.run(InProcessGrid(cut), cut)
    assert (tmp_path / "cut" / "DONE").exists()
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    assert _same_model(_model(tmp_path / "cut"), _model(tmp_path / "whole"))
