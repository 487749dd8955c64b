"""Every random draw of a run, keyed in this one file: each is a function of the run's seed and of where it
happens (epoch, round, client, stream), never of global RNG state, so a resumed run draws exactly what an
uninterrupted one would.

    draw                                        key
    the head's initial weights                  torch.manual_seed(seed) around model building
    centralized batch order + augmentation      (seed, epoch)
    a client's J local steps in round t         (seed, t, partition id, head phase 0/1)
    step-0 head training, epoch e               (seed, STEP0_HEAD, e)
    images a client (or the centre) scores      (seed, FISHER_IMAGES, *partition id)
    labels drawn for the sampled Fisher         (seed, FISHER_LABELS, *partition id)
    mask ties, and the random mask rule         torch generator seeded with seed
    clients sampled in round t of a phase       numpy (seed, t) for training, (seed, t, phase) otherwise
    the shards                                  numpy seed (partition.iid_shards / noniid_shards)
    the train/validation split                  numpy split-seed (fixed across training seeds)
    which clients attack (attack != 'none')     (seed, ATTACKERS)
    a Gaussian attacker's noise in round t      (seed, ATTACK_NOISE, t, partition id)
    differential privacy's noise in round t     (seed, DP_NOISE, t)
    adaptive clipping's count noise in round t  (seed, DP_COUNT, t)

The step-0 stream tags lie above any epoch or round number, so no two kinds of draw share a key.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

STEP0_HEAD, FISHER_IMAGES, FISHER_LABELS = 2**31 + 1, 2**31 + 2, 2**31 + 3
ATTACKERS, ATTACK_NOISE, DP_NOISE, DP_COUNT = 2**31 + 4, 2**31 + 5, 2**31 + 6, 2**31 + 7


class Phase(IntEnum):
    """Which clients a phase of a federated run samples, each from its own stream."""

    TRAIN = 0
    HEAD = 1
    CALIBRATION = 2
    EVALUATE = 3


def generator(device: torch.device, *keys: int) -> torch.Generator:
    """A local torch generator seeded from a tuple of non-negative ints."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    return generator(device, seed, epoch)


def client_generator(device: torch.device, seed: int, server_round: int, partition_id: int,
                     head_phase: bool) -> torch.Generator:
    return generator(device, seed, server_round, partition_id, int(head_phase))


def head_epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    return generator(device, seed, STEP0_HEAD, epoch)


def fisher_images_generator(device: torch.device, seed: int, *partition: int) -> torch.Generator:
    return generator(device, seed, FISHER_IMAGES, *partition)


def fisher_labels_generator(device: torch.device, seed: int, *partition: int) -> torch.Generator:
    return generator(device, seed, FISHER_LABELS, *partition)


def sample_partitions(seed: int, server_round: int, num_clients: int, per_round: int,
                      phase: Phase = Phase.TRAIN) -> list[int]:
    """The partition ids of a round of a phase: a function of (seed, round, phase) alone, so resume repeats it."""
    key = [seed, server_round] if phase == Phase.TRAIN else [seed, server_round, int(phase)]
    rng = np.random.default_rng(key)
    return sorted(int(p) for p in rng.choice(num_clients, size=per_round, replace=False))
