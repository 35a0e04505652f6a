"""Accelerated free relaxations (feedforward start, over-relaxation, Anderson mixing): same
equilibrium, same gradients (against Implicit at a plain tight solve), fewer sweeps where the plain
map is slow, clear errors for bad settings."""
import dataclasses

import pytest
import torch

import ffebm
from ffebm.acceleration import AndersonMixer, feedforward_state, overrelaxed
from ffebm.solvers import analytic_step

from helpers import batch, hybrid_dense, loss_fn

VARIANTS = [{"init": "feedforward"}, {"overrelax": 1.5}, {"anderson": 4}, {"init": "feedforward", "anderson": 5}]


def slow_block(init_gain: float = 1.5, seed: int = 0):
    """A dense block whose plain relaxation needs hundreds of sweeps (strong couplings)."""
    torch.manual_seed(seed)
    blk = ffebm.DenseHopfield([20, 40, 30, 20], gain=0.5, init_gain=init_gain).double()
    u = blk.input_map(torch.randn(16, 20, dtype=torch.float64)).detach()
    return blk, u


def rel(a, b) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-300)) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", VARIANTS)
def test_accelerated_solve_reaches_the_plain_equilibrium(kw):
    blk, u = slow_block()
    plain = ffebm.Relaxation(steps=5000, tol=1e-11, check_every=1)
    ref, _ = blk.solve(u, config=dataclasses.replace(plain, tol=1e-13))
    s, st = blk.solve(u, config=dataclasses.replace(plain, **kw))
    assert st.converged
    assert rel(s, ref) < 1e-8


@pytest.mark.parametrize("kw", [{"overrelax": 1.6}, {"anderson": 4}])
def test_acceleration_cuts_the_sweeps_of_a_slow_block_by_half_or_more(kw):
    blk, u = slow_block()
    cfg = ffebm.Relaxation(steps=5000, tol=1e-10, check_every=1)
    _, plain = blk.solve(u, config=cfg)
    _, fast = blk.solve(u, config=dataclasses.replace(cfg, **kw))
    assert plain.steps > 200
    assert fast.converged and fast.steps <= plain.steps // 2, (plain.steps, fast.steps)


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("method", ["ep", "implicit"])
def test_gradients_with_accelerated_free_phase_match_implicit(kw, method):
    """The gradient of the model with every block's free phase accelerated equals the exact
    gradient (Implicit at a plain tight solve): EP to its O(beta^2) bias, Implicit to the tol."""
    x, y = batch()
    ref_model = hybrid_dense(seed=3)
    g_ref = torch.autograd.grad(loss_fn(ref_model(x), y), list(ref_model.parameters()))
    grad = ffebm.EP(beta=1e-4, variant="centered") if method == "ep" else ffebm.Implicit(tol=1e-12)
    model = hybrid_dense(seed=3, gradient=grad)
    for _, blk in ffebm.energy_blocks(model):
        blk.relaxation = dataclasses.replace(blk.relaxation, tol=1e-12, **kw)
        if method == "ep":
            blk.nudge_relaxation = dataclasses.replace(blk.nudge_relaxation, steps=300, tol=None, strict=False)
    g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for a, b in zip(g, g_ref):
        err = float((a - b).norm() / b.norm().clamp_min(1e-300))
        assert err < (1e-6 if method == "ep" else 1e-8), err


def test_overrelaxed_update_is_the_projected_formula():
    s = torch.tensor([0.2, 0.9, 0.5, 0.0], dtype=torch.float64)
    v = torch.tensor([0.8, 3.0, -1.0, 0.6], dtype=torch.float64)
    out = overrelaxed(s.clone(), v, 0.5, 1.5, bounded=True)
    expect = (s + 1.5 * (0.5 * v - s)).clamp(0, 1)
    assert torch.equal(out, expect)
    assert out[1] == 1.0 and out[2] == 0.0                     # projected onto the box
    lin = overrelaxed(s.clone(), v, 0.5, 1.5, bounded=False)
    assert torch.allclose(lin, s + 1.5 * (0.5 * v - s))      # a linear top layer is not clipped


def test_omega_one_is_the_plain_step_bit_for_bit():
    blk, u = slow_block()
    g = torch.Generator().manual_seed(0)
    s = [torch.rand(16, n, generator=g, dtype=torch.float64) for n in (40, 30, 20)]
    for mode in ("async", "sync"):
        a = analytic_step(blk, u, s, None, mode, {})
        b = analytic_step(blk, u, s, None, mode, {}, 1.0)
        c = analytic_step(blk, u, s, None, mode, {}, 1.3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_feedforward_start_is_one_bottom_up_pass():
    blk, u = slow_block()
    s = feedforward_state(blk, u)
    assert torch.equal(s[0], blk.activate(0, u))
    for i, c in enumerate(blk.couplings):
        assert torch.allclose(s[i + 1], blk.activate(i + 1, c.bottom_up(s[i])[0]))
    _, st = blk.solve(u, config=ffebm.Relaxation(steps=1, tol=None, init="feedforward"))
    assert st.steps == 1


def test_anderson_keeps_converged_samples_and_bounds():
    """A sample already at its fixed point has zero residuals (a singular Gram matrix): the
    mixer must return it unchanged, and every mixed state stays inside the box."""
    blk, u = slow_block()
    s_eq, _ = blk.solve(u, config=ffebm.Relaxation(steps=5000, tol=1e-13, check_every=1))
    mixer = AndersonMixer(blk, 3)
    s = [t.clone() for t in s_eq]
    s[1][1:] = 0.5  # samples 1.. off their fixed point, sample 0 on it
    for _ in range(6):
        with torch.no_grad():
            new = analytic_step(blk, u, s, None, "async", {})
            s = mixer(s, new)
        for i, t in enumerate(s):
            assert torch.isfinite(t).all()
            if blk.bounded(i):
                assert t.min() >= 0 and t.max() <= 1
    assert rel([t[:1] for t in s], [t[:1] for t in s_eq]) < 1e-10


@pytest.mark.parametrize("kw, words", [({"overrelax": 2.0}, "overrelax"), ({"overrelax": 0}, "overrelax"),
                                       ({"anderson": 1}, "anderson"), ({"anderson": -2}, "anderson"),
                                       ({"anderson": 1000}, "anderson"),
                                       ({"init": "ones"}, "init")])
def test_bad_settings_are_named(kw, words):
    with pytest.raises(ValueError, match=words):
        ffebm.Relaxation(**kw)


def test_set_acceleration_touches_free_phases_only():
    model = hybrid_dense()
    before = {n: b.nudge_relaxation for n, b in ffebm.energy_blocks(model)}
    ffebm.set_acceleration(model, init="feedforward", anderson=3)
    for n, b in ffebm.energy_blocks(model):
        assert (b.relaxation.init, b.relaxation.anderson, b.relaxation.overrelax) == ("feedforward", 3, 1.0)
        assert b.nudge_relaxation is before[n]
