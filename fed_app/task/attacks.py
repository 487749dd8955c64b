"""Attacks to measure robust aggregation against (run-config `attack`, `attack-fraction`, `attack-scale`).

A seeded share of the clients is malicious for the whole run: the same partitions in every round and after a
resume. What a malicious client sends instead of its honest update:

    sign-flip    -s * its update               (s = attack-scale)
    scaled       s * its update                (a boosted update, as in model replacement)
    gaussian     noise, s times its update's root mean square per entry, drawn from (seed, round, client)
    label-flip   its honest update, trained on its shard with every label y read as C - 1 - y

An attack acts on what the client trains, as it travels (fed_app/client_app.py `trained_entries`): under a
mask its trainable entries, in a dense run its trainable tensors, never a frozen head; the root mean square
is theirs. Step 0's head rounds (head='train') are outside the attacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fed_app.task.seeds import ATTACK_NOISE, ATTACKERS, generator

UPDATE_ATTACKS = ("sign-flip", "scaled", "gaussian")  # they replace the update a client sends


def malicious_partitions(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The round(fraction * K) partitions that attack, drawn once from the run's seed."""
    count = round(fraction * num_clients)
    order = torch.randperm(num_clients, generator=generator(torch.device("cpu"), seed, ATTACKERS))
    return frozenset(order[:count].tolist())


def poison_(attack: str, scale: float, delta: dict[str, Tensor], seed: int, server_round: int,
            partition_id: int) -> None:
    """Replace, in place, the update a malicious client sends (an attack in UPDATE_ATTACKS)."""
    if attack == "sign-flip":
        for value in delta.values():
            value.mul_(-scale)
    elif attack == "scaled":
        for value in delta.values():
            value.mul_(scale)
    elif attack == "gaussian":
        entries = sum(v.numel() for v in delta.values())
        rms = math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()) / max(entries, 1))
        g = generator(torch.device("cpu"), seed, ATTACK_NOISE, server_round, partition_id)
        for name in sorted(delta):  # a fixed order: the same draws on resume
            value = delta[name]
            value.copy_(torch.randn(value.shape, generator=g) * (scale * rms))
    else:
        raise ValueError(f"attack {attack!r} does not replace a client's update")


def flipped_labels(objective, num_classes: int):
    """`objective` on labels y read as C - 1 - y: a label-flipping client's training."""

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return objective(logits, num_classes - 1 - labels)

    return loss
