"""EP with max pooling inside an energy block: ``EP(pool_winners="free")`` keeps the free
equilibrium's winners through the nudged phases and the read-out.

The reference: a max pool is piecewise linear, so the gradient of the free equilibrium is the
gradient of the block's energy at the free state's winner pattern. Implicit differentiates at s*
(autograd's max-pool derivative routes through the winners at s*), so it is that reference: it
equals Implicit on the fixed-winner view of the block, and central finite differences of the
loss (through the full forward relaxation) agree with it.
"""
import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.compare import cosine


def pooled(seed: int = 0):
    """conv 2->4 (input map) -> layer 4x8x8 -> conv 4->6 + 2x2 max pool -> linear top 6x4x4 -> readout.

    Float64, tight relaxations. The coupling's bias of 1 keeps most top units off the box's
    edges, so the box's kinks stay small next to the pool's; at seed 0 and beta 0.2 winners switch
    between the nudged phases (live-winner EP's cosine is far from 1)."""
    torch.manual_seed(seed)
    tight = ffebm.Relaxation(steps=2000, tol=1e-13)
    nudge = ffebm.Relaxation(steps=300, tol=None)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool=["none", "max"], input_bn=False, gain=0.5, linear_top=True,
                             relaxation=tight, nudge_relaxation=nudge, gradient=ffebm.Implicit(tol=1e-12))
    with torch.no_grad():
        blk.couplings[0].bias.fill_(1.0)
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double()
    list(ffebm.energy_blocks(model))
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    return model, blk, x, y


REF = ffebm.Implicit(tol=1e-12, max_iter=2000)


def test_free_winners_make_ep_match_the_exact_gradient():
    model, blk, x, y = pooled()
    live, free = ffebm.EP(0.2, steps=300), ffebm.EP(0.2, steps=300, pool_winners="free")
    res = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y), reference=REF, candidates=[live, free])
    assert res.min_cosine(free.describe()) > 0.999
    assert res.max_rel_error(free.describe()) < 0.05
    assert res.min_cosine(live.describe()) < 0.9  # winners do switch here: the option is what fixes it
    # the block is untouched: no winners left on its couplings, the view shared its parameters
    assert blk.couplings[0].winners is None
    assert free.describe() == "EP(beta=0.2, variant=centered, pool_winners=free)"


def test_free_winners_bias_is_second_order_in_beta():
    model, _, x, y = pooled()
    errs = []
    for beta in (0.2, 0.1):
        m = ffebm.EP(beta, steps=300, pool_winners="free")
        res = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y), reference=REF, candidates=[m])
        errs.append(res.max_rel_error(m.describe()))
    assert errs[1] < errs[0] / 3  # O(beta^2): halving beta divides the error by ~4


def test_implicit_is_the_free_winner_linearisation():
    model, blk, x, y = pooled()
    loss_fn = nn.CrossEntropyLoss()
    model(x)
    # the incoming gradient at the block's top, from the readout
    top = blk.state[-1].detach().requires_grad_(True)
    delta = torch.autograd.grad(loss_fn(model[2](model[1](top)), y), top)[0]
    call = ffebm.BlockCall.at(blk, blk.input_map(x), blk.state)
    view = blk.with_pool_winners(blk.state)
    assert view is not blk and view.couplings[0].winners is not None and blk.couplings[0].winners is None
    assert view.couplings[0].weight is blk.couplings[0].weight
    a = REF.backward(call, delta)
    b = REF.backward(ffebm.BlockCall.at(view, call.u, blk.state), delta)
    for ga, gb in zip(a.grad_params, b.grad_params):
        assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-14)
    # the view's energy at the free state is the block's, and its fixed point is the same state
    assert torch.allclose(view.energy(blk.state, call.u), blk.energy(blk.state, call.u), rtol=1e-12)
    s, _ = view.solve(call.u, states=blk.state)
    assert max(float((p - q).abs().max()) for p, q in zip(s, blk.state)) < 1e-10


def test_implicit_matches_finite_differences_through_the_max_pool():
    model, _, x, y = pooled()
    loss_fn = nn.CrossEntropyLoss()
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[ffebm.EP(0.2, steps=300)])
    ref = res.grads[res.reference]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):  # directional derivatives along random directions of all parameters at once
        dirs = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.add_(eps * dirs[n])
            lp = loss_fn(model(x), y).item()
            for n, p in params.items():
                p.sub_(2 * eps * dirs[n])
            lm = loss_fn(model(x), y).item()
            for n, p in params.items():
                p.add_(eps * dirs[n])
        fd = (lp - lm) / (2 * eps)
        got = sum(float((ref[n] * dirs[n]).sum()) for n in params)
        assert abs(got - fd) <= 1e-5 * abs(fd) + 1e-9, (got, fd)


def test_conv_coupling_view_and_errors():
    torch.manual_seed(0)
    c = ffebm.ConvCoupling(2, 3, (4, 4), pool="max").double()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    v = c.with_winners(x)
    assert v is not c and v.winners is not None and c.winners is None
    assert torch.equal(v.bottom_up(x)[0], c.bottom_up(x)[0])  # the same pool at x
    x2 = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    # elsewhere: the winners of x, an affine map of x2
    lin = v.bottom_up(x2)[0] - v.bias.view(1, -1, 1, 1)
    assert torch.allclose(v.bottom_up(2 * x2)[0] - v.bias.view(1, -1, 1, 1), 2 * lin)
    with pytest.raises(ValueError, match="batch"):
        v.bottom_up(x2[:1])
    assert ffebm.ConvCoupling(2, 3, (4, 4), pool="avg").with_winners(x.float()) is not None
    with pytest.raises(ValueError, match="pool_winners"):
        ffebm.EP(0.1, pool_winners="fixed")


def test_trace_and_blocks_without_max_pool():
    model, blk, x, y = pooled()
    free = ffebm.EP(0.2, steps=50, pool_winners="free")
    res = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y), reference=REF, candidates=[free], trace=True)
    hist = res.traces[free.describe()][blk.name]
    assert len(hist) == 50
    dense = ffebm.DenseHopfield([4, 5, 3])
    assert dense.with_pool_winners([torch.zeros(1, 4), torch.zeros(1, 5), torch.zeros(1, 3)]) is dense
