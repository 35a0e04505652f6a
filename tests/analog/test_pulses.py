"""Pulsed updates: expected value, fast vs exact statistics, management rules, sign, seeds."""
import math

import pytest
import torch

from ffebm.analog import (ConstantStep, DeviceArray, LinearStep, SoftBounds, UpdateConfig, coincidence_counts,
                          pulse_probabilities)
from ffebm.analog.pulses import exact_update


def _data(seed, B=4, n_in=6, n_out=5, s=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, n_in, generator=g, dtype=torch.float64), \
        torch.randn(B, n_out, generator=g, dtype=torch.float64) * s


def _runs(model, x, d, lr, cfg, K, R, exact, seed):
    """K independent runs, each updating an array of R x R tiled copies of the problem from 0
    (x tiled along inputs, d along outputs: every copy has the right per-element distribution,
    copies inside a run are correlated through shared bit streams). Returns the run-level
    per-element first and second moments, [K, out, in] each: their spread across runs gives
    honest standard errors whatever the correlation inside a run."""
    B, n_in = x.shape
    n_out = d.shape[1]
    da = DeviceArray(model, (n_out * R, n_in * R), seed=seed, dtype=torch.float64)
    xr, dr = x.repeat(1, R), d.repeat(1, R)
    m1, m2 = [], []
    for _ in range(K):
        da.set_weights(torch.zeros(da.shape, dtype=torch.float64))
        da.pulsed_update(xr, dr, lr, cfg, exact=exact)
        w = da.w.reshape(R, n_out, R, n_in).permute(1, 3, 0, 2).reshape(n_out, n_in, R * R)
        m1.append(w.mean(-1))
        m2.append((w * w).mean(-1))
    return torch.stack(m1), torch.stack(m2)


def _mean_se(m):
    return m.mean(0), m.std(0) / math.sqrt(m.shape[0])


def test_expected_update_is_minus_lr_d_xT():
    x, d = _data(0)
    x[:, 0] = -x[:, 0]  # mixed signs
    lr = 0.02
    m = ConstantStep().without_variability().replace(dw_min_std=0.3)
    m1, _ = _runs(m, x, d, lr, UpdateConfig(), K=30, R=30, exact=False, seed=1)
    mean, se = _mean_se(m1)
    target = -lr * d.t() @ x
    assert ((mean - target).abs() <= 4.5 * se + 1e-7).all(), ((mean - target) / se).abs().max()


@pytest.mark.parametrize("um, blm", [(True, True), (False, False), (True, False)])
def test_expected_update_management_variants(um, blm):
    x, d = _data(1, s=0.05)
    lr = 0.01
    cfg = UpdateConfig(update_management=um, bl_management=blm)
    m = ConstantStep().without_variability()
    m1, _ = _runs(m, x, d, lr, cfg, K=30, R=30, exact=False, seed=2)
    mean, se = _mean_se(m1)
    target = -lr * d.t() @ x
    assert ((mean - target).abs() <= 4.5 * se + 1e-7).all(), ((mean - target) / se).abs().max()


AFFINE = [ConstantStep(), SoftBounds(), LinearStep(gamma_up=0.6, gamma_down=0.4, up_down=0.1, mult_noise=False)]


@pytest.mark.parametrize("model", AFFINE, ids=lambda m: type(m).__name__)
def test_fast_path_matches_exact_path_statistics(model):
    """Per-element mean and variance of fast and exact paths agree (same device model)."""
    x, d = _data(3, B=3, n_in=5, n_out=4, s=0.2)
    x[1] = -x[1]
    lr = 0.05  # BL management gives BL ~ 10 per sample
    m = model.replace(dw_min_dtod=0.0, up_down_dtod=0.0, w_min_dtod=0.0, w_max_dtod=0.0)
    K, R = 30, 30
    f1, f2 = _runs(m, x, d, lr, UpdateConfig(), K, R, exact=False, seed=4)
    e1, e2 = _runs(m, x, d, lr, UpdateConfig(), K, R, exact=True, seed=5)
    (mf, sf), (me, se_) = _mean_se(f1), _mean_se(e1)
    se = torch.sqrt(sf ** 2 + se_ ** 2)
    # (+1% of the mean: the fast path orders the pulses of one batch differently, which moves
    # the mean of state-dependent devices at second order)
    assert ((mf - me).abs() <= 4 * se + 0.01 * me.abs() + 1e-7).all(), ((mf - me) / se).abs().max()
    vf = f2.mean(0) - mf ** 2
    ve = e2.mean(0) - me ** 2
    (q2f, s2f), (q2e, s2e) = _mean_se(f2), _mean_se(e2)
    sev = torch.sqrt(s2f ** 2 + s2e ** 2) + 2 * (mf.abs() * sf + me.abs() * se_)
    assert ((vf - ve).abs() <= 4 * sev + 1e-9).all(), ((vf - ve) / sev).abs().max()
    assert ((vf / ve - 1).abs() < 0.2).all(), vf / ve


