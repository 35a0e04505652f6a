"""Energy blocks on inference tiles: exact digital equivalence, one modifier draw per call carried
to the nudged phases, dense digital gradients, refusals, deployment and round trip."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ffebm
from ffebm.analog import (InferenceConfig, InferenceConvCoupling, InferenceDenseCoupling, InferenceEP,
                          InferenceImplicit, InvalidSetting, ModifierOutsideCall, WeightModifier, clip_weights,
                          convert_to_digital, evaluate_over_time, to_analog_energy)
from ffebm.analog.inference import modify_weight
from ffebm.errors import UnsupportedGradient


def _grads(model, x, target):
    for p in model.parameters():
        p.grad = None
    out = model(x)
    F.mse_loss(out, target).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_perfect_reads_without_modifier_equal_the_digital_block(kind):
    torch.manual_seed(0)
    if kind == "dense":
        blk = ffebm.DenseHopfield([6, 12, 4], steps=15, tol=None)
        x = torch.randn(5, 6)
    else:
        blk = ffebm.ConvHopfield(2, (8, 8), [4, 4], pool="avg", steps=10, tol=None)
        x = torch.randn(3, 2, 8, 8)
    ana = to_analog_energy(blk, InferenceConfig.perfect(), seed=0)
    assert isinstance(ana.gradient, InferenceEP)
    assert any(isinstance(c, (InferenceDenseCoupling, InferenceConvCoupling)) for c in ana.couplings)
    target = torch.randn_like(blk(x))
    yd, gd = _grads(blk, x, target)
    ya, ga = _grads(ana, x, target)
    assert torch.equal(yd, ya) and len(gd) == len(ga) and all(torch.equal(a, b) for a, b in zip(gd, ga))


@pytest.mark.parametrize("method", [ffebm.EP(beta=0.1), ffebm.Implicit()])
def test_one_draw_per_call_read_by_free_and_nudged_phases(method):
    """With the modifier on, the block's equilibrium and its EP / Implicit gradient are those of the
    digital block holding the drawn weights; the gradient goes to the clean weights."""
    torch.manual_seed(1)
    blk = ffebm.DenseHopfield([6, 10, 8, 3], steps=60, tol=None, gradient=method).double()
    mod = WeightModifier("add_gauss", 0.1)
    ana = to_analog_energy(blk, InferenceConfig.perfect(modifier=mod), input_coupling=False, seed=0)
    assert isinstance(ana.gradient, (InferenceEP, InferenceImplicit))
    # the draws the call will make (one per coupling, from each coupling's generator)
    twin = copy.deepcopy(blk)
    with torch.no_grad():
        for c, d in zip(ana.couplings, twin.couplings):
            g = torch.Generator().set_state(c.generator.get_state())
            d.weight.copy_(modify_weight(c.weight, mod, g))
            assert not torch.allclose(d.weight, c.weight)
    x = torch.randn(7, 6, dtype=torch.float64)
    target = torch.randn(7, 3, dtype=torch.float64)
    ya, ga = _grads(ana, x, target)
    yt, gt = _grads(twin, x, target)
    assert torch.allclose(ya, yt, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(ga, gt))
    # the next call draws again
    assert not torch.allclose(ana(x).detach(), ya, atol=1e-6)


def test_refusals_plain_method_with_modifier_and_unrolled():
    torch.manual_seed(2)
    blk = ffebm.DenseHopfield([4, 6, 2], steps=10, tol=None)
    ana = to_analog_energy(blk, InferenceConfig(modifier=WeightModifier("add_gauss", 0.05)), seed=0)
    ana.gradient = ffebm.EP()  # does not carry the call's draw to the nudged phases
    with pytest.raises(ModifierOutsideCall, match="InferenceEP"):
        F.mse_loss(ana(torch.randn(3, 4)), torch.randn(3, 2)).backward()
    with pytest.raises(InvalidSetting, match="Unrolled"):
        to_analog_energy(ffebm.DenseHopfield([4, 6, 2], gradient=ffebm.Unrolled()), InferenceConfig())
    ana.gradient = ffebm.Unrolled()
    with pytest.raises(UnsupportedGradient, match="InferenceEP"):
        ana.eval()(torch.randn(3, 4)).sum().backward()


def test_trains_with_torch_optimizer_deploys_and_converts_back():
    torch.manual_seed(3)
    blk = ffebm.DenseHopfield([6, 16, 3], steps=20, tol=None)
    ana = to_analog_energy(blk, InferenceConfig.pcm(), seed=0)
    opt = torch.optim.Adam(ana.parameters(), lr=1e-2)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    before = [p.detach().clone() for p in ana.parameters()]
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(ana(x), y).backward()
        opt.step()
        clip_weights(ana)
    assert all(not torch.equal(a, b) for a, b in zip(before, ana.parameters()))
    res = evaluate_over_time(ana.eval(), lambda m: F.mse_loss(m(x), y).item(), [0.0, 86400.0], draws=2, seed=0)
    assert len(res) == 2 and all(len(r["compensation"][0]) == 2 for r in res)  # input map + coupling
    back = convert_to_digital(ana)
    assert type(back.gradient) is ffebm.EP and type(back.couplings[0]) is ffebm.couplings.DenseCoupling
    blk.load_state_dict(back.state_dict())
    assert torch.equal(blk.couplings[0].weight, ana.couplings[0].weight)
