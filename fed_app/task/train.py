"""Task code shared by centralized and federated training: steps, evaluation, optimizer, schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from fed_app.config import RunConfig
from fed_app.task.batches import BatchTransform
from fed_app.task.data import Split
from fed_app.registry import OBJECTIVES

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> the loss to minimize


@OBJECTIVES.register("cross-entropy")
def cross_entropy(model: torch.nn.Module) -> Objective:
    """A client objective is built from the model at the start of a local update (the global model: a
    proximal term would keep a copy of it here) and returns the loss of a batch."""
    return F.cross_entropy


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA GPU is visible; use device='auto' or 'cpu'.")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless fp32 is asked for; fp32 on CPU unless bf16 is asked for."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def training_module(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The module training steps call: `model`, or with compile=true a torch.compile wrapper sharing its
    parameters, with static shapes: one graph for full batches and one for a pass's short last batch. Fisher,
    ridge and evaluation keep the eager model."""
    return torch.compile(model, dynamic=False) if cfg.compile else model


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None,
                   lr: float | None = None) -> torch.optim.SGD:
    """SGD with momentum over the model's trainable parameters, or SparseSGDM under `masks` (by parameter name;
    a name without one is dense) for optimizer='sparse-sgdm'. Weight decay follows timm's groups: none on
    biases, norms and the model's no_weight_decay() names (pos_embed, cls_token), as the ViT and DINO recipes.
    `lr` defaults to cfg.lr (FL rounds pass client_lr)."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer != "sparse-sgdm":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    from masking import SparseSGDM

    optimizer = SparseSGDM(groups, None, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           foreach=True)
    if masks is not None:
        set_masks_by_name(optimizer, model, masks)
    return optimizer


def set_masks_by_name(optimizer, model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """SparseSGDM.set_masks with masks given by parameter name, aligned to the optimizer's group order."""
    name_of = {p: n for n, p in model.named_parameters()}
    optimizer.set_masks([masks.get(name_of[p]) for group in optimizer.param_groups for p in group["params"]])


def client_lr(cfg: RunConfig, server_round: int) -> float:
    """The clients' learning rate in FL round `server_round` (1-based): lr, or with round-scheduler='cosine'
    lr * (1 + cos(pi (t-1) / T)) / 2 over the run's T rounds (never 0: the last round is still a step)."""
    if cfg.round_scheduler == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / cfg.total_rounds))
    return cfg.lr


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Torch's schedulers, stepped once per optimizer step, with lengths given in epochs."""
    total = cfg.epochs * steps_per_epoch
    S = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        return S.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "warmup-cosine":
        warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
        if warm == 0:
            return S.CosineAnnealingLR(optimizer, T_max=total)
        return S.SequentialLR(optimizer, milestones=[warm], schedulers=[
            S.LinearLR(optimizer, start_factor=1.0 / warm, total_iters=warm),
            S.CosineAnnealingLR(optimizer, T_max=total - warm),
        ])
    if cfg.scheduler == "step":
        return S.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    if cfg.scheduler == "exponential":
        return S.ExponentialLR(optimizer, gamma=cfg.gamma ** (1.0 / steps_per_epoch))
    return S.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    batches: Iterator[torch.Tensor],
    steps: int,
    transform: BatchTransform,
    generator: torch.Generator,
    precision: contextlib.AbstractContextManager,
    scheduler=None,
    objective: Objective = F.cross_entropy,
    correction: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> float:
    """`steps` optimizer steps on index batches of `split` minimizing `objective` (cross-entropy unless a client
    objective is given), each (parameter, c) of `correction` adding c to that parameter's gradient before the
    step (SCAFFOLD's c - c_i); the mean training loss (one sync at the end)."""
    model.train()
    total = torch.zeros((), device=split.labels.device)
    for _ in range(steps):
        idx = next(batches)
        x = transform(split.images[idx], generator)
        with precision:
            loss = objective(model(x), split.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p, c in correction:
            p.grad.add_(c)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().float()
    return float(total) / steps


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Split,
    transform: BatchTransform,
    batch_size: int,
    precision: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over the whole split, in large batches."""
    if len(split) == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device, dtype=torch.float64)
    correct = torch.zeros((), device=split.labels.device, dtype=torch.int64)
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        labels = split.labels[start:start + batch_size]
        with precision:
            logits = model(transform(images)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
    return {"loss": float(loss_sum) / len(split), "accuracy": float(correct) / len(split)}
