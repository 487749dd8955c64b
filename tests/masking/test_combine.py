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
