"""The library checks what torch checks: wrong shapes, empty batches, non-finite inputs and
settings edited into invalid values raise a clear error (or, for an empty batch, give an empty
result) instead of a silently wrong number."""
import math

import pytest
import torch

import ffebm
from ffebm.analog import (AnalogConv2d, AnalogLinear, AnalogOptimizer, InvalidSetting, IOConfig, SoftBounds,
                          UpdateConfig)
from ffebm.analog.energy import analog_energy_block


def test_analog_linear_checks_its_input_features():
    with pytest.raises(ValueError, match=r"AnalogLinear\(8, 4\): expected input \[..., 8\], got \[4, 9\]"):
        AnalogLinear(8, 4)(torch.rand(4, 9))
    assert AnalogLinear(8, 4)(torch.rand(2, 3, 8)).shape == (2, 3, 4)  # leading dims as nn.Linear


def test_analog_conv_checks_its_input_channels():
    with pytest.raises(ValueError, match=r"AnalogConv2d\(3, 4\): expected input \[N, 3, H, W\]"):
        AnalogConv2d(3, 4, 3)(torch.rand(1, 4, 8, 8))
    assert AnalogConv2d(3, 4, 3)(torch.rand(3, 8, 8)).shape == (4, 6, 6)  # unbatched, as nn.Conv2d


@pytest.mark.parametrize("kind", ["dense", "conv", "analog"])
def test_empty_batch_gives_an_empty_result(kind):
    torch.manual_seed(0)
    if kind == "conv":
        blk, x = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="avg"), torch.rand(0, 2, 8, 8)
        top = (6, 2, 2)
    else:
        blk, x = ffebm.DenseHopfield([4, 6, 3]), torch.rand(0, 4)
        top = (3,)
        if kind == "analog":
            blk = analog_energy_block(blk, seed=0)
    y = blk(x)
    assert y.shape == (0, *top)
    y.sum().backward()  # part of the graph: backward works (and gives zero gradients)
    with torch.no_grad():
        assert blk(x).shape == (0, *top)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_input_is_refused(bad):
    blk = ffebm.DenseHopfield([4, 6, 3], name="b")
    x = torch.rand(2, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="block 'b': input holds NaN or inf"):
        blk(x)


def test_invalid_block_and_method_settings_refused():
    with pytest.raises(ValueError, match="gain must be a finite number > 0"):
        ffebm.DenseHopfield([4, 6, 3], gain=math.inf)
    with pytest.raises(ValueError, match="EP.beta must be > 0 and finite"):
        ffebm.EP(beta=math.inf)
    with pytest.raises(ValueError, match="EP.polish"):
        ffebm.EP(polish=-1.0)


def test_learning_rate_edited_after_construction_is_checked_at_step():
    layer = AnalogLinear(3, 2)
    opt = AnalogOptimizer([layer.weight], lr=0.1)
    opt.param_groups[0]["lr"] = -0.5
    layer(torch.rand(2, 3)).sum().backward()
    w0 = layer.get_weights()[0].clone()
    with pytest.raises(InvalidSetting, match=r"param_groups\[0\].lr = -0.5"):
        opt.step()
    assert torch.equal(layer.get_weights()[0], w0)  # nothing was pulsed


@pytest.mark.parametrize("obj,field,value", [
    (SoftBounds(), "dw_min", -0.1), (SoftBounds(), "w_min", 10.0), (SoftBounds(), "corrupt_devices_prob", 2.0),
    (IOConfig(), "out_noise", math.nan), (UpdateConfig(), "pulse_type", "sometimes"),
])
def test_settings_edited_into_invalid_values_are_refused(obj, field, value):
    before = getattr(obj, field)
    with pytest.raises(InvalidSetting, match=field):
        setattr(obj, field, value)
    assert getattr(obj, field) == before  # the object keeps its valid value
