"""Inference drift: PCM-like programming noise, drift, read noise, compensation, evaluation helper."""
import math

import pytest
import torch

from ffebm.analog import (AnalogTile, IdealDevice, InvalidSetting, IOConfig, PCMDriftModel,
                          evaluate_over_time)
from ffebm.analog.drift import drift_compensation_factor


def test_programming_noise_and_drift_statistics():
    nm = PCMDriftModel()
    g = torch.Generator().manual_seed(0)
    w = torch.full((200, 200), 0.5)
    w[0, 0] = 1.0  # scale = 1 -> g_T = 12.5 uS for the rest
    pw = nm.program(w, g)
    gt = 12.5
    sig = 0.26348 + 1.9650 * 0.5 - 1.1731 * 0.25
    dg = pw.g_pos[1:] - gt
    assert abs(float(dg.std()) - sig) < 0.05 * sig and abs(float(dg.mean())) < 0.02
    # drift exponent statistics at g~ = 0.5
    mu = min(max(-0.0155 * math.log(0.5) + 0.0244, 0.049), 0.1)
    s = min(max(-0.0125 * math.log(0.5) - 0.0059, 0.008), 0.045)
    assert abs(float(pw.nu_pos[1:].mean()) - mu) < 0.002 and abs(float(pw.nu_pos[1:].std()) - s) < 0.002
    # conductance decays as ((t + t0)/t0)^-nu (no read noise)
    quiet = nm.replace(read_noise_scale=0.0)
    t = 3600.0
    gd = quiet.conductance_at(pw.g_pos, pw.gt_pos, pw.nu_pos, t)
    assert torch.allclose(gd, pw.g_pos * ((t + 20) / 20) ** (-pw.nu_pos))
    # mean |w| shrinks over time
    w1 = quiet.weights_at(pw, 1.0).abs().mean()
    w2 = quiet.weights_at(pw, 86400.0).abs().mean()
    assert w2 < 0.8 * w1


def test_read_noise_grows_with_time():
    nm = PCMDriftModel(prog_noise_scale=0.0, drift_scale=0.0)
    g = torch.Generator().manual_seed(1)
    w = torch.full((300, 300), 0.3)
    w[0, 0] = 1.0
    pw = nm.program(w, g)
    e1 = (nm.weights_at(pw, 1.0, g) - w)[1:].std()
    e2 = (nm.weights_at(pw, 1e6, g) - w)[1:].std()
    q = 0.0088 / 0.3 ** 0.65
    expect2 = 0.3 * q * math.sqrt(math.log((1e6 + 20 + 250e-9) / (2 * 250e-9)))
    assert e2 > e1 and abs(float(e2) - expect2) < 0.1 * expect2


def test_invalid_drift_settings():
    with pytest.raises(InvalidSetting, match="t0"):
        PCMDriftModel(t0=0.0)
    with pytest.raises(InvalidSetting, match="g_max"):
        PCMDriftModel(g_max=-1.0)
    for bad in (0, -3, 2.5, float("nan"), True):
        with pytest.raises(InvalidSetting, match="compensation_probes"):
            PCMDriftModel(compensation_probes=bad)
    assert PCMDriftModel(compensation_probes=16.0).compensation_probes == 16


def test_evaluate_over_time_compensation_and_restore():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t1 = AnalogTile(16, 32, seed=0, io=IOConfig.perfect())
            self.extra = {"tile": AnalogTile(8, 16, seed=1, io=IOConfig.perfect())}

        def forward(self, x):
            return self.extra["tile"](torch.relu(self.t1(x)))

    net = Net()
    net.t1.set_weights(0.1 * torch.randn(16, 32))
    net.extra["tile"].set_weights(0.1 * torch.randn(8, 16))
    x = torch.rand(64, 32)
    ref = net(x).detach()
    before = [net.t1.get_weights().clone(), net.extra["tile"].get_weights().clone()]

    def err(model):
        return float(((model(x) - ref) ** 2).mean() / (ref ** 2).mean())

    times = [1.0, 3600.0, 86400.0 * 365]
    nm = PCMDriftModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    raw = evaluate_over_time(net, err, times, nm, compensation=False, seed=3)
    comp = evaluate_over_time(net, err, times, nm, compensation=True, seed=3)
    assert [r["t"] for r in raw] == times
    assert raw[-1]["result"] > raw[0]["result"]  # drift hurts more with time
    assert comp[-1]["result"] < raw[-1]["result"]  # compensation helps
    assert all(f > 1 for f in comp[-1]["compensation"])
    # trained weights restored
    assert torch.equal(net.t1.get_weights(), before[0])
    assert torch.equal(net.extra["tile"].get_weights(), before[1])
    # reproducible from the seed
    again = evaluate_over_time(net, err, times, PCMDriftModel(), seed=5)
    again2 = evaluate_over_time(net, err, times, PCMDriftModel(), seed=5)
    assert [r["result"] for r in again] == [r["result"] for r in again2]
    with pytest.raises(ValueError):
        evaluate_over_time(torch.nn.Linear(2, 2), err, times)


