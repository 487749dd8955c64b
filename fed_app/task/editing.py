"""Step 0 and mask calibration on one split of data (centralized; a client's shard in FL)."""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.task.batches import BatchTransform, batch_stream
from fed_app.task.data import Split
from fed_app.task.head import (feature_matrix, fit_logistic, fit_temperature, freeze_head, head_module, logistic_sums,
                          only_head_trainable, ridge_statistics, set_head, solve_ridge, temperature_losses)
from fed_app.task.seeds import fisher_images_generator, fisher_labels_generator, head_epoch_generator
from fed_app.task.train import train_steps
from masking.calibrate import Masks, calibrate
from masking.fisher import fisher_diagonal

log = logging.getLogger(__name__)


def fit_head(cfg: RunConfig, model: torch.nn.Module, split: Split, indices: Tensor, train_tf: BatchTransform,
             eval_tf: BatchTransform, precision: contextlib.AbstractContextManager, num_classes: int) -> dict:
    """Step 0: train the head on the frozen backbone, fit it as a logistic regression on its features, or solve
    it as ridge regression and fit its temperature; then freeze it (unless freeze-head=false). What step 0 found, for the round-0 row: e.g. the temperature."""
    found = {}
    if cfg.head == "logistic":
        feats, labels = feature_matrix(model, split, indices, eval_tf, cfg.eval_batch_size, precision)
        weight, bias, found = fit_logistic(lambda w, b: logistic_sums(feats, labels, w, b), feats.shape[1],
                                           num_classes, cfg.logistic_lambda, cfg.head_iterations)
        set_head(model, weight, bias)
    elif cfg.head == "ridge":
        stats = ridge_statistics(model, split, indices, eval_tf, cfg.eval_batch_size, precision, num_classes)
        set_head(model, *solve_ridge(stats, cfg.ridge_lambda))
        if cfg.ridge_calibrate:
            head = head_module(model)
            losses = temperature_losses(model, split, indices, eval_tf, cfg.eval_batch_size, precision,
                                        head.weight.detach(), head.bias.detach())
            found["head_temperature"] = temperature = fit_temperature(losses)
            set_head(model, head.weight * temperature, head.bias * temperature)
    elif cfg.head == "train":
        device = indices.device
        steps = math.ceil(len(indices) / cfg.batch_size)
        with only_head_trainable(model) as head_params:
            opt = torch.optim.SGD(head_params, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
            for epoch in range(cfg.head_epochs):
                generator = head_epoch_generator(device, cfg.seed, epoch)
                loss = train_steps(model, opt, split, batch_stream(indices, cfg.batch_size, generator), steps,
                                   train_tf, generator, precision)
                log.info("head epoch %d/%d  train_loss %.4f", epoch + 1, cfg.head_epochs, loss)
    if cfg.head_frozen:
        freeze_head(model)
    return found


def fisher_indices(cfg: RunConfig, indices: Tensor, *key: int) -> Tensor:
    """The `fisher-samples` images scored: a seeded choice among `indices` (key: e.g. the partition id)."""
    generator = fisher_images_generator(indices.device, cfg.seed, *key)
    order = torch.randperm(len(indices), device=indices.device, generator=generator)
    return indices[order[: cfg.fisher_samples]]


def fisher_sums(cfg: RunConfig, model: torch.nn.Module, split: Split, indices: Tensor,
                eval_tf: BatchTransform, *key: int) -> dict[str, Tensor]:
    """Fisher sums over `indices`, prepared in slices so that at most a few hundred images exist at once."""
    generator = fisher_labels_generator(indices.device, cfg.seed, *key)
    total: dict[str, Tensor] = {}
    for part in indices.split(max(cfg.fisher_chunk, 256)):
        x = eval_tf(split.images[part])
        scores = fisher_diagonal(model, x, split.labels[part], mode=cfg.fisher_mode, chunk_size=cfg.fisher_chunk,
                                 generator=generator)
        for n, s in scores.items():
            total[n] = total[n] + s if n in total else s
    return total


def calibrate_masks(cfg: RunConfig, model: torch.nn.Module, split: Split, indices: Tensor,
                    eval_tf: BatchTransform) -> Masks:
    """Masks over the trainable parameters by cfg's rule, sparsity and rounds, scored on `indices`."""
    scored = fisher_indices(cfg, indices)
    return calibrate(model, cfg.mask_rule, cfg.sparsity, cfg.calibration_rounds,
                     score_fn=lambda m: fisher_sums(cfg, m, split, scored, eval_tf),
                     damping=cfg.mask_damping, seed=cfg.seed, per_layer=cfg.mask_threshold == "per-layer")
