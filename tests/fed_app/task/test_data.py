"""Datasets: the torchvision loader on a copy in the real format, the offline message, synthetic images, one copy\nper process on the device."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from fed_app.task import data as D
from fed_app.config import RunConfig
from fed_app.errors import DataError

def _write_cifar100(root, n_train=60, n_test=20):
    """A CIFAR-100 copy in the released on-disk format: protocol-2 pickles with str keys, uint8 rows."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 100, size=n)]
        entry = {"data": x, "fine_labels": y, "coarse_labels": [v // 5 for v in y],
                 "filenames": [f"{i}.png" for i in range(n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        made[name] = (x.reshape(n, 3, 32, 32), np.array(y))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return made


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_torchvision_loader_reads_a_copy_in_the_real_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    made = _write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    # torchvision checks the real files' md5 sums; point them at our generated copy
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    (x_train, y_train), (x_test, y_test) = D.read_cifar100(str(tmp_path), download=False)
    assert x_train.shape == (60, 3, 32, 32) and x_train.dtype == np.uint8
    assert (x_train == made["train"][0]).all() and (y_train == made["train"][1]).all()
    assert (x_test == made["test"][0]).all() and (y_test == made["test"][1]).all()


def test_missing_data_offline_says_where_to_put_it(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")  # nothing listens
    for download in (False, True):
        with pytest.raises(DataError) as err:
            D.read_cifar100(str(tmp_path / "empty"), download=download)
        message = str(err.value)
        assert "cifar-100-python" in message and "data-root" in message and "\n" not in message


def test_a_damaged_copy_is_said_to_be_there_and_damaged_not_missing(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    _write_cifar100(tmp_path)  # the real format, but not the real files: torchvision's md5 check fails
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")  # nothing listens
    for download in (False, True):
        with pytest.raises(DataError) as err:
            D.read_cifar100(str(tmp_path), download=download)
        message = str(err.value)
        assert message.startswith(f"CIFAR-100's files are under data-root={str(tmp_path)!r} (cifar-100-python/) "
                                  f"but fail torchvision's integrity check")
        assert "intact cifar-100-python.tar.gz" in message and "not under" not in message


def test_synthetic_images_are_class_structured():
    x, y = D.synthetic_images(2000, seed=0)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == np.uint8
    assert set(np.bincount(y)) == {20}
    flat = x.reshape(len(x), -1).astype(np.float32)
    means = np.stack([flat[y == c][:10].mean(0) for c in range(100)])  # prototypes from 10 per class
    held_out = np.concatenate([np.flatnonzero(y == c)[10:] for c in range(100)])
    dist = ((flat[held_out, None, :] - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == y[held_out]).mean() > 0.5  # nearest class mean: far above 1% chance


def test_dataset_lives_on_the_device_once_per_process(tiny_cfg):
    first = D.load_dataset(tiny_cfg, torch.device("cpu"))
    assert D.load_dataset(tiny_cfg.replace(lr=0.5), torch.device("cpu")) is first
    assert first.train.images.dtype == torch.uint8 and len(first.train) == 3000 and len(first.val) == 200


def _write_cifar10(root, n_per_batch=8):
    """A CIFAR-10 copy in the released format: data_batch_1..5 and test_batch (protocol-2 pickles whose str keys
    torchvision reads with encoding='latin1'), batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    made = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        (folder / name).write_bytes(pickle.dumps({"data": x, "labels": y, "batch_label": name},
                                                 protocol=2))
        part = made["test" if name == "test_batch" else "train"]
        part[0].append(x.reshape(-1, 3, 32, 32))
        part[1].extend(y)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]},
                                                       protocol=2))
    return {k: (np.concatenate(x), np.array(y)) for k, (x, y) in made.items()}


def test_cifar10_is_read_through_torchvision_from_a_copy_in_the_real_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    made = _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    (x_train, y_train), (x_test, y_test) = D.read_cifar("cifar10", str(tmp_path), download=False)
    assert x_train.shape == (40, 3, 32, 32) and (x_train == made["train"][0]).all()
    assert (y_train == made["train"][1]).all() and (y_test == made["test"][1]).all()
    with pytest.raises(DataError, match=r"CIFAR-10 is not under data-root=.*'cifar-10-batches-py' folder "
                                        r"\(from cifar-10-python\.tar\.gz\)"):
        D.read_cifar("cifar10", str(tmp_path / "elsewhere"), download=False)


def test_an_image_folder_of_the_users_own_images_is_read_resized_and_labelled_by_class_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    colors = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}
    for part, n in (("train", 4), ("test", 2)):
        for name, color in colors.items():
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(n):  # different sizes and modes, as real folders have
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                image = Image.new("RGB", size, color)
                (image.convert("L") if i == 0 else image).save(tmp_path / part / name / f"{i}.png")
    (x_train, y_train), (x_test, y_test) = D.read_image_folder(str(tmp_path), size=16)
    assert x_train.shape == (12, 3, 16, 16) and x_train.dtype == np.uint8 and x_test.shape == (6, 3, 16, 16)
    assert sorted(y_train.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # cat, dog, owl: sorted folder names
    reds = x_train[(y_train == 0) & (x_train[:, 0, 0, 0] != x_train[:, 1, 0, 0])]
    assert (reds[:, 0] > reds[:, 1]).all()  # the RGB cats are red
    cfg = RunConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=16, val_size=3)
    data = D.load_dataset(cfg, torch.device("cpu"))
    assert data.num_classes == 3 and len(data.train) == 9 and len(data.val) == 3 and len(data.test) == 6
    (tmp_path / "test" / "cat").rename(tmp_path / "test" / "lion")
    with pytest.raises(DataError, match=r"test/ has classes .* but train/ has .*; give both the same class folders"):
        D.read_image_folder(str(tmp_path), size=16)
    with pytest.raises(DataError, match=r"needs data-root=.* to hold train/ and test/.*; train/ is missing\."):
        D.read_image_folder(str(tmp_path / "train"), size=16)
