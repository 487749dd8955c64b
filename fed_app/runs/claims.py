"""Run claims: before a command runs a run it takes an exclusive claim in the run's folder, so that no run is
ever trained twice at once, by two runners on one machine or by runners on machines sharing the results.

The claim is the file `CLAIM`, created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+), holding
its owner: host, pid, the process's start time (so a reused pid is not taken for the owner), its host identity
(host name, boot id, pid namespace: whose pids those are) and a token. The owner touches it every `heartbeat`
seconds, through passing errors, and stops the run once it is truly lost. It is stale when its owner is known
dead (same host identity: no such process) or, for any other owner, its heartbeat is older than `timeout` by
the file system's own clock (a probe file's mtime), whatever this machine's clock says. A stale claim is taken
over by one taker at a time (`CLAIM.takeover`, itself O_EXCL) and the run resumes from its checkpoint. A
process that was handed a claim (run-config `claim-token`) adopts it instead."""

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
    """This process's claim was taken over, removed or left without a heartbeat: it must stop writing the run."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/<pid>/stat), '' if unknown
    token: str
    since: float
    host_id: str = ""  # procfs.host_identity(): whose pid space `pid` and `started` belong to ('' in old claims)

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), procfs.start_time(os.getpid()), uuid.uuid4().hex, time.time(),
                   procfs.host_identity())

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            values = json.loads(text)
            return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError):
            return None

    def here(self) -> bool:
        """Whether its pid and start time name a process of this one's pid space (same host identity, not just
        the same host name), so that /proc can say if it lives."""
        return bool(self.host_id and self.started) and self.host_id == procfs.host_identity()

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


class Claim:
    """A held claim on `folder`: heartbeat while held, released (removed) on `release()` or leaving `with`."""

    def __init__(self, folder: Path, owner: Owner, adopted: bool = False, heartbeat: float = HEARTBEAT_S,
                 created: tuple[Path, ...] = ()):
        self.file = Path(folder) / "CLAIM"
        self.owner, self.adopted = owner, adopted
        self.created = created  # the folders the claim made, deepest first: removed on release if left empty
        self.lost = ""  # once the heartbeat finds the claim truly lost: the sentence the run stops with
        self._stop = threading.Event()
        self._beat = None
        if not adopted:  # an adopted claim beats in the process that took it
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat,), daemon=True)
            self._beat.start()

    @property
    def token(self) -> str:
        return self.owner.token

    def _heartbeat(self, every: float) -> None:
        """Touch the claim every `every` s. A touch that fails is retried (a file server's hiccup passes); the
        beat ends only when the claim is truly lost: it names another owner, or no touch worked for TIMEOUT_S."""
        beaten = time.monotonic()
        while not self._stop.wait(every):
            try:
                self._touch()
                beaten = time.monotonic()
            except ClaimLostError as err:
                self.lost = str(err)
            except OSError as err:
                if time.monotonic() - beaten <= TIMEOUT_S:
                    log.warning("the heartbeat on %s failed (%s); retrying in %g s", self.file, err, every)
                else:
                    self.lost = (f"no heartbeat could be written on {self.file} for {TIMEOUT_S:g} s ({err}); "
                                 f"this run stops, since another runner may take it over now")
            if self.lost:
                log.error("%s", self.lost)
                return

    def _touch(self) -> None:
        held = self._read()
        if held is None:
            raise OSError(f"{self.file} is unreadable")  # retried: a file server's hiccup passes
        if held != self.owner:
            raise ClaimLostError(self._lost_to(held))
        os.utime(self.file)  # no times given: on NFS the server's clock sets it, as it sets the probe's

    def _read(self) -> Owner | None:
        """The claim's owner now; None if it cannot be read this instant; ClaimLostError if it is gone."""
        try:
            return Owner.parse(self.file.read_text())
        except FileNotFoundError:
            raise ClaimLostError(self._lost_to(None)) from None
        except OSError:
            return None

    def _lost_to(self, held: Owner | None) -> str:
        now = f"now names {held.describe()}" if held is not None else "was removed"
        return f"the claim on {self.file.parent} {now}; this run stops here so that only one command runs it"

    def check(self) -> None:
        """Raise ClaimLostError (its one sentence) once the claim is truly lost: called before each row, so a run
        whose command died, was taken over or went silent stops instead of writing beside its successor."""
        if self.lost:
            raise ClaimLostError(self.lost)
        held = self._read()
        if held is not None and held.token != self.owner.token:
            raise ClaimLostError(self._lost_to(held))
        if held is None or not self.adopted:
            return  # unreadable this instant: the heartbeat's window judges a claim that stays so
        if held.here() and procfs.start_time(held.pid) != held.started:
            raise ClaimLostError(f"the command that claimed {self.file.parent} ({held.describe()}) is gone; "
                                 f"stopping so that the run can be resumed")
        age = heartbeat_age(self.file)
        if age is not None and age > TIMEOUT_S:  # its command is stuck or cut off: other hosts take it over now
            raise ClaimLostError(f"the claim on {self.file.parent} had no heartbeat for {age:.0f} s (its command: "
                                 f"{held.describe()}); stopping so that another command can take the run over")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            if read_owner(self.file) == self.owner:
                self.file.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a run that failed before writing anything leaves no folder,
                    for folder in self.created or (self.file.parent,):  # nor any the claim made for it
                        folder.rmdir()

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
    created = writable(folder)
    for _ in range(3):
        owner = Owner.me()
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stands(file):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(owner), f)
            f.flush()
            os.fsync(f.fileno())
        return Claim(folder, owner, created=created)
    return None


