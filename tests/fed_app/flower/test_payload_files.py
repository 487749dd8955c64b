"""Payload files (transport='files'): a run's folder is made new and private (0700) even where a folder of the
old, predictable name waits, its files are 0600; a start sweeps this user's folders whose server is gone (any
run, not a live server's, not a reused pid's, not another user's, never through a link); a full disk leaves
no partial file and says so in one sentence."""

import contextlib
import os
import re
import resource
import signal
import stat
import subprocess
import sys

import pytest
import torch
from flwr.app import RecordDict

from fed_app.flower import payload_files
from fed_app.flower.payload import PayloadRoomError, SharedFiles, carry, take
from fed_app.runs import procfs


@contextlib.contextmanager
def files_cannot_grow_past(limit: int):
    """While inside, no file this process writes grows past `limit` bytes: a write beyond it fails with EFBIG, as
    on a full disk (SIGXFSZ ignored meanwhile, so the write fails instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_runs_folder_is_new_and_private_even_where_another_user_made_the_old_name():
    tag = "test-planted"
    base = SharedFiles.base_for(10**6)
    planted = base / f"fedit-{tag}-{os.getpid()}"  # the name the server took before, made first by someone else
    planted.mkdir()
    planted.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(planted, 12345, 12345)
    try:
        files, again = SharedFiles(tag, 10**6), SharedFiles(tag, 10**6)
        assert files.root != planted and files.root.parent == base and again.root != files.root  # unguessable
        assert _mode(files.root) == 0o700 and files.root.stat().st_uid == os.getuid()
        assert list(planted.iterdir()) == [] and _mode(planted) == 0o777  # not ours: left as it was
        files.close(), again.close()
    finally:
        planted.rmdir()


def test_payload_files_are_readable_by_their_user_only(tmp_path):
    old = os.umask(0o022)  # what a server usually runs with: files 0644 unless made otherwise
    try:
        content = RecordDict(carry("delta", {"w": torch.arange(4.0)}, tmp_path))
        path = tmp_path / os.path.basename(str(content["delta-file"]["path"]))
        assert _mode(path) == 0o600 and torch.equal(take(content, "delta")["w"], torch.arange(4.0))
    finally:
        os.umask(old)


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)  # exited and reaped: no process has this pid now (reuse within ms is unlikely)


def test_a_start_sweeps_this_users_folders_whose_server_is_gone_of_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(payload_files, "SHM", tmp_path)  # a /dev/shm of the test's own
    me, dead, tag = os.getpid(), _dead_pid(), procfs.identity_tag()
    folders = {
        "dead": tmp_path / f"fedit-payload-{tag}-{dead}-{procfs.start_time(me)}-abcdefgh-another-run",
        "old-name": tmp_path / f"fedit-0123456789-{dead}",  # left by a server before #32
        "reused-pid": tmp_path / f"fedit-payload-{tag}-{me}-1-abcdefgh-another-run",  # this pid, an earlier process's
        "live": tmp_path / f"fedit-payload-{tag}-{me}-{procfs.start_time(me)}-abcdefgh-another-run",
        "not-fedit": tmp_path / f"fedit-bench-{dead}",  # someone else's temp folder of a similar name
        "another-user": tmp_path / f"fedit-payload-{tag}-{dead}-1-abcdefgh-their-run",
        # another container sharing /dev/shm (--ipc=host): its pid means nothing in this /proc
        "another-identity": tmp_path / f"fedit-payload-0123456789ab-{dead}-1-abcdefgh-their-run",
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "delta-x.pt").write_bytes(b"0" * 10)
    if os.geteuid() == 0:  # root (as in CI) can make a folder another user owns; others test the rest
        os.chown(folders["another-user"], 12345, 12345)
    else:
        del folders["another-user"]
    target = tmp_path / "kept"  # a link of a dead server's name: neither it nor what it points to goes
    target.mkdir()
    (target / "data").write_bytes(b"1")
    link = tmp_path / f"fedit-payload-{tag}-{dead}-1-abcdefgh-link"
    link.symlink_to(target)
    files = SharedFiles("this-run", 10**6)
    assert files.root.parent == tmp_path
    gone = {name for name, folder in folders.items() if not folder.exists()}
    assert gone == {"dead", "old-name", "reused-pid"}
    assert link.is_symlink() and (target / "data").read_bytes() == b"1"
    files.close()


def test_a_full_disk_leaves_no_partial_file_and_says_so_in_one_sentence(tmp_path):
    with files_cannot_grow_past(100_000), pytest.raises(PayloadRoomError) as caught:
        carry("delta", {"flat": torch.zeros(1_000_000)}, tmp_path)  # 4 MB
    assert list(tmp_path.iterdir()) == []  # no .part, no file
    assert re.fullmatch(
        rf"no room for the payload file {re.escape(str(tmp_path))}/delta-[0-9a-f]{{32}}\.pt \(File too large\): "
        rf"make room in {re.escape(str(tmp_path.parent))} or pass --run-config \"transport='messages'\" to send "
        r"models inside Flower messages\.", str(caught.value)), str(caught.value)


def test_a_failed_write_that_is_not_for_room_is_left_as_it_is(tmp_path):
    with pytest.raises(FileNotFoundError):
        carry("delta", {"flat": torch.zeros(3)}, tmp_path / "gone")  # the server's folder was removed
