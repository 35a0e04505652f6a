"""Low-precision relaxation (bf16 autocast with full-precision polish steps)."""
import pytest
import torch
import torch.nn as nn

import ffebm
from ffebm.compare import cosine


def _block(precision):
    torch.manual_seed(0)
    relax = ffebm.Relaxation(steps=40, tol=None, precision=precision, polish_steps=3)
    nudge = ffebm.Relaxation(steps=20, tol=None, precision=precision, polish_steps=3)
    return ffebm.ConvHopfield(3, 8, [8, 8], pool=["avg", "avg"], dense=[5], linear_top=True, gain=1.0,
                              relaxation=relax, nudge_relaxation=nudge, gradient=ffebm.EP(0.2))


def test_precision_setting_validated():
    assert ffebm.Relaxation(precision="bfloat16").precision is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        ffebm.Relaxation(precision=torch.int8)
    with pytest.raises(ValueError, match="polish_steps"):
        ffebm.Relaxation(polish_steps=-1)


def test_bf16_relaxation_returns_full_precision_state_close_to_fp32():
    full, low = _block(None), _block(torch.bfloat16)
    low.load_state_dict(full.state_dict())
    diffs = []
    for seed in range(6):
        x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        a, b = full(x), low(x)
        assert b.dtype == torch.float32 and all(t.dtype == torch.float32 for t in low.state)
        diffs.append(float((a - b).abs().max() / a.abs().max()))
        # the polish steps leave a full-precision fixed point: one more fp32 step barely moves it
        assert low.stats.residual < 1e-2
    # typical states agree to bf16 accuracy (a rare sample may settle in another basin)
    assert sorted(diffs)[len(diffs) // 2] < 2e-2, diffs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_ep_gradient_agrees_with_fp32_ep(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    grads = []
    for prec in (None, torch.bfloat16):
        blk = _block(prec)
        nn.functional.cross_entropy(blk(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in blk.named_parameters()})
    for n in grads[0]:
        # a unit near a bound may settle on the other side after bf16 steps: cosine ~0.99, not 1
        assert cosine(grads[0][n], grads[1][n]) > 0.98, n


def test_low_precision_path_is_really_taken():
    """Without polish steps the returned state is what the bf16 steps produced: it differs from the
    fp32 state by bf16's resolution (2^-8), not by 0; polish steps bring it closer again."""
    torch.manual_seed(0)
    blk = ffebm.ConvHopfield(3, 8, [8, 8], pool=["avg", "avg"], dense=[5], linear_top=True, gain=1.0)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    u = blk.input_map(x).detach()
    full, _ = blk.solve(u, config=ffebm.Relaxation(steps=40, tol=None))
    low, _ = blk.solve(u, config=ffebm.Relaxation(steps=40, tol=None, precision=torch.bfloat16, polish_steps=0))
    polished, _ = blk.solve(u, config=ffebm.Relaxation(steps=40, tol=None, precision=torch.bfloat16, polish_steps=3))
    for f, l, p in zip(full, low, polished):
        assert l.dtype == torch.float32 and p.dtype == torch.float32
        rel = float((l - f).abs().max() / f.abs().max())
        assert 1e-3 < rel < 5e-2, rel                                 # bf16's resolution (2^-8)
        assert float((p - f).abs().max() / f.abs().max()) < rel       # polish returns towards fp32
