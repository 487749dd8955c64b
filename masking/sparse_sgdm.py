"""SparseSGDM: torch's SGD (momentum, dampening, nesterov, weight decay) with per-entry gradient masks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach
from torch.optim.sgd import sgd


class SparseSGDM(torch.optim.SGD):
    """SGD whose update is zero wherever a parameter's mask is 0 (frozen); exactly SGD where it is 1.

    `masks` are aligned with the parameters (over all groups, in order); None means dense.
    Weight decay is applied here, masked, and torch's functional `sgd()` runs with weight_decay=0,
    so its foreach and single-tensor paths are used unchanged. Masks live in optimizer state.
    """

    def __init__(
        self,
        params: Iterable,
        masks: Sequence[Tensor | None] | None,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        foreach: bool | None = None,
    ):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, foreach=foreach)
        self.set_masks(masks)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def set_masks(self, masks: Sequence[Tensor | None] | None) -> None:
        """Replace the masks; momentum on entries that are frozen now is cleared."""
        params = self._params()
        masks = [None] * len(params) if masks is None else list(masks)
        if len(masks) != len(params):
            raise ValueError(f"got {len(masks)} masks for {len(params)} parameters; give one per parameter (None = dense).")
        for i, (p, mask) in enumerate(zip(params, masks)):
            state = self.state[p]
            if mask is None:
                state.pop("mask", None)
                continue
            if mask.shape != p.shape:
                raise ValueError(f"mask {i} has shape {tuple(mask.shape)} but its parameter has {tuple(p.shape)}.")
            mask = mask.to(device=p.device, dtype=torch.bool)
            state["mask"] = mask
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(~mask, 0.0)

    def masks(self) -> list[Tensor | None]:
        return [self.state[p].get("mask") for p in self._params()]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p in self._params():  # torch casts state tensors to the parameter's dtype; masks stay bool
            if "mask" in self.state[p]:
                self.state[p]["mask"] = self.state[p]["mask"].to(torch.bool)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor | None] = []
            has_sparse_grad = self._init_group(group, params, grads, buffers)
            grads = self._masked_directions(group, params, grads)
            sgd(params, grads, buffers, weight_decay=0.0, momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                has_sparse_grad=has_sparse_grad, foreach=group["foreach"], fused=group["fused"])
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def _masked_directions(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """grad + weight_decay * param, as torch's SGD computes it, then 0 (not NaN) where frozen."""
        if group["maximize"]:
            grads = [-g for g in grads]
        wd = group["weight_decay"]
        if wd != 0:
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
            if foreach:
                grads = list(torch._foreach_add(grads, params, alpha=wd))
            else:
                grads = [g.add(p, alpha=wd) for g, p in zip(grads, params)]
        if group["maximize"]:  # sgd() negates again under maximize
            grads = [-g for g in grads]
        out = []
        for p, g in zip(params, grads):
            mask = self.state[p].get("mask")
            out.append(g if mask is None else torch.where(mask, g, 0.0))
        return out
