"""The lazily evaluated bound management (read_forward_managed) against the plain published
sequence (``reference_read`` below: the same numbers without noise) and the tile's read
(read_forward: the same distribution with noise, the same numbers up to quantisation ties without),
and with fewer products."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ffebm.analog.inference_layers as inference_layers
from ffebm.analog import InferenceConfig, InferenceLinear, IOConfig, read_forward, read_forward_managed
from ffebm.analog.bound_management import has_lazy_bound_management
from ffebm.analog.tile import adc, dac, noise_management_scale


def reference_read(W, x, io):
    """The published forward read without noise, step by step: x_s = x / alpha, then at
    k = 1, 2, 4, ... the read ADC(W DAC(x_s / k)) of the samples whose last read clipped, y = alpha k
    ADC(.) at the first k that does not clip (or the last). The order of the float operations is
    the one the lazy read keeps (the tile's read works in DAC units: see the tie test below)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    alpha = noise_management_scale(x2, io)
    xs = x2 / alpha

    def single(v):
        z = dac(v, io) @ W.t()
        return adc(z, io), (z.abs() >= io.out_bound).any(dim=1)

    y, clipped = single(xs)
    scale = torch.ones_like(alpha)
    for _ in range(int(math.floor(math.log2(io.max_bm_factor)))):
        idx = clipped.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        scale[idx] = scale[idx] * 2.0
        ys, cl = single(xs[idx] / scale[idx])
        y[idx] = ys * scale[idx]
        clipped = torch.zeros_like(clipped)
        clipped[idx] = cl
    return (y * alpha).reshape(*lead, W.shape[0])


class _CountProducts(TorchFunctionMode):
    """Rows of every matrix product ``a @ b`` (a [N, in]) run under this mode."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul, torch.mm):
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _data(seed, out=96, inp=300, n=256, dtype=torch.float32):
    """Weights in [-1, 1] and inputs whose outputs span the bound at scales 1 .. 64 (a sample's
    magnitude and its alignment with a row vary), so that every bound-management path is taken."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.rand(out, inp, generator=g, dtype=dtype) * 2 - 1)
    x = torch.rand(n, inp, generator=g, dtype=dtype) * 2 - 1
    align = torch.linspace(0, 1, n, dtype=dtype).unsqueeze(1)
    x = (1 - align) * x + align * W[torch.arange(n) % out].sign()  # up to max |W x| ~ ||W_r||_1
    return W, x * torch.logspace(-2, 1, n, dtype=dtype).unsqueeze(1)


NOISE_FREE = {
    "published": IOConfig(out_noise=0.0),
    "no DAC quantisation": IOConfig(out_noise=0.0, inp_res=0.0),
    "low bound, few rounds": IOConfig(out_noise=0.0, out_bound=3.0, max_bm_factor=8),
    "last scale reached": IOConfig(out_noise=0.0, out_bound=0.5, max_bm_factor=4),
    "DAC clips (inp_bound 0.3)": IOConfig(out_noise=0.0, inp_bound=0.3),
    "no noise management": IOConfig(out_noise=0.0, noise_management="none", out_bound=20.0),
    "coarse DAC": IOConfig(out_noise=0.0, inp_res=0.1, out_bound=6.0),
}


@pytest.mark.parametrize("name", list(NOISE_FREE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_free_reads_equal_the_reference_exactly(name, dtype):
    io = NOISE_FREE[name]
    assert has_lazy_bound_management(io)
    for seed in range(3):
        W, x = _data(seed, dtype=dtype)
        ref = reference_read(W, x, io)
        assert torch.equal(read_forward_managed(W, x, io), ref), name
        # leading dimensions and a sub-batch read the same
        assert torch.equal(read_forward_managed(W, x[:60].reshape(3, 20, -1), io), ref[:60].reshape(3, 20, -1))


def test_clips_decided_from_the_first_product_save_the_rereads():
    """Inputs aligned with the rows clip at scales 1 .. 8 with certainty: the reference reads the
    whole batch at every scale, the lazy read only at the scales that were not certain clips."""
    g = torch.Generator().manual_seed(0)
    W = torch.rand(512, 512, generator=g) * 2 - 1
    x = (W[:64] > 0).float() * (0.5 + 0.5 * torch.rand(64, 512, generator=g))  # max |W x| ~ 100-180 > 8 * 12
    io = IOConfig(out_noise=0.0)
    with _CountProducts() as ref_count:
        ref = reference_read(W, x, io)
    with _CountProducts() as lazy_count:
        lazy = read_forward_managed(W, x, io)
    assert torch.equal(lazy, ref)
    assert ref_count.rows[:4] == [64] * 4, ref_count.rows  # scales 1, 2, 4, 8 for every sample
    assert lazy_count.rows[0] == 64 and sum(lazy_count.rows) <= 3 * 64, lazy_count.rows
    assert sum(lazy_count.rows) <= sum(ref_count.rows) - 2 * 64, (lazy_count.rows, ref_count.rows)  # 2, 4 skipped


def test_certificate_holds_when_the_dac_rounding_is_aligned_against_the_row():
    """The worst case of the certificate: inputs whose DAC rounding at scale 2 moves the output
    of row r by -n delta / 2 against its estimate z_1 / 2 (the entries at a = x / delta = 60.6
    round down at scale 2 where the row has +1, those at a = 1.4 round up where it has -1), with
    the bound between the estimate and the true product: the read must stop at scale 2, as the
    reference does (a certificate with a third of the margin would send it to scale 4)."""
    n, io = 64, IOConfig(out_noise=0.0, out_bound=14.9)
    delta = io.inp_res * 2 * io.inp_bound
    a = torch.tensor([60.6, 1.4] * (n // 2))
    w = torch.tensor([1.0, -1.0] * (n // 2))
    a[-1], w[-1] = 63.0, 0.0  # max |x| = 1: no noise-management rescaling
    x = (a * delta).unsqueeze(0)
    W = torch.stack([w, 0.1 * w])
    q1 = torch.round(x / delta) * delta
    q2 = torch.round(x / 2 / delta) * delta
    z1, z2 = float(q1 @ w), float(q2 @ w)
    assert z1 > io.out_bound and z1 / 2 - io.out_bound > 0.3 * 0.75 * n * delta and z2 < io.out_bound
    ref = reference_read(W, x, io)
    assert torch.equal(read_forward_managed(W, x, io), ref)
    assert float(ref[0, 0]) < io.out_bound * 2  # read at scale 2


@pytest.mark.parametrize("name", ["published", "low bound, few rounds", "coarse DAC", "DAC clips (inp_bound 0.3)"])
def test_the_tile_read_agrees_with_the_reference_up_to_quantisation_ties(name):
    """The tile's read computes in units of the DAC step (another order of float operations): a
    product that lands on a rounding tie of the ADC (or DAC) may round to the neighbouring level
    at its scale; every other output agrees to float rounding."""
    io = NOISE_FREE[name]
    for seed in range(3):
        W, x = _data(seed, dtype=torch.float64)
        ref, tile = reference_read(W, x, io), read_forward(W, x, io)
        unit = noise_management_scale(x, io) * io.out_res * 2 * io.out_bound  # one ADC level at scale 1
        levels = (tile - ref).abs() / unit
        assert float((levels > 1e-9).float().mean()) < 0.01, name    # ties are rare
        assert float(levels.max()) <= 4 + 1e-9, name                  # one level at scale <= 4 here


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / a.numel()
    fb = torch.searchsorted(b, grid, right=True) / b.numel()
    return float((fa - fb).abs().max())


def test_noisy_reads_have_the_reference_distribution():
    """Output noise large enough that every bound-management event is random, with the row that
    decides clipping near the certificate's margin: the distribution of every output of every
    sample (4000 draws each) matches the reference's (two-sample KS, 0.1 % level)."""
    g = torch.Generator().manual_seed(1)
    W = (torch.rand(8, 64, generator=g) * 2 - 1) * 0.5
    base = (W[:4] > 0).float() * torch.tensor([[1.0], [0.8], [0.6], [0.45]])
    base[:, 0] = 1.0  # alpha = 1: the scale of each sample is its own
    reps = 4000
    x = base.repeat(reps, 1)
    io = IOConfig(out_noise=0.4, out_bound=2.0, out_res=0.0, max_bm_factor=16)
    ref = read_forward(W, x, io, torch.Generator().manual_seed(2)).reshape(reps, 4, 8)
    lazy = read_forward_managed(W, x, io, torch.Generator().manual_seed(3)).reshape(reps, 4, 8)
    crit = 1.95 * (2 / reps) ** 0.5
    worst = max(_ks(ref[:, i, j], lazy[:, i, j]) for i in range(4) for j in range(8))
    assert worst < crit, (worst, crit)
    # the events are random here: the reference's outputs of one sample come from several scales
    assert all(len(torch.unique((ref[:, i].abs().amax(1) > 0).float())) >= 1 for i in range(4))
    spread = ref.std(dim=0)
    assert float(spread.min()) > 0.3


def test_settings_without_a_lazy_path_are_the_reference_read():
    W, x = _data(4, n=32)
    for io in (IOConfig(inp_noise=0.02), IOConfig(w_noise=0.02), IOConfig(bound_management=False),
               IOConfig(out_bound=float("inf")), IOConfig(max_bm_factor=1.5)):
        assert not has_lazy_bound_management(io)
        a = read_forward_managed(W, x, io, torch.Generator().manual_seed(5))
        assert torch.equal(a, read_forward(W, x, io, torch.Generator().manual_seed(5)))
    io = IOConfig()
    assert read_forward_managed(W, x[:0], io).shape == (0, W.shape[0])
    x0 = x.clone()
    x0[3] = 0.0
    assert torch.equal(read_forward_managed(W, x0, IOConfig(out_noise=0.0))[3], torch.zeros(W.shape[0]))
    with pytest.raises(ValueError, match="features"):
        read_forward_managed(W, x[:, :10], io)


@pytest.mark.parametrize("cfg", [InferenceConfig(io=IOConfig(out_noise=0.0)),
                                 InferenceConfig(io=IOConfig(out_noise=0.0), weight_scaling_columnwise=True,
                                                 max_size=200)])
def test_inference_layer_reads_as_with_the_reference_read(cfg, monkeypatch):
    torch.manual_seed(0)
    layer = InferenceLinear(300, 96, config=cfg, seed=0)
    _, x = _data(6, out=96, inp=300, n=64)
    x.requires_grad_(True)
    y = layer(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    monkeypatch.setattr(inference_layers, "read_forward_managed", lambda W, x, io, gen=None: reference_read(W, x, io))
    y_ref = layer(x)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, layer.weight))
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
