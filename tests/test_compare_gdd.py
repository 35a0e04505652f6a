"""The step-by-step (GDD) check: EP's running estimate after k nudged steps against backprop
through the last k free steps from the equilibrium.

The truncated-backprop side is checked against an independent computation: a dense block's
synchronous or asynchronous step written out here with plain torch ops, run k steps from the
equilibrium in float64 and differentiated with autograd. For synchronous dynamics EP at a small
beta matches it at every k (the gradient-descending-updates property of Ernoult et al. 2019).
"""
import json

import pytest
import torch
import torch.nn as nn

import ffebm
from train.compare import main as compare_main


def one_block(seed: int = 0):
    torch.manual_seed(seed)
    tight = ffebm.Relaxation(steps=3000, tol=1e-13)
    blk = ffebm.DenseHopfield([5, 6, 7, 4], gain=0.5, init_gain=1.5, relaxation=tight,
                              nudge_relaxation=ffebm.Relaxation(steps=6, tol=None))
    with torch.no_grad():
        for c in blk.couplings:
            c.bias.add_(0.5)   # some units saturate, some are free
    model = nn.Sequential(blk, nn.Linear(4, 3)).double()
    list(ffebm.energy_blocks(model))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    return model, blk, x, y


def truncated_bptt(model, blk, x, y, k, mode):
    """d loss / d(W, b, u) through k free steps of the block [6, 7, 4] (written out here) from the equilibrium, and the gradient with respect
    to each layer's pre-activation summed over those steps (via an additive bias on every update)."""
    with torch.no_grad():
        model(x)
    s_star = [t.detach() for t in blk.state]
    W = [c.weight.detach().clone().requires_grad_(True) for c in blk.couplings]
    b = [c.bias.detach().clone().requires_grad_(True) for c in blk.couplings]
    with torch.no_grad():
        u = blk.input_map(x).detach().clone().requires_grad_(True)   # the block's drive of layer 0
    eps = [torch.zeros_like(t, requires_grad=True) for t in s_star]
    a = blk.gain
    s = s_star
    for _ in range(k):
        s0, s1, s2 = s
        clamp = lambda v: torch.clamp(a * v, 0.0, 1.0)  # noqa: E731
        if mode == "sync":
            s = [clamp(u + s1 @ W[0] + eps[0]), clamp(s0 @ W[0].t() + b[0] + s2 @ W[1] + eps[1]),
                 clamp(s1 @ W[1].t() + b[1] + eps[2])]
        else:
            n0 = clamp(u + s1 @ W[0] + eps[0])
            n2 = clamp(s1 @ W[1].t() + b[1] + eps[2])
            s = [n0, clamp(n0 @ W[0].t() + b[0] + n2 @ W[1] + eps[1]), n2]
    loss = nn.functional.cross_entropy(model[1](s[-1]), y)
    leaves = W + b + [u] + eps
    gs = [torch.zeros_like(t) if g is None else g
          for g, t in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)]
    return {"W1": gs[0], "W2": gs[1], "b1": gs[2], "b2": gs[3], "u": gs[4], "s0": gs[5], "s1": gs[6], "s2": gs[7]}


def _by_short(res, block):
    return {res.short(t): rows for t, rows in res.blocks[block].items()}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bptt_side_matches_an_independent_unrolled_computation(mode):
    model, blk, x, y = one_block()
    res = ffebm.compare_gdd(model, nn.CrossEntropyLoss(), (x, y), ep=ffebm.EP(1e-4, steps=6), mode=mode)
    rows = _by_short(res, blk.name)
    assert set(rows) == {"W1", "W2", "b1", "b2", "u", "s0", "s1", "s2"}
    assert res.mode == mode
    for k in (1, 2, 3, 6):
        ref = truncated_bptt(model, blk, x, y, k, mode)
        for name, g in ref.items():
            r = rows[name][k - 1]
            assert r["k"] == k
            assert r["bptt_norm"] == pytest.approx(float(g.norm()), rel=1e-9, abs=1e-15), (mode, k, name)
        if mode == "sync":  # GDD: EP's k-step estimate is the k-step truncated gradient (to O(beta))
            for name, g in ref.items():
                r = rows[name][k - 1]
                assert r["ep_norm"] == pytest.approx(float(g.norm()), rel=1e-5, abs=1e-12), (k, name)
                if float(g.norm()) > 0:
                    assert r["cosine"] > 1 - 1e-8 and r["rel_error"] < 1e-5, (k, name, r)


def test_async_ep_lags_half_a_step_and_both_converge():
    model, blk, x, y = one_block()
    res = ffebm.compare_gdd(model, nn.CrossEntropyLoss(), (x, y), ep=ffebm.EP(1e-4, steps=6))
    rows = _by_short(res, blk.name)
    # the nudge reaches the bottom layer only in a later async step (it is updated first)
    assert rows["s0"][0]["ep_norm"] == 0.0 and rows["s0"][-1]["ep_norm"] > 0
    assert rows["W2"][-1]["rel_error"] < rows["W2"][0]["rel_error"]
    # both tend to the implicit gradient: the last k agrees with Implicit
    ref = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y), reference=ffebm.Implicit(tol=1e-12),
                                  candidates=[ffebm.Unrolled(steps=200)])
    g = ref.grads[ref.reference][f"0.couplings.1.weight"]
    trunc = truncated_bptt(model, blk, x, y, 200, "async")["W2"]
    assert torch.allclose(trunc, g, rtol=1e-6, atol=1e-12)


def test_model_is_restored_and_table_reads():
    model, blk, x, y = one_block()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    method = blk.gradient
    res = ffebm.compare_gdd(model, nn.CrossEntropyLoss(), (x, y), ep=ffebm.EP(0.01, steps=4))
    assert blk.gradient is method
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v))
    text = res.table()
    assert "k=1" in text and "k=4" in text and "couplings.<i-1>" in text
    json.dumps(res.to_dict())
    with pytest.raises(TypeError):
        ffebm.compare_gdd(model, nn.CrossEntropyLoss(), (x, y), ep=ffebm.Implicit())
    with pytest.raises(ValueError, match="mode"):
        ffebm.compare_gdd(model, nn.CrossEntropyLoss(), (x, y), mode="even")


def test_command_line_gdd(tmp_path, capsys):
    compare_main(["--gdd", "--beta", "0.01", "--double", "--t2", "4", "--batch", "4", "--gdd-mode", "sync",
                  "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "block1" in out and "block2" in out and "k=4" in out
    assert (tmp_path / "gdd.png").stat().st_size > 0
    data = json.loads((tmp_path / "gdd.json").read_text())
    assert data["mode"] == "sync" and data["t2"] == 4
    rows = data["blocks"]["block1"]
    first = next(iter(rows.values()))
    assert [r["k"] for r in first] == [1, 2, 3, 4]
