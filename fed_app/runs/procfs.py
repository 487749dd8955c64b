"""What Linux's /proc says of a process, read in one place: its state, start time and CPU seconds (from
/proc/<pid>/stat), its command line and its FLWR_HOME (which Flower federation started it), and which pid
space the pids are of (`host_identity`). A process that is gone reads as None."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pids(include_own: bool = False) -> list[int]:
    """Every process id on the machine (this process's too if asked)."""
    own = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (include_own or int(p) != own)]


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name: index 0 is field 3 (the state), 11 and 12 are
    utime and stime (fields 14, 15), 19 the start time (field 22). None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name, in brackets, may hold spaces and brackets itself


def alive(pid: int) -> bool:
    """Running or sleeping, not yet reaped or a zombie (whose parent has not waited for it)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> str:
    """The process's start in clock ticks since boot, '' if it is gone: with the pid, it names one process."""
    fields = stat_fields(pid)
    return fields[19] if fields is not None else ""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has spent so far."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S if fields is not None else None


def command_line(pid: int) -> str:
    """The process's command line (as it set it: Ray's workers rename theirs), '' if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def flwr_home(pid: int) -> Path | None:
    """The FLWR_HOME in the process's environment: the federation that started it (None: none, or gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    home = next((v[len(b"FLWR_HOME="):] for v in env if v.startswith(b"FLWR_HOME=")), None)
    return Path(os.fsdecode(home)) if home is not None else None


def identity_tag() -> str:
    """A short digest of host_identity() (whose pids this process sees) for file names."""
    return hashlib.sha256(host_identity().encode()).hexdigest()[:12] if host_identity() else "unknown"


@functools.cache
def host_identity() -> str:
    """Whose pids this process sees: host name, boot id and pid namespace, '' if /proc cannot tell. Two
    containers with host networking, or two clones of one VM, share a host name but not this: a pid (and its
    start time) means the same process only to a process of the same identity."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()} {boot} {namespace}"
