"""Energy blocks behave like torch modules: per-call state travels with the call, frozen
parameters, double backward refused, torch.func refused, stochastic methods checkpointed,
EP's tolerance follows beta. Every value is checked against an independent computation."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ffebm
from ffebm.errors import FunctorchUnsupported, NotTwiceDifferentiable
from helpers import hybrid_conv, hybrid_dense

METHODS = {
    "ep-centered": lambda: ffebm.EP(beta=1e-3),
    "ep-positive": lambda: ffebm.EP(beta=1e-3, variant="positive"),
    "implicit": lambda: ffebm.Implicit(tol=1e-12),
    "unrolled": lambda: ffebm.Unrolled(steps=60),
    "bptt": lambda: ffebm.Unrolled(from_equilibrium=False),
}


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# 1. per-call state
# ---------------------------------------------------------------------------------------------
def test_two_calls_before_one_backward_issue_input():
    """Calls that settle in different step counts: full BPTT must unroll each call's own count."""
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 12, 4], linear_top=True, init_gain=2.0, steps=200, tol=1e-6,
                              gradient=ffebm.Unrolled(from_equilibrium=False)).double()
    x1 = torch.rand(3, 6, dtype=torch.float64) * 0.01
    x2 = torch.rand(3, 6, dtype=torch.float64) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffebm.ConvergenceWarning)
        steps = []
        for x in (x1, x2):
            blk(x)
            steps.append(blk.stats.steps)
        assert steps[0] != steps[1]  # the two calls really differ in step count
        both = _grads(blk, blk(x1).sum() + blk(x2).sum())
        g1 = _grads(blk, blk(x1).sum())
        g2 = _grads(blk, blk(x2).sum())
    for n in both:
        assert _rel(both[n], g1[n] + g2[n]) < 1e-12, n


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_two_calls_sum_of_separate_backwards(method, kind):
    model = hybrid_dense(gradient=METHODS[method]()) if kind == "dense" else \
        hybrid_conv(gradient=METHODS[method]())
    shape = (3, 5) if kind == "dense" else (2, 2, 8, 8)
    torch.manual_seed(1)
    xa, xb = torch.rand(*shape, dtype=torch.float64), 2 * torch.rand(*shape, dtype=torch.float64)
    ta = torch.randn_like(model(xa))
    both = _grads(model, ((model(xa) - ta) ** 2).sum() + model(xb).square().sum())
    ga = _grads(model, ((model(xa) - ta) ** 2).sum())
    gb = _grads(model, model(xb).square().sum())
    for n in both:
        assert _rel(both[n], ga[n] + gb[n]) < 1e-9, n


def test_backward_uses_the_method_and_settings_of_its_call():
    """Swapping the method or the nudge settings between forward and backward changes nothing."""
    model = hybrid_dense(gradient=ffebm.Implicit(tol=1e-12))
    x = torch.rand(4, 5, dtype=torch.float64)
    ref = _grads(model, model(x).square().sum())
    out = model(x).square().sum()
    for _, blk in ffebm.energy_blocks(model):
        blk.gradient = ffebm.EP(beta=0.9, variant="positive")
        blk.nudge_relaxation = ffebm.Relaxation(steps=1, tol=None)
    got = _grads(model, out)
    for n in ref:
        assert _rel(got[n], ref[n]) < 1e-12, n
    assert all(blk.backward_stats.method.startswith("Implicit") for _, blk in ffebm.energy_blocks(model))


def test_backward_stats_are_returned_by_the_method_not_written_by_it():
    model = hybrid_dense(gradient=ffebm.EP(beta=0.01))
    x = torch.rand(4, 5, dtype=torch.float64)
    blk = model[2]
    u = blk.input_map(model[1](model[0](x))).detach()
    states, stats = blk.solve(u)
    call = ffebm.gradients.BlockCall.at(blk, u, states, stats)
    before = blk.backward_stats
    res = blk.gradient.backward(call, torch.randn_like(states[-1]))
    assert blk.backward_stats is before  # the method itself touched no record on the block
    assert res.stats.method.startswith("EP") and len(res.stats.nudged) == 2
    assert all(s.phase.startswith("nudged") for s in res.stats.nudged)


