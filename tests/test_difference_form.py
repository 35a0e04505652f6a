"""EP's nudged phases in difference form (``EP(form="difference")``, ffebm.difference).

References, none of them the method itself: ordinary EP in float64 (the same algebra, so the
two agree to the free state's residual), Implicit (the exact gradient at s*) and central finite
differences of the loss through the forward relaxation. In float32 the point of the form: on a
block whose nudge moves its state by less than float32 resolves, ordinary EP is rounding and the
difference form matches the float64 exact gradient.
"""

import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.compare import INPUT, cosine
from helpers import batch, finite_difference, hybrid_conv, hybrid_dense, loss_fn

REF = ffebm.Implicit(tol=1e-12, max_iter=2000)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("variant", ["centered", "positive"])
@pytest.mark.parametrize("make,shape", [(hybrid_dense, (5,)), (hybrid_conv, (2, 8, 8))], ids=["dense", "conv"])
def test_float64_difference_form_is_ordinary_ep(make, shape, variant, mode):
    model = make()
    for _, blk in ffebm.energy_blocks(model):
        blk.nudge_relaxation = ffebm.Relaxation(steps=300, tol=None, mode=mode)
    x, y = batch(4, shape)
    ordinary = ffebm.EP(0.1, variant=variant, steps=300)
    diff = ffebm.EP(0.1, variant=variant, steps=300, form="difference")
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[ordinary, diff])
    go, gd = res.grads[ordinary.describe()], res.grads[diff.describe()]
    for name, g in go.items():
        if g is not None:
            assert _rel(gd[name], g) < 1e-9, name  # the free state's residual (tol 1e-13), not EP's bias
    assert res.min_cosine(diff.describe()) > 0.99


def test_difference_form_against_finite_differences():
    model = hybrid_dense(gradient=ffebm.EP(0.02, steps=400, form="difference"))
    x, y = batch(3, (5,))
    x_ = x.clone().requires_grad_(True)
    loss_fn(model(x_), y).backward()
    for name in ("2.couplings.0.weight", "5.input_map.1.weight", "0.weight"):
        fd = finite_difference(model, x, y, name)
        g = dict(model.named_parameters())[name].grad
        assert cosine(g, fd) > 0.9999 and _rel(g, fd) < 1e-2, name
    assert _rel(x_.grad, finite_difference(model, x, y, INPUT)) < 1e-2


def test_max_pool_with_free_winners_and_pool_refusals():
    torch.manual_seed(0)
    blk = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool=["none", "max"], input_bn=False, gain=0.5, linear_top=True,
                             relaxation=ffebm.Relaxation(steps=2000, tol=1e-13),
                             nudge_relaxation=ffebm.Relaxation(steps=300, tol=None))
    with torch.no_grad():
        blk.couplings[0].bias.fill_(1.0)
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(96, 3)).double()
    x, y = torch.rand(3, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    free = ffebm.EP(0.2, steps=300, pool_winners="free")
    diff = ffebm.EP(0.2, steps=300, pool_winners="free", form="difference")
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=REF, candidates=[free, diff])
    assert res.min_cosine(diff.describe()) > 0.999
    for name, g in res.grads[free.describe()].items():
        assert _rel(res.grads[diff.describe()][name], g) < 1e-9, name
    # live winners: the drive is only piecewise linear; soft pooling is not linear at all
    blk.gradient = ffebm.EP(0.2, form="difference")
    with pytest.raises(ffebm.DifferenceFormUnsupported, match="pool_winners='free'"):
        loss_fn(model(x), y).backward()
    soft = ffebm.ConvHopfield(2, (8, 8), [4, 6], pool=["none", "soft"], input_bn=False,
                              gradient=ffebm.EP(0.2, pool_winners="free", form="difference"))
    with pytest.raises(ffebm.DifferenceFormUnsupported, match="soft pooling is not piecewise linear"):
        soft(torch.rand(2, 2, 8, 8)).sum().backward()


def test_float32_small_nudge_keeps_its_precision():
    """A block whose nudge moves the state by ~1e-9 of its size: float32's s_a - s_b is rounding,
    the difference form's d_a - d_b is not. Reference: Implicit in float64."""
    torch.manual_seed(3)
    blk = ffebm.DenseHopfield([20, 30, 30, 10], gain=0.5, init_gain=0.5, linear_top=True,
                              relaxation=ffebm.Relaxation(steps=400, tol=1e-7))
    with torch.no_grad():
        for c in blk.couplings:
            c.bias.fill_(0.5)
    x = torch.randn(4, 20)
    delta = torch.randn(4, 10) * 1e-6
    b64 = blk.double()
    s64, _ = b64.solve(b64.input_map(x.double()), config=ffebm.Relaxation(steps=3000, tol=1e-14))
    ref = REF.backward(ffebm.BlockCall.at(b64, b64.input_map(x.double()), s64), delta.double())
    b32 = blk.float()
    u = b32.input_map(x)
    s32, _ = b32.solve(u)
    call = ffebm.BlockCall.at(b32, u, s32)
    ordinary = ffebm.EP(0.02, steps=60).backward(call, delta)
    diff = ffebm.EP(0.02, steps=60, form="difference").backward(call, delta)
    for go, gd, gr in zip(ordinary.grad_params, diff.grad_params, ref.grad_params):
        assert cosine(gd, gr) > 0.999
    assert min(cosine(go, gr) for go, gr in zip(ordinary.grad_params, ref.grad_params)) < 0.9


