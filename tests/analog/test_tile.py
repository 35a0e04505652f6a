"""Reads (perfect, default noise model, bound management) and the AnalogTile."""
import pytest
import torch

from ffebm.analog import (AnalogTile, ConstantStep, IdealDevice, IOConfig, SoftBounds,
                          find_analog_tiles, read_backward, read_forward)


def _wx(seed, out=64, inp=128, B=256, wscale=0.5):
    g = torch.Generator().manual_seed(seed)
    W = (torch.rand(out, inp, generator=g) * 2 - 1) * wscale
    x = torch.rand(B, inp, generator=g) * 2 - 1
    return W, x, g


def test_perfect_reads_are_exact():
    W, x, g = _wx(0)
    assert torch.equal(read_forward(W, x, IOConfig.perfect()), x @ W.t())
    d = torch.randn(10, 64, generator=g)
    assert torch.equal(read_backward(W, d, IOConfig.perfect()), d @ W)


def test_default_read_within_noise_and_quantisation():
    W, x, g = _wx(1)
    x[:, 0] = 1.0  # alpha = max|x| = 1 for every sample
    io = IOConfig()
    err = read_forward(W, x, io, g) - x @ W.t()
    # out_noise 0.06, ADC step 24/510 (var step^2/12), DAC step 2/126 on 128 inputs
    q_out = io.out_res * 2 * io.out_bound
    q_in = io.inp_res * 2 * io.inp_bound
    expect = (io.out_noise ** 2 + q_out ** 2 / 12 + (W ** 2).sum(1).mean() * q_in ** 2 / 12) ** 0.5
    assert abs(float(err.mean())) < 0.01
    assert 0.85 * expect < float(err.std()) < 1.15 * expect, (float(err.std()), float(expect))
    # noise management: reading 0.01 x gives 0.01 y with the same relative error
    err_small = read_forward(W, 0.01 * x, io, g) - 0.01 * (x @ W.t())
    assert 0.85 * 0.01 * expect < float(err_small.std()) < 1.15 * 0.01 * expect
    # backward read with the same model
    d = torch.rand(256, 64, generator=g) * 2 - 1
    d[:, 0] = 1.0
    errb = read_backward(W, d, io, g) - d @ W
    assert 0.8 * 0.06 < float(errb.std()) < 0.08 * 1.2


@pytest.mark.parametrize("kind", ["additive", "pcm"])
def test_weight_read_noise(kind):
    W, x, g = _wx(2)
    io = IOConfig(out_noise=0.0, inp_res=0.0, out_res=0.0, w_noise=0.05, w_noise_type=kind)
    err = read_forward(W, x, io, g) - x @ W.t()
    xs = x / x.abs().amax(1, keepdim=True)
    if kind == "additive":
        s = xs.norm(dim=1, keepdim=True) * x.abs().amax(1, keepdim=True)
    else:
        s = torch.sqrt((xs * xs) @ W.abs().t()) * x.abs().amax(1, keepdim=True)
    z = err / (0.05 * s)
    assert abs(float(z.std()) - 1) < 0.05 and abs(float(z.mean())) < 0.05


def test_bound_management_recovers_clipped_outputs():
    g = torch.Generator().manual_seed(3)
    W = torch.full((8, 100), 0.5) + 0.05 * torch.randn(8, 100, generator=g)
    x = torch.ones(4, 100)  # W x ~ 50 >> out_bound 12
    exact = x @ W.t()
    clipped = read_forward(W, x, IOConfig(bound_management=False), g)
    assert torch.allclose(clipped, torch.full_like(clipped, 12.0), atol=0.05)
    rec = read_forward(W, x, IOConfig(), g)
    # input halved three times (50 -> 6.25) -> noise and quantisation scaled by 8
    # (plus DAC rounding of the scaled input 1/8 -> 8/63, ~1.6%)
    assert (rec - exact).abs().max() < 8 * (4.5 * 0.06 + 0.5 * 0.047) + 0.02 * 50
    # without output noise and DAC rounding the recovery is within ADC quantisation
    rec0 = read_forward(W, x, IOConfig(out_noise=0.0, inp_res=0.0), g)
    assert (rec0 - exact).abs().max() < 8 * 0.047
    # mixed batch: only the clipping sample is re-read
    x2 = torch.cat([x[:1], 0.01 * x[:1]])
    r2 = read_forward(W, x2, IOConfig(out_noise=0.0, inp_res=0.0), g)
    assert (r2 - x2 @ W.t()).abs().max() < 8 * 0.047


def test_tile_split_and_weights_roundtrip():
    g = torch.Generator().manual_seed(4)
    t = AnalogTile(70, 50, ConstantStep(w_min_dtod=0.0, w_max_dtod=0.0), io=IOConfig.perfect(), max_size=32, seed=0,
                   dtype=torch.float64)
    assert t.n_arrays == 3 * 2
    W = (torch.rand(70, 50, generator=g, dtype=torch.float64) - 0.5) * 0.2
    t.set_weights(W)
    assert torch.allclose(t.get_weights(), W)
    x = torch.randn(5, 50, generator=g, dtype=torch.float64)
    d = torch.randn(5, 70, generator=g, dtype=torch.float64)
    assert torch.allclose(t(x), x @ W.t())
    assert torch.allclose(t.backward(d), d @ W)