def test_bl_and_update_management_rules():
    x = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.1, 0.2]])
    d = torch.tensor([[0.02, -0.01], [0.8, 0.4]])
    lr, dw = 0.01, 0.001
    px, pd, bl = pulse_probabilities(x, d, lr, UpdateConfig(), dw)
    # BL = ceil(lr max|x| max|d| / dw_min), at most 31
    assert bl.tolist() == [math.ceil(0.01 * 0.5 * 0.02 / 0.001), min(31, math.ceil(0.01 * 1.0 * 0.8 / 0.001))]
    # update management balances the two streams: max p_x == max p_d for each sample
    assert torch.allclose(px.amax(1), pd.amax(1))
    # expected coincidences per slot * BL * dw_min == lr |x d| (unless a probability clipped at 1)
    exp = bl[0] * px[0].unsqueeze(0) * pd[0].unsqueeze(1) * dw
    assert torch.allclose(exp, lr * d[0].abs().unsqueeze(1) * x[0].abs().unsqueeze(0))
    _, _, bl_off = pulse_probabilities(x, d, lr, UpdateConfig(bl_management=False), dw)
    assert bl_off.tolist() == [31, 31]


def test_sign_convention_positive_product_decreases_w():
    da = DeviceArray(ConstantStep().without_variability(), (2, 2), seed=0)
    x = torch.tensor([[1.0, -1.0]])
    d = torch.tensor([[1.0, -1.0]])
    da.pulsed_update(x, d, 0.01, UpdateConfig(bl_management=False))
    w = da.w
    assert w[0, 0] < 0 and w[1, 1] < 0 and w[0, 1] > 0 and w[1, 0] > 0


def test_coincidence_counts_exact_integers_and_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 30, generator=g)
    d = torch.randn(16, 20, generator=g)
    cu, cd, bl = coincidence_counts(x, d, 0.5, UpdateConfig(), 0.001, g)
    assert torch.equal(cu, cu.round()) and torch.equal(cd, cd.round())
    assert (cu >= 0).all() and (cd >= 0).all()
    assert float((cu + cd).max()) <= float(bl.sum())
    # zero input -> no pulses
    cu, cd, _ = coincidence_counts(torch.zeros(4, 30), d[:4], 0.5, UpdateConfig(), 0.001, g)
    assert float(cu.sum() + cd.sum()) == 0


def test_update_reproducible_from_seed():
    x, d = _data(7, B=16, n_in=32, n_out=24)
    res = []
    for seed in (5, 5, 6):
        da = DeviceArray(SoftBounds(), (24, 32), seed=seed, dtype=torch.float64)
        for _ in range(3):
            da.pulsed_update(x, d, 0.05)
        res.append(da.w.clone())
    assert torch.equal(res[0], res[1])
    assert not torch.equal(res[0], res[2])
    # an explicit generator overrides the array's own
    da1 = DeviceArray(ConstantStep(), (24, 32), seed=1, dtype=torch.float64)
    da2 = DeviceArray(ConstantStep(), (24, 32), seed=1, dtype=torch.float64)
    da1.pulsed_update(x, d, 0.05, generator=torch.Generator().manual_seed(9))
    da2.pulsed_update(x, d, 0.05, generator=torch.Generator().manual_seed(9))
    assert torch.equal(da1.w, da2.w)


