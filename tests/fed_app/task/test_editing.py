"""Step 0 and sparse fine-tuning in the centralized trainer: frozen means bit-identical, ridge and the logistic head
are exact."""

import json

import pytest
import torch

from fed_app import centralized
from fed_app.task.batches import BatchTransform
from fed_app.task.data import load_dataset
from fed_app.task.head import feature_matrix, fit_logistic, logistic_sums, ridge_statistics, solve_ridge
from fed_app.task.model import build_model
from fed_app.runs.rundir import RunDir

TIMING = {"wall_time", "epoch_time"}


def _sparse(tiny_cfg, **kw):
    settings = dict(optimizer="sparse-sgdm", head="ridge", sparsity=0.8, calibration_rounds=2,
                    fisher_samples=64, epochs=2, lr=0.01, augment=False)  # a calibrated head: a lower lr
    return tiny_cfg.replace(**{**settings, **kw})


def test_sparse_run_never_moves_frozen_entries_nor_the_head(tiny_cfg):
    cfg = _sparse(tiny_cfg)
    model0, _ = build_model(cfg, 100)
    run_dir = centralized.run(cfg)
    masks = RunDir(run_dir.path).load_mask()
    stats = json.loads((run_dir.path / "mask_stats.json").read_text())
    assert stats[-1]["name"] == "total" and stats[-1]["density"] == pytest.approx(0.2, abs=1e-4)
    rows = run_dir.rows()
    assert rows[0]["epoch"] == 0 and rows[0]["density"] == pytest.approx(0.2, abs=1e-4)
    final = run_dir.load_checkpoint()["model"]
    start = dict(model0.named_parameters())
    assert set(masks) == {n for n in start if not n.startswith("head.")}
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], start[name].detach()[~mask]), name
    moved = sum(int((final[n][m] != start[n].detach()[m]).sum()) for n, m in masks.items())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())  # trainable entries did train
    assert not torch.equal(final["head.weight"], start["head.weight"])  # step 0 solved it...
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] and rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
    assert rows[0]["head_temperature"] > 1


def test_the_head_is_frozen_after_step_0(tiny_cfg, monkeypatch):
    seen = {}
    real_fit = centralized.fit_head

    def spy(cfg, model, *args):
        found = real_fit(cfg, model, *args)
        seen["head"] = model.head.weight.detach().clone()
        return found

    monkeypatch.setattr(centralized, "fit_head", spy)
    run_dir = centralized.run(_sparse(tiny_cfg, head="train"))
    assert torch.equal(run_dir.load_checkpoint()["model"]["head.weight"], seen["head"])  # ...and then froze it


def test_ridge_from_statistics_equals_a_direct_solve_and_statistics_add_up(tiny_cfg):
    data = load_dataset(tiny_cfg, torch.device("cpu"))
    model, spec = build_model(tiny_cfg, 100)
    tf = BatchTransform.for_model(spec)
    idx = torch.arange(400)
    prec = torch.autocast("cpu", enabled=False)
    stats = ridge_statistics(model, data.train, idx, tf, 128, prec, 100)
    half_a = ridge_statistics(model, data.train, idx[:150], tf, 64, prec, 100)
    half_b = ridge_statistics(model, data.train, idx[150:], tf, 64, prec, 100)
    for k in ("xtx", "xty"):
        torch.testing.assert_close(half_a[k] + half_b[k], stats[k])
    weight, bias = solve_ridge(stats, lam=2.0)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(tf(data.train.images[idx])), pre_logits=True).double()
    x = torch.cat([feats, torch.ones(400, 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(data.train.labels[idx], 100).double()
    penalty = 2.0 * torch.eye(x.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0
    ref = torch.linalg.solve(x.T @ x + penalty, x.T @ y)
    torch.testing.assert_close(weight, ref[:-1].T)
    torch.testing.assert_close(bias, ref[-1])


def test_an_interrupted_sparse_run_resumes_with_its_mask_to_the_same_end(tiny_cfg, tmp_path, monkeypatch):
    whole = centralized.run(_sparse(tiny_cfg, epochs=3).replace(run_dir=str(tmp_path / "whole")))
    cfg = _sparse(tiny_cfg, epochs=3).replace(run_dir=str(tmp_path / "cut"))
    real_steps, calls = centralized.train_steps, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the notebook VM goes away mid-epoch
        return real_steps(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_steps", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        centralized.run(cfg)
    monkeypatch.setattr(centralized, "train_steps", real_steps)
    cut = centralized.run(cfg)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(cut.rows()) == strip(whole.rows())
    a, b = whole.load_checkpoint()["model"], cut.load_checkpoint()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_logistic_head_is_the_regularized_cross_entropy_optimum_and_its_sums_add_up(tiny_cfg):
    data = load_dataset(tiny_cfg, torch.device("cpu"))
    model, spec = build_model(tiny_cfg, 100)
    tf = BatchTransform.for_model(spec)
    idx = torch.arange(400)
    feats, labels = feature_matrix(model, data.train, idx, tf, 128, torch.autocast("cpu", enabled=False))
    weight, bias = torch.randn(100, feats.shape[1], dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    whole = logistic_sums(feats, labels, weight, bias)
    halves = [logistic_sums(feats[s], labels[s], weight, bias) for s in (slice(0, 150), slice(150, None))]
    for k in whole:
        torch.testing.assert_close(halves[0][k] + halves[1][k], whole[k])
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()  # the gradient against autograd's
    torch.nn.functional.cross_entropy(feats @ w.T + b, labels, reduction="sum").backward()
    torch.testing.assert_close(whole["grad_weight"], w.grad)
    torch.testing.assert_close(whole["grad_bias"], b.grad)

    lam = 1e-2
    weight, bias, found = fit_logistic(lambda w, b: logistic_sums(feats, labels, w, b), feats.shape[1], 100, lam, 500)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    objective = torch.nn.functional.cross_entropy(feats @ w.T + b, labels) + lam / 2 * w.square().sum()
    objective.backward()
    assert found["head_gradient"] < 1e-6 and w.grad.abs().max() < 1e-6 and b.grad.abs().max() < 1e-6  # the optimum
    assert found["head_loss"] == pytest.approx(torch.nn.functional.cross_entropy(feats @ weight.T + bias, labels).item())
    assert found["head_evaluations"] > 10
