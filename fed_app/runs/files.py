"""A run's files on disk, one at a time: written whole or not at all (a temporary file, fsync, rename, then the
folder fsynced, so the rename itself survives a power cut), a full disk said in one sentence, and torch files
read without unpickling code, a file that is damaged told apart from a disk that will not give it back.

Nothing here knows a run's layout (fed_app/runs/rundir.py does); the mask and SCAFFOLD's control files are
written through here too."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fed_app.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the disk, the user's quota, the file-size limit

# What torch.load raises on the bytes of a checkpoint cut short or with a bit flipped (measured: every
# truncation and 4000 single-bit flips of a checkpoint): its zip reader's RuntimeErrors (matched by these words,
# so that an allocator's "can't allocate memory" RuntimeError is not damage), the restricted unpickler's
# UnpicklingError (also what a pickle that would run code gets), EOFError, and from a corrupt pickle stream
# ValueError (UnicodeDecodeError, "negative seek value"), TypeError, IndexError, KeyError, AssertionError. The
# bytes are read first, so no disk error reaches torch.load to be mistaken for these.
ARCHIVE_WORDS = ("PytorchStreamReader", "inline_container", "hasRecord", "record size", "resize storage")
DAMAGE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AssertionError)


class DiskFullError(UserError, OSError):
    """A run's file could not be written for want of room; the message says what is kept and how to go on."""


class DamagedRunError(UserError, RuntimeError):
    """A run's file is damaged (cut short, corrupt, or not what fedit writes); the message names the file."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause  # what torch said, for the warning of a checkpoint that gives way


class UnreadableError(UserError, OSError):
    """The disk would not give a run's file back (EIO, EACCES...): not damage, so nothing is changed."""


def read_torch(path: Path, allow: Sequence[Any] = ()) -> Any:
    """What torch.save wrote in `path`, tensors and plain types only (plus the classes `allow` names): a file
    that holds anything else, or is cut short or corrupt, is a DamagedRunError; a read the disk refuses is an
    UnreadableError."""
    with readable(path):
        data = read_regular(path)
        try:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except DAMAGE as err:
            raise _damaged(path, err) from None
        except RuntimeError as err:
            if not any(word in str(err) for word in ARCHIVE_WORDS):
                raise
            raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> DamagedRunError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return DamagedRunError(f"{path} cannot be read ({cause[:200]}); it is cut short, corrupt or not a file fedit "
                           f"wrote: delete that run's folder to run it again.", cause)


def read_regular(path: Path) -> bytes:
    """The bytes of `path`, a regular file and not a link: a FIFO planted in a shared folder would block the read
    for ever, a link would read what it points to (an OSError of its own, for `readable` to say)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        return f.read()


@contextlib.contextmanager
def readable(path: Path) -> Iterator[None]:
    """Reading `path`: an OSError (EIO, EACCES, a network disk gone) is one sentence, and stops the run before
    anything is changed."""
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError):
            raise
        why = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
        raise UnreadableError(f"{path} could not be read ({why}); the run stops here with its files as they were: "
                              f"fix the disk or the file's permissions and run the same command to resume.") from None


def atomic_write_bytes(path: Path, data: bytes | memoryview, tmp: Path | None = None) -> None:
    """`path` holds `data` whole, or is as it was: written beside it (in `tmp`), fsynced, renamed over it, and the
    folder fsynced. A full disk is a DiskFullError."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    write_whole(tmp, data, path)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: Path, tmp: Path | None = None) -> None:
    atomic_write_bytes(path, torch_bytes(obj), tmp)


def torch_bytes(obj: Any) -> memoryview:
    """torch.save's bytes, written by Python afterwards: torch's own file writer turns a full disk into a bare
    RuntimeError ('unexpected pos'), Python's into an OSError with its errno."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def write_whole(tmp: Path, data: bytes | memoryview, path: Path) -> None:
    """`data` in `tmp`, on disk (fsync), for `path`: a full disk is a DiskFullError and no `tmp` is left. A `tmp`
    already there (a link planted in a shared folder) is removed, never written through."""
    with room_for(path, tmp):
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """The folder's entries on disk: a rename (or a new file) is only durable once its folder is fsynced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # a file system that cannot fsync a folder (some network ones) has no more
            raise
    finally:
        os.close(fd)


def set_aside(path: Path) -> Path:
    """A damaged file kept as `<name>.bad` (`<name>.2.bad`... when that is taken): never overwritten, never
    deleted, out of the way of the run."""
    bad, n = path.with_name(path.name + ".bad"), 1
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.{n}.bad")
    os.rename(path, bad)
    fsync_dir(path.parent)
    return bad


@contextlib.contextmanager
def room_for(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """Writing `path` (through `tmp`): a disk full, a quota or a file-size limit reached is one sentence, with the
    half-written temporary file removed and `path` as it was."""
    try:
        yield
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if err.errno not in FULL:
            raise
        raise DiskFullError(f"{path} could not be written ({os.strerror(err.errno)}); the run stops here with its "
                            f"files as they were and its last checkpoint kept: make room on that disk (or raise "
                            f"the file-size limit) and run the same command to resume.") from None
