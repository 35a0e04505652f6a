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


def loss_nudged_ep(model, blk, x, y, beta, k):
    """Centered EP with the loss nudge, written out for the block [6, 7, 4]: k synchronous steps
    from the equilibrium at +beta and at -beta, the top layer nudged by beta * B * d loss / d s_top
    (the loss of the model's readout, at the current top state), read out as
    -(dPhi/d.(s+) - dPhi/d.(s-)) / (2 beta B) for W, b, u and -(s+ - s-) / (2 beta B) for the layers."""
    with torch.no_grad():
        model(x)
        u = blk.input_map(x)
    s_star = [t.detach() for t in blk.state]
    W = [c.weight.detach() for c in blk.couplings]
    b = [c.bias.detach() for c in blk.couplings]
    a, c = blk.gain, float(x.shape[0])
    clamp = lambda v: torch.clamp(a * v, 0.0, 1.0)  # noqa: E731

    def force(top):
        top = top.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model[1](top), y)
        return torch.autograd.grad(loss, top)[0]

    def phase(bt):
        s = s_star
        for _ in range(k):
            s0, s1, s2 = s
            s = [clamp(u + s1 @ W[0]), clamp(s0 @ W[0].t() + b[0] + s2 @ W[1]),
                 clamp(s1 @ W[1].t() + b[1] - bt * c * force(s2))]
        return s

    p, m = phase(beta), phase(-beta)
    scale = 1.0 / (2 * beta * c)
    out = {"W1": p[1].t() @ p[0] - m[1].t() @ m[0], "W2": p[2].t() @ p[1] - m[2].t() @ m[1],
           "b1": (p[1] - m[1]).sum(0), "b2": (p[2] - m[2]).sum(0), "u": p[0] - m[0]}
    out.update({f"s{i}": p[i] - m[i] for i in range(3)})
    return {n: -scale * g for n, g in out.items()}


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


def test_loss_nudge_matches_written_out_ep_and_truncated_bptt():
    """EP(nudge="loss") in the step-by-step check: its running estimate is the written-out
    loss-nudged EP at every k (beta 0.3, where the loss and delta nudges differ), and at a small
    beta it is the k-step truncated gradient (synchronous dynamics, float64)."""
    model, blk, x, y = one_block()
    loss = nn.CrossEntropyLoss()
    res = ffebm.compare_gdd(model, loss, (x, y), ep=ffebm.EP(0.3, steps=6, nudge="loss"), mode="sync")
    assert "nudge=loss" in res.method
    rows = _by_short(res, blk.name)
    delta = _by_short(ffebm.compare_gdd(model, loss, (x, y), ep=ffebm.EP(0.3, steps=6), mode="sync"), blk.name)
    moved = 0.0
    for k in range(1, 7):
        ep, bp = loss_nudged_ep(model, blk, x, y, 0.3, k), truncated_bptt(model, blk, x, y, k, "sync")
        for name, g in ep.items():
            r = rows[name][k - 1]
            assert r["ep_norm"] == pytest.approx(float(g.norm()), rel=1e-9, abs=1e-15), (k, name)
            assert r["rel_error"] == pytest.approx(ffebm.compare.rel_error(g, bp[name]), rel=1e-7, abs=1e-12), (k, name)
            moved = max(moved, abs(r["ep_norm"] - delta[name][k - 1]["ep_norm"]) / max(r["ep_norm"], 1e-30))
    assert moved > 1e-3   # the loss's curvature entered the nudged phases: not the delta nudge
    small = _by_short(ffebm.compare_gdd(model, loss, (x, y), ep=ffebm.EP(1e-4, steps=6, nudge="loss"), mode="sync"),
                      blk.name)
    for k in (1, 2, 3, 6):
        for name, g in truncated_bptt(model, blk, x, y, k, "sync").items():
            if float(g.norm()) > 0:
                r = small[name][k - 1]
                assert r["cosine"] > 1 - 1e-8 and r["rel_error"] < 1e-5, (k, name, r)


def test_command_line_gdd_with_the_loss_nudge(tmp_path, capsys):
    """--gdd --nudge loss: the last block nudged by the loss, the others by delta; against truncated
    backprop (synchronous, float64, small beta) it is as close as the delta nudge is, and the last
    block's first step is the delta nudge's (the loss's force at s* is the incoming gradient)."""
    runs = {}
    for nudge in ("delta", "loss"):
        out = tmp_path / nudge
        compare_main(["--gdd", "--nudge", nudge, "--beta", "0.001", "--double", "--t2", "4", "--batch", "4",
                      "--gdd-mode", "sync", "--out", str(out)])
        runs[nudge] = json.loads((out / "gdd.json").read_text())
    assert "block2: EP(beta=0.001, variant=centered, nudge=loss)" in runs["loss"]["method"]
    assert "nudge=loss" not in runs["delta"]["method"]
    changed = 0.0
    for block in ("block1", "block2"):
        for t, rows in runs["loss"]["blocks"][block].items():
            ref = runs["delta"]["blocks"][block][t]
            assert [r["k"] for r in rows] == [1, 2, 3, 4]
            for r, d in zip(rows, ref):
                assert abs(r["rel_error"] - d["rel_error"]) < 1e-6 + 1e-3 * d["rel_error"], (block, t, r, d)
                if r["bptt_norm"] > 0:
                    assert r["cosine"] > 0.999, (block, t, r)
                changed = max(changed, abs(r["ep_norm"] - d["ep_norm"]))
            if block == "block2":   # the last block: the same incoming gradient, the same backprop
                assert rows[0]["ep_norm"] == pytest.approx(ref[0]["ep_norm"], rel=1e-12, abs=1e-15), t
                assert [r["bptt_norm"] for r in rows] == pytest.approx([d["bptt_norm"] for d in ref], rel=1e-12), t
    assert changed > 1e-12   # the loss nudge ran: a fall-back to the delta nudge repeats the delta run exactly
