"""Combining the clients' own masks: vote with a quorum, intersection, union, against hand counts."""

import pytest
import torch

from fed_app.config import ConfigError, RunConfig
from masking.combine import combine_masks


def test_vote_intersection_and_union_against_hand_counts():
    t, f = True, False
    clients = [{"w": torch.tensor([t, t, f, f, t])}, {"w": torch.tensor([t, f, t, f, t])},
               {"w": torch.tensor([t, f, f, f, f])}, {"w": torch.tensor([t, t, t, f, f])}]
    # votes per entry: 4, 2, 2, 0, 2
    assert combine_masks(clients, "vote", 0.5)["w"].tolist() == [t, t, t, f, t]  # at least 2 of 4
    assert combine_masks(clients, "vote", 0.75)["w"].tolist() == [t, f, f, f, f]  # at least 3 of 4
    assert combine_masks(clients, "intersection")["w"].tolist() == [t, f, f, f, f]
    assert combine_masks(clients, "union")["w"].tolist() == [t, t, t, f, t]
    assert combine_masks(clients, "vote", 1.0)["w"].tolist() == combine_masks(clients, "intersection")["w"].tolist()


def test_combining_the_clients_masks_needs_a_global_mask_scope():
    with pytest.raises(ConfigError, match=r"mask-aggregation='vote' combines the clients' masks into one global "
                                          r"mask, so mask-scope='local' does not fit; use mask-scope='global'\."):
        RunConfig(optimizer="sparse-sgdm", head="ridge", mask_scope="local", mask_aggregation="vote")


def test_vote_rank_keeps_the_most_voted_entries_at_the_clients_density():
    t, f = True, False
    # 4 clients, each training 3 of the 8 entries over two tensors; votes: a = [4, 2, 2, 1], b = [0, 3, 0, 0]
    clients = [{"a": torch.tensor([t, t, f, f]), "b": torch.tensor([f, t, f, f])},
               {"a": torch.tensor([t, f, t, f]), "b": torch.tensor([f, t, f, f])},
               {"a": torch.tensor([t, t, f, t]), "b": torch.tensor([f, f, f, f])},
               {"a": torch.tensor([t, f, t, f]), "b": torch.tensor([f, t, f, f])}]
    masks = {seed: combine_masks(clients, "vote-rank", seed=seed) for seed in range(20)}
    for mask in masks.values():
        assert int(mask["a"].sum() + mask["b"].sum()) == 3  # a client's own count, where union keeps 6
        assert mask["a"][0] and mask["b"][1] and not mask["a"][3]  # 4 and 3 votes in, 1 vote out
        assert int(mask["a"][1]) + int(mask["a"][2]) == 1  # one of the two 2-vote entries: a tie at the cut
    assert {tuple(m["a"].tolist()) for m in masks.values()} == {(t, t, f, f), (t, f, t, f)}  # the draw breaks it
    assert combine_masks(clients, "vote-rank", seed=3)["a"].tolist() == masks[3]["a"].tolist()  # seeded
