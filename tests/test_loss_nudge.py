"""The published nudge of the last block, beta * loss(readout(s_top), y) (``EP(nudge="loss")``
inside ``ffebm.loss_nudge``), against Implicit and finite differences in float64 (the exact
gradient is the same as for the linear nudge beta <delta, s_top>; the loss nudge has its own
O(beta^2) centered bias)."""
import warnings

import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.compare import PerBlock, cosine
from helpers import batch, finite_difference, hybrid_dense, loss_fn

REF = ffebm.Implicit(tol=1e-12, max_iter=2000)


def _published_scheme(beta, **kw):
    """delta nudge on the first block (named DenseHopfield too: the second is the last), loss
    nudge on the last."""
    ep = ffebm.EP(beta, steps=400, **kw)
    return ep, ffebm.EP(beta, steps=400, nudge="loss", **kw)


def _model():
    model = hybrid_dense()
    model[2].block_name, model[5].block_name = "first", "last"
    return model


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("form", ["ordinary", "difference"])
def test_loss_nudge_estimates_the_exact_gradient(form):
    model = _model()
    x, y = batch(4, (5,))
    delta_ep, loss_ep = _published_scheme(0.1, form=form)
    cand_delta = PerBlock(delta_ep, {})
    cand_loss = PerBlock(delta_ep, {"last": loss_ep})
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[cand_delta, cand_loss])
    gl, gd = res.grads[cand_loss.describe()], res.grads[cand_delta.describe()]
    assert res.min_cosine(cand_loss.describe()) > 0.999
    assert model[5].backward_stats.fallback is None and "nudge=loss" in model[5].backward_stats.method
    # the loss's curvature does enter the last block's nudged phases: a different estimate
    assert _rel(gl["5.couplings.0.weight"], gd["5.couplings.0.weight"]) > 1e-6


def test_loss_nudge_bias_is_second_order_and_matches_finite_differences():
    model = _model()
    x, y = batch(4, (5,))
    errs = []
    for beta in (0.2, 0.1):
        d, l = _published_scheme(beta)
        res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[PerBlock(d, {"last": l})])
        errs.append(res.max_rel_error())
    assert errs[1] < errs[0] / 3
    d, l = _published_scheme(0.01)
    model[2].gradient, model[5].gradient = d, l
    with ffebm.loss_nudge(model, loss_fn, y):
        out = model(x)
    loss_fn(out, y).backward()
    name = "5.couplings.0.weight"
    g = dict(model.named_parameters())[name].grad
    fd = finite_difference(model, x, y, name)
    assert cosine(g, fd) > 0.9999 and _rel(g, fd) < 1e-3


def test_force_follows_the_state_in_the_nudged_phase():
    """Ordinary and difference forms give the same loss-nudged estimate in float64 (the force is
    evaluated at the current state in both)."""
    model = _model()
    x, y = batch(4, (5,))
    a, b = (PerBlock(ffebm.EP(0.3, steps=400), {"last": ffebm.EP(0.3, steps=400, nudge="loss", form=f)})
            for f in ("ordinary", "difference"))
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[a, b])
    for name, g in res.grads[a.describe()].items():
        if g is not None:
            assert _rel(res.grads[b.describe()][name], g) < 1e-9, name


def test_without_the_context_it_falls_back_and_says_so():
    model = _model()
    model[5].gradient = ffebm.EP(0.1, steps=50, nudge="loss")
    x, y = batch(4, (5,))
    with pytest.warns(UserWarning, match="outside ffebm.loss_nudge"):
        loss_fn(model(x), y).backward()
    assert "outside ffebm.loss_nudge" in model[5].backward_stats.fallback


def test_wrong_loss_or_block_is_refused():
    model = _model()
    x, y = batch(4, (5,))
    model[5].gradient = ffebm.EP(0.1, steps=50, nudge="loss")
    with ffebm.loss_nudge(model, lambda o, t: 2 * loss_fn(o, t), y):
        out = model(x)
    with pytest.raises(ValueError, match="does not give this backward's incoming gradient"):
        loss_fn(out, y).backward()
    model[5].gradient = ffebm.EP(0.1, steps=50)
    model[2].gradient = ffebm.EP(0.1, steps=50, nudge="loss")
    with pytest.raises(ValueError, match="not the last energy block"):
        with ffebm.loss_nudge(model, loss_fn, y):
            model(x)
    with pytest.raises(ValueError, match="EP.nudge"):
        ffebm.EP(nudge="readout")


def test_traced_comparison_keeps_the_loss_nudge():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([5, 8, 4], gain=0.5, linear_top=True,
                              relaxation=ffebm.Relaxation(steps=3000, tol=1e-13))
    model = nn.Sequential(blk, nn.Linear(4, 3)).double()
    x, y = batch(4, (5,))
    ep = ffebm.EP(0.2, steps=200, nudge="loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the delta nudge
        plain = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[ep])
        traced = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[ep], trace=True)
    for name, g in plain.grads[ep.describe()].items():
        assert torch.allclose(traced.grads[ep.describe()][name], g, rtol=1e-10, atol=1e-14), name
    assert plain.min_cosine(ep.describe()) > 0.99


def test_loss_nudge_works_under_module_backward_hooks():
    """The force is a nested autograd.grad through the readout: module backward hooks (here
    torch's FlopCounterMode, as `python -m train.bench` counts a step) must not break it, nor
    change the gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = batch(4, (5,))
    grads = []
    for counted in (False, True):
        model = _model()
        d, l = _published_scheme(0.1)
        model[2].gradient, model[5].gradient = d, l
        with FlopCounterMode(display=False) if counted else warnings.catch_warnings():
            with ffebm.loss_nudge(model, loss_fn, y):
                out = model(x)
            g = torch.autograd.grad(loss_fn(out, y), list(model.parameters()))
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
