"""Sessions: one local Flower simulation that runs a command's federated runs one after another, so that the
runs of a manifest pay Flower's start-up and shut-down (SuperLink, simulation engine, Ray, its workers'
imports and devices) once per slot rather than once per run.

The command and the ServerApp talk through files in the session's folder: the command writes `run-<n>.json`
(the run's whole config, its claim token included), the ServerApp runs it and writes `done-<n>.json` (the
error's sentence, or none), then waits for run n+1, for `stop`, or for the command to die (its pid and start
time are in `owner.json`). The clients take each message's run config from the message itself. A run that
fails ends the session; the command's next run starts a new one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from fed_app.runs import procfs
from fed_app.config import RunConfig, plumbing
from fed_app.local.local_federation import FlowerRunError, LocalFederation

POLL_S = 0.1
SESSION_RUN_ENDED = "session run ended:"  # the ServerApp's last log line of a run; Flower streams logs with a lag
LOG_WAIT_S = 10.0


class SessionFolder:
    """The files through which a command hands a session's ServerApp its runs, one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def create(cls, folder: Path) -> SessionFolder:
        """A fresh folder owned by this process (what an earlier session left there is removed)."""
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True)
        session = cls(folder)
        session._write("owner.json", {"pid": os.getpid(), "started": procfs.start_time(os.getpid())})
        return session

    def _write(self, name: str, value: dict) -> None:
        tmp = self.folder / f".{name}.part"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.folder / name)  # a reader never sees half a file

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def submit(self, n: int, cfg: RunConfig, claim_token: str = "") -> None:
        self._write(f"run-{n}.json", {**cfg.to_run_config(), "claim-token": claim_token})

    def result(self, n: int) -> dict | None:
        """Run n's outcome once the ServerApp wrote it: {"error": None} or {"error": "<sentence>"}."""
        return self._read(f"done-{n}.json")

    def stop(self) -> None:
        self._write("stop", {})

    def owner_alive(self) -> bool:
        owner = self._read("owner.json")
        return owner is not None and procfs.start_time(owner["pid"]) == owner["started"]

    def next_run(self, n: int) -> tuple[RunConfig, str] | None:
        """The ServerApp's side: run n's config and the claim token it comes with, once it is submitted; None on
        `stop` or once the command is gone."""
        while (value := self._read(f"run-{n}.json")) is None:
            if (self.folder / "stop").exists() or not self.owner_alive():
                return None
            time.sleep(POLL_S)
        return RunConfig.from_run_config(value), plumbing(value)["claim-token"]

    def finish(self, n: int, error: str | None) -> None:
        self._write(f"done-{n}.json", {"error": error})


class Session:
    """The command's side: fedit in session mode on `federation` (one `flwr run`), fed one run at a time and
    started again when it ended (a failed run) or when a run needs another federation (num-clients)."""

    def __init__(self, federation: LocalFederation, cpus: int = 1, gpus: float = 0.0, total_cpus: int | None = None):
        self.federation, self.options = federation, {"cpus": cpus, "gpus": gpus, "total_cpus": total_cpus}
        self.proc: subprocess.Popen | None = None
        self.folder: SessionFolder | None = None
        self.supernodes, self.count, self.lines = 0, 0, []
        self.starts = 0  # how many `flwr run`s this session took: 1 while its runs succeed

    def run(self, cfg: RunConfig, claim_token: str = "") -> str:
        """Run `cfg` to its end in the session (the ServerApp adopting the caller's claim, if it holds one); its
        part of Flower's log. FlowerRunError if it failed."""
        if self.starts_for(cfg):
            self._start(cfg)
        self.count += 1
        first = len(self.lines)
        self.folder.submit(self.count, cfg, claim_token)
        while (result := self.folder.result(self.count)) is None:
            if self.proc.poll() is not None:
                self._reader.join()
                raise FlowerRunError(f"the Flower session ended during run {cfg.run_id()}: "
                                     f"{''.join(self.lines[first:])[-2000:]}")
            time.sleep(POLL_S)
        if result["error"] is None:  # the log reaches us after the result: wait (a while) for the run's last line
            deadline = time.monotonic() + LOG_WAIT_S
            while (not any(f"{SESSION_RUN_ENDED} {self.count}" in line for line in self.lines[first:])
                   and time.monotonic() < deadline and self.proc.poll() is None):
                time.sleep(POLL_S)
        log = "".join(self.lines[first:])
        if result["error"] is not None:
            self.close()  # the ServerApp ends the session after a failed run; no need to wait for Ray's shut-down
            raise FlowerRunError(f"run {cfg.run_id()} failed: {result['error']}")
        return log

    def starts_for(self, cfg: RunConfig) -> bool:
        """Whether running `cfg` starts a simulation: none is running, or one of another size."""
        return self.proc is None or self.proc.poll() is not None or self.supernodes != cfg.num_clients

    def _start(self, cfg: RunConfig) -> None:
        self.close()
        self.folder = SessionFolder.create(self.federation.home / "session")
        self.supernodes, self.count, self.lines = cfg.num_clients, 0, []
        self.proc = self.federation.popen(cfg, cfg.num_clients, session=str(self.folder.folder), **self.options)
        self.starts += 1
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read_log(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def close(self) -> None:
        """End the session's `flwr run` and every process of the federation (its runs' results are written:
        an orderly shut-down of Ray would only cost seconds)."""
        if self.proc is None:
            return
        self.folder.stop()
        self.federation.stop()
        self.proc.wait()
        self._reader.join()
        self.proc = None
