"""fisher_diagonal against a brute-force loop of one backward per sample, and its closed forms."""

import pytest
import torch
import torch.nn.functional as F

from fed_app.config import RunConfig
from fed_app.task.model import build_model
from masking.fisher import fisher_diagonal, sample_labels


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_model(RunConfig(model="vit-tiny-test", seed=1), 100)
    model.head.requires_grad_(False)  # step 0 freezes the head: it is not scored
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (10,), generator=g)
    return model, x, y


def _per_sample_grads(model, x, y):
    """The reference: one forward and backward per sample."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    return grads


def test_empirical_equals_the_brute_force_per_sample_loop(tiny):
    model, x, y = tiny
    model.eval()
    scores = fisher_diagonal(model, x, y, mode="empirical", chunk_size=4)
    grads = _per_sample_grads(model, x, y)
    assert set(scores) == set(grads[0]) and not any(k.startswith("head.") for k in scores)
    for name, s in scores.items():
        ref = sum(g[name].square() for g in grads)
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-10, check_dtype=False)


def test_sampled_draws_labels_from_the_model_then_matches_the_loop(tiny):
    model, x, _ = tiny
    model.eval()
    scores = fisher_diagonal(model, x, mode="sampled", chunk_size=10, generator=torch.Generator().manual_seed(5))
    y = sample_labels(model, x, torch.Generator().manual_seed(5))
    grads = _per_sample_grads(model, x, y)
    for name, s in scores.items():
        torch.testing.assert_close(s, sum(g[name].square() for g in grads), rtol=1e-4, atol=1e-10, check_dtype=False)


def test_batch_mode_is_the_squared_mean_gradient_per_chunk(tiny):
    model, x, y = tiny
    model.eval()
    scores = fisher_diagonal(model, x, y, mode="batch", chunk_size=4)
    grads = _per_sample_grads(model, x, y)
    for name, s in scores.items():
        ref = sum(
            (sum(g[name] for g in grads[a:a + 4]) / len(grads[a:a + 4])).square() for a in range(0, 10, 4)
        )
        torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-12, check_dtype=False)
        exact = sum(g[name].square() for g in grads)
        assert not torch.allclose(s, exact.double())  # the shortcut is a different quantity


def test_scores_of_two_sets_add_up_to_the_score_of_their_union(tiny):
    model, x, y = tiny
    whole = fisher_diagonal(model, x, y, mode="empirical", chunk_size=3)
    a = fisher_diagonal(model, x[:6], y[:6], mode="empirical", chunk_size=3)
    b = fisher_diagonal(model, x[6:], y[6:], mode="empirical", chunk_size=3)
    for name in whole:
        torch.testing.assert_close(a[name] + b[name], whole[name], rtol=1e-5, atol=1e-12)


def test_bad_mode_or_missing_labels_are_refused(tiny):
    model, x, _ = tiny
    with pytest.raises(ValueError, match="not one of sampled, empirical, batch"):
        fisher_diagonal(model, x, mode="ewc")
    with pytest.raises(ValueError, match="needs the true labels"):
        fisher_diagonal(model, x, mode="empirical")
