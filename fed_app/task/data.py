"""Datasets: CIFAR-100, CIFAR-10, the user's own ImageFolder, digits or synthetic images read into device-resident uint8 tensors, split into
train/val/test (the split itself: fed_app/task/partition.py), once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fed_app.config import RunConfig
from fed_app.errors import DataError, override_hint
from fed_app.task.partition import stratified_split

log = logging.getLogger(__name__)

NUM_CLASSES = 100


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
           cfg.synthetic_test_size, cfg.image_size, str(device))
    if key not in _CACHE:
        if cfg.dataset in CIFAR:
            (x_train, y_train), (x_test, y_test) = read_cifar(cfg.dataset, cfg.data_root, cfg.download)
        elif cfg.dataset == "imagefolder":
            (x_train, y_train), (x_test, y_test) = read_image_folder(cfg.data_root, cfg.image_size)
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


CIFAR = {"cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz",
                      "eb9058c3a382ffc7106e4002c42a8d85"),
         "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                     "c58f30108f718f92721af3b95e74349a")}


def read_cifar100(root: str, download: bool) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """CIFAR-100 through torchvision as ((x_train, y_train), (x_test, y_test)), x in (N, 3, 32, 32)."""
    return read_cifar("cifar100", root, download)


def read_cifar(which: str, root: str, download: bool) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """CIFAR-100 or CIFAR-10 through torchvision as ((x_train, y_train), (x_test, y_test)), x (N, 3, 32, 32)."""
    import torchvision.datasets

    name, cls_name, folder, _, _ = CIFAR[which]
    cls = getattr(torchvision.datasets, cls_name)
    path = Path(root).expanduser().resolve()
    out = []
    for train in (True, False):
        try:
            ds = cls(str(path), train=train, download=False)
        except RuntimeError:
            there = (path / folder).is_dir()  # the folder is there, its files fail the md5 check
            if not download:
                raise DataError(_damaged_cifar_message(which, path) if there else
                                _missing_cifar_message(which, path, "download=false")) from None
            try:
                ds = cls(str(path), train=train, download=True)
            except Exception as err:  # offline: URLError, socket errors, a partial archive
                raise DataError(_damaged_cifar_message(which, path) if there else
                                _missing_cifar_message(which, path, f"download failed: {err}")) from err
        out.append((ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)))
    return tuple(out)


def _missing_cifar_message(which: str, path: Path, why: str) -> str:
    name, _, folder, archive, _ = CIFAR[which]
    return (
        f"{name} is not under data-root={str(path)!r} ({why}); put the extracted "
        f"'{folder}' folder (from {archive}) there, or "
        f"{override_hint('data-root', repr('/path/to/dir/containing/it'))}, or use dataset='synthetic' offline."
    )


def _damaged_cifar_message(which: str, path: Path) -> str:
    name, _, folder, archive, md5 = CIFAR[which]
    return (
        f"{name}'s files are under data-root={str(path)!r} ({folder}/) but fail torchvision's integrity "
        f"check (md5 of its batches and meta): a partial or damaged copy; replace that folder with one extracted "
        f"from an intact {archive} (md5 {md5}), or delete it and rerun with download=true where the internet "
        f"is reachable."
    )


def check_image_folder(root: str) -> Path:
    """The folder, if it has train/ and test/; one sentence on the layout otherwise (the preflight's check)."""
    path = Path(root).expanduser().resolve()
    for part in ("train", "test"):
        if not (path / part).is_dir():
            raise DataError(f"dataset='imagefolder' needs data-root={str(path)!r} to hold train/ and test/, each "
                            f"with one folder of images per class (torchvision's ImageFolder layout); "
                            f"{part}/ is missing.")
    return path


def read_image_folder(root: str, size: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The user's own images in torchvision's ImageFolder layout, `root/train/<class>/*.png|jpg...` and
    `root/test/<class>/...` (the same class folders), each resized (shorter side) and center-cropped to
    size x size, as uint8 (N, 3, size, size) arrays; labels are the class folders in sorted order."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    path = check_image_folder(root)
    shape = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    out, classes = [], None
    for part in ("train", "test"):
        ds = ImageFolder(str(path / part), transform=shape)
        if classes is not None and ds.classes != classes:
            raise DataError(f"dataset='imagefolder': test/ has classes {ds.classes[:5]}... but train/ has "
                            f"{classes[:5]}...; give both the same class folders.")
        classes = ds.classes
        images = np.stack([ds[i][0].expand(3, -1, -1).numpy() for i in range(len(ds))])
        out.append((images, np.asarray(ds.targets, dtype=np.int64)))
    return tuple(out)


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
