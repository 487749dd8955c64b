"""Step 0: the classifier head, trained on a frozen backbone, fitted as an L2-regularized multinomial logistic
regression (the linear probe of LP-FT) or solved as ridge regression (its logits' temperature then fitted by
cross-entropy), then frozen."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_app.task.batches import BatchTransform
from fed_app.task.data import Split


# Temperatures tried for the ridge head's logits: 401 log-spaced values over five decades (2.9% apart), refined
# by a parabola through the best three; ridge logits of a one-hot regression lie near [0, 1], so the best is >> 1.
TEMPERATURES = torch.logspace(-1, 4, 401, dtype=torch.float64)


@torch.no_grad()
def features(model: torch.nn.Module, split: Split, indices: Tensor, transform: BatchTransform, batch_size: int,
             precision: contextlib.AbstractContextManager) -> Iterator[tuple[Tensor, Tensor]]:
    """(backbone features in float64, labels) of `indices`, batch by batch (the model in eval mode)."""
    model.eval()
    for batch in indices.split(batch_size):
        with precision:
            feats = model.forward_head(model.forward_features(transform(split.images[batch])), pre_logits=True)
        yield feats.double(), split.labels[batch]


@torch.no_grad()
def ridge_statistics(model: torch.nn.Module, split: Split, indices: Tensor, transform: BatchTransform,
                     batch_size: int, precision: contextlib.AbstractContextManager,
                     num_classes: int) -> dict[str, Tensor]:
    """Sufficient statistics of ridge regression on backbone features: X^T X, X^T Y (X with a ones
    column, Y one-hot) in float64, and the count. Statistics of disjoint sets add up."""
    xtx = xty = None
    for feats, labels in features(model, split, indices, transform, batch_size, precision):
        x = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64, device=feats.device)], 1)
        y = F.one_hot(labels, num_classes).double()
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
def temperature_losses(model: torch.nn.Module, split: Split, indices: Tensor, transform: BatchTransform,
                       batch_size: int, precision: contextlib.AbstractContextManager, weight: Tensor,
                       bias: Tensor) -> Tensor:
    """Summed cross-entropy of the head (weight, bias) on `indices` at each of TEMPERATURES, in float64:
    the only numbers a client sends to calibrate the head (sums of disjoint sets add up)."""
    temps = TEMPERATURES.to(indices.device)
    total = torch.zeros_like(temps)
    for feats, labels in features(model, split, indices, transform, batch_size, precision):
        logits = feats @ weight.to(feats).T + bias.to(feats)
        for part in range(0, len(temps), 50):  # (50, B, C) at a time
            t = temps[part:part + 50, None, None]
            scaled = t * logits
            total[part:part + 50] += (scaled.logsumexp(-1) - scaled.gather(-1, labels.expand(len(t), -1)[..., None])
                                      .squeeze(-1)).sum(-1)
    return total


def fit_temperature(losses: Tensor) -> float:
    """The temperature minimizing the summed cross-entropy: the best grid point, refined by the vertex of
    the parabola (in log temperature) through it and its neighbours."""
    losses = losses.double().cpu()
    i = int(losses.argmin())
    log_t = TEMPERATURES.log()
    if 0 < i < len(losses) - 1:
        left, mid, right = losses[i - 1:i + 2].tolist()
        curvature = left - 2 * mid + right
        if curvature > 0:
            step = float(log_t[1] - log_t[0])
            return math.exp(float(log_t[i]) + 0.5 * step * (left - right) / curvature)
    return float(TEMPERATURES[i])


@torch.no_grad()
def feature_matrix(model: torch.nn.Module, split: Split, indices: Tensor, transform: BatchTransform, batch_size: int,
                   precision: contextlib.AbstractContextManager) -> tuple[Tensor, Tensor]:
    """(backbone features (N, D) in float64, labels (N,)) of `indices`: what the logistic head is fitted on."""
    feats, labels = zip(*features(model, split, indices, transform, batch_size, precision))
    return torch.cat(feats), torch.cat(labels)


def logistic_sums(feats: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """Summed cross-entropy of the linear head (weight, bias) on these features, and its gradient, in float64:
    the only numbers a client sends to fit the logistic head (sums of disjoint sets add up)."""
    log_p = (feats @ weight.to(feats).T + bias.to(feats)).log_softmax(-1)
    rows = torch.arange(len(labels), device=feats.device)
    residual = log_p.exp()
    residual[rows, labels] -= 1  # d(cross-entropy)/d(logits) = softmax - one-hot
    return {"loss": -log_p[rows, labels].sum(), "grad_weight": residual.T @ feats, "grad_bias": residual.sum(0),
            "count": torch.tensor(float(len(labels)), dtype=torch.float64)}


Sums = Callable[[Tensor, Tensor], dict[str, Tensor]]


def fit_logistic(sums: Sums, dim: int, classes: int, lam: float, iterations: int) -> tuple[Tensor, Tensor, dict]:
    """(weight (C, D), bias (C,), what the fit reports) minimizing the mean cross-entropy + lam/2 ||W||^2 (the
    bias unpenalized), from zero, by full-batch L-BFGS with a strong-Wolfe line search in float64. `sums(W, b)`
    gives logistic_sums over all the data: centrally in one call, in FL one query round of every client (the
    same iterates either way, to float64 rounding). Stops after `iterations` L-BFGS steps or when no gradient
    entry exceeds 1e-6."""
    params = torch.zeros(classes, dim + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    last = {"evaluations": 0}

    def closure() -> Tensor:
        weight, bias = params.detach()[:, :dim], params.detach()[:, dim]
        found = {k: v.double().cpu() for k, v in sums(weight, bias).items()}
        n = float(found["count"])
        params.grad = torch.cat([found["grad_weight"] / n + lam * weight, found["grad_bias"][:, None] / n], 1)
        last.update(evaluations=last["evaluations"] + 1, loss=float(found["loss"] / n))
        return found["loss"] / n + lam / 2 * weight.square().sum()

    opt.step(closure)
    weight, bias = params.detach()[:, :dim].clone(), params.detach()[:, dim].clone()
    return weight, bias, {"head_loss": last["loss"], "head_evaluations": last["evaluations"],
                          "head_gradient": float(params.grad.abs().max())}


def head_name(model: torch.nn.Module) -> str:
    """The classifier's name in the model: timm's `pretrained_cfg['classifier']` ('head' for ViTs, 'fc' for
    ResNets), 'head' for models built without one (the tiny test ViT)."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")


def head_module(model: torch.nn.Module) -> torch.nn.Linear:
    return model.get_submodule(head_name(model))


@torch.no_grad()
def set_head(model: torch.nn.Module, weight: Tensor, bias: Tensor) -> None:
    head = head_module(model)
    head.weight.copy_(weight.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))


@contextlib.contextmanager
def only_head_trainable(model: torch.nn.Module):
    """Inside the block only the head has requires_grad; the previous flags come back after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = head_name(model) + "."
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefix))
    try:
        yield [p for n, p in model.named_parameters() if n.startswith(prefix)]
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def freeze_head(model: torch.nn.Module) -> None:
    head_module(model).requires_grad_(False)
