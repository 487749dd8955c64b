"""Calibration: the density schedule, the global threshold, the rules, soft-mask rescoring, the file."""

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.task.model import build_model
from masking.calibrate import (RULES, calibrate, damped, density_of, density_schedule, mask_stats,
                               shrink_masks)
from masking.fisher import fisher_diagonal
from fed_app.runs.rundir import RunDir


def _tiny():
    model, _ = build_model(RunConfig(model="vit-tiny-test", seed=2), 100)
    model.head.requires_grad_(False)
    return model


def test_schedule_shrinks_geometrically_to_the_target():
    assert density_schedule(0.1, 1) == [0.1]
    sched = density_schedule(0.1, 4)
    assert sched[-1] == pytest.approx(0.1) and sched[1] == pytest.approx(0.1 ** 0.5)


def test_one_global_threshold_keeps_the_lowest_scores_across_layers():
    scores = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([[2.0, 9.0], [0.5, 7.0]])}
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    gen = torch.Generator().manual_seed(0)
    kept = shrink_masks(scores, masks, 3, keep_lowest=True, generator=gen)
    assert kept["a"].tolist() == [False, True, False] and kept["b"].tolist() == [[True, False], [True, False]]
    top = shrink_masks(scores, masks, 2, keep_lowest=False, generator=gen)
    assert top["a"].tolist() == [False, False, False] and top["b"].tolist() == [[False, True], [False, True]]


def test_frozen_entries_never_come_back_and_ties_follow_the_seed():
    scores = {"w": torch.zeros(100)}
    masks = {"w": torch.arange(100) < 60}
    a = shrink_masks(scores, masks, 30, True, torch.Generator().manual_seed(1))
    b = shrink_masks(scores, masks, 30, True, torch.Generator().manual_seed(1))
    c = shrink_masks(scores, masks, 30, True, torch.Generator().manual_seed(2))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    assert int(a["w"].sum()) == 30 and not (a["w"] & ~masks["w"]).any()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("rounds", [1, 3])
def test_every_rule_hits_the_target_density_within_one_element(rule, rounds):
    model = _tiny()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    score_fn = lambda m: fisher_diagonal(m, x, mode="sampled", generator=torch.Generator().manual_seed(0))  # noqa: E731
    masks = calibrate(model, rule, sparsity=0.9, rounds=rounds, score_fn=score_fn, seed=0, per_layer=False)
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int(m.sum()) for m in masks.values()) - 0.1 * total) <= 1
    assert "head.weight" not in masks
    if not RULES.get(rule).needs_fisher:  # per layer (TaLoS): each tensor keeps its own share
        per_layer = calibrate(model, rule, sparsity=0.9, rounds=rounds, score_fn=score_fn, seed=0)
        assert all(int(m.sum()) == round(0.1 * m.numel()) for m in per_layer.values())


def test_magnitude_rules_pick_the_smallest_or_largest_weights_globally_or_per_layer():
    model = _tiny()
    params = dict(model.named_parameters())
    for per_layer in (False, True):
        low = calibrate(model, "lowest-magnitude", 0.5, 1, score_fn=None, per_layer=per_layer)
        high = calibrate(model, "highest-magnitude", 0.5, 1, score_fn=None, per_layer=per_layer)
        groups = [[n] for n in low] if per_layer else [list(low)]
        for names in groups:
            w = torch.cat([params[n].detach().abs().flatten() for n in names])
            lo = torch.cat([low[n].flatten() for n in names])
            hi = torch.cat([high[n].flatten() for n in names])
            assert w[lo].max() <= w[~lo].min() and w[hi].min() >= w[~hi].max()
    # per layer, every tensor keeps half; one global threshold does not (layers' magnitudes differ)
    assert all(int(m.sum()) == round(0.5 * m.numel()) for m in low.values())
    globally = calibrate(model, "lowest-magnitude", 0.5, 1, score_fn=None, per_layer=False)
    assert any(abs(int(m.sum()) - 0.5 * m.numel()) > 1 for m in globally.values())


def test_rules_without_data_take_one_round_whatever_r():
    model = _tiny()
    for rule in ("random", "lowest-magnitude"):
        one = calibrate(model, rule, 0.9, 1, score_fn=None, seed=3)
        five = calibrate(model, rule, 0.9, 5, score_fn=None, seed=3)
        assert all(torch.equal(one[n], five[n]) for n in one)


def test_rescoring_sees_frozen_weights_damped_and_the_weights_come_back_exactly():
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) < 0.5
             for n, p in model.named_parameters() if p.requires_grad}
    with damped(model, masks, 0.1):
        w = dict(model.named_parameters())["blocks.0.mlp.fc1.weight"]
        m = masks["blocks.0.mlp.fc1.weight"]
        ref = before["blocks.0.mlp.fc1.weight"]
        assert torch.equal(w[m], ref[m]) and torch.allclose(w[~m], 0.1 * ref[~m])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_multi_round_rescoring_differs_from_one_shot():
    model = _tiny()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    score_fn = lambda m: fisher_diagonal(m, x, mode="sampled", generator=torch.Generator().manual_seed(0))  # noqa: E731
    one = calibrate(model, "least-sensitive", 0.9, 1, score_fn)
    many = calibrate(model, "least-sensitive", 0.9, 4, score_fn)
    assert density_of(one) == pytest.approx(density_of(many), abs=1e-6)
    assert any(not torch.equal(one[n], many[n]) for n in one)


def test_masks_round_trip_through_a_file_with_stats(tmp_path):
    masks = {"a": torch.tensor([True, False, True, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    RunDir(tmp_path).save_mask(masks)  # what a run writes: save_masks' bytes, whole
    loaded = RunDir(tmp_path).load_mask()
    assert all(torch.equal(masks[n], loaded[n]) for n in masks)
    stats = mask_stats(loaded)
    assert stats[0]["density"] == 0.75 and stats[-1] == {"name": "total", "numel": 8, "trainable": 3,
                                                          "density": 3 / 8}
