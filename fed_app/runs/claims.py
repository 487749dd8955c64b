"""Run claims: before a command runs a run it takes an exclusive claim in the run's folder, so that no run is
ever trained twice at once, by two runners on one machine or by runners on machines sharing the results.

The claim is the file `CLAIM`, created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+), holding
its owner: host, pid, the process's start time (so a reused pid is not taken for the owner) and a token. The
owner touches it every `heartbeat` seconds. It is stale when its owner is known dead (same host: no such
process) or its heartbeat is older than `timeout` (another host: machines' clocks must agree to well within
it). A stale claim is taken over by one taker at a time (`CLAIM.takeover`, itself O_EXCL) and the run resumes
from its checkpoint. A process that was handed a claim (run-config `claim-token`) adopts it instead."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fed_app.runs import procfs
from fed_app.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_S = float(os.environ.get("FEDIT_CLAIM_HEARTBEAT", "10"))
TIMEOUT_S = float(os.environ.get("FEDIT_CLAIM_TIMEOUT", "60"))


class ClaimedError(UserError, RuntimeError):
    """The run is claimed by another live command."""


class ClaimLostError(RuntimeError):
    """This process's claim was taken over or removed: it must stop writing the run."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/<pid>/stat), '' if unknown
    token: str
    since: float

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), procfs.start_time(os.getpid()), uuid.uuid4().hex, time.time())

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


class Claim:
    """A held claim on `folder`: heartbeat while held, released (removed) on `release()` or leaving `with`."""

    def __init__(self, folder: Path, owner: Owner, adopted: bool = False, heartbeat: float = HEARTBEAT_S):
        self.file = Path(folder) / "CLAIM"
        self.owner, self.adopted = owner, adopted
        self._stop = threading.Event()
        self._beat = None
        if not adopted:  # an adopted claim beats in the process that took it
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat,), daemon=True)
            self._beat.start()

    @property
    def token(self) -> str:
        return self.owner.token

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if read_owner(self.file) != self.owner:
                    log.error("the claim on %s was taken over; this process stops writing it", self.file.parent)
                    return
                os.utime(self.file)
            except OSError:
                return

    def check(self) -> None:
        """Raise ClaimLostError unless the claim is still this one's and its owner alive: called before each
        row, so a run whose command died (or was taken over) stops instead of writing beside its successor."""
        held = read_owner(self.file)
        if held is None or held.token != self.owner.token:
            raise ClaimLostError(f"the claim on {self.file.parent} is no longer this run's; stopping")
        if self.adopted and is_stale(held, self.file):
            raise ClaimLostError(f"the command that claimed {self.file.parent} ({held.describe()}) is gone; "
                                 f"stopping so that the run can be resumed")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            if read_owner(self.file) == self.owner:
                self.file.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a run that failed before writing anything leaves no folder
                    self.file.parent.rmdir()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take(folder: Path, token: str = "") -> Claim | None:
    """This process's claim on `folder` (created if needed), or None if a live owner holds it. With `token`,
    adopt the claim that token names (handed over by the command that took it) or refuse."""
    folder = Path(folder)
    file = folder / "CLAIM"
    if token:
        held = read_owner(file)
        if held is None or held.token != token:
            raise ClaimedError(f"claim-token={token!r} does not name the claim on {folder}; it is set by the "
                               f"commands that claim runs (make run, python -m experiments run); leave it empty.")
        return Claim(folder, held, adopted=True)
    writable(folder)
    for _ in range(3):
        owner = Owner.me()
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_owner(file)
            if held is not None and not is_stale(held, file):
                return None
            if held is None and time.time() - _mtime(file) < TIMEOUT_S:
                return None  # being written this instant, or unreadable: not ours to judge yet
            _take_over(file, held)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(owner), f)
            f.flush()
            os.fsync(f.fileno())
        return Claim(folder, owner)
    return None


def busy_message(folder: Path) -> str:
    held = holder(folder)
    who = held.describe() if held else "another command"
    return (f"run {folder} is being run by {who}; wait for it to finish or stop that command (a claim whose owner "
            f"died is taken over: at once on the same host, after {TIMEOUT_S:.0f} s of silence from another)")


def holder(folder: Path) -> Owner | None:
    """The live owner of `folder`'s claim, if any."""
    held = read_owner(Path(folder) / "CLAIM")
    return held if held is not None and not is_stale(held, Path(folder) / "CLAIM") else None


def read_owner(file: Path) -> Owner | None:
    try:
        return Owner(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_stale(owner: Owner, file: Path) -> bool:
    """Dead owner (same host: no such process, or a different one under its pid), or no heartbeat for TIMEOUT_S."""
    if owner.host == socket.gethostname() and owner.started:
        return procfs.start_time(owner.pid) != owner.started
    return time.time() - _mtime(file) > TIMEOUT_S


def writable(folder: Path) -> None:
    """Create `folder` if needed and check that a claim can be written there, in one sentence if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".claim-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ClaimedError(f"cannot write a claim in {folder} ({err.strerror}); point --results (or run-dir) at "
                           f"a folder this user can write") from None


def _take_over(file: Path, seen: Owner | None) -> None:
    """Remove a stale claim, one taker at a time; a takeover lock left by a dead taker expires after TIMEOUT_S."""
    lock = file.with_name("CLAIM.takeover")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if time.time() - _mtime(lock) > TIMEOUT_S:
            lock.unlink(missing_ok=True)
        return
    os.close(fd)
    try:
        if read_owner(file) == seen:  # nobody took it over meanwhile
            log.warning("taking over %s from %s, which is gone", file.parent,
                        seen.describe() if seen else "an unreadable claim")
            file.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


