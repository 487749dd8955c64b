"""Data: the split, iid/non-iid shards on CIFAR-100-sized labels, the torchvision loader, batches."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from fed_app import data as D
from fed_app.config import RunConfig
from fed_app.data import BatchTransform, DataError

# CIFAR-100's training labels after the default split: 45 000 images, 450 per class.
LABELS_45K = np.repeat(np.arange(100), 450)
np.random.default_rng(0).shuffle(LABELS_45K)


def _assert_partition(shards, n):
    everything = np.concatenate(shards)
    assert len(everything) == n and len(np.unique(everything)) == n  # disjoint and covering


def test_stratified_split_takes_the_same_share_of_every_class():
    labels = np.repeat(np.arange(100), 500)
    train, val = D.stratified_split(labels, 5000, seed=0)
    assert len(train) == 45000 and len(val) == 5000
    assert not set(train) & set(val)
    assert (np.bincount(labels[val], minlength=100) == 50).all()
    again, _ = D.stratified_split(labels, 5000, seed=0)
    other, _ = D.stratified_split(labels, 5000, seed=1)
    assert (again == train).all() and not (other == train).all()


def test_stratified_split_with_uneven_classes_hits_the_exact_size():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    _, val = D.stratified_split(labels, 4, seed=0)
    assert len(val) == 4


def test_iid_shards_are_disjoint_covering_balanced_and_class_uniform():
    shards = D.iid_shards(LABELS_45K, 100, seed=3)
    _assert_partition(shards, 45000)
    assert {len(s) for s in shards} == {450}
    per_class = np.stack([np.bincount(LABELS_45K[s], minlength=100) for s in shards])
    assert per_class.min() >= 4 and per_class.max() <= 5  # 450 of a class over 100 clients: 4 or 5
    uneven = D.iid_shards(LABELS_45K[:44999], 100, seed=3)
    assert max(map(len, uneven)) - min(map(len, uneven)) == 1


@pytest.mark.parametrize("nc", [1, 5, 10, 50])
def test_noniid_shards_hold_exactly_nc_classes_with_equal_sizes(nc):
    shards = D.noniid_shards(LABELS_45K, 100, nc, seed=7)
    _assert_partition(shards, 45000)
    assert {len(np.unique(LABELS_45K[s])) for s in shards} == {nc}
    assert {len(s) for s in shards} == {450}
    # each class is shared by K*Nc/C = Nc clients, in pieces within 1 of each other
    holders = np.zeros((100, 100), dtype=int)
    for k, s in enumerate(shards):
        holders[:, k] = np.bincount(LABELS_45K[s], minlength=100)
    assert ((holders > 0).sum(1) == nc).all()
    pieces = np.where(holders > 0, holders, np.nan)
    assert (np.nanmax(pieces, 1) - np.nanmin(pieces, 1) <= 1).all()


def test_noniid_class_sets_vary_between_clients_and_follow_the_seed():
    a = D.noniid_shards(LABELS_45K, 100, 5, seed=1)
    b = D.noniid_shards(LABELS_45K, 100, 5, seed=1)
    c = D.noniid_shards(LABELS_45K, 100, 5, seed=2)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(a, c))
    class_sets = {tuple(np.unique(LABELS_45K[s])) for s in a}
    assert len(class_sets) > 50  # not a few blocks of clients sharing identical classes


def test_noniid_with_numbers_that_do_not_divide_stays_exact_in_classes():
    labels = np.repeat(np.arange(10), 37)
    shards = D.noniid_shards(labels, 7, 3, seed=0)
    _assert_partition(shards, 370)
    assert {len(np.unique(labels[s])) for s in shards} == {3}


@pytest.mark.parametrize("nc", [0, 101])
def test_impossible_nc_is_one_clear_sentence(nc):
    with pytest.raises(DataError, match=rf"classes-per-client={nc} is impossible with 100 classes; use a value from 1 to 100\."):
        D.noniid_shards(LABELS_45K, 100, nc, seed=0)


def test_too_few_client_class_slots_to_cover_every_class_is_one_sentence():
    with pytest.raises(DataError, match=r"num-clients=10 x classes-per-client=5 < 100 classes"):
        D.noniid_shards(LABELS_45K, 10, 5, seed=0)


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


def test_batch_transform_crops_flips_resizes_and_normalizes():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    plain = BatchTransform(64, (0.5,) * 3, (0.25,) * 3)(images)
    assert plain.shape == (16, 3, 64, 64)
    ref = torch.nn.functional.interpolate(images.float() / 255, size=64, mode="bicubic").clamp(0, 1)
    assert torch.allclose(plain, (ref - 0.5) / 0.25, atol=1e-5)

    aug = BatchTransform(32, (0.0,) * 3, (1.0,) * 3, augment=True)
    out = aug(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    for i in range(16):  # each output is some crop of the padded image, possibly mirrored
        found = any(
            torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
            for dy in range(9) for dx in range(9)
            for crop in [padded[i, :, dy:dy + 32, dx:dx + 32]]
        )
        assert found
    again = aug(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_batch_stream_cycles_through_a_shard_with_a_seeded_order():
    idx = torch.arange(10, 20)
    stream = D.batch_stream(idx, 4, torch.Generator().manual_seed(0))
    first_pass = torch.cat([next(stream) for _ in range(3)])
    assert sorted(first_pass.tolist()) == list(range(10, 20))
    second_pass = torch.cat([next(stream) for _ in range(3)])
    assert sorted(second_pass.tolist()) == list(range(10, 20))
    assert not torch.equal(first_pass, second_pass)
