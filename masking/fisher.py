"""Diagonal Fisher sensitivity: exact per-sample squared gradients of the log-likelihood, summed in float64.

Which parameters are scored: every parameter with requires_grad=True, by name. In a ViT that is the
whole backbone (patch embedding, cls_token, pos_embed, every block's weights and biases, norms); freeze
the classifier head (requires_grad=False) to leave it out, as step 0 of sparse fine-tuning does.

Modes:
- "sampled" (default): y ~ p(y|x) from the model itself: the true Fisher, E_x E_{y~p} [grad log p(y|x)]^2.
- "empirical": y = the true label: the empirical Fisher.
- "batch": the shortcut of computing (grad of the mini-batch mean loss)^2 per chunk. Per chunk of B
  samples with per-sample gradients g_i this is (1/B^2)(sum_i g_i^2 + sum_{i!=j} g_i g_j), so it ranks
  by the mean square plus (B-1) times the squared mean gradient, not by the per-sample mean square.
  Kept only to compare against; labels as in "empirical" if given, else sampled.
All modes return per-name sums over samples (over chunks for "batch") in float64: a float32 gradient squares
exactly in float64, so sums over the same samples in any grouping or order (chunks, clients) agree to about
1e-15 relative, and scores of disjoint sets add up to the score of their union, as federated calibration needs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

MODES = ("sampled", "empirical", "batch")


def scored_parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(
    model: torch.nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    mode: str = "sampled",
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-parameter-name sums over `inputs` of squared log-likelihood gradients (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"fisher mode {mode!r} is not one of {', '.join(MODES)}.")
    if mode == "empirical" and labels is None:
        raise ValueError("fisher mode 'empirical' needs the true labels; pass labels= or use mode='sampled'.")
    scored = {n: p.detach() for n, p in scored_parameters(model).items()}
    if not scored:
        raise ValueError("the model has no parameter with requires_grad=True to score.")
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in scored}
    fixed.update(dict(model.named_buffers()))

    def nll(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (params, fixed), (x,))
        return F.cross_entropy(logits.float(), y)

    def nll_one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nll(params, x.unsqueeze(0), y.unsqueeze(0))

    per_sample = vmap(grad(nll_one), in_dims=(None, 0, 0))
    scores = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in scored.items()}
    was_training = model.training
    model.eval()
    try:
        with unfused_attention(model):
            for start in range(0, len(inputs), chunk_size):
                x = inputs[start:start + chunk_size]
                sampled = mode == "sampled" or labels is None
                y = sample_labels(model, x, generator) if sampled else labels[start:start + chunk_size]
                if mode == "batch":  # one gradient of the chunk's mean loss, squared
                    for n, g in grad(nll)(scored, x, y).items():
                        scores[n] += g.double().square()
                else:
                    for n, g in per_sample(scored, x, y).items():
                        scores[n] += g.double().square().sum(0)
    finally:
        model.train(was_training)
    return scores


@contextlib.contextmanager
def unfused_attention(model: torch.nn.Module):
    """timm attention through its explicit softmax(QK^T)V path, which vmap batches (fused SDPA it loops)."""
    modules = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


@torch.no_grad()
def sample_labels(model: torch.nn.Module, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """y ~ softmax(model(x)), one draw per sample."""
    probs = torch.softmax(model(x).float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