def _slot_by_slot(model, p, w, x, d, lr, cfg, g):
    """The exact path written plainly: bits drawn slot by slot, every device of the array
    pulsed (or not) by ``pulse_once`` in every slot."""
    px, pd, bl = pulse_probabilities(x, d, lr, cfg, model.dw_min)
    for b in range(x.shape[0]):
        for _ in range(int(bl[b])):
            xbit = torch.rand(px[b].shape, generator=g, dtype=w.dtype) < px[b]
            dbit = torch.rand(pd[b].shape, generator=g, dtype=w.dtype) < pd[b]
            direction = -torch.outer(torch.sign(d[b]) * dbit, torch.sign(x[b]) * xbit)
            w = model.pulse_once(w, direction, p, g)
    return w


def _moments(fn, K):
    ws = torch.stack([fn(k) for k in range(K)])
    return ws.mean(0), ws.var(0), ws.shape[0]


@pytest.mark.parametrize("model", AFFINE[1:] + [SoftBounds(dw_min=0.02, w_max=0.1)], ids=lambda m: type(m).__name__)
def test_exact_path_matches_slot_by_slot_statistics(model):
    """The exact path (pulses gathered per coincidence rectangle) has the per-element mean and
    variance of a plain slot-by-slot loop over the whole array (a device that hits its bound
    included: SoftBounds with w_max = 0.1 and large steps)."""
    x, d = _data(11, B=3, n_in=5, n_out=4, s=0.2)
    x[0] = -x[0]
    lr, cfg = 0.05, UpdateConfig()
    m = model.replace(dw_min_dtod=0.0, up_down_dtod=0.0, w_min_dtod=0.0, w_max_dtod=0.0, dw_min_std=0.5)
    R = 20  # R x R tiled copies per run (as _runs); runs are independent
    da = DeviceArray(m, (4 * R, 5 * R), seed=0, dtype=torch.float64)
    xr, dr = x.repeat(1, R), d.repeat(1, R)
    w0 = torch.zeros(da.shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)

    def per_element(w):
        return w.reshape(R, 4, R, 5).permute(1, 3, 0, 2).reshape(4, 5, R * R)

    def new(k):
        return per_element(exact_update(m, da.params, w0, xr, dr, lr, cfg, m.dw_min, g)[0])

    def ref(k):
        return per_element(_slot_by_slot(m, da.params, w0, xr, dr, lr, cfg, g))

    # copies inside a run share bit streams: compare run-level moments over independent runs
    K = 25
    a = torch.stack([new(k) for k in range(K)])
    b = torch.stack([ref(k) for k in range(K)])
    for stat in (lambda t: t.mean(-1), lambda t: (t * t).mean(-1)):
        sa, sb = stat(a), stat(b)
        se = torch.sqrt(sa.var(0) / K + sb.var(0) / K)
        assert ((sa.mean(0) - sb.mean(0)).abs() <= 4.5 * se + 1e-12).all(), ((sa.mean(0) - sb.mean(0)) / se).abs().max()


@pytest.mark.parametrize("model", [SoftBounds(dw_min=0.01), LinearStep(gamma_up=0.5, mult_noise=False, dw_min=0.01)],
                         ids=lambda m: type(m).__name__)
def test_exact_path_equals_slot_by_slot_when_every_bit_fires(model):
    """Probabilities 1 (large lr) and no noise: both exact paths apply the same pulses in the
    same order, so the states agree to rounding, whatever the random streams."""
    m = model.without_variability().replace(dw_min_std=0.0)
    x = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    cfg = UpdateConfig(bl=7, bl_management=False)
    p = m.nominal((2, 3), dtype=torch.float64)
    w0 = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.05, -0.1]], dtype=torch.float64)
    got, n_up, n_down, bl = exact_update(m, p, w0, x, d, 100.0, cfg, m.dw_min, torch.Generator().manual_seed(0))
    want = _slot_by_slot(m, p, w0, x, d, 100.0, cfg, torch.Generator().manual_seed(1))
    assert torch.allclose(got, want, rtol=0, atol=1e-14), (got, want)
    assert not torch.equal(got, w0)
    # pulses per device: 7 slots, product sign decides the direction (x_j d_i > 0 -> down)
    prod = torch.einsum("bi,bj->ij", d.sign(), x.sign())
    hits = torch.einsum("bi,bj->ij", d.abs().sign(), x.abs().sign())
    assert float(n_up + n_down) == 7 * float(hits.sum()) and float(n_down - n_up) == 7 * float(prod.sum())
