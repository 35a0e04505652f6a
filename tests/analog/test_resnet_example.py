"""The README's analog example, end to end: a torchvision ResNet-18 (10 classes, 32x32 inputs)
with one energy block inserted, on tiles, trained a few steps with the one optimizer, saved,
loaded into a fresh conversion, and converted back to digital."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ffebm
from ffebm.analog import (AnalogConfig, AnalogOptimizer, ChoppedTTv2, IOConfig, SoftBounds, analog_stats,
                          convert_to_analog, convert_to_digital, to_analog_energy)

tv = pytest.importorskip("torchvision")


def _resnet18_with_energy_block():
    net = tv.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32x32 inputs: no stem downsampling
    net.maxpool = nn.Identity()
    net.fc = nn.Sequential(ffebm.DenseHopfield([512, 64, 32], steps=30, tol=None, nudge_steps=10),
                           nn.Linear(32, 10))
    return net


@pytest.mark.slow
def test_resnet18_with_an_energy_block_on_tiles(tmp_path):
    torch.manual_seed(0)
    # perfect reads, so that the digital twin can be compared exactly; devices still pulsed
    cfg = AnalogConfig(device=SoftBounds(), io=IOConfig.perfect())

    def analog_model(seed):
        return to_analog_energy(convert_to_analog(_resnet18_with_energy_block(), cfg, seed=seed), cfg, seed=seed + 100)

    def optimizer(model, seed=None):
        return AnalogOptimizer(model.parameters(), ChoppedTTv2(), lr=0.05, seed=seed,
                               digital=torch.optim.SGD, digital_options=dict(lr=0.01, momentum=0.9))

    model = analog_model(0)
    opt = optimizer(model, seed=0)
    n_tiles = sum(1 for m in model.modules() if hasattr(m, "analog_ctx"))
    assert n_tiles >= 20 + 1 + 2 and len(opt.analog_groups[0]["params"]) == n_tiles  # convs, fc, couplings
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    bn0 = model.bn1.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    p = model.layer1[0].conv1.weight
    rt = opt._runtimes[id(p)]  # c-TTv2 pulses the fast array A; C moves at its transfers
    assert not torch.equal(rt.A.w, rt.tensors["ref"])
    assert not torch.equal(model.bn1.weight.detach(), bn0)  # the digital side stepped too
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2 = analog_model(1)
    opt2 = optimizer(model2)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    model.eval(), model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x))
    digital = convert_to_digital(model2)
    assert not any("Analog" in type(m).__name__ for m in digital.modules())
    digital.eval()
    with torch.no_grad():
        torch.testing.assert_close(digital(x), model2(x), rtol=1e-4, atol=1e-4)
    ref = _resnet18_with_energy_block()
    ref.load_state_dict(digital.state_dict())  # strict
    assert analog_stats(model2).total.devices == sum(p.numel() for p in (m.weight for m in model2.modules()
                                                                          if hasattr(m, "analog_ctx")))
