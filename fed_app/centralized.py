"""The centralized trainer: SGDM or sparse fine-tuning (step 0, calibration, SparseSGDM); resumable; no Flower."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch

from fed_app.config import RunConfig, parse_overrides, plumbing
from fed_app.task.batches import BatchTransform, batch_stream
from fed_app.task.data import load_dataset
from fed_app.task.editing import calibrate_masks, fit_head
from fed_app.task.head import freeze_head
from fed_app.task.model import build_model
from fed_app.runs.hooks import Curves
from fed_app.runs.plots import run_title
from fed_app.runs.rundir import RunDir
from fed_app.runs.run_loop import DivergedError, claimed_run, diverged_message, run_steps
from fed_app.task.seeds import epoch_generator
from fed_app.task.train import (autocast, evaluate, make_optimizer, make_scheduler, resolve_device, set_masks_by_name,
                          train_steps, training_module)
from masking.calibrate import density_of

log = logging.getLogger(__name__)


def run(cfg: RunConfig, claim_token: str = "") -> RunDir:
    """Step 0 and calibration when asked, then cfg.epochs epochs, resuming from the run's checkpoint.
    `claim_token`: the claim of the command that started this process (the runner), adopted."""
    with claimed_run(cfg, "centralized", claim_token) as (run_dir, claim):
        if run_dir.finished_whole("epoch", cfg.epochs):
            log.info("run %s is already %s; nothing to do", run_dir.path, "done" if run_dir.done else "diverged")
            return run_dir
        return run_steps(cfg, run_dir, Epochs(cfg, run_dir), guard=claim.check,
                         hooks=[Curves("epoch", run_title(cfg, "centralized"))])


class Epochs:
    """The centralized run's steps (`run_loop.Steps`): step 0 on all training data, then epochs of SGDM or
    SparseSGDM with the learning-rate schedule; model, optimizer and scheduler in every checkpoint."""

    key = "epoch"

    def __init__(self, cfg: RunConfig, run_dir: RunDir):
        self.cfg, self.run_dir, self.total = cfg, run_dir, cfg.epochs
        self.device = resolve_device(cfg)
        self.data = load_dataset(cfg, self.device)
        model, spec = build_model(cfg, self.data.num_classes)
        self.model = model.to(self.device)
        if cfg.head_frozen:
            freeze_head(self.model)  # before the optimizer is built: the head stays out of it
        self.optimizer = make_optimizer(cfg, self.model)
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.batch_size)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.train_tf = BatchTransform.for_model(spec, augment=cfg.augment)
        self.eval_tf = BatchTransform.for_model(spec)
        self.precision = autocast(cfg, self.device)
        self.all_train = torch.arange(len(self.data.train), device=self.device)
        self._trainer = None

    def step_zero(self) -> dict:
        cfg, data = self.cfg, self.data
        found = fit_head(cfg, self.model, data.train, self.all_train, self.train_tf, self.eval_tf, self.precision,
                         data.num_classes)
        density = 1.0
        if cfg.optimizer == "sparse-sgdm":
            masks = calibrate_masks(cfg, self.model, data.train, self.all_train, self.eval_tf)
            self.run_dir.save_mask(masks)
            set_masks_by_name(self.optimizer, self.model, masks)
            density = density_of(masks)
        return {"density": density, **found}

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])

    def step(self, epoch: int) -> dict:
        if self._trainer is None:
            self._trainer = training_module(self.cfg, self.model)
        generator = epoch_generator(self.device, self.cfg.seed, epoch - 1)
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss = train_steps(self._trainer, self.optimizer, self.data.train,
                                 batch_stream(self.all_train, self.cfg.batch_size, generator), self.steps_per_epoch,
                                 self.train_tf, generator, self.precision, self.scheduler)
        return {"learning_rate": lr, "train_loss": train_loss}

    def evaluate(self, epoch: int) -> dict:
        metrics = {}
        for split in ("val", "test"):
            result = evaluate(self.model, getattr(self.data, split), self.eval_tf, self.cfg.eval_batch_size,
                              self.precision)
            metrics.update({f"{split}_loss": result["loss"], f"{split}_accuracy": result["accuracy"]})
        return metrics

    def checkpoints(self, epoch: int) -> bool:
        return True

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Centralized baseline (same run-config keys as the Flower app).")
    parser.add_argument("--run-config", default="", help="e.g. \"lr=0.01 epochs=10 scheduler='step'\"")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.run_config)
    run_dir = run(RunConfig.from_run_config(overrides), plumbing(overrides)["claim-token"])
    if run_dir.diverged:
        raise DivergedError(diverged_message(run_dir))
    print(Path(run_dir.path))


if __name__ == "__main__":
    from fed_app.cli import exit_on_user_error

    exit_on_user_error(main)
