"""Data: CIFAR-100 or synthetic images as device-resident uint8 tensors, the split, and client shards."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fed_app.config import RunConfig
from fed_app.errors import UserError

log = logging.getLogger(__name__)

NUM_CLASSES = 100


class DataError(UserError, RuntimeError):
    """Data that cannot be loaded or split as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Split:
    """Images (N, 3, H, W) uint8 and labels (N,) int64, both on the compute device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int


_CACHE: dict[tuple, Dataset] = {}


def load_dataset(cfg: RunConfig, device: torch.device) -> Dataset:
    """The train/val/test splits on `device`, loaded once per process for the same data settings."""
    key = (cfg.dataset, cfg.data_root, cfg.val_size, cfg.split_seed, cfg.synthetic_train_size,
           cfg.synthetic_test_size, str(device))
    if key not in _CACHE:
        if cfg.dataset == "cifar100":
            (x_train, y_train), (x_test, y_test) = read_cifar100(cfg.data_root, cfg.download)
        elif cfg.dataset == "digits":
            (x_train, y_train), (x_test, y_test) = read_digits()
        else:
            x_train, y_train = synthetic_images(cfg.synthetic_train_size, seed=0)
            x_test, y_test = synthetic_images(cfg.synthetic_test_size, seed=1)
        train_idx, val_idx = stratified_split(y_train, cfg.val_size, cfg.split_seed)

        def to_split(x: np.ndarray, y: np.ndarray) -> Split:
            images = torch.from_numpy(np.ascontiguousarray(x)).to(device)
            return Split(images, torch.from_numpy(y.astype(np.int64)).to(device))

        _CACHE[key] = Dataset(
            train=to_split(x_train[train_idx], y_train[train_idx]),
            val=to_split(x_train[val_idx], y_train[val_idx]),
            test=to_split(x_test, y_test),
            num_classes=int(max(y_train.max(), y_test.max())) + 1,
        )
    return _CACHE[key]


def read_cifar100(root: str, download: bool) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """CIFAR-100 through torchvision as ((x_train, y_train), (x_test, y_test)), x in (N, 3, 32, 32)."""
    from torchvision.datasets import CIFAR100

    path = Path(root).expanduser().resolve()
    out = []
    for train in (True, False):
        try:
            ds = CIFAR100(str(path), train=train, download=False)
        except RuntimeError:
            if not download:
                raise DataError(_missing_cifar_message(path, "download=false")) from None
            try:
                ds = CIFAR100(str(path), train=train, download=True)
            except Exception as err:  # offline: URLError, socket errors, a partial archive
                raise DataError(_missing_cifar_message(path, f"download failed: {err}")) from err
        out.append((ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)))
    return tuple(out)


def _missing_cifar_message(path: Path, why: str) -> str:
    return (
        f"CIFAR-100 is not under data-root={str(path)!r} ({why}); put the extracted "
        f"'cifar-100-python' folder (from cifar-100-python.tar.gz) there, or pass "
        f"--run-config \"data-root='/path/to/dir/containing/it'\", or use dataset='synthetic' offline."
    )


def read_digits(test_size: int = 360) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """scikit-learn's 1797 handwritten digits (real 8x8 scans, 10 classes, shipped inside the package: nothing
    is downloaded) as 32x32 grey images in 3 channels; a fixed stratified test split of `test_size` images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("dataset='digits' reads scikit-learn's digits; install it (pip install scikit-learn) "
                        "or pick dataset='cifar100' or 'synthetic'.") from err
    digits = load_digits()
    small = torch.from_numpy(digits.images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
    big = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).numpy()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, test_size, seed=0)
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def synthetic_images(n: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 32x32 class-structured images: a per-class colour layout and grating, shifted and noised."""
    protos = _class_prototypes(num_classes)  # (C, 3, 32, 32) float32, same for every split
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for start in range(0, n, 4096):
        y = labels[start:start + 4096]
        shifts = rng.integers(-3, 4, size=(len(y), 2))
        x = protos[y]
        for i, (dy, dx) in enumerate(shifts):
            x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
        x = x * rng.uniform(0.8, 1.2, size=(len(y), 1, 1, 1)) + rng.normal(0, 20, size=x.shape)
        images[start:start + len(y)] = np.clip(x, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _class_prototypes(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    coarse = rng.uniform(30, 225, size=(num_classes, 3, 4, 4))
    layout = coarse.repeat(8, axis=2).repeat(8, axis=3)
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    angle = rng.uniform(0, np.pi, size=num_classes)
    freq = rng.uniform(0.2, 0.8, size=num_classes)
    phase = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) * freq[:, None, None]
    grating = 40 * np.sin(phase)[:, None]
    return (layout + grating).astype(np.float32)


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


def client_shards(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The K shards of the training split the run config asks for (iid, or Nc classes per client)."""
    if cfg.partition == "iid":
        return iid_shards(labels, cfg.num_clients, cfg.seed)
    return noniid_shards(labels, cfg.num_clients, cfg.classes_per_client, cfg.seed)


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


@dataclass(frozen=True)
class BatchTransform:
    """uint8 batch -> normalized float batch at the model's input size; augmentation at 32 px, on device.
    The resize uses the model's interpolation (timm's data configuration: bicubic for DINO), clamped to [0, 1]
    as an 8-bit resize would be."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = False
    pad: int = 4
    interpolation: str = "bicubic"

    @classmethod
    def for_model(cls, spec, augment: bool = False) -> BatchTransform:
        """The transform a ModelSpec asks for (input size, interpolation, mean, std)."""
        return cls(spec.input_size, spec.mean, spec.std, augment=augment, interpolation=spec.interpolation)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.augment:
            x = self._crop_and_flip(x, generator)
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                                                align_corners=False).clamp_(0.0, 1.0)
        return (x - _channel_stats(self.mean, x.device)) / _channel_stats(self.std, x.device)

    def _crop_and_flip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        off = torch.randint(0, 2 * self.pad + 1, (2, b), device=x.device, generator=generator)
        rows = off[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = off[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@functools.lru_cache(maxsize=16)
def _channel_stats(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """Normalization constants, made once per device rather than copied to it every batch."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def batch_stream(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Index batches forever: a seeded permutation of `indices` per pass, the last batch of a pass short."""
    while True:
        perm = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
        yield from perm.split(batch_size)


