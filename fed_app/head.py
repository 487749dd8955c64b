"""Step 0: the classifier head, trained on a frozen backbone or solved as ridge regression, then frozen."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_app.data import BatchTransform, Split


@torch.no_grad()
def ridge_statistics(model: torch.nn.Module, split: Split, indices: Tensor, transform: BatchTransform,
                     batch_size: int, precision: contextlib.AbstractContextManager,
                     num_classes: int) -> dict[str, Tensor]:
    """Sufficient statistics of ridge regression on backbone features: X^T X, X^T Y (X with a ones
    column, Y one-hot) in float64, and the count. Statistics of disjoint sets add up."""
    model.eval()
    xtx = xty = None
    for batch in indices.split(batch_size):
        with precision:
            feats = model.forward_head(model.forward_features(transform(split.images[batch])), pre_logits=True)
        x = torch.cat([feats.double(), torch.ones(len(batch), 1, dtype=torch.float64, device=feats.device)], 1)
        y = F.one_hot(split.labels[batch], num_classes).double()
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xty = x.T @ y if xty is None else xty + x.T @ y
    return {"xtx": xtx, "xty": xty, "count": torch.tensor(len(indices))}


def solve_ridge(stats: dict[str, Tensor], lam: float) -> tuple[Tensor, Tensor]:
    """(weight (C, D), bias (C,)) minimizing ||XW + b - Y||^2 + lam ||W||^2 (the bias unpenalized)."""
    xtx = stats["xtx"].clone()
    d = xtx.shape[0] - 1
    xtx[:d, :d] += lam * torch.eye(d, dtype=xtx.dtype, device=xtx.device)
    solution = torch.linalg.solve(xtx, stats["xty"])
    return solution[:d].T.contiguous(), solution[d].contiguous()


@torch.no_grad()
def set_head(model: torch.nn.Module, weight: Tensor, bias: Tensor) -> None:
    model.head.weight.copy_(weight.to(model.head.weight.dtype))
    model.head.bias.copy_(bias.to(model.head.bias.dtype))


@contextlib.contextmanager
def only_head_trainable(model: torch.nn.Module):
    """Inside the block only the head has requires_grad; the previous flags come back after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    try:
        yield [p for n, p in model.named_parameters() if n.startswith("head.")]
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def freeze_head(model: torch.nn.Module) -> None:
    model.head.requires_grad_(False)
