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
    model, _, _, res = dense_setup
    label = ffebm.EP(1e-3).describe()
    rows = [r for r in res.rows if r["method"] == label]
    assert len(rows) == len(list(model.parameters())) + 1  # every parameter and the input
    for r in rows:
        # the direction *and* the size: a gradient scaled by 2 has cosine 1 but error 1
        assert r["cosine"] >= 0.9999 and r["rel_error"] < 1e-2, r


def test_unrolled_agrees_with_implicit(dense_setup):
    _, _, _, res = dense_setup
    labels = [m for m in res.methods() if m.startswith("Unrolled")]
    assert len(labels) == 2, res.methods()  # recurrent backprop and full BPTT
    for label in labels:
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
    assert len(res.methods()) == 2
    for m in res.methods():
        assert res.min_cosine(m) > 0.999 and res.max_rel_error(m) < 5e-2, m


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
    # each block ran its own method (its backward statistics say which, and what it did)
    assert b1.backward_stats.method.startswith("EP") and len(b1.backward_stats.nudged) == 2
    assert b2.backward_stats.method.startswith("Unrolled") and b2.backward_stats.steps == 400
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ffebm.set_gradient(model, ffebm.Implicit(tol=1e-12))
    loss_fn(model(x), y).backward()
    for n, p in model.named_parameters():
        assert cosine(mixed[n], p.grad) > 0.9999 and rel_error(mixed[n], p.grad) < 1e-2, n
    assert b1.backward_stats.method.startswith("Implicit") and b1.backward_stats.adjoint_iterations > 0


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


# ---------------------------------------------------------------------------------------------
# EP variants at a beta where they differ (soft pooling: a smooth, curved energy)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_setup():
    model = hybrid_conv(pool="soft", seed=0)
    x, y = batch(n=2, shape=(2, 8, 8))
    ref = _flat_grads(model, x, y, ffebm.Implicit(tol=1e-12))
    return model, x, y, ref


def _flat_grads(model, x, y, method):
    ffebm.set_gradient(model, method)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_ep_variants_sign_conventions(variant_setup):
    """positive nudges with +beta, negative with -beta: their O(beta) biases are opposite, and
    centered is their mean (exactly, on this model: the same two nudged phases)."""
    model, x, y, ref = variant_setup
    beta = 0.04
    pos = _flat_grads(model, x, y, ffebm.EP(beta, variant="positive"))
    assert [s.phase for s in model[0].backward_stats.nudged] == ["nudged+"]
    neg = _flat_grads(model, x, y, ffebm.EP(beta, variant="negative"))
    assert [s.phase for s in model[0].backward_stats.nudged] == ["nudged-"]
    cen = _flat_grads(model, x, y, ffebm.EP(beta, variant="centered"))
    assert [s.phase for s in model[0].backward_stats.nudged] == ["nudged+", "nudged-"]
    e_pos, e_neg = pos - ref, neg - ref
    assert rel_error(pos, ref) > 1e-3 and rel_error(neg, ref) > 1e-3  # the biases are visible here
    assert cosine(e_pos, e_neg) < -0.99                                # and opposite
    assert rel_error(cen, 0.5 * (pos + neg)) < 1e-6
    assert rel_error(cen, ref) < 0.1 * min(rel_error(pos, ref), rel_error(neg, ref))


def test_random_variant_draws_both_signs_and_nothing_else(variant_setup):
    model, x, y, _ = variant_setup
    beta = 0.04
    pos = _flat_grads(model, x, y, ffebm.EP(beta, variant="positive"))
    neg = _flat_grads(model, x, y, ffebm.EP(beta, variant="negative"))
    rnd = ffebm.EP(beta, variant="random", seed=0)
    seen = []
    for _ in range(8):
        g = _flat_grads(model, x, y, rnd)
        phases = {s.phase for _, b in ffebm.energy_blocks(model) for s in b.backward_stats.nudged}
        if phases == {"nudged+"}:
            seen.append("+")
            assert rel_error(g, pos) < 1e-9
        elif phases == {"nudged-"}:
            seen.append("-")
            assert rel_error(g, neg) < 1e-9
        else:  # the two blocks drew different signs: a mix of both estimates
            seen.append("mixed")
    assert "+" in seen and "-" in seen, seen


def test_ep_batch_scaling_nudges_each_sample_by_beta(variant_setup):
    """scale="batch": EP on a batch equals the mean of single-sample EP estimates at the same
    beta (each sample is nudged by beta times its own loss gradient); scale="none" does not."""
    model, x, y, _ = variant_setup
    beta = 0.04
    whole = _flat_grads(model, x, y, ffebm.EP(beta, variant="positive"))
    single = sum(_flat_grads(model, x[i:i + 1], y[i:i + 1], ffebm.EP(beta, variant="positive"))
                 for i in range(len(x))) / len(x)
    assert rel_error(whole, single) < 1e-6
    unscaled = _flat_grads(model, x, y, ffebm.EP(beta, variant="positive", scale="none"))
    assert rel_error(unscaled, single) > 1e-3


# ---------------------------------------------------------------------------------------------
# untested paths, each against an independent reference
# ---------------------------------------------------------------------------------------------
def test_implicit_fixed_point_solver_matches_finite_differences():
    model = hybrid_dense(seed=3, gradient=ffebm.Implicit(tol=1e-12, solver="fixed_point", max_iter=5000))
    x, y = batch(seed=4)
    loss_fn(model(x), y).backward()
    assert model[2].backward_stats.method == "Implicit(solver=fixed_point)"
    for name in ["2.couplings.0.weight", "5.couplings.0.bias", "0.weight"]:
        got = dict(model.named_parameters())[name].grad
        fd = finite_difference(model, x, y, name)
        assert rel_error(got, fd) < 1e-5, name


def test_default_unrolled_matches_converged_implicit():
    """Unrolled() runs the block's nudged-phase step count from the equilibrium: on a contractive
    block that is the implicit gradient (a default truncated to few steps is not)."""
    model = hybrid_dense(seed=5)
    for _, blk in ffebm.energy_blocks(model):
        blk.nudge_relaxation = ffebm.Relaxation(steps=300, tol=None)
    x, y = batch(seed=6)
    ref = _flat_grads(model, x, y, ffebm.Implicit(tol=1e-12))
    got = _flat_grads(model, x, y, ffebm.Unrolled())
    assert model[2].backward_stats.steps == 300
    assert rel_error(got, ref) < 1e-6
    short = _flat_grads(model, x, y, ffebm.Unrolled(steps=1))
    assert rel_error(short, ref) > 1e-2  # the comparison above can fail
