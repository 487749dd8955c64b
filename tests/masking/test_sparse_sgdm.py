"""SparseSGDM against torch.optim.SGD: same floats where trainable, bit-frozen elsewhere."""

import itertools

import pytest
import torch

from masking import SparseSGDM

# (momentum, dampening, nesterov, weight decay, foreach); torch rejects nesterov without momentum or with dampening
GRID = [c for c in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.01], [False, True])
        if not (c[2] and (c[0] == 0 or c[1] != 0))]


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    return params, masks, grads


def _run(opt_factory, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_factory(ps)
    for step_grads in grads:
        for p, gr in zip(ps, step_grads):
            p.grad = gr.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("momentum, dampening, nesterov, weight_decay, foreach", GRID)
def test_equals_sgd_where_trainable_and_never_moves_frozen_entries(momentum, dampening, nesterov, weight_decay, foreach):
    params, masks, grads = _setup()
    kw = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, foreach=foreach)
    dense, _ = _run(lambda ps: torch.optim.SGD(ps, **kw), params, grads)
    sparse, _ = _run(lambda ps: SparseSGDM(ps, masks, **kw), params, grads)
    # SGD is elementwise, so an always-trainable entry must follow dense SGD's float for float
    for p0, m, d, s in zip(params, masks, dense, sparse):
        assert torch.equal(s[~m], p0[~m])  # frozen: bit-identical
        assert torch.equal(s[m], d[m])  # trainable: exactly SGD's floats


def test_none_masks_are_plain_sgd():
    params, _, grads = _setup(1)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    dense, _ = _run(lambda ps: torch.optim.SGD(ps, **kw), params, grads)
    sparse, _ = _run(lambda ps: SparseSGDM(ps, [None, None, None], **kw), params, grads)
    assert all(torch.equal(a, b) for a, b in zip(dense, sparse))


def test_nan_gradients_on_frozen_entries_do_not_leak():
    params, masks, grads = _setup(2)
    for step_grads in grads:
        for g, m in zip(step_grads, masks):
            g[~m] = float("nan")
    sparse, _ = _run(lambda ps: SparseSGDM(ps, masks, lr=0.1, momentum=0.9, weight_decay=0.01), params, grads)
    for p0, m, s in zip(params, masks, sparse):
        assert torch.equal(s[~m], p0[~m]) and torch.isfinite(s).all()


def test_masks_survive_state_dict_and_new_masks_clear_frozen_momentum():
    params, masks, grads = _setup(3)
    ps, opt = _run(lambda ps: SparseSGDM(ps, masks, lr=0.1, momentum=0.9), params, grads[:3])
    state = opt.state_dict()
    fresh = SparseSGDM([torch.nn.Parameter(p.detach().clone()) for p in ps], None, lr=0.1, momentum=0.9)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) and b.dtype == torch.bool for a, b in zip(opt.masks(), fresh.masks()))

    tighter = [m & (torch.rand(m.shape, generator=torch.Generator().manual_seed(9)) < 0.5) for m in masks]
    opt.set_masks(tighter)
    for p, m in zip(ps, tighter):
        buf = opt.state[p]["momentum_buffer"]
        assert (buf[~m] == 0).all() and (buf[m] != 0).any()
    before = [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads[3]):
        p.grad = g.clone()
    opt.step()
    for b, p, m in zip(before, ps, tighter):
        assert torch.equal(p[~m], b[~m])


def test_a_mask_of_the_wrong_shape_or_count_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        SparseSGDM([p], [torch.ones(4, dtype=torch.bool)], lr=0.1)
    with pytest.raises(ValueError, match="one per parameter"):
        SparseSGDM([p], [], lr=0.1)


@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_with_their_own_weight_decay_stay_exact(foreach):
    """timm's weight-decay groups (decay on matrices, none on biases and norms): masks align over the groups."""
    params, masks, grads = _setup(4)
    kw = dict(lr=0.1, momentum=0.9, foreach=foreach)

    def groups(ps):
        return [{"params": [ps[1]], "weight_decay": 0.0}, {"params": [ps[0], ps[2]], "weight_decay": 0.05}]

    dense, _ = _run(lambda ps: torch.optim.SGD(groups(ps), **kw), params, grads)
    sparse, _ = _run(lambda ps: SparseSGDM(groups(ps), [masks[1], masks[0], masks[2]], **kw), params, grads)
    for p0, m, d, s in zip(params, masks, dense, sparse):
        assert torch.equal(s[~m], p0[~m]) and torch.equal(s[m], d[m])
    assert not torch.equal(dense[0], _run(lambda ps: torch.optim.SGD(ps, **kw), params, grads)[0][0])  # decay acted


def test_make_optimizer_follows_timm_weight_decay_groups_and_masks_by_name():
    from fed_app.config import RunConfig
    from fed_app.task.model import build_model
    from fed_app.task.train import make_optimizer

    cfg = RunConfig(model="vit-tiny-test", optimizer="sparse-sgdm", head="ridge", weight_decay=0.01)
    model, _ = build_model(cfg, 10)
    model.head.requires_grad_(False)
    masks = {n: torch.rand(p.shape) < 0.3 for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(cfg, model, masks)
    name_of = {p: n for n, p in model.named_parameters()}
    decayed = {name_of[p] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert not decayed & {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"}
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert all(name_of[p] != "head.weight" for g in opt.param_groups for p in g["params"])
    for group in opt.param_groups:
        for p in group["params"]:
            assert torch.equal(opt.state[p]["mask"], masks[name_of[p]])
