"""Bad input gets a clear error that names the problem."""
import math
import warnings

import pytest
import torch

import ffebm
from ffebm.gradients import BlockCall


def test_wrong_input_shape_names_expected_shape():
    blk = ffebm.DenseHopfield([64, 32, 10])
    with pytest.raises(ValueError, match=r"expects input of shape \[B, 64\].*got \[4, 30\]"):
        blk(torch.zeros(4, 30))
    conv = ffebm.ConvHopfield(3, 8, [4])
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\].*got \[2, 1, 8, 8\]"):
        conv(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("beta", [0, -0.1, float("nan")])
def test_non_positive_beta_refused(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        ffebm.EP(beta=beta)


@pytest.mark.parametrize("kw", [dict(steps=-1), dict(steps=0), dict(tol=-1.0), dict(mode="fast"),
                                dict(stepper="magic"), dict(check_every=0)])
def test_bad_relaxation_settings_refused(kw):
    with pytest.raises(ValueError, match="Relaxation"):
        ffebm.Relaxation(**kw)


def test_bad_method_settings_refused():
    with pytest.raises(ValueError, match="steps"):
        ffebm.EP(steps=-3)
    with pytest.raises(ValueError, match="variant"):
        ffebm.EP(variant="sideways")
    with pytest.raises(ValueError, match="steps"):
        ffebm.Unrolled(steps=-1)
    with pytest.raises(ValueError, match="solver"):
        ffebm.Implicit(solver="lu")
    with pytest.raises(ValueError, match="sizes"):
        ffebm.DenseHopfield([64])
    with pytest.raises(ValueError, match="pool"):
        ffebm.ConvHopfield(3, 8, [4], pool="median")


def test_nan_relaxation_names_block_and_step():
    blk = ffebm.DenseHopfield([4, 6, 3], linear_top=True, name="enc")
    with torch.no_grad():
        blk.couplings[0].weight[0, 0] = float("nan")
    with pytest.raises(ffebm.RelaxationDiverged, match=r"block 'enc' diverged at step \d+ \(free phase\)") as e:
        blk(torch.ones(2, 4))
    assert e.value.block == "enc" and e.value.step >= 1


def test_budget_hit_warns_with_residual_or_raises_if_strict():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([8, 32, 16], gain=1.0, steps=2, tol=1e-12)
    with pytest.warns(ffebm.ConvergenceWarning, match=r"residual \d\.\d+e[-+]\d+ > tol"):
        blk(torch.rand(3, 8))
    assert blk.stats.converged is False and blk.stats.steps == 2 and math.isfinite(blk.stats.residual)
    strict = ffebm.DenseHopfield([8, 32, 16], gain=1.0, relaxation=ffebm.Relaxation(steps=2, tol=1e-12, strict=True))
    with pytest.raises(ffebm.NotConverged, match="did not converge in 2 steps"):
        strict(torch.rand(3, 8))


def test_stats_and_state_available_after_call():
    blk = ffebm.DenseHopfield([8, 16, 4])
    y = blk(torch.rand(5, 8))
    assert y.shape == (5, 4)
    assert [tuple(s.shape) for s in blk.state] == [(5, 16), (5, 4)]
    assert blk.stats.steps >= 1 and blk.stats.trace and blk.stats.converged


def _saddle_block(coupling=5.0):
    """A state on a face where the energy's Hessian is indefinite (not a minimum)."""
    blk = ffebm.DenseHopfield([3, 3, 3], gain=0.5).double()
    with torch.no_grad():
        blk.couplings[0].weight.copy_(coupling * torch.eye(3))
        blk.couplings[0].bias.zero_()
    u = torch.full((2, 3), 0.5, dtype=torch.float64)
    states = [torch.full((2, 3), 0.1, dtype=torch.float64), torch.full((2, 3), 0.1, dtype=torch.float64)]
    return blk, u, states, torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_implicit_refuses_a_saddle_without_fallback():
    blk, u, states, delta = _saddle_block()
    with pytest.raises(ffebm.AdjointNotConverged, match="not positive definite"):
        ffebm.Implicit(fallback=None).backward(BlockCall.at(blk, u, states), delta)


def test_implicit_falls_back_to_unrolled_on_a_saddle():
    """The fallback is backprop through the block's T2 relaxation steps from the state; checked
    against central finite differences of that very map (T2 steps from the fixed state)."""
    blk, u, states, delta = _saddle_block(coupling=2.5)
    blk.nudge_relaxation = ffebm.Relaxation(steps=1, tol=None)  # before the units saturate
    with pytest.warns(ffebm.ConvergenceWarning, match="falling back"):
        gu, gp = res = ffebm.Implicit().backward(BlockCall.at(blk, u, states), delta)
    assert res.stats.fallback == "unrolled" and res.stats.steps == 1

    def unrolled_output(u_):
        s = [t.clone() for t in states]
        for _ in range(blk.nudge_relaxation.steps):
            s = ffebm.solvers.analytic_step(blk, u_, s, None, blk.relaxation.mode, {})
        return (s[-1] * delta).sum()

    eps = 1e-6
    with torch.no_grad():
        fd_u = torch.zeros_like(u)
        for i in range(u.numel()):
            e = torch.zeros_like(u).view(-1)
            e[i] = eps
            fd_u.view(-1)[i] = (unrolled_output(u + e.view_as(u)) - unrolled_output(u - e.view_as(u))) / (2 * eps)
        w = blk.couplings[0].weight
        fd_w = torch.zeros_like(w)
        for i in range(w.numel()):
            old = w.view(-1)[i].item()
            w.view(-1)[i] = old + eps
            plus = unrolled_output(u)
            w.view(-1)[i] = old - eps
            minus = unrolled_output(u)
            w.view(-1)[i] = old
            fd_w.view(-1)[i] = (plus - minus) / (2 * eps)
    assert fd_u.abs().max() > 0 and fd_w.abs().max() > 0
    torch.testing.assert_close(gu, fd_u, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gp[0], fd_w, rtol=1e-6, atol=1e-9)
