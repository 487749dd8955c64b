"""Shared fixtures: tiny synthetic run configs, CUDA gating for `gpu` tests."""

from __future__ import annotations

import pytest
import torch

from fed_app.config import RunConfig

TINY = {
    "dataset": "synthetic", "model": "vit-tiny-test", "synthetic-train-size": 3200,
    "synthetic-test-size": 300, "val-size": 200, "batch-size": 32, "eval-batch-size": 256,
    "epochs": 2, "lr": 0.05, "device": "cpu",
}


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    return RunConfig.from_run_config({**TINY, "run-dir": str(tmp_path / "run")})


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
