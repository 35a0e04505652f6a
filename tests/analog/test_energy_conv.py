"""Convolutional energy blocks on tiles: reads, equilibria and pulsed EP steps against the digital block."""
import io

import pytest
import torch

import ffebm
from ffebm.analog import (AnalogConfig, AnalogConv2d, AnalogConvCoupling, AnalogOptimizer, AnalogSGD, ChoppedTTv2,
                          IdealDevice, InvalidSetting, IOConfig, SoftBounds, analog_energy_block, analog_parameters,
                          digital_parameters)
from ffebm.analog.energy import AnalogEP, reset_read_counts, to_analog_energy
from ffebm.couplings import ConvCoupling

PERFECT = AnalogConfig(device=IdealDevice(), io=IOConfig.perfect())
D = torch.float64


def _coupling(pool, seed=0, stride=1):
    torch.manual_seed(seed)
    c = ConvCoupling(3, 4, (8, 8), kernel_size=3, stride=stride, padding=1, pool=pool).double()
    with torch.no_grad():
        c.bias.normal_()
    return c


@pytest.mark.parametrize("pool", ["max", "avg", "soft", "none"])
def test_conv_coupling_reads_match_digital_in_perfect_mode(pool):
    c = _coupling(pool)
    a = AnalogConvCoupling.from_conv(c, PERFECT, seed=0)
    assert a.weight.shape == c.weight.shape and a.tile.in_size == 27 and a.tile.out_size == 4
    x = torch.rand(2, 3, 8, 8, dtype=D)
    yd, ctx_d = c.bottom_up(x)
    ya, ctx_a = a.bottom_up(x)
    torch.testing.assert_close(ya, yd, rtol=0, atol=1e-12)
    assert a.out_shape((3, 8, 8)) == tuple(yd.shape[1:])
    y = torch.rand_like(yd)
    torch.testing.assert_close(a.top_down(y, ctx_a), c.top_down(y, ctx_d), rtol=0, atol=1e-12)
    # phi and its derivatives w.r.t. both states and the kernel (dense path) equal the digital ones,
    # which come from torch's own conv2d autograd: an independent reference
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gd = torch.autograd.grad(c.phi(xr, yr), [xr, yr, c.weight, c.bias])
    ga = torch.autograd.grad(a.phi(xr, yr), [xr, yr, a.weight, a.bias])
    for u, v in zip(ga, gd):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-11)
    assert a.n_forward_reads == 1 and a.n_backward_reads == 1


def test_strided_coupling_and_bad_settings():
    c = _coupling("none", stride=2)
    a = AnalogConvCoupling.from_conv(c, PERFECT)
    x, y = torch.rand(2, 3, 8, 8, dtype=D), torch.rand(2, 4, 4, 4, dtype=D)
    torch.testing.assert_close(a.top_down(y, None), c.top_down(y, None), rtol=0, atol=1e-12)
    with pytest.raises(InvalidSetting, match="out_channels"):
        AnalogConvCoupling(3, 0, (8, 8))
    with pytest.raises(InvalidSetting, match="padding"):
        AnalogConvCoupling(3, 2, (8, 8), padding=-1)
    with pytest.raises(InvalidSetting, match="in_size"):
        AnalogConvCoupling(3, 2, (7, 7), pool="max")  # 7x7 conv output not divisible by the pool
    with pytest.raises(InvalidSetting, match="ConvCoupling"):
        AnalogConvCoupling.from_conv(a)


def _conv_block(pool="avg", seed=0):
    torch.manual_seed(seed)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool=pool, dense=[5], steps=150, tol=1e-11, nudge_steps=60,
                             gradient=ffebm.EP(beta=0.05)).double()
    return blk


def test_conv_block_on_tiles_settles_like_the_digital_block():
    blk = _conv_block()
    ab = analog_energy_block(blk, PERFECT, seed=0)
    assert isinstance(ab.couplings[0], AnalogConvCoupling) and isinstance(ab.gradient, AnalogEP)
    assert any(isinstance(m, AnalogConv2d) for m in ab.input_map.modules())
    x = torch.rand(3, 2, 8, 8, dtype=D)
    blk.eval(), ab.eval()
    with torch.no_grad():
        torch.testing.assert_close(ab(x), blk(x), rtol=0, atol=1e-10)
    ab.relaxation = ffebm.Relaxation(steps=150, tol=1e-11, stepper="autograd")
    with torch.no_grad():
        torch.testing.assert_close(ab(x), blk(x), rtol=0, atol=1e-9)


