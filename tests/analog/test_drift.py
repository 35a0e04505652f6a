"""Inference drift: PCM-like programming noise, drift, read noise, compensation, evaluation helper."""
import math

import pytest
import torch

from ffebm.analog import (AnalogTile, InvalidSetting, IOConfig, PCMDriftModel, evaluate_over_time)


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
