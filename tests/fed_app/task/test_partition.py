"""Partitions: the stratified split and iid/non-iid shards on CIFAR-100-sized labels, exact in sizes and classes."""

import numpy as np
import pytest

from fed_app.task import partition as D
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


def test_dirichlet_shards_are_disjoint_covering_seeded_and_never_smaller_than_the_minimum():
    shards = D.dirichlet_shards(LABELS_45K, 100, 0.5, seed=3)
    _assert_partition(shards, len(LABELS_45K))
    assert min(map(len, shards)) >= D.MIN_SHARD
    again = D.dirichlet_shards(LABELS_45K, 100, 0.5, seed=3)
    other = D.dirichlet_shards(LABELS_45K, 100, 0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_with_large_alpha_approaches_iid_and_small_alpha_gives_few_classes():
    counts = {alpha: D.class_counts(D.dirichlet_shards(LABELS_45K, 100, alpha, seed=0), LABELS_45K, 100)
              for alpha in (1e4, 0.5, 0.05)}
    near_iid = counts[1e4] / counts[1e4].sum(1, keepdims=True)
    assert np.abs(near_iid - 0.01).max() < 0.01  # every client about 1% of each class
    assert (counts[1e4] > 0).sum(1).min() == 100
    # classes a client needs to reach 90% of its images: few under strong skew, most of them near iid
    def classes_for_90(c):
        share = np.sort(c / c.sum(1, keepdims=True), axis=1)[:, ::-1].cumsum(1)
        return (share < 0.9).sum(1).mean() + 1
    # measured: 9.6 at alpha 0.05, 45.5 at 0.5, 89.0 at 1e4 (of 100 classes)
    assert classes_for_90(counts[0.05]) < 20 < classes_for_90(counts[0.5]) < 70 < classes_for_90(counts[1e4])


def test_a_dirichlet_draw_that_cannot_give_every_client_the_minimum_is_one_sentence():
    labels = np.repeat(np.arange(2), 20)  # 40 images, 4 clients: each must hold 10, the whole set exactly
    with pytest.raises(DataError, match=r"dirichlet-alpha=0.01 left a client with fewer than 10 images in 1000 "
                                        r"draws; raise dirichlet-alpha or lower num-clients\."):
        D.dirichlet_shards(labels, 4, 0.01, seed=0)