def test_tile_output_scale_and_update():
    g = torch.Generator().manual_seed(5)
    t = AnalogTile(20, 30, IdealDevice(), io=IOConfig.perfect(), seed=0, max_size=16,
                   weight_scaling_omega=0.5, dtype=torch.float64)
    W = torch.randn(20, 30, generator=g, dtype=torch.float64)
    t.set_weights(W)
    assert torch.allclose(t.tile_weights().abs().amax(1), torch.full((20,), 0.5, dtype=torch.float64))
    assert torch.allclose(t.get_weights(), W)
    x = torch.randn(4, 30, generator=g, dtype=torch.float64)
    d = torch.randn(4, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(t(x), x @ W.t())
    t.update(x, d, 0.1)
    assert torch.allclose(t.get_weights(), W - 0.1 * d.t() @ x)


def test_tile_pulsed_update_direction_and_state_dict():
    g = torch.Generator().manual_seed(6)
    t = AnalogTile(40, 30, SoftBounds(), seed=1, max_size=16)
    x = torch.rand(16, 30, generator=g)
    d = torch.randn(16, 40, generator=g) * 0.1
    before = t.get_weights()
    for _ in range(5):
        t.update(x, d, 0.05)
    dw = t.get_weights() - before
    target = -0.05 * 5 * d.t() @ x
    assert torch.nn.functional.cosine_similarity(dw.flatten(), target.flatten(), dim=0) > 0.8
    t2 = AnalogTile(40, 30, SoftBounds(), seed=99, max_size=16)
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2.get_weights(), t.get_weights())
    assert torch.equal(t2.arrays[1][0].params.w_max, t.arrays[1][0].params.w_max)


def test_tile_reads_reproducible_and_found_in_models():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = AnalogTile(4, 3, seed=0)
            self.holder = [AnalogTile(3, 2, seed=1)]

    net = Net()
    assert len(find_analog_tiles(net)) == 2
    x = torch.rand(2, 3)
    t1, t2 = AnalogTile(4, 3, seed=7), AnalogTile(4, 3, seed=7)
    t1.set_weights(torch.full((4, 3), 0.1))
    t2.set_weights(torch.full((4, 3), 0.1))
    assert torch.equal(t1(x), t2(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_update_and_read():
    t = AnalogTile(64, 48, SoftBounds(), seed=0, max_size=32)
    t.to("cuda")
    assert t.arrays[0][0].w.is_cuda and t.generator.device.type == "cuda"
    x = torch.rand(8, 48, device="cuda")
    d = torch.randn(8, 64, device="cuda") * 0.1
    y = t(x)
    z = t.backward(d)
    st = t.update(x, d, 0.05)
    assert y.is_cuda and z.is_cuda and float(st["n_up"] + st["n_down"]) > 0
    # device follows inputs: a CPU tile moves to the inputs' device
    t2 = AnalogTile(16, 8, "ConstantStep", seed=1)
    assert t2(torch.rand(2, 8, device="cuda")).is_cuda
    # reproducible on CUDA too
    a = AnalogTile(16, 8, "SoftBounds", seed=3, device="cuda")
    b = AnalogTile(16, 8, "SoftBounds", seed=3, device="cuda")
    xs, ds = torch.rand(4, 8, device="cuda"), torch.randn(4, 16, device="cuda") * 0.1
    a.update(xs, ds, 0.05)
    b.update(xs, ds, 0.05)
    assert torch.equal(a.get_weights(), b.get_weights())
    # exact path too: it moves the weights, identically on two equal tiles
    w = a.get_weights().clone()
    a.update(xs, ds, 0.05, exact=True)
    b.update(xs, ds, 0.05, exact=True)
    assert not torch.equal(a.get_weights(), w) and torch.equal(a.get_weights(), b.get_weights())


@pytest.mark.parametrize("io", [IOConfig(out_noise=0.0), IOConfig(out_noise=0.0, out_bound=1.0),
                                IOConfig(out_noise=0.0, noise_management="none", inp_bound=0.5)],
                         ids=["default", "bound-management", "no-noise-management"])
def test_column_reads_equal_row_reads(io):
    """Reads of the columns of [B, in, L] (the im2col layout) are the row reads of the same
    vectors: DAC/ADC quantisation, noise management and bound management (out_bound 1: some
    vectors re-read) act per vector. Noiseless, float64: equal to rounding; a tile
    split into several arrays (out_scale, partial sums) included."""
    g = torch.Generator().manual_seed(7)
    W = (torch.rand(6, 20, generator=g, dtype=torch.float64) - 0.5)
    x = torch.rand(3, 20, 5, generator=g, dtype=torch.float64) * 2 - 1
    x[1, :, 2] = 0.0  # a zero vector (alpha = 1)
    rows = x.transpose(1, 2).reshape(-1, 20)
    want = read_forward(W, rows, io).reshape(3, 5, 6).transpose(1, 2)
    got = read_forward(W, x, io, columns=True)
    assert got.shape == (3, 6, 5) and torch.allclose(got, want, atol=1e-12, rtol=0)
    if io.out_bound == 1.0:  # bound management did re-read some vectors
        assert not torch.allclose(read_forward(W, rows, IOConfig(out_noise=0.0, out_bound=1.0, bound_management=False)),
                                  read_forward(W, rows, io))
    d = torch.rand(3, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
    want_b = read_backward(W, d.transpose(1, 2).reshape(-1, 6), io).reshape(3, 5, 20).transpose(1, 2)
    assert torch.allclose(read_backward(W, d, io, columns=True), want_b, atol=1e-12, rtol=0)
    t = AnalogTile(6, 20, ConstantStep(w_min_dtod=0.0, w_max_dtod=0.0), io=io, max_size=4, seed=0, dtype=torch.float64)
    t.set_weights(0.2 * W)
    assert torch.allclose(t.forward(x, columns=True), t.forward(rows).reshape(3, 5, 6).transpose(1, 2),
                          atol=1e-12, rtol=0)
    assert torch.allclose(t.backward(d, columns=True), t.backward(d.transpose(1, 2).reshape(-1, 6))
                          .reshape(3, 5, 20).transpose(1, 2), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        read_forward(W, rows, io, columns=True)
