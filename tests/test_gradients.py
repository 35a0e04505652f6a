"""Every gradient path against an independent reference (float64)."""
import pytest
import torch

import ffebm
from ffebm.compare import INPUT, cosine, rel_error
from helpers import batch, finite_difference, hybrid_conv, hybrid_dense, loss_fn


@pytest.fixture(scope="module")
def dense_setup():
    model = hybrid_dense()
    x, y = batch()
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.EP(1e-3), ffebm.Unrolled(steps=400),
                                              ffebm.Unrolled(from_equilibrium=False)])
    return model, x, y, res


def test_implicit_matches_finite_differences_on_every_tensor(dense_setup):
    model, x, y, res = dense_setup
    ref = res.grads[res.reference]
    names = [n for n, _ in model.named_parameters()] + [INPUT]
    assert set(names) <= set(ref)
    for name in names:
        fd = finite_difference(model, x, y, name)
        assert fd.abs().max() > 0, f"{name}: degenerate test (zero gradient)"
        assert rel_error(ref[name], fd) < 1e-4, name


def test_centered_ep_small_beta_cosine(dense_setup):
    _, _, _, res = dense_setup
    label = ffebm.EP(1e-3).describe()
    for r in res.rows:
        if r["method"] == label:
            assert r["cosine"] >= 0.9999, r


def test_unrolled_agrees_with_implicit(dense_setup):
    _, _, _, res = dense_setup
    for label in res.methods():
        if label.startswith("Unrolled"):
            assert res.max_rel_error(label) < 1e-6, label


def test_ep_bias_orders_in_beta():
    """positive EP's error ~ beta, centered EP's ~ beta^2 (on a smooth energy).

    Soft pooling makes the coupling non-linear, so the nudged response has curvature. (With
    hard sigmoids and linear couplings the energy is piecewise quadratic and EP is exact until
    a unit crosses a bound: no smooth bias to measure.)
    """
    model = hybrid_conv(pool="soft", seed=0)
    x, y = batch(n=2, shape=(2, 8, 8))
    betas = [0.04, 0.02]
    cands = [ffebm.EP(b, variant=v) for v in ("positive", "centered") for b in betas]
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ffebm.Implicit(tol=1e-12), candidates=cands,
                                  include_input=False)
    err = {}
    for c in cands:
        rows = [r for r in res.rows if r["method"] == c.describe() and r["block"] == "0"]
        err[(c.variant, c.beta)] = max(r["rel_error"] for r in rows)
    r_pos = err[("positive", 0.04)] / err[("positive", 0.02)]
    r_cen = err[("centered", 0.04)] / err[("centered", 0.02)]
    assert 1.7 < r_pos < 2.3, err
    assert 3.0 < r_cen < 5.0, err
    assert err[("centered", 0.02)] < 1e-2 * err[("positive", 0.02)]


def test_negative_and_random_variants_converge():
    model = hybrid_dense(seed=5)
    x, y = batch(seed=6)
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.EP(1e-4, variant="negative"),
                                              ffebm.EP(1e-4, variant="random", seed=0)])
    for m in res.methods():
        assert res.min_cosine(m) > 0.999, m


@pytest.mark.parametrize("pool", ["avg", "max", "soft"])
def test_conv_implicit_matches_finite_differences(pool):
    model = hybrid_conv(pool=pool)
    x, y = batch(n=2, shape=(2, 8, 8))
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.EP(1e-3)])
    ref = res.grads[res.reference]
    g = torch.Generator().manual_seed(0)
    for name in ["0.input_map.0.weight", "0.couplings.0.weight", "3.couplings.0.weight", "3.couplings.1.weight"]:
        # a random subset of entries keeps the check quick
        p = dict(model.named_parameters())[name]
        idx = torch.randperm(p.numel(), generator=g)[:4]
        fd = torch.zeros(len(idx), dtype=torch.float64)
        flat = p.data.view(-1)
        with torch.no_grad():
            for j, i in enumerate(idx):
                old = flat[i].item()
                flat[i] = old + 1e-6
                lp = loss_fn(model(x), y).item()
                flat[i] = old - 1e-6
                lm = loss_fn(model(x), y).item()
                flat[i] = old
                fd[j] = (lp - lm) / 2e-6
        got = ref[name].reshape(-1)[idx]
        assert (got - fd).abs().max() <= 1e-4 * fd.abs().max() + 1e-9, (name, got, fd)
    if pool != "max":  # max pooling is non-smooth; EP is checked on the smooth poolings
        assert res.min_cosine(ffebm.EP(1e-3).describe()) > 0.999


def test_mixed_methods_in_one_model_and_switching():
    model = hybrid_dense(seed=7)
    x, y = batch(seed=8)
    b1, b2 = model[2], model[5]
    b1.gradient = ffebm.EP(1e-3)
    b2.gradient = ffebm.Unrolled(steps=400)
    loss_fn(model(x), y).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ffebm.set_gradient(model, ffebm.Implicit(tol=1e-12))
    loss_fn(model(x), y).backward()
    for n, p in model.named_parameters():
        assert cosine(mixed[n], p.grad) > 0.9999, n
    assert b1.backward_stats.method.startswith("Implicit")


def test_gradients_accumulate_like_autograd():
    """Parameter gradients come out of backward: two backward passes accumulate."""
    model = hybrid_dense(seed=9, gradient=ffebm.EP(1e-3))
    x, y = batch(seed=10)
    loss_fn(model(x), y).backward()
    g1 = model[2].couplings[0].weight.grad.clone()
    loss_fn(model(x), y).backward()
    assert torch.allclose(model[2].couplings[0].weight.grad, 2 * g1)


def test_ddp_wraps_hybrid_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = hybrid_dense(seed=11, gradient=ffebm.EP(1e-3))
    x, y = batch(seed=12)
    loss_fn(model(x), y).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        loss_fn(ddp(x), y).backward()
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, want[n], rtol=1e-10, atol=1e-14), n
    finally:
        dist.destroy_process_group()
