"""Analog energy blocks: couplings on tiles, pulsed EP updates, the digits experiment."""
import io

import pytest
import torch

import ffebm
from ffebm.analog import (AnalogConfig, AnalogLinear, AnalogOptimizer, AnalogSGD, IdealDevice, InvalidSetting,
                          IOConfig, SoftBounds, analog_parameters, digital_parameters)
from ffebm.analog.energy import (AnalogDenseCoupling, AnalogEP, analog_energy_block, reset_read_counts,
                                 to_analog_energy)
from ffebm.couplings import DenseCoupling

PERFECT = AnalogConfig(device=IdealDevice(), io=IOConfig.perfect())


def _block(beta=0.1, seed=0):
    torch.manual_seed(seed)
    return ffebm.DenseHopfield([6, 5, 4, 3], steps=200, tol=1e-11, nudge_steps=60,
                               gradient=ffebm.EP(beta=beta)).double()


def test_coupling_reads_match_dense_in_perfect_mode():
    torch.manual_seed(1)
    c = DenseCoupling((5,), 4).double()
    a = AnalogDenseCoupling.from_dense(c, PERFECT, seed=0)
    assert a.weight.dtype == torch.float64
    x, y = torch.rand(3, 5, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(a.bottom_up(x)[0], x @ c.weight.t() + c.bias, rtol=0, atol=1e-14)
    torch.testing.assert_close(a.top_down(y, None), y @ c.weight, rtol=0, atol=1e-14)
    torch.testing.assert_close(a.phi(x, y), c.phi(x, y), rtol=1e-13, atol=1e-13)
    # phi's derivatives w.r.t. the states are the drives (what the autograd stepper uses)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gx, gy = torch.autograd.grad(a.phi(xr, yr), [xr, yr])
    torch.testing.assert_close(gx, y @ c.weight, rtol=0, atol=1e-13)
    torch.testing.assert_close(gy, x @ c.weight.t() + c.bias, rtol=0, atol=1e-13)
    assert a.n_forward_reads == 1 and a.n_backward_reads == 1


def test_conversion_keeps_weights_and_perfect_equilibrium():
    blk = _block()
    ab = analog_energy_block(blk, PERFECT, seed=0)
    assert ab is not blk and isinstance(ab.gradient, AnalogEP) and ab.gradient.beta == 0.1
    assert all(isinstance(c, AnalogDenseCoupling) for c in ab.couplings)
    assert isinstance(ab.input_map[1], AnalogLinear)
    for c, ca in zip(blk.couplings, ab.couplings):
        torch.testing.assert_close(ca.tile.get_weights(), c.weight.detach(), rtol=0, atol=0)
    x = torch.rand(4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ab(x), blk(x), rtol=0, atol=1e-12)
    # autograd stepper on the analog block agrees too (phi consistent with the reads)
    ab.relaxation = ffebm.Relaxation(steps=200, tol=1e-11, stepper="autograd")
    with torch.no_grad():
        torch.testing.assert_close(ab(x), blk(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["centered", "positive"])
def test_pulsed_ep_step_equals_digital_ep_step(variant):
    blk = _block()
    blk.gradient = ffebm.EP(beta=0.1, variant=variant)
    ab = analog_energy_block(blk, PERFECT, seed=0)
    assert ab.gradient.variant == variant
    x = torch.rand(4, 6, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    ((blk(x) - t) ** 2).sum().backward()
    ((ab(x) - t) ** 2).sum().backward()
    lr = 0.3
    ref = {n: (p - lr * p.grad).detach() for n, p in blk.named_parameters()}
    oa = AnalogOptimizer(analog_parameters(ab), AnalogSGD(), lr=lr)
    od = torch.optim.SGD(digital_parameters(ab), lr=lr)
    names = {id(p): n for n, p in ab.named_parameters()}
    analog_names = {names[id(p)] for p in analog_parameters(ab)}
    assert analog_names == {"input_map.1.weight", "couplings.0.weight", "couplings.1.weight"}
    for n, p in ab.named_parameters():
        if n in analog_names:
            assert p.grad is None  # no dense gradient is formed
            n_pairs = 1 if n.startswith("input_map") else 2  # (s_a, s_b): nudged vs nudged or free
            assert len(p.analog_ctx._pairs) == n_pairs
        else:
            assert p.grad is not None
    oa.step()
    od.step()
    moved = 0.0
    for n, p in ab.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=0, atol=1e-12)
        moved = max(moved, (ref[n] - dict(blk.named_parameters())[n]).abs().max().item())
    assert moved > 1e-4  # the step is not trivially zero
    for c in ab.couplings:  # the tile itself moved, not just the mirror
        torch.testing.assert_close(c.tile.get_weights(), c.weight.detach(), rtol=0, atol=0)


def test_plain_ep_on_analog_block_gives_dense_grads():
    blk = _block()
    ab = analog_energy_block(blk, PERFECT, seed=0, analog_gradient=False)
    assert type(ab.gradient) is ffebm.EP
    x = torch.rand(4, 6, dtype=torch.float64)
    blk(x).sum().backward()
    ab(x).sum().backward()
    for (n, p), (_, q) in zip(blk.couplings.named_parameters(), ab.couplings.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_default_reads_are_used_and_close():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([16, 12, 8], steps=40, tol=None)
    ab = analog_energy_block(blk, AnalogConfig(), seed=3)
    x = torch.rand(8, 16)
    reset_read_counts(ab)
    with torch.no_grad():
        yd, ya = blk(x), ab(x)
    c = ab.couplings[0]
    assert c.n_forward_reads >= 40 and c.n_backward_reads >= 40  # one of each per relaxation step
    err = (ya - yd).abs().mean().item()
    assert 1e-5 < err < 0.6 * yd.abs().mean().item()  # different (noise, quantisation) but close
    assert torch.nn.functional.cosine_similarity(ya.flatten(), yd.flatten(), dim=0) > 0.85
    with torch.no_grad():  # noisy reads: a second solve differs
        assert (ab(x) - ya).abs().max() > 0


def test_state_dict_round_trip():
    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 5, 4])
    cfg = AnalogConfig(device=SoftBounds())
    a = analog_energy_block(blk, cfg, seed=0)
    b = analog_energy_block(ffebm.DenseHopfield([6, 5, 4]), cfg, seed=9)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for ca, cb in zip(a.couplings, b.couplings):
        torch.testing.assert_close(cb.tile.tile_weights(), ca.tile.tile_weights(), rtol=0, atol=0)
        torch.testing.assert_close(cb.weight, ca.weight, rtol=0, atol=0)
    x = torch.rand(3, 6)
    with torch.no_grad():  # same devices and same read-noise stream -> same equilibrium
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_to_analog_energy_model_and_bad_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ffebm.DenseHopfield([6, 5, 4]), torch.nn.Linear(4, 3))
    am = to_analog_energy(model, PERFECT, seed=0)
    assert isinstance(am[1], torch.nn.Linear)  # digital layers stay digital
    assert len(analog_parameters(am)) == 2
    with pytest.raises(InvalidSetting, match="block"):
        analog_energy_block(torch.nn.Linear(2, 2), PERFECT)
    with pytest.raises(InvalidSetting, match="out_features"):
        AnalogDenseCoupling((3,), 0)


