"""Deployment of inference layers: programming, the drift law, global drift compensation,
restoring the trained weights, evaluation over time."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ffebm.analog import (InferenceConfig, InferenceLinear, PCMDriftModel, ProgrammedWeightChanged, deployed,
                          drift_to, evaluate_over_time, program, unprogram)
from ffebm.analog.drift import compensation_probes

DAY = 86400.0


def _layer(w, nm, **kw):
    m = InferenceLinear(w.shape[1], w.shape[0], bias=False, config=InferenceConfig.perfect(noise_model=nm, **kw),
                        seed=0, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
    return m.eval()


def test_drift_law_and_compensation_on_a_known_matrix():
    """No programming or read noise: W(t) = (g+ d+ - g- d-) / g_max * max|W| with
    d = ((t + t0) / t0)^-nu per device, outputs scaled by ref / mean|W(t) x_k|."""
    w = torch.tensor([[0.5, -0.25, 1.0], [-1.0, 0.125, 0.0]], dtype=torch.float64)
    nm = PCMDriftModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    m = _layer(w, nm)
    program(m, seed=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    pw = m.deployment.programmed
    assert torch.allclose(m(x), x @ w.t(), atol=1e-12)  # programmed exactly (no programming noise)
    t = DAY
    d_pos = ((t + 20.0) / 20.0) ** (-pw.nu_pos)
    d_neg = ((t + 20.0) / 20.0) ** (-pw.nu_neg)
    w_t = (w.clamp(min=0) * d_pos - (-w).clamp(min=0) * d_neg)  # g = |w| / max|W| * g_max, back to weights
    (f,) = drift_to(m, t, compensation=False)
    assert f == 1.0 and torch.allclose(m(x), x @ w_t.t(), atol=1e-12)
    (f,) = drift_to(m, t)
    probes = compensation_probes(128, 3, w)
    expect = float((probes @ w.t()).abs().mean() / (probes @ w_t.t()).abs().mean())
    assert abs(f - expect) < 1e-12 and f > 1.2
    assert torch.allclose(m(x), f * (x @ w_t.t()), atol=1e-12)
    # the drift exponents follow the published law at g~ = 1: mu = 0.049 (clipped), s = 0.008
    big = _layer(torch.ones(200, 200, dtype=torch.float64), PCMDriftModel(prog_noise_scale=0.0))
    program(big, seed=0)
    nu = big.deployment.programmed.nu_pos
    assert abs(float(nu.mean()) - 0.049) < 0.001 and abs(float(nu.std()) - 0.008) < 0.001


@torch.no_grad()
def test_compensation_restores_the_output_scale_after_a_year():
    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.float64).sign() * 0.1  # every device at g_max: one drift law
    x = torch.randn(256, 64, dtype=torch.float64)
    m = _layer(w, PCMDriftModel())
    ref = x @ w.t()
    program(m, seed=1)
    drift_to(m, 365 * DAY, compensation=False)
    raw = (m(x) - ref).norm() / ref.norm()
    shrink = float(m(x).abs().mean() / ref.abs().mean())
    drift_to(m, 365 * DAY)
    comp = (m(x) - ref).norm() / ref.norm()
    expect = ((365 * DAY + 20) / 20) ** (-0.049)  # mean drift factor at g~ = 1
    # what is left after compensation is the device-to-device spread (drift exponents, programming
    # and 1/f read noise, ~13 % after a year at g_max), not the common decay (~50 %)
    assert abs(shrink - expect) < 0.02 and comp < 0.2 < 0.4 < raw


def test_program_is_reversible_and_refuses_a_changed_weight():
    torch.manual_seed(1)
    m = InferenceLinear(16, 8, config=InferenceConfig.perfect(), seed=0).eval()
    x = torch.randn(5, 16)
    digital = F.linear(x, m.weight, m.bias)
    with deployed(m, seed=0):
        noisy = m(x)
        assert not torch.allclose(noisy, digital, atol=1e-4)  # programming noise
        drift_to(m, 3600.0)
        m.train()
        assert not torch.allclose(m(x), digital, atol=1e-4)  # programmed weights in train mode too
        m.eval()
    assert m.deployment is None and torch.equal(m(x), digital)
    program(m, seed=0)
    assert torch.equal(m(x), noisy)  # the same seed, the same chip
    with torch.no_grad():
        m.weight.add_(0.1)
    with pytest.raises(ProgrammedWeightChanged, match="unprogram"):
        m(x)
    assert unprogram(m) == 1 and unprogram(m) == 0
    with pytest.raises(RuntimeError, match="program"):
        drift_to(m, 1.0)
    with pytest.raises(ValueError, match="no inference layers"):
        program(nn.Linear(2, 2))


def test_evaluate_over_time_draws_mean_spread_and_restore():
    torch.manual_seed(2)
    net = nn.Sequential(InferenceLinear(20, 10, config=InferenceConfig.perfect(), seed=0))
    x = torch.randn(64, 20)
    y = net(x).detach()
    loss = lambda model: F.mse_loss(model(x), y).item()  # noqa: E731
    times = [0.0, DAY, 30 * DAY]
    a = evaluate_over_time(net, loss, times, draws=4, seed=5)
    b = evaluate_over_time(net, loss, times, draws=4, seed=5)
    assert [r["results"] for r in a] == [r["results"] for r in b]
    assert all(len(r["results"]) == 4 and len(r["compensation"]) == 4 for r in a)
    r = a[1]
    vals = torch.tensor(r["results"], dtype=torch.float64)
    assert math.isclose(r["mean"], float(vals.mean()), rel_tol=1e-12)
    assert math.isclose(r["std"], float(vals.std()), rel_tol=1e-12) and r["std"] > 0
    assert len(set(r["results"])) == 4  # four programming draws
    assert net[0].deployment is None and torch.equal(net(x), y)  # trained weights restored
    one = evaluate_over_time(net, loss, times, seed=5)  # one draw: draw 0 above (same seed)
    assert [r["results"] for r in one] == [[r["results"][0]] for r in a] and one[1]["std"] == 0.0


def test_programmed_state_is_checkpointed_and_drifts_on_after_reloading(tmp_path):
    """A programmed, drifted model saved with torch.save(state_dict) and loaded (weights_only)
    into a fresh model reads the same outputs, and drift_to(t) then gives the same weights, factor
    and outputs as the original (the 1/f read-noise stream is part of the state)."""
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(InferenceLinear(12, 8, config=InferenceConfig(), seed=seed), nn.Tanh(),
                             InferenceLinear(8, 4, config=InferenceConfig(), seed=seed + 1)).eval()

    net = make(0)
    x = torch.rand(16, 12)
    program(net, seed=3)
    drift_to(net, 3600.0)
    torch.save(net.state_dict(), tmp_path / "chip.pt")
    fresh = make(1)
    fresh.load_state_dict(torch.load(tmp_path / "chip.pt", weights_only=True))
    assert all(m.deployment is not None and m.deployment.t == 3600.0 for m in (fresh[0], fresh[2]))
    assert torch.equal(fresh(x), net(x))  # same chip state, same read-noise draws
    assert drift_to(fresh, DAY) == drift_to(net, DAY)
    for a, b in zip((fresh[0], fresh[2]), (net[0], net[2])):
        assert torch.equal(a.deployment.w_read, b.deployment.w_read) and torch.equal(a.weight, b.weight)
    assert torch.equal(fresh(x), net(x))
    # an unprogrammed state loaded into a programmed model: the trained weights again
    unprogram(net)
    fresh.load_state_dict(net.state_dict())
    assert fresh[0].deployment is None and torch.equal(fresh(x), net(x))
    # a chip state of another shape is refused by name
    program(net, seed=3)
    sd = net.state_dict()
    sd["0._extra_state"]["deployment"]["trained"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="chip state"):
        make(2).load_state_dict(sd)
