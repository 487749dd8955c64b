"""Durable writes everywhere: every rename of a run's file is followed by an fsync of its folder (else the rename
itself may not survive a power cut), and the mask and SCAFFOLD's control files are written like the checkpoint:
whole or not at all, with the full-disk sentence (a file-size limit, in a child process, plays the full disk)."""

import os
import stat
import subprocess
import sys

import torch

from fed_app.runs.rundir import RunDir
from strategies.scaffold import ControlStore


def _record(monkeypatch):
    """What the process does to the disk, in order: ('replace', destination) and ('fsync dir', folder)."""
    events = []
    replace, fsync = os.replace, os.fsync

    def recording_replace(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        events.append(("replace", os.fspath(dst)))

    def recording_fsync(fd):
        fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync dir", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    return events


def test_each_rename_of_a_runs_file_is_followed_by_an_fsync_of_its_folder(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    store = ControlStore(tmp_path / "client_state")
    events = _record(monkeypatch)
    writes = [lambda: run.save_checkpoint({"epoch": 0}), lambda: run.save_checkpoint({"epoch": 1}),
              lambda: run.save_mask({"w": torch.tensor([True, False])}), run.mark_done,
              lambda: run.save_client_masks({0: torch.zeros(1, dtype=torch.uint8)}),
              lambda: store.save(0, 1, torch.ones(2), 0)]
    for write in writes:
        del events[:]
        write()
        renamed = [os.path.dirname(path) for kind, path in events if kind == "replace"]
        assert renamed, events
        assert events[-1][0] == "fsync dir" and events[-1][1] in renamed, events  # after the last rename


_FULL = """
import resource, signal, sys, torch
from pathlib import Path
from fed_app.cli import exit_on_user_error
from fed_app.runs.rundir import RunDir
from strategies.scaffold import ControlStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
run, store = RunDir(Path(sys.argv[1])), ControlStore(Path(sys.argv[1]) / "client_state")
store.save(3, 1, torch.ones(10), 0)  # fits
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a mask or c_i of 1e5 entries does not
if sys.argv[2] == "mask":
    exit_on_user_error(lambda: run.save_mask({"w": torch.ones(100_000, dtype=torch.bool)}))
else:
    exit_on_user_error(lambda: store.save(3, 2, torch.ones(100_000), 0))
"""


def _fill(tmp_path, what):
    proc = subprocess.run([sys.executable, "-c", _FULL, str(tmp_path), what], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr


def test_a_mask_the_disk_has_no_room_for_stops_in_one_sentence_leaving_nothing_half_made(tmp_path):
    said = _fill(tmp_path, "mask")
    assert said == (f"error: {tmp_path / 'mask.pt'} could not be written (File too large); the run stops here with "
                    f"its files as they were and its last checkpoint kept: make room on that disk (or raise the "
                    f"file-size limit) and run the same command to resume.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_state"]  # no mask.pt, no mask.pt.tmp


def test_a_control_file_the_disk_has_no_room_for_stops_in_one_sentence_its_earlier_version_kept(tmp_path):
    said = _fill(tmp_path, "control")
    assert said == (f"error: {tmp_path / 'client_state' / '3' / 'control-2.pt'} could not be written (File too "
                    f"large); the run stops here with its files as they were and its last checkpoint kept: make room "
                    f"on that disk (or raise the file-size limit) and run the same command to resume.\n")
    assert sorted(p.name for p in (tmp_path / "client_state" / "3").iterdir()) == ["control-1.pt"]
    assert torch.equal(ControlStore(tmp_path / "client_state").load(3, 2), torch.ones(10))


def test_links_and_fifos_planted_in_a_shared_run_folder_are_never_written_through_or_waited_on(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    (run.path / "checkpoint.pt.tmp").symlink_to(victim)  # a write through it would overwrite the victim
    run.save_checkpoint({"round": 0, "model": {"w": torch.zeros(2)}})
    assert victim.read_text() == "the user's own file" and run.load_checkpoint()["round"] == 0
    run.rows_file.symlink_to(victim)  # rows appended through it would land in the victim
    try:
        run.append_row({"round": 0})
    except OSError:
        pass
    assert victim.read_text() == "the user's own file"
    run.rows_file.unlink()
    os.mkfifo(run.rows_file)  # reading a FIFO blocks until someone writes it: never, here
    try:
        run.rows()
        raise AssertionError("a FIFO was read as rows")
    except OSError as err:
        assert "is not a regular file" in str(err)