def test_mean_difference_pairs_keep_the_update_and_shrink_the_pulse_count():
    blk = _block()
    with torch.no_grad():  # states away from the clipping at 0, as in a trained block
        for c in list(blk.couplings) + [blk.input_map[1]]:
            c.bias.fill_(1.0)
    x = torch.rand(4, 6, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    sums, sizes = {}, {}
    for form in ("raw", "mean_difference"):
        ab = analog_energy_block(blk, PERFECT, seed=0)
        ab.gradient.pair_form = form
        ((ab(x) - t) ** 2).sum().backward()
        for n, p in ab.couplings.named_parameters():
            if p is getattr(ab.couplings[int(n.split(".")[0])], "weight"):
                pend = p.analog_ctx._pairs
                assert len(pend) == 2
                sums[form, n] = sum(d.t() @ xx for xx, d in pend)
                # what the pulse count scales with: sum_b |d_b| |x_b|^T
                sizes[form, n] = sum((d.abs().t() @ xx.abs()).sum() for xx, d in pend).item()
    for n in ("0.weight", "1.weight"):
        torch.testing.assert_close(sums["mean_difference", n], sums["raw", n], rtol=1e-10, atol=1e-12)
        assert sizes["mean_difference", n] < 0.5 * sizes["raw", n]
    with pytest.raises(InvalidSetting, match="pair_form"):
        AnalogEP(beta=0.1, pair_form="bogus")