def test_one_sided_difference_form_needs_no_polish():
    model = hybrid_dense(gradient=ffebm.EP(0.05, variant="positive", steps=300, form="difference"))
    x, y = batch(4, (5,))
    loss_fn(model(x), y).backward()
    blk = model[2]
    assert blk.backward_stats.polish is None
    assert "form=difference" in blk.backward_stats.method


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="EP.form"):
        ffebm.EP(form="diff")
    blk = ffebm.DenseHopfield([4, 5, 3], gradient=ffebm.EP(form="difference"),
                              nudge_relaxation=ffebm.Relaxation(steps=5, tol=None, average_last=2))
    with pytest.raises(ffebm.DifferenceFormUnsupported, match="average_last"):
        blk(torch.rand(2, 4)).sum().backward()


def test_a_subclass_with_its_own_drive_is_refused():
    class Scaled(ffebm.DenseCoupling):  # stands for a tile's read: not the digital map's own
        def bottom_up(self, x):
            y, ctx = super().bottom_up(x)
            return 0.5 * y, ctx

    blk = ffebm.DenseHopfield([4, 5, 3], gradient=ffebm.EP(form="difference"))
    blk.couplings[0] = Scaled((5,), 3)
    with pytest.raises(ffebm.DifferenceFormUnsupported, match="overrides bottom_up"):
        blk(torch.rand(2, 4)).sum().backward()


def test_published_preset_in_float32_meets_the_target():
    """splitting_small_3block at initialisation, float32, batch 2, beta 0.02 and the published
    scheme (last block nudged by the loss): every tensor >= 0.99 against the exact gradient;
    the ordinary form's block 1 is far below (the float32 resolution of its nudged states)."""
    from ffebm import models

    torch.manual_seed(0)
    model = models.build("splitting_small_3block", pool_winners="free", ep_form="difference")
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    diff = ffebm.compare.PerBlock(ffebm.EP(0.02, steps=20, pool_winners="free", form="difference"),
                                  {"block3": ffebm.EP(0.02, steps=20, pool_winners="free", form="difference",
                                                      nudge="loss")})
    ordinary = ffebm.EP(0.02, steps=20, pool_winners="free")
    res = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y), reference=ffebm.Implicit(tol=1e-8, max_iter=1000),
                                  candidates=[diff, ordinary])
    assert res.min_cosine(diff.describe()) > 0.99
    assert min(r["cosine"] for r in res.rows if r["method"] == ordinary.describe() and r["block"] == "block1") < 0.9


def test_blocks_that_cannot_take_the_difference_form_are_refused_before_any_call():
    from ffebm.difference import check_before_use

    live = ffebm.ConvHopfield(2, 8, [3, 4], pool=["max", "max"], input_bn=False,
                              gradient=ffebm.EP(0.1, form="difference"))
    with pytest.raises(ffebm.errors.DifferenceFormUnsupported, match="live winners"):
        check_before_use(live)
    free = ffebm.ConvHopfield(2, 8, [3, 4], pool=["max", "max"], input_bn=False,
                              gradient=ffebm.EP(0.1, form="difference", pool_winners="free"))
    check_before_use(free)                                     # the backward latches the winners
    soft = ffebm.ConvHopfield(2, 8, [3, 4], pool=["soft", "soft"], input_bn=False,
                              gradient=ffebm.EP(0.1, form="difference", pool_winners="free"))
    with pytest.raises(ffebm.errors.DifferenceFormUnsupported, match="soft"):
        check_before_use(soft)
    check_before_use(ffebm.ConvHopfield(2, 8, [3, 4], pool=["max", "max"], input_bn=False))  # ordinary form


def test_the_trainer_refuses_the_difference_form_on_live_winners_in_one_line():
    import torch

    import models
    from train.config import ConfigError, TrainConfig
    from train.step import prepare_model

    model = models.build("splitting_small_3block", ep_form="difference")
    with pytest.raises(ConfigError, match="pool_winners"):
        prepare_model(model, TrainConfig(), torch.device("cpu"))
    prepare_model(models.build("splitting_small_3block", ep_form="difference", pool_winners="free"),
                  TrainConfig(), torch.device("cpu"))