def test_pulsed_ep_step_on_conv_block_equals_digital_ep_step():
    blk = _conv_block()
    ab = analog_energy_block(blk, PERFECT, seed=0)
    blk.eval(), ab.eval()  # batch norm in eval mode: both blocks see the same input map
    x = torch.rand(3, 2, 8, 8, dtype=D)
    t = torch.randn(3, 5, dtype=D)
    ((blk(x) - t) ** 2).sum().backward()
    ((ab(x) - t) ** 2).sum().backward()
    lr = 0.2
    ref = {n: (p - lr * p.grad).detach() for n, p in blk.named_parameters() if p.grad is not None}
    names = {id(p): n for n, p in ab.named_parameters()}
    analog = {names[id(p)] for p in analog_parameters(ab)}
    assert {"couplings.0.weight", "couplings.1.weight", "input_map.0.weight"} <= analog
    for n, p in ab.named_parameters():
        if n in analog:
            assert p.grad is None and p.analog_ctx.num_pairs >= 1  # pairs, no dense gradient
    AnalogOptimizer(analog_parameters(ab), AnalogSGD(), lr=lr).step()
    torch.optim.SGD([p for p in digital_parameters(ab) if p.grad is not None], lr=lr).step()
    params = dict(ab.named_parameters())
    moved = 0.0
    for n, want in ref.items():
        torch.testing.assert_close(params[n].detach(), want, rtol=0, atol=1e-11)
        moved = max(moved, (want - dict(blk.named_parameters())[n]).abs().max().item())
    assert moved > 1e-4
    c = ab.couplings[0]
    torch.testing.assert_close(c.tile.get_weights().reshape(c.weight.shape), c.weight.detach(), rtol=0, atol=0)


def test_conv_ep_on_tiles_matches_implicit_gradient():
    """Independent reference: the digital block's Implicit (exact) gradient at the equilibrium."""
    torch.manual_seed(0)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="max", dense=[5], steps=300, tol=1e-13,
                             gradient=ffebm.Implicit(tol=1e-12)).double().eval()
    ab = analog_energy_block(blk, PERFECT, seed=0, analog_gradient=False)
    ab.gradient = ffebm.EP(beta=1e-4, steps=300, tol=1e-13)
    x = torch.rand(3, 2, 8, 8, dtype=D)
    t = torch.randn(3, 5, dtype=D)
    ((blk(x) - t) ** 2).sum().backward()
    ((ab(x) - t) ** 2).sum().backward()
    ref = dict(blk.couplings.named_parameters())
    for n, p in ab.couplings.named_parameters():
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref[n].grad.flatten(), dim=0)
        assert cos > 0.9999, n


def test_default_reads_conv_block_close_and_counted():
    torch.manual_seed(0)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="max", dense=[5], steps=30, tol=None)
    ab = analog_energy_block(blk, AnalogConfig(), seed=1)
    blk.eval(), ab.eval()
    x = torch.rand(4, 2, 8, 8)
    reset_read_counts(ab)
    with torch.no_grad():
        yd, ya = blk(x), ab(x)
    assert ab.couplings[0].n_forward_reads >= 30 and ab.couplings[0].n_backward_reads >= 30
    assert (ya - yd).abs().max() > 0  # noisy, quantised reads
    assert torch.nn.functional.cosine_similarity(ya.flatten(), yd.flatten(), dim=0) > 0.8


def test_conv_block_state_dict_round_trip_and_training_steps():
    torch.manual_seed(0)
    cfg = AnalogConfig(device=SoftBounds())
    a = analog_energy_block(ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="avg", steps=10, tol=None), cfg, seed=0)
    b = analog_energy_block(ffebm.ConvHopfield(2, (8, 8), [4, 6], pool="avg", steps=10, tol=None), cfg, seed=5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    a.eval(), b.eval()
    x = torch.rand(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # pulsed c-TTv2 steps move the tiles and keep everything finite
    a.train()
    opt = AnalogOptimizer(analog_parameters(a), ChoppedTTv2(), lr=0.05, seed=0)
    w0 = a.couplings[0].tile.tile_weights().clone()
    for _ in range(3):
        opt.zero_grad()
        a(x).square().mean().backward()
        opt.step()
    w1 = a.couplings[0].tile.tile_weights()
    assert torch.isfinite(w1).all() and not torch.equal(w0, w1)
