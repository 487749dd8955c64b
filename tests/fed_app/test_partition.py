"""Partitions: the stratified split and iid/non-iid shards on CIFAR-100-sized labels, exact in sizes and classes."""

import numpy as np
import pytest

from fed_app import partition as D
from fed_app.errors import DataError

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
