"""Inference layers: exact digital equivalence, ideal gradients, modifier statistics, the optimizer
regression, clipping, settings, resume."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ffebm.analog import (InferenceConfig, InferenceConv1d, InferenceConv2d, InferenceLinear, InvalidSetting,
                          IOConfig, PCMDriftModel, WeightClip, WeightModifier, clip_after_step, clip_weights,
                          convert_to_analog, convert_to_digital)
from ffebm.analog.inference import modify_weight
from ffebm.errors import NotTwiceDifferentiable

#: a read through the read model's code path with every non-ideality off (exact in real arithmetic)
IDEAL_IO = IOConfig(inp_res=0.0, out_res=0.0, out_noise=0.0, inp_bound=math.inf, out_bound=math.inf)


def _grads(m, x, gy):
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.backward(gy)
    return y.detach(), x.grad, [p.grad.clone() for p in m.parameters()]


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(13, 7),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 8, 3, padding="same", groups=2, dilation=2),
    lambda: nn.Conv1d(3, 5, 4, padding=2, padding_mode="circular"),
])
def test_perfect_reads_without_modifier_equal_the_digital_layer_exactly(make):
    torch.manual_seed(0)
    dig = make()
    ana = convert_to_analog(dig, InferenceConfig.perfect(), seed=0)
    assert type(ana).__name__.startswith("Inference")
    shape = {nn.Linear: (5, 13), nn.Conv2d: (2, 4, 9, 9), nn.Conv1d: (2, 3, 11)}[type(dig)]
    x = torch.randn(*shape)
    gy = torch.randn_like(dig(x))
    yd, gxd, gpd = _grads(dig, x, gy)
    ya, gxa, gpa = _grads(ana, x, gy)
    assert torch.equal(yd, ya) and torch.equal(gxd, gxa)
    assert len(gpd) == len(gpa) and all(torch.equal(a, b) for a, b in zip(gpd, gpa))


@pytest.mark.parametrize("layer", ["linear", "conv_groups"])
def test_read_path_gradient_matches_finite_differences(layer):
    """The read-model path (weight scaling, noise management, arrays split at max_size) with every
    noise and quantisation off: float64 gradcheck of the ideal backward."""
    torch.manual_seed(1)
    cfg = InferenceConfig(io=IDEAL_IO, max_size=4)
    if layer == "linear":
        m = InferenceLinear(9, 5, config=cfg, seed=0, dtype=torch.float64)
        x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    else:
        m = InferenceConv2d(4, 6, 3, padding=1, groups=2, config=cfg, seed=0, dtype=torch.float64)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert not m._uses_digital_path()
    torch.autograd.gradcheck(lambda x_, w_, b_: torch.func.functional_call(m, {"weight": w_, "bias": b_}, (x_,)),
                             (x, m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()))


def test_modifier_path_gradient_is_the_digital_gradient_at_the_drawn_weights():
    """Training mode: forward reads W + noise; dL/dx through the drawn weights, dL/dW = dy^T x
    (the dense gradient w.r.t. the clean weights), against autograd of F.linear."""
    torch.manual_seed(2)
    mod = WeightModifier("mul_gauss", 0.3)
    m = InferenceLinear(12, 6, config=InferenceConfig.perfect(modifier=mod), seed=0, dtype=torch.float64)
    g = torch.Generator().set_state(m.generator.get_state())
    w_drawn = modify_weight(m.weight, mod, g)
    assert not torch.allclose(w_drawn, m.weight)
    x = torch.randn(4, 12, dtype=torch.float64)
    gy = torch.randn(4, 6, dtype=torch.float64)
    ya, gxa, (gwa, gba) = _grads(m, x, gy)
    xr = x.clone().requires_grad_(True)
    wr = m.weight.detach().clone().requires_grad_(True)
    yr = F.linear(xr, wr + (w_drawn - wr).detach(), m.bias.detach())
    yr.backward(gy)
    assert torch.allclose(ya, yr, atol=1e-12) and torch.allclose(gxa, xr.grad, atol=1e-12)
    assert torch.allclose(gwa, gy.t() @ x, atol=1e-12) and torch.allclose(gba, gy.sum(0), atol=1e-12)


def test_module_rules_frozen_twice_input_grad_double_backward():
    torch.manual_seed(3)
    m = InferenceLinear(8, 4, config=InferenceConfig(modifier=WeightModifier("add_gauss", 0.02)), seed=0)
    x = torch.randn(5, 8, requires_grad=True)
    # autograd.grad for the input only: no weight gradient formed or accumulated
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    assert gx.shape == x.shape and m.weight.grad is None
    # called twice before one backward: both calls' gradients accumulate
    (m(x).sum() + m(2 * x).sum()).backward()
    assert torch.allclose(m.weight.grad, 3 * x.detach().sum(0).expand(4, 8), atol=1e-5)
    # frozen weight: no gradient, the bias still trains
    m.zero_grad()
    m.weight.requires_grad_(False)
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None
    m.weight.requires_grad_(True)
    # a gradient penalty would be silently wrong: refused
    with pytest.raises(NotTwiceDifferentiable, match="first-order"):
        torch.autograd.grad(m(x).sum(), x, create_graph=True)


# -- modifier ----------------------------------------------------------------------------------


def test_modifier_noise_has_the_documented_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    w = torch.empty(600, 600).uniform_(-0.4, 0.4, generator=g)
    w[0, 0] = -0.8  # amax
    d = modify_weight(w, WeightModifier("add_gauss", 0.05), g) - w
    assert abs(float(d.mean())) < 2e-4 and abs(float(d.std()) / (0.05 * 0.8) - 1) < 0.01
    r = modify_weight(w, WeightModifier("mul_gauss", 0.1), g) / w - 1
    assert abs(float(r.mean())) < 1e-3 and abs(float(r.std()) / 0.1 - 1) < 0.01
    # PCM-like programming noise at |w| = amax / 2: sigma(12.5 uS) / 25 uS * amax
    half = torch.full((600, 600), 0.4)
    half[0, 0] = 0.8
    nm = PCMDriftModel()
    d = (modify_weight(half, WeightModifier("pcm_prog"), g, nm) - half)[1:]
    sig = (0.26348 + 1.9650 * 0.5 - 1.1731 * 0.25) / 25.0 * 0.8
    assert abs(float(d.mean())) < 2e-4 and abs(float(d.std()) / sig - 1) < 0.01
    assert torch.equal(modify_weight(w, WeightModifier(), g), w)


def test_modifier_is_drawn_once_per_call_in_training_mode_only():
    torch.manual_seed(4)
    m = InferenceLinear(10, 6, config=InferenceConfig.perfect(modifier=WeightModifier("add_gauss", 0.1)), seed=0)
    x = torch.randn(1, 10).expand(3, 10)  # three identical samples
    y = m(x)
    assert torch.allclose(y[0], y[1], atol=1e-6) and torch.allclose(y[0], y[2], atol=1e-6)  # one draw per batch
    assert float((y - m(x)).detach().abs().max()) > 1e-2  # a new draw at the next call
    assert not torch.allclose(y, F.linear(x, m.weight, m.bias), atol=1e-3)
    m.eval()
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))


# -- the regression: a torch optimizer's step is what the next forward reads -------------------


@pytest.mark.parametrize("cfg", [InferenceConfig.perfect(), InferenceConfig.pcm(clip=WeightClip())])
def test_torch_optimizer_step_changes_what_the_next_forward_reads(cfg):
    torch.manual_seed(5)
    m = InferenceLinear(16, 8, config=cfg, seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(32, 16)
    before = m.weight.detach().clone()
    F.mse_loss(m(x), torch.randn(32, 8)).backward()
    step = -0.5 * m.weight.grad.clone()
    opt.step()
    assert float(step.abs().max()) > 0.01
    assert torch.equal(m.weight.detach(), before + step)  # nothing overwrote the update
    m.eval()
    with torch.no_grad():
        seen = m(x) if cfg.io.is_perfect else None
    if seen is not None:
        assert torch.equal(seen, F.linear(x, before + step, m.bias))
    else:  # the read model: outputs follow the new weights, not the old ones
        with torch.no_grad():
            y = torch.stack([m(x) for _ in range(8)]).mean(0)
            err_new = (y - F.linear(x, before + step, m.bias)).abs().mean()
            err_old = (y - F.linear(x, before, m.bias)).abs().mean()
        assert err_new < 0.5 * err_old


# -- clipping ----------------------------------------------------------------------------------


def test_fixed_clip_holds_after_every_step():
    torch.manual_seed(6)
    model = convert_to_analog(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)),
                              InferenceConfig(modifier=WeightModifier("add_gauss", 0.05),
                                              clip=WeightClip("fixed", 0.3)), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    handle = clip_after_step(opt, model)
    would_exceed = 0
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(16, 8)), 3 * torch.randn(16, 2)).backward()
        raw = [(p.detach() - 2.0 * p.grad).abs().max() for p in (model[0].weight, model[2].weight)]
        would_exceed += sum(float(r) > 0.3 for r in raw)
        opt.step()
        for layer in (model[0], model[2]):
            assert bool(layer.weight.abs().max() <= torch.tensor(0.3))  # 0.3 in float32
    assert would_exceed > 0  # clipping was needed
    handle.remove()


@pytest.mark.parametrize("per_channel", [False, True])
def test_sigma_clip_bounds_at_k_standard_deviations(per_channel):
    torch.manual_seed(7)
    m = InferenceLinear(64, 32, config=InferenceConfig(clip=WeightClip("sigma", 2.0, per_channel=per_channel)), seed=0)
    with torch.no_grad():
        m.weight.normal_().mul_(torch.linspace(0.5, 2.0, 32).unsqueeze(1))
    before = m.weight.detach().clone()
    std = before.std(dim=1, correction=0, keepdim=True) if per_channel else before.std(correction=0)
    assert bool((before.abs() > 2.0 * std).any())
    assert clip_weights(m) == 1
    assert bool((m.weight.abs() <= 2.0 * std + 1e-6).all())
    inside = before.abs() <= 2.0 * std
    assert torch.equal(m.weight[inside], before[inside])


# -- settings ----------------------------------------------------------------------------------


def test_invalid_settings_raise():
    with pytest.raises(InvalidSetting, match="kind"):
        WeightModifier("gauss")
    with pytest.raises(InvalidSetting, match="std"):
        WeightModifier("add_gauss")
    with pytest.raises(InvalidSetting, match="std"):
        WeightModifier("mul_gauss", -0.1)
    with pytest.raises(InvalidSetting, match="value"):
        WeightClip("fixed")
    with pytest.raises(InvalidSetting, match="value"):
        WeightClip("sigma", 0.0)
    with pytest.raises(InvalidSetting, match="modifier"):
        InferenceConfig(modifier="add_gauss")
    cfg = InferenceConfig()
    with pytest.raises(InvalidSetting, match="max_size"):
        cfg.max_size = 0
    assert cfg.max_size == 512
    with pytest.raises(InvalidSetting, match="config"):
        InferenceLinear(4, 2, config=IOConfig())
    assert WeightModifier("pcm_prog").strength == 1.0 and WeightClip("sigma").bound == 2.5


# -- state -------------------------------------------------------------------------------------


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        clip_weights(model)


def test_resume_is_bit_exact():
    torch.manual_seed(8)
    cfg = InferenceConfig.pcm()
    model = convert_to_analog(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=2)
    want = [p.detach().clone() for p in model.parameters()]
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other = convert_to_analog(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), cfg, seed=99)
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-2)
    other.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train(other, opt2, 3, seed=2)
    got = [p.detach() for p in other.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # the generators' state is what makes it exact: without it the same run draws other noise
    third = convert_to_analog(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), cfg, seed=99)
    opt3 = torch.optim.Adam(third.parameters(), lr=1e-2)
    third.load_state_dict({k: v for k, v in ck["model"].items() if not k.endswith("_extra_state")})
    opt3.load_state_dict(ck["opt"])
    _train(third, opt3, 3, seed=2)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(want, third.parameters()))


def test_digital_round_trip_and_digital_state_loads():
    torch.manual_seed(9)
    dig = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ana = convert_to_analog(dig, InferenceConfig(), seed=0)
    with torch.no_grad():
        ana[2].weight.add_(0.1)
    back = convert_to_digital(ana)
    assert type(back[0]) is nn.Conv2d and type(back[2]) is nn.Linear
    dig.load_state_dict(back.state_dict())  # strict
    assert torch.equal(dig[2].weight, ana[2].weight)
    ana2 = convert_to_analog(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)), InferenceConfig())
    ana2.load_state_dict(dig.state_dict())  # a digital checkpoint loads strictly into the inference model
    assert torch.equal(ana2[0].weight, dig[0].weight)
