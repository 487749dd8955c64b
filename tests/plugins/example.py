"""A plugin from outside the fedit package, as a researcher would write one: a mask rule, a client objective,
an aggregation rule and a federated method, registered by name. Run with
--run-config "plugins='tests.plugins.example' ..."."""

import torch
import torch.nn.functional as F

from fed_app.registry import AGGREGATIONS, MASK_RULES, METHODS, OBJECTIVES
from masking.calibrate import MaskRule
from strategies.fedavg import SeededFedAvg
from strategies.mean import WeightedSum
from strategies.method import FedAvg

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


class HalvedMean(SeededFedAvg):
    """SeededFedAvg that applies half of each round's mean update."""

    def train_round(self, server_round, arrays, config):
        update, metrics = super().train_round(server_round, arrays, config)
        return {n: 0.5 * t for n, t in update.items()}, metrics


@METHODS.register("doubled-delta")
class DoubledDelta(FedAvg):
    """A method with both hooks: clients reply with twice their delta, the server applies half the mean. Scaling
    by powers of two is exact in floating point, so a run ends equal to FedAvg's bit for bit, and only if both
    hooks ran."""

    def strategy(self, cfg, task, federation, files):
        return HalvedMean(*self.strategy_args(cfg, federation, files))

    def client_train(self, task, request):
        reply = super().client_train(task, request)
        for t in reply.delta.values():
            t.mul_(2.0)
        return reply