# ---------------------------------------------------------------------------------------------
# 2. frozen parameters
# ---------------------------------------------------------------------------------------------
def test_frozen_bias_issue_input():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 10, 4])
    blk.couplings[0].bias.requires_grad_(False)
    blk(torch.rand(3, 6)).sum().backward()
    assert blk.couplings[0].bias.grad is None
    assert blk.couplings[0].weight.grad is not None and blk.couplings[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["ep-centered", "implicit", "unrolled", "bptt"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_frozen_subsets_give_the_unfrozen_gradients(method, kind):
    model = hybrid_dense(gradient=METHODS[method]()) if kind == "dense" else \
        hybrid_conv(gradient=METHODS[method]())
    shape = (3, 5) if kind == "dense" else (2, 2, 8, 8)
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _grads(model, model(x).square().sum())
    names = [n for n, _ in model.named_parameters()]
    energy = [n for n in names if ".couplings." in n]
    # every other energy parameter frozen, plus everything before the first block (its input
    # then needs no gradient)
    frozen = set(energy[::2]) | {n for n in names if n.startswith("0.")}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    got = _grads(model, model(x).square().sum())
    for n in names:
        if n in frozen:
            assert got[n] is None, n
        else:
            assert got[n] is not None and _rel(got[n], ref[n]) < 1e-9, n


def test_input_gradient_only_with_all_parameters_frozen():
    model = hybrid_dense(gradient=ffebm.Implicit(tol=1e-12))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(model(x).sum(), x)
    # central finite differences in float64
    eps, fd = 1e-6, torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[i] = eps
            e = e.view_as(x)
            fd.view(-1)[i] = (model(x + e).sum() - model(x - e).sum()) / (2 * eps)
    assert _rel(g, fd) < 1e-6
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 3. double backward is refused, first-order values under create_graph stay right
# ---------------------------------------------------------------------------------------------
def _penalty_model():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    blk = ffebm.DenseHopfield([4, 8, 3], linear_top=True, init_gain=2, steps=400, tol=1e-13,
                              gradient=ffebm.Implicit(tol=1e-13), name="pen").double()
    return lin, blk


@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_penalty_is_refused_naming_the_block(method):
    lin, blk = _penalty_model()
    blk.gradient = METHODS[method]()
    x = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(blk(torch.tanh(lin(x))).sum(), x, create_graph=True)
    assert g.requires_grad  # the graph exists, and leads to the refusal
    with pytest.raises(NotTwiceDifferentiable, match="energy block 'pen' is not twice differentiable"):
        (g ** 2).sum().backward()
    assert lin.weight.grad is None  # nothing silently wrong was accumulated


def test_create_graph_first_order_values_unchanged():
    lin, blk = _penalty_model()
    x = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    g_plain, = torch.autograd.grad(blk(torch.tanh(lin(x))).sum(), x)
    g_graph, = torch.autograd.grad(blk(torch.tanh(lin(x))).sum(), x, create_graph=True)
    torch.testing.assert_close(g_graph.detach(), g_plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 4. torch.func
# ---------------------------------------------------------------------------------------------
def test_torch_func_grad_and_vmap_are_refused_clearly():
    model = hybrid_dense()
    x = torch.rand(3, 5, dtype=torch.float64)
    params = dict(model.named_parameters())

    def loss(p, xx):
        return torch.func.functional_call(model, p, (xx,)).sum()

    with pytest.raises(FunctorchUnsupported, match="energy block '2' cannot run under torch.func"):
        torch.func.grad(loss)(params, x)
    with pytest.raises(FunctorchUnsupported, match="cannot run under torch.func"):
        torch.func.vmap(model)(x.unsqueeze(1))
    # and the model still works normally afterwards
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 7. EP's tolerance follows beta
# ---------------------------------------------------------------------------------------------
def _digits_batch(n):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data[:n] / 16.0, dtype=torch.float64), torch.tensor(d.target[:n])


def _coupling_grad(model, method, x, y):
    ffebm.set_gradient(model, method)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".couplings." in n])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("variant", ["positive", "negative"])
def test_one_sided_ep_small_beta_is_independent_of_the_free_tolerance(variant):
    """With default settings, one-sided EP at beta 1e-3 equals the same estimate on a free phase
    converged to 1e-13 (it was 0.2-0.9 in cosine before the free state was polished)."""
    import models

    x, y = _digits_batch(32)
    torch.manual_seed(0)
    default = models.build("digits").double()
    tight = models.build("digits", tol=1e-13, t1=2000).double()
    tight.load_state_dict(default.state_dict())
    ep = ffebm.EP(1e-3, variant=variant, steps=12)
    g = _coupling_grad(default, ep, x, y)
    g_tight = _coupling_grad(tight, ffebm.EP(1e-3, variant=variant, steps=12, polish=0), x, y)
    assert _cos(g, g_tight) > 0.99999 and _rel(g, g_tight) < 5e-3
    assert all(b.backward_stats.polish is not None and b.backward_stats.polish.converged
               for _, b in ffebm.energy_blocks(default))
    # the polish is what makes it right: without it the default model's estimate is poor
    assert _cos(_coupling_grad(default, ffebm.EP(1e-3, variant=variant, steps=12, polish=0), x, y), g_tight) < 0.95


def test_one_sided_ep_small_beta_against_implicit():
    import models

    x, y = _digits_batch(16)
    cosines = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = models.build("digits").double()
        ref = _coupling_grad(m, ffebm.Implicit(), x, y)
        cosines.append(_cos(_coupling_grad(m, ffebm.EP(1e-3, variant="positive", steps=12), x, y), ref))
    # what is left at beta 1e-3 is EP's own O(beta) bias (units crossing the hard sigmoid's kinks)
    assert max(cosines) >= 0.999 and min(cosines) >= 0.99, cosines


