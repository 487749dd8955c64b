"""A plugin from outside the fedit package, as a researcher would write one: a mask rule, a client objective
and an aggregation rule, registered by name. Run with --run-config "plugins='tests.plugins.example' ..."."""

import torch
import torch.nn.functional as F

from fed_app.registry import AGGREGATIONS, MASK_RULES, OBJECTIVES
from masking.calibrate import MaskRule
from strategies.fedavg import WeightedSum

PROX_MU = 0.1


def position(params, generator):
    """Each entry's position in its tensor: the rule keeps the first entries of every tensor trainable."""
    return {n: torch.arange(p.numel(), dtype=torch.float32, device=p.device).view_as(p) for n, p in params.items()}


MASK_RULES.register("by-position")(MaskRule(keep_lowest=True, score=position))


@OBJECTIVES.register("proximal")
def proximal(model):
    """FedProx's objective: cross-entropy + mu/2 ||w - w_global||^2 over the trainable parameters."""
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(logits, labels):
        drift = sum((params[n] - anchor[n]).square().sum() for n in params)
        return F.cross_entropy(logits, labels) + PROX_MU / 2 * drift

    return loss


@AGGREGATIONS.register("half-step")
class HalfStep(WeightedSum):
    """The FedAvg mean update, applied at half size (a server learning rate of 0.5)."""

    def result(self):
        return {n: 0.5 * t for n, t in super().result().items()}
