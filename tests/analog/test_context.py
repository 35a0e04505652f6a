"""The analog context: pulsed updates are recorded exactly when torch would accumulate a gradient
into the analog weight's ``.grad``, applied only by an AnalogOptimizer, bounded in memory, and
compared honestly by ``compare_gradients``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.analog import (AnalogConfig, AnalogContext, AnalogConv2d, AnalogLinear, AnalogOptimizer, IdealDevice,
                          IOConfig, UnownedAnalogWeight, UpdateConfig, analog_parameters, digital_parameters)
from ffebm.analog.energy import AnalogEP, analog_energy_block

EXACT = AnalogConfig(device=IdealDevice(), io=IOConfig.perfect(), bwd_io=IOConfig.perfect(),
                     update=UpdateConfig(pulse_type="none"))


def _linear():
    torch.manual_seed(0)
    return AnalogLinear(3, 2, bias=False, config=EXACT).double()


def _conv():
    torch.manual_seed(0)
    return AnalogConv2d(2, 3, 3, padding=1, bias=False, config=EXACT).double()


def _dense_block():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 5, 4, 3], steps=200, tol=1e-11, nudge_steps=60,
                              gradient=ffebm.EP(beta=0.05)).double()
    return analog_energy_block(blk, EXACT, seed=0)


def _conv_block():
    torch.manual_seed(0)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="avg", dense=[5], steps=150, tol=1e-11, nudge_steps=60,
                             gradient=ffebm.EP(beta=0.05)).double()
    return analog_energy_block(blk, EXACT, seed=0)


MODULES = {"linear": (_linear, (4, 3)), "conv": (_conv, (2, 2, 5, 5)),
           "dense-block": (_dense_block, (4, 6)), "conv-block": (_conv_block, (2, 2, 8, 8))}


def _tiles(m):
    return [p.analog_ctx.tile.get_weights().clone() for p in analog_parameters(m)]


def test_input_gradient_does_not_move_weights_issue_input():
    layer = AnalogLinear(3, 2, bias=False, config=EXACT)
    opt = AnalogOptimizer([layer.weight], lr=0.1)
    x = torch.rand(4, 3, requires_grad=True)
    w0 = layer.get_weights()[0].clone()
    gx, = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, w0.sum(0).expand(4, 3))  # W^T 1, as nn.Linear
    opt.step()
    assert torch.equal(layer.get_weights()[0], w0)  # nn.Linear + SGD would not move either
    layer(x).sum().backward()  # and loss.backward() does record: the step moves W by -lr d^T x
    opt.step()
    torch.testing.assert_close(layer.get_weights()[0], w0 - 0.1 * torch.ones(2, 1) @ x.detach().sum(0, keepdim=True))


@pytest.mark.parametrize("kind", list(MODULES))
def test_recorded_only_when_backward_accumulates(kind):
    build, shape = MODULES[kind]
    m = build()
    opt = AnalogOptimizer(analog_parameters(m), lr=0.05)
    x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    w0 = _tiles(m)
    torch.autograd.grad(m(x).square().sum(), x)              # input gradients only
    m(x).square().sum().backward(inputs=[x])                  # backward restricted to the input
    with torch.no_grad():
        m(x)                                                  # no graph
    m.eval()
    with torch.no_grad():
        m(x)                                                  # evaluation
    m.train()
    assert all(p.analog_ctx.num_pairs == 0 for p in analog_parameters(m))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_tiles(m), w0))
    m(x).square().sum().backward()
    assert all(p.analog_ctx.num_pairs > 0 for p in analog_parameters(m))
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(_tiles(m), w0))
    assert all(p.analog_ctx.num_pairs == 0 for p in analog_parameters(m))


@pytest.mark.parametrize("kind", list(MODULES))
def test_autograd_grad_of_weight_is_the_dense_equivalent_of_the_pulsed_step(kind):
    """torch.autograd.grad(loss, W) returns what backward + an exact AnalogSGD step applies."""
    build, shape = MODULES[kind]
    m = build()
    lr = 0.01
    opt = AnalogOptimizer(analog_parameters(m), lr=lr)
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ws = analog_parameters(m)
    gs = torch.autograd.grad(m(x).square().sum(), ws)
    assert all(p.analog_ctx.num_pairs == 0 for p in ws)
    w0 = _tiles(m)
    m(x).square().sum().backward()
    opt.step()
    for w_new, w_old, g in zip(_tiles(m), w0, gs):
        assert g.abs().sum() > 0
        torch.testing.assert_close(w_new, w_old - lr * g.reshape(w_old.shape), rtol=1e-10, atol=1e-12)


def test_torch_optimizer_alone_warns_and_stays_bounded():
    torch.manual_seed(0)
    net = nn.Sequential(AnalogLinear(16, 32, config=EXACT), nn.ReLU(), AnalogLinear(32, 4, config=EXACT))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(8, 16)
    counts = []
    with pytest.warns(UnownedAnalogWeight, match="AnalogOptimizer"):
        for _ in range(5):
            opt.zero_grad()
            net(x).sum().backward()
            counts.append(max(p.analog_ctx.num_pairs for p in analog_parameters(net)))
            opt.step()
    assert all(p.analog_ctx.num_pairs == 0 for p in analog_parameters(net))
    assert max(counts) == 8  # one backward's pairs at a time, never piling up
    # without any optimizer step, the unowned pairs are still bounded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnownedAnalogWeight)
        from ffebm.analog.context import UNOWNED_LIMIT

        for _ in range(UNOWNED_LIMIT + 10):
            net(x).sum().backward()
    assert max(p.analog_ctx.num_pairs for p in analog_parameters(net)) <= 8 * UNOWNED_LIMIT


def test_zero_grad_of_the_analog_optimizer_clears_what_is_recorded():
    layer = _linear()
    opt = AnalogOptimizer([layer.weight], lr=0.1)
    layer(torch.rand(5, 3, dtype=torch.float64)).sum().backward()
    assert layer.weight.analog_ctx.num_pairs == 5
    opt.zero_grad()
    assert layer.weight.analog_ctx.num_pairs == 0


def test_pairs_recorded_before_the_optimizer_exists_are_applied():
    layer = _linear()
    x = torch.rand(5, 3, dtype=torch.float64)
    w0 = layer.get_weights()[0].clone()
    layer(x).sum().backward()
    AnalogOptimizer([layer.weight], lr=0.1).step()
    torch.testing.assert_close(layer.get_weights()[0], w0 - 0.1 * torch.ones(2, 1, dtype=torch.float64) @ x.sum(0, keepdim=True))


def test_context_is_typed_and_not_copied_with_the_model():
    import copy

    layer = _linear()
    opt = AnalogOptimizer([layer.weight], lr=0.1)
    layer(torch.rand(2, 3, dtype=torch.float64)).sum().backward()
    ctx = layer.weight.analog_ctx
    assert isinstance(ctx, AnalogContext) and ctx.optimizer is opt and ctx.tile is layer.tile
    twin = copy.deepcopy(layer)
    twin._link()
    assert twin.weight.analog_ctx is not ctx and twin.weight.analog_ctx.tile is twin.tile
    assert twin.weight.analog_ctx.num_pairs == 0 and twin.weight.analog_ctx.optimizer is None
    # no private per-call attributes on the parameters any more
    assert not [k for k in vars(layer.weight) if k.startswith("_analog") or k == "analog_tile"]


# ---------------------------------------------------------------------------------------------
# compare_gradients never reports fake agreement
# ---------------------------------------------------------------------------------------------
def test_compare_gradients_compares_the_dense_equivalent_of_pulsed_updates():
    blk = _dense_block()
    model = nn.Sequential(blk, nn.Linear(3, 2).double())
    x = torch.rand(6, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    res = ffebm.compare_gradients(model, nn.functional.cross_entropy, (x, y),
                                  reference=ffebm.Implicit(tol=1e-12), candidates=[AnalogEP(beta=1e-3)])
    rows = {r["param"]: r for r in res.rows}
    analog = [n for n, p in model.named_parameters() if any(p is q for q in analog_parameters(model))]
    assert len(analog) == 3
    for n in analog:
        r = rows[n]
        assert r["comparable"] and r["norm"] > 0
        assert r["cosine"] > 0.999 and 0 < r["rel_error"] < 0.05, r  # close, and not zeros vs zeros


def test_compare_gradients_marks_absent_gradients_not_comparable():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(beta=0.01))
            self.head = nn.Linear(3, 2)
            self.unused = nn.Linear(2, 2)  # parameters the loss never reaches

        def forward(self, x):
            return self.head(self.blk(x))

    model = Net()
    res = ffebm.compare_gradients(model, nn.functional.cross_entropy,
                                  (torch.rand(5, 4), torch.randint(0, 2, (5,))), candidates=[ffebm.EP(beta=0.01)])
    rows = {r["param"]: r for r in res.rows}
    assert not rows["unused.weight"]["comparable"] and "both" in rows["unused.weight"]["note"]
    assert "not comparable" in res.table()
    assert set(res.not_comparable()) == {"unused.weight", "unused.bias"}
    assert res.min_cosine() > 0.9  # over the comparable rows only


# ---------------------------------------------------------------------------------------------
# other gradient methods and frozen weights on analog energy blocks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense-block", "conv-block"])
def test_implicit_on_tiles_equals_the_digital_blocks_implicit(kind):
    """Perfect tiles: the analog weights' dense gradients are the digital block's (before: absent)."""
    build, shape = MODULES[kind]
    torch.manual_seed(0)
    digital = ffebm.DenseHopfield([6, 5, 4, 3], steps=200, tol=1e-11, nudge_steps=60).double() \
        if kind == "dense-block" else \
        ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="avg", dense=[5], steps=150, tol=1e-11, nudge_steps=60).double()
    analog = analog_energy_block(digital, EXACT, seed=0, input_coupling=False, analog_gradient=False)
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for m in (digital, analog):
        m.gradient = ffebm.Implicit(tol=1e-12)
        m(x).square().sum().backward()
    qs = dict(analog.named_parameters())
    for n, p in digital.named_parameters():
        q = qs[n]
        assert q.grad is not None and q.grad.abs().sum() > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10)


def test_unrolled_on_tiles_is_refused():
    m = _dense_block()
    m.gradient = ffebm.Unrolled()
    with pytest.raises(ffebm.UnsupportedGradient, match="read through analog tiles"):
        m(torch.rand(3, 6, dtype=torch.float64)).sum().backward()


def test_frozen_analog_coupling_records_nothing_and_changes_nothing_else():
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _dense_block()
    AnalogOptimizer(analog_parameters(ref), lr=0.1)
    ref(x).square().sum().backward()
    m = _dense_block()
    AnalogOptimizer(analog_parameters(m), lr=0.1)
    m.couplings[0].weight.requires_grad_(False)
    m(x).square().sum().backward()
    assert m.couplings[0].weight.analog_ctx.num_pairs == 0 and m.couplings[0].weight.grad is None
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        if n == "couplings.0.weight":
            continue
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
        else:  # pulsed weights: the same pairs
            a, b = p.analog_ctx.pending(), q.analog_ctx.pending()
            torch.testing.assert_close(b[1].t() @ b[0], a[1].t() @ a[0], rtol=1e-10, atol=1e-12)


def test_owned_pairs_that_pile_up_are_folded_into_the_same_update():
    from ffebm.analog.context import OWNED_LIMIT

    layer = _linear()
    opt = AnalogOptimizer([layer.weight], lr=0.001)
    x = torch.rand(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = OWNED_LIMIT + 20
    with pytest.warns(UserWarning, match="folded into the dense update"):
        for _ in range(n):
            layer(x).square().sum().backward()
    X, D = layer.weight.analog_ctx.pending()
    assert X.shape[0] < 8 * n  # bounded (the fold plus what came after it)
    dense = sum(torch.autograd.grad(layer(x).square().sum(), layer.weight)[0] for _ in range(1)) * n
    torch.testing.assert_close(D.t() @ X, dense, rtol=1e-10, atol=1e-12)
    w0 = layer.get_weights()[0].clone()
    opt.step()
    torch.testing.assert_close(layer.get_weights()[0], w0 - 0.001 * dense, rtol=1e-9, atol=1e-12)


def test_compare_gradients_one_sided_absence_is_disagreement_and_dropout_is_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.blk = ffebm.DenseHopfield([6, 8, 3], gradient=ffebm.EP(beta=0.01), name="b").double()

        def forward(self, x):
            return self.blk(self.drop(x))

    class NoWeight(ffebm.EP):
        def backward(self, call, delta):  # forgets the coupling weight
            res = super().backward(call, delta)
            res.grad_params = (None,) + tuple(res.grad_params[1:])
            return res

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.rand(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    res = ffebm.compare_gradients(model, nn.functional.cross_entropy, (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.Implicit(tol=1e-12), NoWeight(beta=0.01)])
    same, forgetful = res.methods()
    assert res.min_cosine(same) > 0.999999  # dropout drew the same mask for every method
    rows = {r["param"]: r for r in res.rows if r["method"] == forgetful}
    assert rows["blk.couplings.0.weight"]["cosine"] == 0.0 and rows["blk.couplings.0.weight"]["rel_error"] == 1.0
    assert res.min_cosine(forgetful) == 0.0  # not hidden from the summary


def test_compare_gradients_current_keeps_each_blocks_method():
    torch.manual_seed(0)
    model = nn.Sequential(ffebm.DenseHopfield([4, 6, 5], gradient=ffebm.Implicit(tol=1e-12)),
                          ffebm.DenseHopfield([5, 6, 3], gradient=ffebm.EP(beta=0.3, variant="positive"))).double()
    x, y = torch.rand(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    res = ffebm.compare_gradients(model, nn.functional.cross_entropy, (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.CURRENT])
    label = res.methods()[0]
    assert "Implicit" in label and "EP(beta=0.3" in label
    rows = {r["param"]: r for r in res.rows}
    assert rows["1.couplings.0.weight"]["rel_error"] > 1e-3   # block 1 ran its EP
    assert isinstance(model[0].gradient, ffebm.Implicit) and isinstance(model[1].gradient, ffebm.EP)