def test_polish_is_skipped_for_centered_ep():
    import models

    x, y = _digits_batch(16)
    torch.manual_seed(0)
    m = models.build("digits").double()
    _coupling_grad(m, ffebm.EP(1e-3), x, y)
    assert all(b.backward_stats.polish is None for _, b in ffebm.energy_blocks(m))


# ---------------------------------------------------------------------------------------------
# 8. a stochastic method's random stream is part of the block's state
# ---------------------------------------------------------------------------------------------
def test_random_ep_sign_stream_round_trips_through_state_dict():
    def signs(blk, n):
        out = []
        for _ in range(n):
            out.append(blk.gradient.nudges()[0] != 0)
        return out

    blk = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(variant="random", seed=5))
    signs(blk, 7)
    sd = copy.deepcopy(blk.state_dict())
    ahead = signs(blk, 20)
    other = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(variant="random", seed=99))
    assert signs(copy.deepcopy(other), 20) != ahead  # a different stream (the check below can fail)
    other.load_state_dict(sd)
    assert signs(other, 20) == ahead
    # saved with torch.save and loaded with weights_only=True
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert signs(other, 20) == ahead


# ---------------------------------------------------------------------------------------------
# siblings found by trying the module as a user would
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["grad-weight", "grad-all", "backward-inputs"])
def test_penalty_refused_whichever_way_it_is_differentiated(how):
    lin, blk = _penalty_model()
    model = nn.Sequential(lin, nn.Tanh(), blk)
    x = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    pen = (g ** 2).sum()
    W = blk.couplings[0].weight
    with pytest.raises(NotTwiceDifferentiable, match="energy block 'pen'"):
        if how == "grad-weight":
            torch.autograd.grad(pen, [W], allow_unused=True)
        elif how == "grad-all":
            torch.autograd.grad(pen, list(model.parameters()))
        else:
            pen.backward(inputs=[W])


def test_functional_call_without_a_transform_differentiates_the_call_parameters():
    model = hybrid_dense(gradient=ffebm.Implicit(tol=1e-12))
    x = torch.rand(3, 5, dtype=torch.float64)
    fast = {k: (1.1 * v).detach().requires_grad_() for k, v in model.named_parameters()}  # "fast weights"
    torch.func.functional_call(model, fast, (x,)).square().sum().backward()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in twin.named_parameters():
            v.copy_(fast[k])
    ref = _grads(twin, twin(x).square().sum())
    for k, v in fast.items():
        assert v.grad is not None and _rel(v.grad, ref[k]) < 1e-9, k
    assert all(p.grad is None for p in model.parameters())  # the module's own tensors were not used


def test_full_bptt_differentiates_the_averaged_output():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([4, 6, 3], relaxation=ffebm.Relaxation(steps=8, tol=None, average_last=5),
                              gradient=ffebm.Unrolled(from_equilibrium=False)).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    blk(x).sum().backward()
    W = blk.couplings[0].weight
    fd = torch.zeros_like(W)
    with torch.no_grad():
        for i in range(W.numel()):
            old = W.view(-1)[i].item()
            W.view(-1)[i] = old + 1e-6
            p = blk(x).sum().item()
            W.view(-1)[i] = old - 1e-6
            m = blk(x).sum().item()
            W.view(-1)[i] = old
            fd.view(-1)[i] = (p - m) / 2e-6
    assert _rel(W.grad, fd) < 1e-7


def test_state_dicts_saved_before_method_state_still_load():
    blk = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(variant="random", seed=1))
    old = {k: v for k, v in blk.state_dict().items() if not k.endswith("_extra_state")}
    fresh = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(variant="random", seed=1))
    assert not fresh.load_state_dict(old).missing_keys


def test_inference_mode_and_no_grad_calls():
    from ffebm.analog import AnalogLinear
    from ffebm.analog.energy import analog_energy_block

    blk = analog_energy_block(ffebm.DenseHopfield([4, 6, 3]), seed=0)
    with torch.inference_mode():
        assert AnalogLinear(3, 2)(torch.rand(2, 3)).shape == (2, 2)
        assert blk(torch.rand(2, 4)).shape == (2, 3)


@pytest.mark.slow
def test_torch_compile_runs_blocks_eagerly_behind_a_graph_break():
    model = hybrid_dense(gradient=ffebm.Implicit(tol=1e-12))
    x = torch.rand(3, 5, dtype=torch.float64)
    ref = _grads(model, model(x).square().sum())
    compiled = torch.compile(model)
    got = _grads(model, compiled(x).square().sum())
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-9, k


def test_editing_the_method_in_place_after_a_call_does_not_change_its_backward():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([4, 6, 3], gradient=ffebm.EP(beta=0.5)).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    ref = _grads(blk, blk(x).sum())
    out = blk(x).sum()
    blk.gradient.beta = 1e-3
    blk.nudge_relaxation.steps = 1
    got = _grads(blk, out)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert blk.backward_stats.method == "EP(beta=0.5, variant=centered)"
