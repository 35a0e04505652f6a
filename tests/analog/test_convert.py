"""convert_to_analog / convert_to_digital: grouped and 1-d convolutions, padding forms, layers it
cannot map, exclusions, clear errors, and the round trip back to digital."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from ffebm.analog import (AnalogConfig, AnalogConv1d, AnalogConv2d, AnalogGroupedConv, AnalogLinear,
                          AnalogOptimizer, AnalogSGD, IdealDevice, InvalidSetting, IOConfig, SoftBounds,
                          analog_parameters, convert_to_analog, convert_to_digital)
from ffebm.analog.convert import UnsupportedLayers

EXACT = AnalogConfig(device=IdealDevice(), io=IOConfig.perfect())


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),            # depthwise
    lambda: nn.Conv2d(3, 5, 3, padding="same"),
    lambda: nn.Conv2d(3, 5, (2, 4), padding="same", dilation=(1, 2)),       # asymmetric "same"
    lambda: nn.Conv2d(3, 5, 3, padding="valid", stride=2),
    lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular"),
    lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="replicate"),
    lambda: nn.Conv1d(3, 5, 3, padding=1),
    lambda: nn.Conv1d(3, 5, 4, padding="same", dilation=2),
    lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2),
], ids=["grouped", "depthwise", "same", "same-asym", "valid", "reflect", "circular", "replicate", "1d",
        "1d-same", "1d-grouped"])
def test_conv_forms_match_torch_in_value_and_gradient(make):
    torch.manual_seed(0)
    conv = make().double()
    a = convert_to_analog(conv, EXACT)
    expected = AnalogGroupedConv if conv.groups > 1 else (AnalogConv1d if isinstance(conv, nn.Conv1d) else AnalogConv2d)
    assert isinstance(a, expected)
    if conv.groups > 1:
        assert len(a.groups_) == conv.groups  # one tile per group
    shape = (2, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else (2, conv.in_channels, 9, 8)
    x = torch.randn(shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conv(x1), a(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-12)
    t = torch.randn_like(y1)
    (y1 * t).sum().backward()
    (y2 * t).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)
    # the pulsed update on the ideal device is the dense SGD step, group by group
    lr = 0.05
    torch.optim.SGD([conv.weight], lr=lr).step()
    AnalogOptimizer(analog_parameters(a), AnalogSGD(), lr=lr).step()
    torch.testing.assert_close(a.get_weights()[0], conv.weight.detach(), rtol=0, atol=1e-12)
    back = convert_to_digital(a)
    assert type(back) is type(conv) and back.groups == conv.groups
    torch.testing.assert_close(back(x), a(x), rtol=0, atol=1e-12)


def test_mobilenet_v2_converts_with_grouped_convs():
    tv = pytest.importorskip("torchvision")
    net = tv.models.mobilenet_v2(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedLayers)  # everything in it can be mapped
        a = convert_to_analog(net, AnalogConfig(), seed=0)
    kinds = {type(m).__name__ for m in a.modules()}
    assert {"AnalogGroupedConv", "AnalogConv2d", "AnalogLinear"} <= kinds
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in a.modules())
    a.eval()
    with torch.no_grad():
        assert a(torch.rand(1, 3, 32, 32)).shape == (1, 10)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(1, 2, 1)
        self.up = nn.ConvTranspose2d(2, 2, 2)
        self.attn = nn.MultiheadAttention(4, 2)
        self.fc = nn.Linear(4, 2)


def test_unsupported_layers_stay_digital_with_one_warning():
    m = _Odd()
    with pytest.warns(UnsupportedLayers) as rec:
        a = convert_to_analog(m)
    assert len([w for w in rec if issubclass(w.category, UnsupportedLayers)]) == 1
    msg = str(rec[0].message)
    for name in ("c3 (Conv3d)", "up (ConvTranspose2d)", "attn.out_proj (NonDynamicallyQuantizableLinear)"):
        assert name in msg, msg
    assert isinstance(a.fc, AnalogLinear) and isinstance(a.c3, nn.Conv3d) and type(a.attn.out_proj) is not AnalogLinear
    with pytest.raises(InvalidSetting, match="Conv3d"):
        convert_to_analog(m, skip_unsupported=False)
    assert isinstance(m.fc, nn.Linear)  # nothing converted on the original


def test_exclude_keeps_layers_digital():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Linear(8, 2))
    a = convert_to_analog(net, EXACT, exclude=["0", "4"])
    assert isinstance(a[0], nn.Conv2d) and isinstance(a[3], AnalogLinear) and isinstance(a[4], nn.Linear)
    b = convert_to_analog(net, EXACT, exclude=[nn.Conv2d])
    assert isinstance(b[0], nn.Conv2d) and isinstance(b[4], AnalogLinear)
    with pytest.raises(InvalidSetting, match="nope"):
        convert_to_analog(net, EXACT, exclude=["nope"])


def test_device_where_a_config_belongs_is_a_short_clear_error():
    with pytest.raises(InvalidSetting) as ei:
        convert_to_analog(nn.Linear(3, 2), SoftBounds())
    msg = str(ei.value)
    assert "AnalogConfig(device=SoftBounds())" in msg and len(msg) < 300, msg


def test_analog_conv_rejects_groups_with_a_pointer():
    with pytest.raises(InvalidSetting, match="AnalogGroupedConv"):
        AnalogConv2d(4, 4, 3, groups=2)
    with pytest.raises(InvalidSetting, match="stride 1"):
        AnalogConv1d(2, 2, 3, padding="same", stride=2)


def test_convert_to_digital_of_an_energy_block():
    import ffebm
    from ffebm.analog import AnalogEP, to_analog_energy
    from ffebm.couplings import DenseCoupling
    from ffebm.gradients.ep import EP

    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 8, 4], steps=30, nudge_steps=10).double()
    a = to_analog_energy(blk, EXACT)
    assert isinstance(a.gradient, AnalogEP)
    d = convert_to_digital(a)
    assert all(type(c) is DenseCoupling for c in d.couplings) and type(d.gradient) is EP
    x = torch.rand(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(d(x), blk(x), rtol=0, atol=1e-10)


def test_convert_to_digital_uses_effective_weights_and_loads_strictly():
    """With Tiki-Taka (gamma > 0) the reads see C + gamma (A - ref): the digital twin holds that."""
    from ffebm.analog import TikiTaka

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    a = convert_to_analog(net, AnalogConfig(device=SoftBounds(), io=IOConfig.perfect()), seed=0)
    opt = AnalogOptimizer(analog_parameters(a), TikiTaka(gamma=0.5), lr=0.05, seed=0)
    for _ in range(3):
        opt.zero_grad()
        (a(torch.rand(8, 5)) ** 2).sum().backward()
        opt.step()
    assert not torch.equal(a[0].effective_weight(), a[0].get_weights()[0])  # A contributes
    d = convert_to_digital(a)
    x = torch.rand(6, 5)
    with torch.no_grad():
        torch.testing.assert_close(d(x), a(x), rtol=1e-5, atol=1e-6)
    fresh = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    fresh.load_state_dict(d.state_dict())  # strict: same keys as the original digital model
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), d(x))
