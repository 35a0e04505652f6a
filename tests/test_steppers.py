"""Analytic steppers against the autograd stepper (gradient of the primitive function)."""
import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.solvers import analytic_step, autograd_step


def three_block_model(pool: str) -> nn.Module:
    torch.manual_seed(0)
    b1 = ffebm.ConvHopfield(3, 8, [4, 5], pool=[pool, pool], input_bn=True)
    b2 = ffebm.ConvHopfield(5, 2, [6, 6], pool=["none", "none"], input_bn=True)
    b3 = ffebm.ConvHopfield(6, 2, [6], pool="none", dense=[7, 4], linear_top=True, input_bn=False)
    model = nn.Sequential(b1, b2, b3).double()
    list(ffebm.energy_blocks(model))
    return model


def block_inputs(model, x):
    """Each block's driving input u = input_map(block input)."""
    us = []
    h = x
    with torch.no_grad():
        for blk in model:
            us.append(blk.input_map(h))
            h = blk(h)
    return us


@pytest.mark.parametrize("pool", ["max", "avg", "soft"])
@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("nudged", [False, True])
def test_analytic_matches_autograd_every_block(pool, mode, nudged):
    model = three_block_model(pool)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    us = block_inputs(model, x)
    g = torch.Generator().manual_seed(1)
    for k, (blk, u) in enumerate(zip(model, us)):  # first, intermediate and last block
        s = [torch.rand((3, *sh), generator=g, dtype=torch.float64) for sh in blk.layer_shapes]
        nudge = 0.3 * torch.randn((3, *blk.layer_shapes[-1]), generator=g, dtype=torch.float64) if nudged else None
        cache: dict = {}
        for _ in range(3):  # several steps: the cached pooling contexts must stay consistent
            a = analytic_step(blk, u, s, nudge, mode, cache)
            b = autograd_step(blk, u, s, nudge, mode, {})
            for la, lb in zip(a, b):
                assert (la - lb).abs().max() < 1e-6, (k, pool, mode, nudged)
            s = a


def test_nudge_sign_lowers_the_nudged_energy():
    """A positive nudge along delta must decrease <delta, s_top> (E + beta <delta, s> is minimised)."""
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([5, 8, 6], linear_top=True).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    u = blk.input_map(x).detach()
    s, _ = blk.solve(u)
    delta = torch.randn(4, 6, dtype=torch.float64)
    cfg = ffebm.Relaxation(steps=200, tol=None)
    sp, _ = blk.solve(u, states=s, nudge=0.1 * delta, config=cfg)
    sm, _ = blk.solve(u, states=s, nudge=-0.1 * delta, config=cfg)
    assert (delta * sp[-1]).sum() < (delta * s[-1]).sum() < (delta * sm[-1]).sum()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_equilibrium_is_an_energy_minimum_and_steppers_agree(mode):
    torch.manual_seed(2)
    blk = ffebm.DenseHopfield([5, 8, 6, 4], init_gain=0.8,
                              relaxation=ffebm.Relaxation(steps=2000, tol=1e-12, mode=mode)).double()
    u = blk.input_map(torch.randn(3, 5, dtype=torch.float64)).detach()
    s, st = blk.solve(u)
    assert st.converged and st.residual <= 1e-12
    s2, _ = blk.solve(u, config=ffebm.Relaxation(steps=2000, tol=1e-12, mode=mode, stepper="autograd"))
    for a, b in zip(s, s2):
        assert (a - b).abs().max() < 1e-9
    e0 = blk.energy(s, u)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):  # feasible perturbations never lower the energy
        p = [torch.clamp(t + 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype), 0, 1) for t in s]
        assert blk.energy(p, u) >= e0 - 1e-12


def test_async_settles_in_fewer_steps_than_sync():
    torch.manual_seed(3)
    blk = ffebm.DenseHopfield([20, 64, 64, 32], gain=1.0).double()
    u = blk.input_map(torch.randn(8, 20, dtype=torch.float64)).detach()
    cfg = dict(steps=3000, tol=1e-8)
    _, sa = blk.solve(u, config=ffebm.Relaxation(mode="async", **cfg))
    _, ss = blk.solve(u, config=ffebm.Relaxation(mode="sync", **cfg))
    assert sa.converged
    assert sa.steps < ss.steps or not ss.converged


def test_average_last_returns_mean_of_last_states():
    torch.manual_seed(4)
    blk = ffebm.DenseHopfield([5, 8, 6]).double()
    u = blk.input_map(torch.randn(3, 5, dtype=torch.float64)).detach()
    seen = []
    cfg = ffebm.Relaxation(steps=7, tol=None, average_last=3)
    s, _ = blk.solve(u, config=cfg, callback=lambda k, st: seen.append([t.clone() for t in st]))
    for i in range(2):
        want = torch.stack([seen[k][i] for k in (4, 5, 6)]).mean(0)
        assert torch.allclose(s[i], want)
    with pytest.raises(ValueError, match="average_last"):
        ffebm.Relaxation(average_last=-1)
