"""Payload files on one machine (transport='files'): a run's private folder (made new, swept of folders whose
server is gone, removed at the end) and each file's private, whole-or-nothing write, which says when there is no
room. Other users of the machine can neither read a client's raw update nor plant or swap one."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
import torch.utils.serialization
from torch import Tensor

from fed_app.errors import UserError, override_hint
from fed_app.runs import procfs

SHM = Path("/dev/shm")


class TransportError(RuntimeError):
    """A payload file that this process cannot read: the client runs on another machine."""


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full file system, a quota, a file-size limit


class PayloadRoomError(TransportError):
    """No room for a payload file (a full /dev/shm or temp folder): the server sends models inside messages."""


def write_private(path: Path, tensors: dict[str, Tensor]) -> None:
    """`tensors` saved to `path` (mode 0600) through `path`.part and a rename, so that a reader never sees a
    partial file (torch's zip CRC32 would guard nothing here, and it is 40% of the write on a 2-core CPU); a
    failed write leaves nothing behind."""
    tmp = path.with_name(path.name + ".part")
    sink = None
    try:  # O_EXCL: a .part that is there is another writer's, never this one's to remove
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno in NO_ROOM:
            raise _no_room(path, err.errno) from err
        raise
    try:
        with open(fd, "wb") as f:
            sink = _Sink(f)
            with torch.utils.serialization.config.patch("save.compute_crc32", False):
                torch.save(tensors, sink)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else err
        if isinstance(cause, OSError) and cause.errno in NO_ROOM:
            raise _no_room(path, cause.errno) from err
        raise


def _no_room(path: Path, errno: int) -> PayloadRoomError:
    return PayloadRoomError(f"no room for the payload file {path} ({os.strerror(errno)}): make room in "
                            f"{path.parent.parent} or {override_hint('transport', repr('messages'))} to send models "
                            f"inside Flower messages.")


class _Sink:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it as a bare RuntimeError
    (or not at all), without the errno that tells a full disk from another failure."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


class PayloadFolderError(UserError):
    """A payload folder that other users could open (a file system that ignores modes)."""


# The owner's host identity, pid and start time: fedit-payload-<identity tag>-P-S-*. A pid means that process only
# to a process of the same identity (another container sharing /dev/shm has its own pids): only those are swept.
PAYLOAD_FOLDER = re.compile(r"fedit-payload-([0-9a-z]+)-(\d+)-(\d+)-")
OLD_FOLDER = re.compile(r"fedit-[0-9a-f]{10}-(\d+)")  # before #32: fedit-<run id>-<pid>, no start time


class SharedFiles:
    """A private folder for one run's payload files: /dev/shm when it has room, else the temp folder. Made new
    under an unguessable name (mode 0700, files 0600: other users cannot read or plant a client's update), removed
    by close(); this user's folders whose server is gone (killed, any run) are removed on creation."""

    def __init__(self, tag: str, room_bytes: int):
        for place in {SHM, Path(tempfile.gettempdir())}:  # first: what they held counts as room
            if place.is_dir():
                sweep(place)
        base = self.base_for(room_bytes)
        pid = os.getpid()
        self.root = Path(tempfile.mkdtemp(prefix=f"fedit-payload-{procfs.identity_tag()}-{pid}-"
                                                 f"{procfs.start_time(pid) or 0}-",
                                          suffix=f"-{tag}", dir=base))
        found = os.lstat(self.root)
        if found.st_uid != os.getuid() or not stat.S_ISDIR(found.st_mode) or found.st_mode & 0o077:
            self.close()
            raise PayloadFolderError(
                f"the payload folder {self.root} came out open to other users (owner {found.st_uid}, mode "
                f"{stat.S_IMODE(found.st_mode):o}): {override_hint('transport', repr('messages'))} instead.")

    @staticmethod
    def base_for(room_bytes: int) -> Path:
        if SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > room_bytes:
            return SHM
        return Path(tempfile.gettempdir())

    def empty(self) -> None:
        """Delete the folder's files, keeping the folder (models go inside messages from now on)."""
        for entry in os.scandir(self.root):
            Path(entry.path).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def sweep(base: Path) -> None:
    """Remove this user's payload folders in `base` whose server is gone: another user's, a link, or a live
    server's (the same pid and start time: not a reused pid) stay."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:  # a place this user cannot list holds none of its folders it could remove
        return
    for entry in entries:
        owner = PAYLOAD_FOLDER.match(entry.name) or OLD_FOLDER.fullmatch(entry.name)
        try:
            found = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if owner is None or found.st_uid != uid or not stat.S_ISDIR(found.st_mode):
            continue
        if owner.re is PAYLOAD_FOLDER and owner.group(1) != procfs.identity_tag():
            continue  # another host identity's: its pids are not this /proc's
        pid, start = (owner.group(2), owner.group(3)) if owner.re is PAYLOAD_FOLDER else (owner.group(1), "0")
        if not _alive(int(pid), start):
            shutil.rmtree(entry.path, ignore_errors=True)  # never follows links inside


def _alive(pid: int, start: str) -> bool:
    """Whether process `pid`, started at `start` (clock ticks since boot; '0': unknown), still runs."""
    if not Path("/proc/self").exists():  # no procfs (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return procfs.alive(pid) and start in ("0", procfs.start_time(pid))
