"""Nothing loads code: a pickle planted in any file a run reads (checkpoint.pt, checkpoint.prev.pt, mask.pt,
client_masks.pt, a control file, a weights file, the dry run's peek at checkpoint.pt) is treated as damaged or
refused in one sentence, and never runs: its payload would create a marker file, which stays absent."""

import argparse
import logging
import pathlib

import numpy as np
import pytest
import torch

from experiments.display import checkpoint_step
from experiments.manifest import Run
from fed_app.config import RunConfig
from fed_app.flower.mask_plan import MaskPlan, pack_masks, unpack_masks
from fed_app.runs.rundir import DamagedRunError, RunDir
from fed_app.task.model import ModelWeightsError, build_model
from strategies.scaffold import ControlStore

from ...conftest import TINY


class Evil:
    """Unpickling this creates `marker`: what a crafted file could do with any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "ran"


def _plant(path, obj, marker):
    """`obj` (holding an Evil) saved as `path`; its payload proved live (a full unpickling creates the marker, then
    removed), so that the marker's absence afterwards means nothing unpickled it."""
    torch.save(obj, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def _run_with_two_checkpoints(path):
    run = RunDir(path)
    path.mkdir()
    for epoch in (0, 1):
        run.append_row({"epoch": epoch, "val_accuracy": 0.1 * epoch})
        run.save_checkpoint({"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}})
    return run


def test_a_planted_checkpoint_is_kept_as_bad_and_the_one_before_it_resumes(tmp_path, marker):
    run = _run_with_two_checkpoints(tmp_path / "run")
    _plant(run.checkpoint_file, {"epoch": 1, "model": Evil(marker)}, marker)
    planted = run.checkpoint_file.read_bytes()
    checkpoint = run.resume("epoch")
    assert not marker.exists()
    assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["model"]["w"], torch.zeros(3))
    assert (run.path / "checkpoint.pt.bad").read_bytes() == planted  # kept, as it was
    assert [r["epoch"] for r in run.rows()] == [0]  # epoch 1 is redone


def test_a_planted_previous_checkpoint_behind_a_cut_one_starts_the_run_over_without_running_it(tmp_path, marker):
    run = _run_with_two_checkpoints(tmp_path / "run")
    data = run.checkpoint_file.read_bytes()
    run.checkpoint_file.write_bytes(data[: len(data) // 2])
    _plant(run.previous_file, {"epoch": 0, "model": Evil(marker)}, marker)
    assert run.resume("epoch") is None
    assert not marker.exists()
    assert (run.path / "checkpoint.pt.bad").exists() and (run.path / "checkpoint.prev.pt.bad").exists()


def _sparse(tmp_path, scope):
    return RunConfig.from_run_config({**TINY, "optimizer": "sparse-sgdm", "head": "ridge", "mask-scope": scope,
                                      "num-clients": 2, "run-dir": str(tmp_path)})


@pytest.mark.parametrize("scope, name", [("global", "mask.pt"), ("local", "client_masks.pt")])
def test_a_planted_mask_file_is_refused_in_one_sentence(tmp_path, marker, scope, name):
    cfg = _sparse(tmp_path, scope)
    _plant(tmp_path / name, {0: Evil(marker)} if scope == "local" else {"w": Evil(marker)}, marker)
    with pytest.raises(DamagedRunError, match=rf"^{tmp_path / name} cannot be read \(UnpicklingError: .*\); it is "
                                              r"cut short, corrupt or not a file fedit wrote: delete that run's "
                                              r"folder to run it again\.$"):
        MaskPlan.load(RunDir(tmp_path), {"w": torch.Size([4])}, cfg)
    assert not marker.exists()


def test_client_masks_round_trip_as_tensors_and_an_older_file_of_numpy_bits_still_reads(tmp_path):
    masks = {p: {"w": torch.tensor([True, p == 1, False, True])} for p in (0, 1)}
    shapes = {"w": torch.Size([4])}
    cfg = _sparse(tmp_path, "local")
    MaskPlan.local_masks(masks).save(RunDir(tmp_path))
    assert all(torch.is_tensor(b) for b in torch.load(tmp_path / "client_masks.pt", weights_only=True).values())
    torch.save({p: pack_masks(m) for p, m in masks.items()}, tmp_path / "old.pt")  # numpy arrays, as before
    (tmp_path / "old.pt").replace(tmp_path / "client_masks.pt")
    plan = MaskPlan.load(RunDir(tmp_path), shapes, cfg)
    assert all(torch.equal(plan.per_partition[p]["w"], masks[p]["w"]) for p in masks)
    assert torch.equal(unpack_masks(np.packbits([1, 0, 1]), {"w": torch.Size([3])})["w"],
                       torch.tensor([True, False, True]))


def test_a_planted_control_file_is_refused_in_one_sentence(tmp_path, marker):
    store = ControlStore(tmp_path / "client_state")
    store.save(3, 2, torch.ones(4), 0)
    _plant(store.versions(3)[2], Evil(marker), marker)
    with pytest.raises(DamagedRunError, match=r"control-2\.pt cannot be read \(UnpicklingError"):
        store.load(3, 5)
    assert not marker.exists()


def test_a_planted_weights_file_is_refused_in_one_sentence_naming_what_it_holds(tmp_path, marker):
    path = tmp_path / "weights.pth"
    _plant(path, {"teacher": {"blocks.0.attn.qkv.weight": torch.zeros(2)}, "hook": Evil(marker)}, marker)
    with pytest.raises(ModelWeightsError) as refused:
        build_model(RunConfig(model="vit-tiny-test", model_weights=str(path)), 10)
    assert str(refused.value) == (f"model-weights={str(path)!r} holds builtins.getattr, pathlib.Path, "
                                  f"pathlib.PosixPath besides tensors, which fedit does not unpickle (that could run "
                                  f"code); pass a file of tensors, e.g. one saved with "
                                  f"torch.save(model.state_dict(), path).")
    assert not marker.exists()


def test_dinos_own_checkpoint_with_its_argparse_args_loads_weights_only(tmp_path, caplog):
    source, _ = build_model(RunConfig(model="vit-tiny-test", seed=3), 10)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("head.")},
                "args": argparse.Namespace(arch="vit_small", lr=0.0005, out_dim=65536)}, path)
    with caplog.at_level(logging.WARNING):
        model, _ = build_model(RunConfig(model="vit-tiny-test", model_weights=str(path)), 10)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert "unpickling" not in caplog.text  # argparse.Namespace allowed by name, not by a full unpickling


def test_the_dry_runs_peek_at_a_planted_checkpoint_does_not_run_it(tmp_path, marker):
    run = Run("centralized", RunConfig.from_run_config({**TINY, "run-dir": str(tmp_path)}))
    _plant(tmp_path / "checkpoint.pt", {"epoch": 2, "model": Evil(marker)}, marker)
    assert checkpoint_step(run) == "its last readable checkpoint"
    assert not marker.exists()
    torch.save({"epoch": 2, "model": {}}, tmp_path / "checkpoint.pt")
    assert checkpoint_step(run) == "epoch 2"
