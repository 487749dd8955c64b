"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", 2021): the server treats the negative
example-weighted mean client delta as a pseudo-gradient and takes one optimizer step on the global model per
round. Each follows the update of Flower's strategy of the same name (flwr.serverapp.strategy.FedAvgM,
FedAdam, FedYogi, FedAdagrad) term for term, including FedAdam's bias correction at round t+1, and works in
place on the flat float32 global model; its state is part of the run's checkpoint. Each is registered under
run-config `server-optimizer` with the keys it reads; 'fedavg' adds the mean delta as it is."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fed_app.config import ConfigError, RunConfig
from fed_app.registry import SERVER_OPTIMIZERS


class ServerOptimizer:
    """x <- x + step(delta) for the flat global model x and the round's mean client delta."""

    settings: tuple[str, ...] = ("server_lr",)  # keys that shape a run only under this optimizer (applicability)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.optimizer != "sgdm":
            raise ConfigError(f"run-config server-optimizer={cfg.server_optimizer!r} steps on the dense global "
                              f"model; with optimizer={cfg.optimizer!r} use server-optimizer='fedavg' (or "
                              f"optimizer='sgdm').")

    @classmethod
    def build(cls, cfg: RunConfig) -> ServerOptimizer | None:
        return cls(cfg)

    def __init__(self, cfg: RunConfig):
        self.lr, self.momentum = cfg.server_lr, cfg.server_momentum
        self.beta1, self.beta2, self.tau = cfg.server_beta1, cfg.server_beta2, cfg.server_tau
        self.state: dict[str, Tensor] = {}

    def step(self, x: Tensor, delta: Tensor, server_round: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}


@SERVER_OPTIMIZERS.register("fedavg")
class MeanDelta(ServerOptimizer):
    """Plain FedAvg: the mean delta is added as it is (no optimizer object, no state)."""

    settings = ()

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        pass

    @classmethod
    def build(cls, cfg: RunConfig) -> None:
        return None


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): pseudo-gradient g = -delta; m = g, then m = momentum * m + g;
    x -= server_lr * m (with momentum 0: x -= server_lr * g; server_lr 1 gives FedAvg, bit for bit)."""

    settings = ("server_lr", "server_momentum")

    def step(self, x: Tensor, delta: Tensor, server_round: int) -> None:
        g = -delta
        if self.momentum > 0.0:
            m = self.state.get("momentum")
            g = g if m is None else self.momentum * m + g
            self.state["momentum"] = g
        x.sub_(self.lr * g)


class FedOpt(ServerOptimizer):
    """m = beta1 * m + (1 - beta1) * delta (m from zeros), then the rule's v, then x += lr_t * m / (sqrt(v) + tau)."""

    beta1_fixed: float | None = None  # FedAdagrad uses no first moment
    settings = ("server_lr", "server_beta1", "server_beta2", "server_tau")

    def step(self, x: Tensor, delta: Tensor, server_round: int) -> None:
        beta1 = self.beta1 if self.beta1_fixed is None else self.beta1_fixed
        m = self.state.get("m", torch.zeros_like(delta))
        v = self.state.get("v", torch.zeros_like(delta))
        m = beta1 * m + (1 - beta1) * delta
        v = self.second_moment(v, delta)
        self.state["m"], self.state["v"] = m, v
        x.add_(self.rate(server_round) * m / (torch.sqrt(v) + self.tau))

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def rate(self, server_round: int) -> float:
        return self.lr


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(FedOpt):
    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta ** 2

    def rate(self, server_round: int) -> float:  # Adam's bias correction, at Flower's t = round + 1
        t = server_round + 1.0
        return self.lr * math.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(FedOpt):
    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return v - (1.0 - self.beta2) * delta ** 2 * torch.sign(v - delta ** 2)


@SERVER_OPTIMIZERS.register("fedadagrad")
class FedAdagrad(FedOpt):
    beta1_fixed = 0.0
    settings = ("server_lr", "server_tau")

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return v + delta ** 2


def make_server_optimizer(cfg: RunConfig) -> ServerOptimizer | None:
    """None for plain FedAvg (the mean delta is added as it is)."""
    return SERVER_OPTIMIZERS.get(cfg.server_optimizer).build(cfg)
