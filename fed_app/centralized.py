"""The centralized trainer: SGDM or sparse fine-tuning (step 0, calibration, SparseSGDM); resumable; no Flower."""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from fed_app.config import RunConfig, parse_overrides
from fed_app.data import BatchTransform, batch_stream, load_dataset
from fed_app.editing import calibrate_masks, fit_head
from fed_app.head import freeze_head
from fed_app.model import build_model
from fed_app.plots import plot_curves
from fed_app.rundir import RunDir
from fed_app.seeds import epoch_generator
from fed_app.task import (autocast, evaluate, make_optimizer, make_scheduler, resolve_device, set_masks_by_name,
                          train_steps, training_module)
from masking.calibrate import density_of

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> RunDir:
    """Step 0 and calibration when asked, then cfg.epochs epochs, resuming from the run's checkpoint."""
    run_dir = RunDir.for_config(cfg, group="centralized")
    run_dir.claim(cfg)
    if run_dir.done:
        log.info("run %s is already done; nothing to do", run_dir.path)
        return run_dir
    device = resolve_device(cfg)
    data = load_dataset(cfg, device)
    model, spec = build_model(cfg, data.num_classes)
    model.to(device)
    if cfg.head_frozen:
        freeze_head(model)  # before the optimizer is built: the head stays out of it
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    train_tf = BatchTransform.for_model(spec, augment=cfg.augment)
    eval_tf = BatchTransform.for_model(spec)
    precision = autocast(cfg, device)
    all_train = torch.arange(len(data.train), device=device)

    def finish_epoch(epoch: int, **row) -> None:
        val = evaluate(model, data.val, eval_tf, cfg.eval_batch_size, precision)
        test = evaluate(model, data.test, eval_tf, cfg.eval_batch_size, precision)
        run_dir.append_row({"epoch": epoch, **row, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                            "wall_time": time.perf_counter() - t0})
        run_dir.save_checkpoint({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "config": cfg.to_dict()})
        log.info("epoch %d/%d  val_acc %.4f  test_acc %.4f", epoch, cfg.epochs, val["accuracy"], test["accuracy"])

    t0 = time.perf_counter()
    start = _restore(run_dir, model, optimizer, scheduler)
    if start is None:  # a fresh run: step 0, calibration, and the starting point as epoch 0
        found = fit_head(cfg, model, data.train, all_train, train_tf, eval_tf, precision, data.num_classes)
        density = 1.0
        if cfg.optimizer == "sparse-sgdm":
            masks = calibrate_masks(cfg, model, data.train, all_train, eval_tf)
            run_dir.save_mask(masks)
            set_masks_by_name(optimizer, model, masks)
            density = density_of(masks)
        finish_epoch(0, density=density, **found)
        start = 0
    trainer = training_module(cfg, model)
    for epoch in range(start, cfg.epochs):
        generator = epoch_generator(device, cfg.seed, epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_steps(trainer, optimizer, data.train, batch_stream(all_train, cfg.batch_size, generator),
                                 steps_per_epoch, train_tf, generator, precision, scheduler)
        finish_epoch(epoch + 1, learning_rate=lr, train_loss=train_loss)
    plot_curves(run_dir.rows(), run_dir.path / "curves.png", x="epoch", title=f"centralized {cfg.run_id()}")
    run_dir.mark_done()
    return run_dir


def _restore(run_dir: RunDir, model, optimizer, scheduler) -> int | None:
    """Model, optimizer and scheduler from the last checkpoint, if any; the epoch to go on from."""
    ckpt = run_dir.resume("epoch")
    if ckpt is None:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Centralized baseline (same run-config keys as the Flower app).")
    parser.add_argument("--run-config", default="", help="e.g. \"lr=0.01 epochs=10 scheduler='step'\"")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    run_dir = run(cfg)
    print(Path(run_dir.path))


if __name__ == "__main__":
    from fed_app.cli import exit_on_user_error

    exit_on_user_error(main)
