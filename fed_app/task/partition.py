"""Who holds which image: the stratified train/val split and the client shards (iid, Nc classes per client, or
Dirichlet label skew), each a seeded function of the labels."""

from __future__ import annotations

import numpy as np

from fed_app.config import RunConfig
from fed_app.errors import DataError


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays; each class gives val_size * its share, largest remainders first."""
    labels = np.asarray(labels)
    if not 0 <= val_size < len(labels):
        raise DataError(
            f"val-size={val_size} does not fit a training set of {len(labels)} images; "
            f"use 0 <= val-size < {len(labels)}."
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = val_size * counts / len(labels)
    per_class = np.floor(exact).astype(int)
    order = np.argsort(-(exact - per_class), kind="stable")
    per_class[order[: val_size - per_class.sum()]] += 1
    rng = np.random.default_rng(seed)
    val = []
    for c, k in zip(classes, per_class):
        val.append(rng.permutation(np.flatnonzero(labels == c))[:k])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def iid_shards(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Disjoint covering shards, sizes within 1, each class dealt round-robin across clients."""
    labels = np.asarray(labels)
    if not 1 <= num_clients <= len(labels):
        raise DataError(f"num-clients={num_clients} must be between 1 and the {len(labels)} training images.")
    rng = np.random.default_rng(seed)
    # shuffle within each class, keep classes contiguous, then deal like cards: pile i gets positions
    # i, i+K, i+2K, ... so every class is split over the piles within 1; piles go to clients at random
    order = np.lexsort((rng.random(len(labels)), labels))
    piles = [order[i::num_clients] for i in range(num_clients)]
    return [np.sort(piles[j]) for j in rng.permutation(num_clients)]


def noniid_shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Disjoint covering shards; each client holds exactly `classes_per_client` classes; sizes balanced."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise DataError(
            f"classes-per-client={classes_per_client} is impossible with {len(classes)} classes; "
            f"use a value from 1 to {len(classes)}."
        )
    if num_clients * classes_per_client < len(classes):
        raise DataError(
            f"num-clients={num_clients} x classes-per-client={classes_per_client} < {len(classes)} classes, so "
            f"some classes would belong to no client; raise one of them to cover all {len(classes)}."
        )
    rng = np.random.default_rng(seed)
    slots = _class_slots(len(classes), num_clients, classes_per_client)  # pieces of each class
    owners = _assign_classes(slots, num_clients, classes_per_client, rng)  # class -> list of clients
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < slots[c]:
            raise DataError(
                f"class {cls} has {len(idx)} images but must be split over {slots[c]} clients; "
                f"lower num-clients or classes-per-client."
            )
        for client, part in zip(rng.permutation(owners[c]), np.array_split(idx, slots[c])):
            shards[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shards]


MIN_SHARD = 10  # the fewest images a Dirichlet client may hold (NIID-Bench's rule), or N/K if that is less
DRAWS = 1000


def dirichlet_shards(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class's images go to the clients in proportions drawn from
    Dir(alpha, ..., alpha); the whole draw is repeated (seeded) until every client holds at least MIN_SHARD
    images. alpha -> inf approaches iid; small alpha gives each client few classes."""
    labels = np.asarray(labels)
    if not 1 <= num_clients <= len(labels):
        raise DataError(f"num-clients={num_clients} must be between 1 and the {len(labels)} training images.")
    need = min(MIN_SHARD, len(labels) // num_clients)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                parts[client].append(part)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(map(len, shards)) >= need:
            return shards
    raise DataError(f"dirichlet-alpha={alpha} left a client with fewer than {need} images in {DRAWS} draws; "
                    f"raise dirichlet-alpha or lower num-clients.")


def client_shards(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The K shards of the training split the run config asks for (iid, Nc classes, or Dirichlet label skew)."""
    if cfg.partition == "iid":
        return iid_shards(labels, cfg.num_clients, cfg.seed)
    if cfg.partition == "dirichlet":
        return dirichlet_shards(labels, cfg.num_clients, cfg.dirichlet_alpha, cfg.seed)
    return noniid_shards(labels, cfg.num_clients, cfg.classes_per_client, cfg.seed)


def class_counts(shards: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(clients, classes) image counts of each client's shard: what the report draws."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def _class_slots(num_classes: int, num_clients: int, classes_per_client: int) -> np.ndarray:
    """How many clients share each class: K*Nc slots spread over the classes within 1."""
    total = num_clients * classes_per_client
    slots = np.full(num_classes, total // num_classes)
    slots[: total % num_classes] += 1
    return slots


def _assign_classes(slots: np.ndarray, num_clients: int, nc: int, rng: np.random.Generator) -> list[list[int]]:
    """Give each client nc distinct classes, always from the classes with most free slots (Gale-Ryser)."""
    free = slots.copy()
    owners: list[list[int]] = [[] for _ in range(len(slots))]
    for client in rng.permutation(num_clients):
        ranked = np.lexsort((rng.random(len(free)), -free))  # most free slots first, random among ties
        chosen = ranked[:nc]
        if free[chosen].min() <= 0:
            raise DataError(f"cannot give {num_clients} clients {nc} distinct classes each; lower classes-per-client.")
        free[chosen] -= 1
        for c in chosen:
            owners[c].append(int(client))
    return owners
