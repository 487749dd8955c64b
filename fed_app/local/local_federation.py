"""A private local Flower federation: its own FLWR_HOME and ports, `flwr run` on the local simulation or on
a deployment SuperLink, the run's real status (not the exit code), and a stop that ends exactly its own
processes. Used by `make run` (fed_app/launch.py), the experiment runner, the benchmarks and the tests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fed_app.local.app_files import copy_app
from fed_app.runs import procfs
from fed_app.runs.procfs import identity_tag
from fed_app.config import ConfigError, RunConfig, to_kebab
from fed_app.errors import UserError

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app: the folder with pyproject.toml


class FlowerRunError(UserError, RuntimeError):
    """A Flower run that did not finish successfully."""


def toml_value(value: Any, key: str = "") -> str:
    """`value` as TOML text that Flower's --run-config reads back unchanged. Flower splits the text at quotes (a
    quoted value cannot hold its own quote, escaped or not): a string goes as a literal '...' (no escapes at all)
    unless it holds a ', then as a basic "..." string with JSON's escapes (TOML's); one with both is refused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" not in value and all(c == "\t" or " " <= c != "\x7f" for c in value):  # what a literal may hold
            return "'" + value + "'"
        if '"' not in value:
            return json.dumps(value)
        raise ConfigError(f"run-config {key}={value!r} holds both quote characters, which Flower's --run-config "
                          f"cannot carry; give a value without ' or without \".")
    return repr(value)


def run_config_arg(cfg: RunConfig, **plumbing: str) -> str:
    """The whole config as `--run-config` text, so the run never depends on pyproject defaults drifting; with
    the commands' plumbing keys (config.PLUMBING: claim_token, session) that are set."""
    values = {**cfg.to_run_config(), **{to_kebab(k): v for k, v in plumbing.items() if v}}
    return " ".join(f"{k}={toml_value(v, k)}" for k, v in values.items())


class LocalFederation:
    """`flwr run` against a local SuperLink that lives under its own FLWR_HOME and is stopped by `stop()`."""

    _count = 0

    def __init__(self, base: Path, extra_env: dict[str, str] | None = None):
        # one FLWR_HOME per federation (<base>/<host>-<pid>-<n>-<identity tag>): stop() ends exactly this one's
        # processes even when several commands share `base` (the tag: two containers of one host name may both
        # run as pid 7); the leftovers of a command that was SIGKILLed are reaped here
        base = Path(base).resolve()
        reap_orphans(base)
        LocalFederation._count += 1
        self.home = base / f"{socket.gethostname()}-{os.getpid()}-{LocalFederation._count}-{identity_tag()}"
        self.app_copies: dict[Path, Path] = {}  # app folder -> its packed files' copy (app_copy)
        self.extra_env = dict(extra_env or {})  # e.g. CUDA_VISIBLE_DEVICES: the device this federation is pinned to
        # Flower's local SuperLink listens on fixed ports by default and `flwr run` reuses any SuperLink
        # answering there, whoever started it: private ports keep two federations from sharing one.
        self.ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                      "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}

    @property
    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, **self.extra_env, **self.ports, "FLWR_HOME": str(self.home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}

    def command(self, cfg: RunConfig, num_supernodes: int | None = None, cpus: int = 1, gpus: float = 0.0,
                superlink: str | None = None, total_cpus: int | None = None, app: Path = APP_DIR,
                run_config: str | None = None, **plumbing: str) -> list[str]:
        """`flwr run` of fedit (or of another Flower `app` folder, with its own `run_config` text) on the local
        simulation (num_supernodes; Ray limited to `total_cpus` cores if given), or on a named SuperLink;
        `plumbing`: the claim_token or session the ServerApp is to take."""
        run_config = run_config_arg(cfg, **plumbing) if run_config is None else run_config
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(app)]
        if superlink:
            return cmd + [superlink, "--stream", "--run-config", run_config]
        federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
                      f"client-resources-num-gpus={gpus}")
        if total_cpus:
            federation += f" init-args-num-cpus={total_cpus}"
        return cmd + ["--stream", "--run-config", run_config, "--federation-config", federation]

    def popen(self, cfg: RunConfig, num_supernodes: int | None = None, app: Path = APP_DIR,
              **options) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(self.command(cfg, num_supernodes, app=self.app_copy(app), **options), env=self.env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def app_copy(self, app: Path) -> Path:
        """The files of `app` that Flower packs, copied once into this federation's home: `flwr run` on the
        copy walks those alone, not the clone's virtualenv and results (fed_app/local/app_files.py)."""
        if app not in self.app_copies:
            into = self.home / "packed" / f"{len(self.app_copies)}-{Path(app).name}"
            self.app_copies[app] = copy_app(app, into)
        return self.app_copies[app]

    def run(self, cfg: RunConfig, num_supernodes: int | None = None, timeout: float | None = None,
            **options) -> str:
        """Run to the end; the streamed log. Raises FlowerRunError unless the run's status is completed."""
        proc = self.popen(cfg, num_supernodes, **options)
        output, _ = proc.communicate(timeout=timeout)
        match = re.search(r"Successfully started run (\d+)", output)
        if proc.returncode != 0 or not match:
            raise FlowerRunError(f"`flwr run` failed (exit {proc.returncode}): {output[-2000:]}")
        status = self.status(match.group(1))
        if status != "finished:completed":
            raise FlowerRunError(f"Flower run {match.group(1)} ended as {status!r}; its log:\n{output[-4000:]}")
        return output

    def status(self, run_id: str) -> str:
        out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "--run-id", run_id, "--format",
                              "json"], env=self.env, capture_output=True, text=True, check=True).stdout
        runs = json.loads(out).get("runs", [])
        return runs[0].get("status", "unknown") if runs else "unknown"

    def stop(self) -> list[int]:
        """SIGKILL every process started under this FLWR_HOME (SuperLink, SuperExec, simulation, Ray)."""
        return _kill_under(lambda home: home == self.home)

    def close(self) -> None:
        """stop(), then remove this federation's FLWR_HOME."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reap_orphans(base: Path) -> list[int]:
    """Kill the Flower processes of federations under `base` whose command is gone, and remove their FLWR_HOMEs:
    what a SIGKILLed runner leaves behind. Only the homes of this host identity (their name's tag): another
    container or cloned VM of this host name has pids of its own, alive where ours are not."""
    if not procfs.host_identity():
        return []  # a host that cannot tell its pid spaces apart leaves every home alone
    host, tag = socket.gethostname(), identity_tag()

    def orphaned(home: Path) -> bool:
        if home.parent != base or not home.name.startswith(host + "-") or not home.name.endswith("-" + tag):
            return False
        pid = home.name[len(host) + 1:].split("-")[0]
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    killed = _kill_under(orphaned)
    for home in base.glob(f"{host}-*-{tag}") if base.exists() else []:
        if orphaned(home):
            shutil.rmtree(home, ignore_errors=True)
    return killed


def _kill_under(chosen, wait: float = 10.0) -> list[int]:
    """SIGKILL every process whose FLWR_HOME is a path that `chosen` accepts, and wait (up to `wait` s) until
    they are gone: a killed process lingers a moment, and a command that says it stopped must have."""
    killed = []
    for pid in processes_under(chosen):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            continue
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(procfs.alive(pid) for pid in killed):
        time.sleep(0.02)
    return killed


def processes_under(chosen) -> list[int]:
    """The processes (not this one) whose FLWR_HOME is a path that `chosen` accepts."""
    return [pid for pid in procfs.pids() if (home := procfs.flwr_home(pid)) is not None and chosen(home)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_gpus(asked: float | None) -> float:
    """The GPU fraction per simulated client: as asked, else 0.1 with CUDA (ten clients share it), else 0."""
    if asked is not None:
        return asked
    import torch

    return 0.1 if torch.cuda.is_available() else 0.0
