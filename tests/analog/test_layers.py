"""AnalogLinear / AnalogConv2d / AnalogOptimizer / convert_to_analog."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from ffebm.analog import (
    AGAD, AnalogConfig, AnalogConv2d, AnalogLinear, AnalogOptimizer, AnalogSGD, ChoppedTTv2,
    IdealDevice, InvalidSetting, IOConfig, MixedPrecision, SoftBounds, TikiTaka, TTv2,
    analog_parameters, convert_to_analog, digital_parameters,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


IDEAL = AnalogConfig(device=IdealDevice(), io=IOConfig.perfect())
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dev", DEVICES)
def test_linear_matches_nn_linear(dev):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double().to(dev)
    al = AnalogLinear.from_linear(lin, IDEAL)
    assert al.weight.dtype == torch.float64 and al.weight.device.type == dev
    x = torch.randn(4, 7, dtype=torch.float64, device=dev)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = lin(x1), al(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-14)
    t = torch.randn(4, 5, dtype=torch.float64, device=dev)
    ((y1 - t) ** 2).mean().backward()
    ((y2 - t) ** 2).mean().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-14)
    assert al.weight.grad is None  # the update goes through the recorded (x, d) pairs
    torch.testing.assert_close(al.bias.grad, lin.bias.grad, rtol=0, atol=1e-14)
    lr = 0.1
    torch.optim.SGD(lin.parameters(), lr=lr).step()
    AnalogOptimizer(analog_parameters(al), AnalogSGD(), lr=lr).step()
    torch.optim.SGD(digital_parameters(al), lr=lr).step()
    torch.testing.assert_close(al.get_weights()[0], lin.weight.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(al.weight.detach(), lin.weight.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(al.bias.detach(), lin.bias.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dev", DEVICES)
def test_conv_matches_nn_conv2d(dev):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1).double().to(dev)
    ac = AnalogConv2d.from_conv(conv, IDEAL)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=dev)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conv(x1), ac(x2)
    assert y1.shape == y2.shape
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-13)
    t = torch.randn_like(y1)
    ((y1 - t) ** 2).sum().backward()
    ((y2 - t) ** 2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-13)
    lr = 0.01
    torch.optim.SGD(conv.parameters(), lr=lr).step()
    AnalogOptimizer([ac.weight], AnalogSGD(), lr=lr).step()
    torch.optim.SGD([ac.bias], lr=lr).step()
    torch.testing.assert_close(ac.get_weights()[0], conv.weight.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(ac.bias.detach(), conv.bias.detach(), rtol=0, atol=1e-13)


def test_dense_grad_fallback_and_accumulation():
    torch.manual_seed(2)
    lin = nn.Linear(6, 3).double()
    cfg = IDEAL.replace(dense_grad=True)
    a1, a2 = AnalogLinear.from_linear(lin, cfg), AnalogLinear.from_linear(lin, cfg)
    x = torch.randn(5, 6, dtype=torch.float64)
    for _ in range(2):  # two backward passes accumulate before the step
        a1(x).pow(2).sum().backward()
        a2(x).pow(2).sum().backward()
    torch.testing.assert_close(a1.weight.grad, a2.weight.grad)
    a2.weight.analog_ctx.clear()  # a2: only the dense gradient is left -> one-hot fallback
    AnalogOptimizer([a1.weight], lr=0.05).step()
    AnalogOptimizer([a2.weight], lr=0.05).step()
    torch.testing.assert_close(a1.get_weights()[0], a2.get_weights()[0], rtol=0, atol=1e-13)
    ref = lin.weight.detach() - 0.05 * a1.weight.grad
    torch.testing.assert_close(a1.get_weights()[0], ref, rtol=0, atol=1e-13)


def _noisy_model(seed=0):
    torch.manual_seed(seed)
    cfg = AnalogConfig(device=SoftBounds(), io=IOConfig())  # published noisy reads
    return nn.Sequential(AnalogLinear(6, 8, config=cfg, seed=seed), nn.Tanh(),
                         AnalogLinear(8, 3, config=cfg, seed=seed + 1))


@pytest.mark.parametrize("algo", [AnalogSGD(), TikiTaka(), TTv2(), ChoppedTTv2(in_chop_random=True),
                                  AGAD(), MixedPrecision()], ids=lambda a: type(a).__name__)
def test_state_dict_roundtrip_bit_identical(algo, tmp_path):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(12)]

    def train(model, opt, batches):
        for x, t in batches:
            opt.zero_grad()
            ((model(x) - t) ** 2).mean().backward()
            opt.step()

    m1 = _noisy_model()
    o1 = AnalogOptimizer(analog_parameters(m1), algo, lr=0.1, seed=3)
    train(m1, o1, data[:6])
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, tmp_path / "ck.pt")
    torch.manual_seed(123)
    train(m1, o1, data[6:])
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = _noisy_model(seed=9)  # different spread/weights: everything must come from the file
    o2 = AnalogOptimizer(analog_parameters(m2), algo, lr=0.1, seed=11)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    torch.manual_seed(123)
    train(m2, o2, data[6:])
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    for p1, p2 in zip(analog_parameters(m1), analog_parameters(m2)):
        assert torch.equal(p1.analog_ctx.tile.tile_weights(), p2.analog_ctx.tile.tile_weights())
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert _same(s1[k][name], s2[k][name]), name
    for p1, p2 in zip(analog_parameters(m1), analog_parameters(m2)):  # the fast arrays' device spread too
        rt1, rt2 = o1._runtimes[id(p1)], o2._runtimes[id(p2)]
        if hasattr(rt1, "A"):
            assert all(torch.equal(v, rt2.A.params[k]) for k, v in rt1.A.params.items() if isinstance(v, torch.Tensor))


def _same(a, b) -> bool:
    """Equality of nested checkpoint values (tensors, dicts, lists, plain values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.to(b.dtype), b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_invalid_settings_name_field_and_range():
    with pytest.raises(InvalidSetting, match=r"ChoppedTTv2\.in_chop_prob.*\[0, 1\]"):
        ChoppedTTv2(in_chop_prob=1.5)
    with pytest.raises(InvalidSetting, match=r"TTv2\.momentum"):
        TTv2(momentum=1.0)
    with pytest.raises(InvalidSetting, match=r"TikiTaka\.transfer_every.*integer"):
        TikiTaka(transfer_every=0)
    with pytest.raises(InvalidSetting, match=r"TikiTaka\.reference.*symmetry_point"):
        TikiTaka(reference="mean")
    with pytest.raises(InvalidSetting, match=r"MixedPrecision\.thresh"):
        MixedPrecision(thresh=0)
    with pytest.raises(InvalidSetting, match=r"AnalogConfig\.max_size"):
        AnalogConfig(max_size=0)
    with pytest.raises(InvalidSetting, match=r"AnalogConv2d\.groups"):
        AnalogConv2d(4, 4, 3, groups=2)
    with pytest.raises(InvalidSetting, match=r"AnalogOptimizer\.lr"):
        AnalogOptimizer(analog_parameters(AnalogLinear(2, 2)), lr=-1.0)
    with pytest.raises(InvalidSetting, match=r"AnalogOptimizer\.params.*analog weights only"):
        AnalogOptimizer(nn.Linear(2, 2).parameters())
    with pytest.raises(InvalidSetting, match=r"convert_to_analog\.layers"):
        convert_to_analog(nn.Sequential(nn.Linear(2, 2)), layers=["nope"])


def test_convert_to_analog_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 2))
    cfg = AnalogConfig(device=SoftBounds(), io=IOConfig())
    am = convert_to_analog(model, cfg, seed=0)
    assert isinstance(am[0], AnalogConv2d) and isinstance(am[3], AnalogLinear) and isinstance(am[5], AnalogLinear)
    assert isinstance(model[0], nn.Conv2d)  # the original is untouched
    torch.testing.assert_close(am[3].bias, model[3].bias)
    only = convert_to_analog(model, cfg, layers=["3"])
    assert isinstance(only[3], AnalogLinear) and isinstance(only[0], nn.Conv2d) and isinstance(only[5], nn.Linear)
    # tiny synthetic problem: the sign of the mean of the left half minus the right half
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 6, 6, generator=g)
    y = (x[..., :3].mean((1, 2, 3)) > x[..., 3:].mean((1, 2, 3))).long()
    opt_a = AnalogOptimizer(analog_parameters(am), AnalogSGD(), lr=0.1, seed=0)
    opt_d = torch.optim.SGD(digital_parameters(am), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        l0 = loss_fn(am(x), y).item()
    for epoch in range(8):
        for i in range(0, 256, 16):
            opt_a.zero_grad(), opt_d.zero_grad()
            loss_fn(am(x[i:i + 16]), y[i:i + 16]).backward()
            opt_a.step(), opt_d.step()
    with torch.no_grad():
        l1 = loss_fn(am(x), y).item()
    assert l1 < 0.85 * l0, (l0, l1)


def test_gamma_reads_fast_array():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    al = AnalogLinear.from_linear(lin, AnalogConfig(device=SoftBounds(), io=IOConfig.perfect()))
    opt = AnalogOptimizer([al.weight], TikiTaka(gamma=0.5, transfer_every=1000), lr=0.1, seed=0)
    x = torch.randn(8, 4, dtype=torch.float64)
    al(x).sum().backward()
    opt.step()
    rt = al.weight.analog_ctx.runtime
    W = al.tile.get_weights() + 0.5 * (rt.A.w - rt.tensors["ref"])
    torch.testing.assert_close(al(x), x @ W.t() + al.bias, rtol=0, atol=1e-12)