def _stands(file: Path) -> bool:
    """Whether the claim `file` stands (its owner lives, or it cannot be judged yet); one that does not is
    taken over (removed) on the way, for the caller to try again."""
    held = read_owner(file)
    if held is None:
        if not file.exists():
            return False  # released meanwhile
        age = heartbeat_age(file)
        if age is None or age < TIMEOUT_S:
            return True  # being written this instant, or unreadable: not ours to judge yet
    elif not is_stale(held, file):
        return True
    _take_over(file, held)
    return False


def busy_message(folder: Path) -> str:
    held = holder(folder)
    who = held.describe() if held else "another command"
    return (f"run {folder} is being run by {who}; wait for it to finish or stop that command (a claim whose owner "
            f"died is taken over: at once by a command of the same host, boot and pid namespace, after "
            f"{TIMEOUT_S:.0f} s without a heartbeat by any other)")


def holder(folder: Path) -> Owner | None:
    """The live owner of `folder`'s claim, if any."""
    held = read_owner(Path(folder) / "CLAIM")
    return held if held is not None and not is_stale(held, Path(folder) / "CLAIM") else None


def read_owner(file: Path) -> Owner | None:
    try:
        return Owner.parse(file.read_text())
    except OSError:
        return None


def is_stale(owner: Owner, file: Path) -> bool:
    """Whether a claim may be taken over. An owner of this host identity (procfs.host_identity) is judged by
    its process: gone, or another under its pid. Any other, even one of this host name (a container, a cloned
    VM), by its heartbeat alone: none for TIMEOUT_S, by the file system's clock. A live heartbeat is never stale."""
    if owner.here():
        return procfs.start_time(owner.pid) != owner.started
    age = heartbeat_age(file)
    return age is not None and age > TIMEOUT_S


def heartbeat_age(file: Path) -> float | None:
    """Seconds since `file` was last touched, by the clock of the file system that holds it (a probe touched
    beside it now), not this machine's, which may be minutes off the file server's; None if it cannot be told."""
    try:
        now = _probe(file.parent)
        with open(file, "rb") as f:  # an open revalidates the attributes NFS caches (close-to-open)
            return now - os.fstat(f.fileno()).st_mtime
    except OSError:
        return None


def writable(folder: Path) -> tuple[Path, ...]:
    """Create `folder` if needed and check that a claim can be written there, in one sentence if not; the folders
    it made, deepest first."""
    created = tuple(p for p in (folder, *folder.parents) if not p.exists())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as err:
        raise ClaimedError(f"cannot write a claim in {folder} ({err.strerror}); point --results (or run-dir) at "
                           f"a folder this user can write") from None
    return created


def _probe(folder: Path) -> float:
    """The file system's clock now: the mtime of a probe file touched in `folder` (and removed)."""
    probe = folder / f".claim-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        os.utime(probe)  # as the heartbeat touches a claim: on NFS the server's clock sets both
        return probe.stat().st_mtime
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _take_over(file: Path, seen: Owner | None) -> None:
    """Remove a stale claim, one taker at a time; a takeover lock left by a dead taker expires after TIMEOUT_S."""
    lock = file.with_name("CLAIM.takeover")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        age = heartbeat_age(lock)
        if age is not None and age > TIMEOUT_S:
            lock.unlink(missing_ok=True)
        return
    os.close(fd)
    try:
        if read_owner(file) == seen:  # nobody took it over meanwhile
            log.warning("taking over %s from %s, which is gone or silent", file.parent,
                        seen.describe() if seen else "an unreadable claim")
            file.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)