# -- global drift compensation for any weight matrix (signed, zero-sum, sparse) -------------------

DAY = 86400.0
ZERO_SUM = [[0.5, -0.5], [-0.3, 0.3]]
NONZERO_SUM = [[0.5, 0.2], [0.1, 0.4]]


def _tile(w):
    w = torch.as_tensor(w, dtype=torch.float32)
    tile = AnalogTile(w.shape[0], w.shape[1], IdealDevice(), io=IOConfig.perfect())
    tile.set_weights(w)
    return tile, w


def _drift_only_day(w, seed=0):
    """(relative output error after one day, compensation factor): drift only, perfect reads."""
    tile, w = _tile(w)
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(123))
    y0 = x @ w.t()

    def rel_err(model):
        return float((model(x) - y0).norm() / y0.norm())

    nm = PCMDriftModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    r = evaluate_over_time(tile, rel_err, [DAY], nm, seed=seed)[0]
    return r["result"], r["compensation"][0]


def test_compensation_zero_sum_rows():
    # all-ones reference: W 1 = 0 -> factor 0, relative error 1.0; now ~1.52 and ~0.10
    err, f = _drift_only_day(ZERO_SUM)
    assert math.isfinite(f) and f > 1.0
    assert err < 0.15


def test_compensation_any_matrix_close_to_nonzero_sum_case():
    base, f_base = _drift_only_day(NONZERO_SUM)
    assert f_base > 1.0 and base < 0.15
    g = torch.Generator().manual_seed(7)
    cases = {
        "zero-sum": ZERO_SUM,
        "sparse": [[0.0, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, -0.4]],
        "signed 16x32": 0.1 * torch.randn(16, 32, generator=g),
    }
    for name, w in cases.items():
        err, f = _drift_only_day(w)
        assert math.isfinite(f) and f > 1.0, (name, f)
        assert abs(err - base) < 0.1, (name, err, base)


def test_compensation_reference_uses_fixed_probes():
    # the reference is the mean |W x_k| over the fixed calibration probes, whatever the noise seed
    from ffebm.analog.drift import compensation_probes
    w = torch.tensor(ZERO_SUM)
    nm = PCMDriftModel(prog_noise_scale=0.0, read_noise_scale=0.0, compensation_probes=64)
    x = compensation_probes(64, 2, w)
    assert x.shape == (64, 2) and float(x.abs().max()) <= 1.0 and float(x.min()) < 0 < float(x.max())
    assert torch.equal(x, compensation_probes(64, 2, w))
    for seed in (0, 1):
        pw = nm.program(w, torch.Generator().manual_seed(seed))
        assert pw.probes == 64
        assert torch.allclose(pw.reference, (x @ w.t()).abs().mean())
        assert float(drift_compensation_factor(pw, w)) == pytest.approx(1.0)
        assert float(drift_compensation_factor(pw, 0.5 * w)) == pytest.approx(2.0)
        assert float(drift_compensation_factor(pw, torch.zeros_like(w))) == 1.0  # undefined -> 1


def _noisy_factors(w):
    tile, _ = _tile(w)
    return [evaluate_over_time(tile, lambda m: None, [DAY], PCMDriftModel(), seed=s)[0]["compensation"][0]
            for s in range(10)]


def test_compensation_factor_stable_across_seeds():
    # default (noisy) model, seeds 0..9. Measured: zero-sum 2x2 1.417..1.572 (all-ones read:
    # 0.300..2.916); signed 8x8 1.448..1.539, spread 0.091 (all-ones read: spread 0.259).
    fs = _noisy_factors(ZERO_SUM)
    assert all(1.3 < f < 1.7 for f in fs), fs
    assert max(fs) - min(fs) < 0.25
    fs = _noisy_factors(0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(11)))
    assert all(1.3 < f < 1.7 for f in fs), fs
    assert max(fs) - min(fs) < 0.15
