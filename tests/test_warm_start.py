"""Warm starts from the previous equilibrium (ffebm.warm_start): fewer free sweeps, the same
equilibrium and gradients up to the solve tolerance, nothing kept on the model, clear errors."""
import pytest
import torch

import ffebm
from ffebm.warm_start import WarmStartTooLarge


def _block(tol=1e-8, steps=2000, gradient=None):
    torch.manual_seed(0)
    kw = {} if gradient is None else {"gradient": gradient}
    return ffebm.DenseHopfield([12, 24, 16, 6], steps=steps, tol=tol, nudge_steps=40, **kw).double()


def test_second_visit_starts_at_the_stored_equilibrium_and_needs_fewer_sweeps():
    blk = _block()
    blk.relaxation.check_every = 1
    x = torch.rand(10, 12, dtype=torch.float64)
    starts = ffebm.WarmStarts(50)
    idx = torch.arange(20, 30)
    with ffebm.warm_start(starts, idx):  # one training step's forward pass
        y1 = blk(x)
        cold = blk.stats.steps
    with ffebm.warm_start(starts, idx):  # a later step with the same samples
        y2 = blk(x)
        warm = blk.stats.steps
    assert starts.misses == 10 and starts.hits == 10
    assert warm < cold / 3, (cold, warm)
    assert torch.allclose(y1, y2, atol=1e-7)
    # the stored rows are this call's free equilibrium, the other rows untouched
    (stored, _, _), seen = starts._blocks[blk][0]
    assert torch.allclose(stored[20:30], blk.state[0], atol=1e-12) and seen.sum() == 10
    assert stored[:20].abs().sum() == 0


def test_unseen_samples_of_a_batch_start_as_usual():
    blk = _block()
    x = torch.rand(6, 12, dtype=torch.float64)
    starts = ffebm.WarmStarts(10)
    with ffebm.warm_start(starts, torch.tensor([0, 1, 2])):
        blk(x[:3])
    with ffebm.warm_start(starts, torch.tensor([1, 2, 3, 4])):  # 1, 2 seen; 3, 4 new
        y = blk(x[1:5])
    plain = blk(x[1:5])  # no context: from zeros
    assert torch.allclose(y, plain, atol=1e-7)
    assert starts.hits == 2 and starts.misses == 5


@pytest.mark.parametrize("method", ["ep", "implicit"])
def test_gradients_match_the_cold_start_within_tolerance(method):
    # the weights move between two visits (as in training); the warm-started gradient is the
    # cold-started one, against Implicit at a tight solve (independent reference)
    grad = ffebm.EP(beta=1e-4, variant="centered") if method == "ep" else ffebm.Implicit()
    blk = _block(tol=1e-11, gradient=grad)
    x = torch.rand(8, 12, dtype=torch.float64)
    starts = ffebm.WarmStarts(8)
    idx = torch.arange(8)
    with ffebm.warm_start(starts, idx):
        blk(x).sum().backward()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.01 * torch.randn_like(p))
    blk.zero_grad()
    with ffebm.warm_start(starts, idx):
        (blk(x) ** 2).sum().backward()
    warm = [p.grad.clone() for p in blk.parameters()]
    ref_blk = _block(tol=1e-11, gradient=ffebm.Implicit())
    ref_blk.load_state_dict(blk.state_dict())
    (ref_blk(x) ** 2).sum().backward()
    tol = 1e-6 if method == "ep" else 1e-8
    for a, b in zip(warm, [p.grad for p in ref_blk.parameters()]):
        assert torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max()))), (a - b).abs().max()


def test_nothing_is_kept_on_the_model_and_outside_the_context_nothing_changes():
    blk = _block()
    x = torch.rand(4, 12, dtype=torch.float64)
    keys = set(blk.state_dict())
    starts = ffebm.WarmStarts(4)
    with ffebm.warm_start(starts, torch.arange(4)):
        blk(x)
    assert set(blk.state_dict()) == keys
    blk.relaxation.check_every = 1
    blk(x)
    assert blk.stats.steps > 10  # from zeros again
    # eval mode inside the context: from zeros, nothing stored
    before = starts.hits + starts.misses
    blk.eval()
    with ffebm.warm_start(starts, torch.arange(4)):
        blk(x)
    assert blk.stats.steps > 10 and starts.hits + starts.misses == before
    blk.train()
    # a batch of another size inside the context: an error naming the sizes
    with pytest.raises(ValueError, match="called on 2 samples inside a warm_start of 4 indices"):
        with ffebm.warm_start(starts, torch.arange(4)):
            blk(x[:2])


def test_a_block_called_twice_per_pass_keeps_a_state_per_call():
    blk = _block()
    blk.relaxation.check_every = 1
    x1, x2 = torch.rand(5, 12, dtype=torch.float64), torch.rand(5, 12, dtype=torch.float64)
    starts = ffebm.WarmStarts(5)
    idx = torch.arange(5)
    with ffebm.warm_start(starts, idx):
        blk(x1)
        cold2 = (blk(x2), blk.stats.steps)
    with ffebm.warm_start(starts, idx):
        blk(x1)
        warm1 = blk.stats.steps
        y2 = blk(x2)
        warm2 = blk.stats.steps
    assert warm1 < cold2[1] / 3 and warm2 < cold2[1] / 3
    assert torch.allclose(y2, cold2[0], atol=1e-7)
    assert len(starts._blocks[blk]) == 2


def test_bad_input_is_refused_with_clear_errors():
    starts = ffebm.WarmStarts(5)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        with ffebm.warm_start(starts, torch.tensor([0, 5])):
            pass
    with pytest.raises(ValueError, match="repeat"):
        with ffebm.warm_start(starts, torch.tensor([1, 1])):
            pass
    with pytest.raises(ValueError, match="1-d tensor of integers"):
        with ffebm.warm_start(starts, torch.tensor([0.5])):
            pass
    with pytest.raises(TypeError, match="WarmStarts"):
        with ffebm.warm_start("cache", torch.tensor([0])):
            pass
    with pytest.raises(ValueError, match="num_samples"):
        ffebm.WarmStarts(0)
    with pytest.raises(ValueError, match="num_samples"):
        ffebm.WarmStarts(2.5)
    assert ffebm.WarmStarts(__import__("numpy").int64(5)).num_samples == 5
    blk = _block()
    small = ffebm.WarmStarts(1000, max_bytes=1000)
    with pytest.raises(WarmStartTooLarge, match="MiB"):
        with ffebm.warm_start(small, torch.arange(3)):
            blk(torch.rand(3, 12, dtype=torch.float64))
