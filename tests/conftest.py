"""Shared fixtures and helpers: tiny synthetic run configs (TINY, FL), Flower process checks, CUDA gating for `gpu`
tests; the in-process federation (fed_app/in_process.py) re-exported for the tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.local.local_federation import LocalFederation, processes_under
from fed_app.local.session import Session
from fed_app.in_process import InProcessGrid, PushPullGrid, play_server_app, run_in_process  # noqa: F401

TINY = {
    "dataset": "synthetic", "model": "vit-tiny-test", "synthetic-train-size": 3200,
    "synthetic-test-size": 300, "val-size": 200, "batch-size": 32, "eval-batch-size": 256,
    "epochs": 2, "lr": 0.05, "device": "cpu",
}

FL = {**TINY, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 4, "eval-every": 2, "checkpoint-every": 2,
      "local-steps": 2}  # a small federation: 3 of 10 clients a round


def fl_cfg(tmp_path, name, **changes) -> RunConfig:
    """The small federation's config with `changes`, its run folder tmp_path/name."""
    return RunConfig.from_run_config({**FL, **changes, "run-dir": str(tmp_path / name)})


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    return RunConfig.from_run_config({**TINY, "run-dir": str(tmp_path / "run")})


@pytest.fixture(scope="session")
def flower_session(tmp_path_factory):
    """One Flower simulation of 10 nodes (fed_app/local/session.py) that runs the tests' runs in turn, as the runner
    runs a slot's: Flower's start-up paid once. `flower_session.run(cfg)`; a failed run starts a new one."""
    with LocalFederation(tmp_path_factory.mktemp("flwr")) as sim:
        session = Session(sim)
        yield session
        session.close()


def flower_processes_under(base: Path) -> list[int]:
    """The processes whose FLWR_HOME lies under `base`: what a stopped command must leave none of."""
    return processes_under(lambda home: str(home).startswith(str(base)))


@pytest.fixture(scope="session")
def server_app_identity() -> None:
    play_server_app()


# The suite's longest commands (make demo, the Flower benchmarks), each a subprocess whose output its test reads.
# Much of their time is spent waiting on Flower's processes to start and stop, so on a 2-core machine they run
# side by side, started together when the first of their tests asks: about the time of the longest, not the sum.
# A test module registers its command (`background_command`) and marks its test `@pytest.mark.background(name)`;
# only the commands of selected tests start. Their timings are never asserted, so running beside each other
# changes none of their results (each writes only its own folder).
BACKGROUND: dict[str, object] = {}  # name -> (folder -> argv), the registered commands


def background_command(name: str):
    def register(build):
        BACKGROUND[name] = build
        return build

    return register


class Background:
    """The selected background commands, running; `output(name)` waits for one, asserts it succeeded and gives
    its stdout."""

    def __init__(self, root: Path, names: list[str]):
        self.procs, self.folders = {}, {}
        for name in names:
            folder = root / name
            folder.mkdir(parents=True)
            # the child keeps its own copies of the two files; ours close here
            with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
                self.procs[name] = subprocess.Popen(BACKGROUND[name](folder), cwd=folder, stdout=out, stderr=err)
            self.folders[name] = folder

    def output(self, name: str, timeout: float = 900) -> str:
        proc, folder = self.procs[name], self.folders[name]
        proc.wait(timeout=timeout)
        out, err = (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text()
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-2000:]}{err[-3000:]}"
        return out

    def folder(self, name: str) -> Path:
        return self.folders[name]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def pytest_collection_finish(session):
    session.config.background_names = sorted({m.args[0] for item in session.items
                                              for m in item.iter_markers("background")})


@pytest.fixture(scope="session")
def background(request, tmp_path_factory):
    running = Background(tmp_path_factory.mktemp("background"), request.config.background_names)
    yield running
    running.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
