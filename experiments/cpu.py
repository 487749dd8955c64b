"""Where a local federation's CPU goes: every process started under one FLWR_HOME sampled from /proc while it
runs, its CPU seconds summed by kind (client actors, the simulation engine that runs the ServerApp, the
SuperLink, the rest), and read back as the CPU each kind spent between two moments (e.g. over the steady
rounds). On a CPU-bound machine every CPU-second that the server or Flower spends is one the clients lack."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fed_app.runs import procfs
from fed_app.local.local_federation import processes_under

CLIENTS, ENGINE, SUPERLINK, OTHER = ("client actors", "simulation engine (ServerApp)", "SuperLink",
                                     "Ray, SuperExec, flwr CLI")
KINDS = (CLIENTS, ENGINE, SUPERLINK, OTHER)


def kind_of(command_line: str) -> str:
    """The kind of a federation's process from its command line (Ray's workers rename theirs)."""
    if "ClientAppActor" in command_line:
        return CLIENTS
    if "flwr-simulation" in command_line:
        return ENGINE
    if "flower-superlink" in command_line:
        return SUPERLINK
    return OTHER


class CpuSampler:
    """Samples, every `interval` s in a thread, the CPU seconds of the processes under `home`, summed by kind. A
    process keeps the first kind other than OTHER it was seen as (a Ray worker becomes a client actor and
    stays one) and, once gone, its last reading."""

    def __init__(self, home: Path, interval: float = 0.25):
        self.home, self.interval = Path(home), interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (epoch seconds, CPU-s by kind so far)
        self._seen: dict[tuple[int, str], list] = {}  # (pid, start time) -> [kind, last CPU seconds]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        for pid in processes_under(lambda home: home == self.home):
            key = (pid, procfs.start_time(pid))
            seconds = procfs.cpu_seconds(pid)
            if seconds is None:
                continue
            entry = self._seen.setdefault(key, [OTHER, 0.0])
            if entry[0] == OTHER:
                entry[0] = kind_of(procfs.command_line(pid))
            entry[1] = seconds
        totals = dict.fromkeys(KINDS, 0.0)
        for kind, seconds in self._seen.values():
            totals[kind] += seconds
        self.samples.append((time.time(), totals))

    def at(self, moment: float) -> dict[str, float]:
        """CPU seconds by kind up to an epoch time, interpolated between the samples around it."""
        if not self.samples or not self.samples[0][0] <= moment <= self.samples[-1][0]:
            raise ValueError(f"no CPU samples around {moment:.2f}; the sampler ran while the federation did not.")
        after = next(i for i, (t, _) in enumerate(self.samples) if t >= moment)
        (t1, c1), (t0, c0) = self.samples[after], self.samples[max(after - 1, 0)]
        share = (moment - t0) / (t1 - t0) if t1 > t0 else 1.0
        return {k: c0[k] + share * (c1[k] - c0[k]) for k in KINDS}

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each kind spent between two epoch times."""
        first, last = self.at(start), self.at(end)
        return {k: last[k] - first[k] for k in KINDS}
