"""The fused CPU kernels (ffebm/analog/kernels): the same read model as the torch path, their
own normal draws and pulse bits checked for distribution, independence and reproducibility, and
a clear fallback when no compiler is there."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ffebm.analog import kernels
from ffebm.analog.config import IOConfig
from ffebm.analog.pulses import coincidence_counts, sample_bits
from ffebm.analog.config import UpdateConfig
from ffebm.analog.tile import read_backward, read_forward

# Without any C compiler the kernel cannot exist (reads take the torch path, checked by the
# fallback tests below, which always run); with one, a failed build fails these tests.
def _has_compiler() -> bool:
    try:
        return kernels._compiler() is not None
    except RuntimeError:  # a $CC that is no command
        return False


needs_kernel = pytest.mark.skipif(not _has_compiler(), reason="no C compiler on this machine")


@pytest.fixture
def path():
    """Run a read on a chosen path, restoring the choice afterwards."""
    def run(choice, fn, *a, **kw):
        kernels.set_cpu_kernels(choice)
        try:
            return fn(*a, **kw)
        finally:
            kernels.set_cpu_kernels(None)
    return run


NOISELESS = [
    IOConfig(out_noise=0.0),
    IOConfig(out_noise=0.0, noise_management="none"),
    IOConfig(out_noise=0.0, out_bound=0.5),  # clips: bound management re-reads
    IOConfig(out_noise=0.0, out_bound=0.5, bound_management=False),
    IOConfig(out_noise=0.0, inp_res=0.0, out_res=0.0),
    IOConfig(out_noise=0.0, inp_bound=0.3, out_bound=float("inf")),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("k", range(len(NOISELESS)))
def test_noiseless_reads_equal_the_torch_path(path, dtype, columns, k):
    io = NOISELESS[k]
    g = torch.Generator().manual_seed(k)
    W = torch.randn(20, 30, generator=g, dtype=dtype) * 0.3
    x = (torch.randn(4, 30, 7, generator=g, dtype=dtype) if columns
         else torch.randn(5, 3, 30, generator=g, dtype=dtype))
    d = (torch.randn(4, 20, 7, generator=g, dtype=dtype) if columns
         else torch.randn(5, 3, 20, generator=g, dtype=dtype))
    x[0].zero_()  # an all-zero vector: alpha = 1
    for fn, inp in ((read_forward, x), (read_backward, d)):
        ref = path("torch", fn, W, inp, io, None, columns)
        got = path("fused", fn, W, inp, io, None, columns)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, ref), float((got - ref).abs().max())


@needs_kernel
def test_bound_management_rereads_only_the_clipped_vectors(path):
    io = IOConfig(out_noise=0.0, out_bound=2.0, out_res=0.0, inp_res=0.0)
    W = torch.ones(3, 4)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.0, 0.0, 0.0]])  # row 0: 4 > bound at scale 1
    y = path("fused", read_forward, W, x, io)
    assert torch.allclose(y, x.sum(1, keepdim=True).expand(2, 3))  # recovered by halving the input


@needs_kernel
def test_nan_input_propagates(path):
    x = torch.rand(3, 8)
    x[1, 2] = float("nan")
    y = path("fused", read_forward, torch.rand(4, 8), x, IOConfig())
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def _noise(n_rows, out, seed, columns=False, io=None):
    """Pure output noise of fused reads: W = 0, no quantisation or bounds, inputs with alpha = 1."""
    io = io or IOConfig(out_noise=1.0, inp_res=0.0, out_res=0.0, out_bound=float("inf"))
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(out, 6)
    x = torch.ones(n_rows, 6, 5) if columns else torch.ones(n_rows, 6)
    kernels.set_cpu_kernels("fused")
    try:
        return read_forward(W, x, io, g, columns)
    finally:
        kernels.set_cpu_kernels(None)


def _normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@needs_kernel
@pytest.mark.parametrize("columns", [False, True])
def test_output_noise_is_standard_normal(columns):
    z = _noise(4000, 250, 0, columns).double().flatten()  # 1M (rows) / 5M (columns) draws
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 5 * math.sqrt(0.5 / n)
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    # Kolmogorov-Smirnov distance to N(0, 1), and the tails the ziggurat's slow paths produce
    s, _ = torch.sort(z)
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float((ecdf - _normal_cdf(s)).abs().max())
    assert ks < 1.95 / math.sqrt(n), ks
    for t in (1.0, 2.0, 3.0, 3.7, 4.5):  # 3.7 is beyond the base layer's edge R = 3.65
        p = 2 * (1 - float(_normal_cdf(torch.tensor(t, dtype=torch.float64))))
        got = float((z.abs() > t).double().mean())
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, (t, got, p)


@needs_kernel
def test_noise_is_independent_across_outputs_vectors_and_reads():
    a = _noise(2000, 64, 1).double()
    b = _noise(2000, 64, 1).double()
    assert torch.equal(a, b)  # same seed, same numbers
    g = torch.Generator().manual_seed(2)
    io = IOConfig(out_noise=1.0, inp_res=0.0, out_res=0.0, out_bound=float("inf"))
    kernels.set_cpu_kernels("fused")
    try:
        r1 = read_forward(torch.zeros(64, 6), torch.ones(2000, 6), io, g).double()
        r2 = read_forward(torch.zeros(64, 6), torch.ones(2000, 6), io, g).double()  # next read
    finally:
        kernels.set_cpu_kernels(None)
    n = r1.numel()
    lim = 5 / math.sqrt(n)

    def corr(u, v):
        u, v = u.flatten() - u.mean(), v.flatten() - v.mean()
        return float((u * v).mean() / (u.std() * v.std()))

    assert abs(corr(r1, r2)) < lim  # consecutive reads of the same generator
    assert abs(corr(r1[:, 1:], r1[:, :-1])) < lim  # neighbouring outputs of a vector
    assert abs(corr(r1[1:], r1[:-1])) < lim  # the same output of neighbouring vectors
    assert abs(corr(r1, a)) < lim  # another seed


@needs_kernel
def test_noise_does_not_depend_on_the_thread_count():
    code = textwrap.dedent("""
        import sys, torch
        from ffebm.analog import kernels
        from ffebm.analog.config import IOConfig
        from ffebm.analog.tile import read_forward
        torch.set_num_threads(int(sys.argv[1]))
        kernels.set_cpu_kernels("fused")
        g = torch.Generator().manual_seed(3)
        y = read_forward(torch.rand(64, 300, generator=g), torch.rand(3000, 300, generator=g), IOConfig(), g)
        torch.save(y, sys.argv[2])
    """)
    outs = []
    for t in (1, 2):
        f = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ffebm-kernel-threads-{os.getpid()}-{t}.pt")
        subprocess.run([sys.executable, "-c", code, str(t), f], check=True)
        outs.append(torch.load(f, weights_only=True))
        os.unlink(f)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_reads_follow_the_tile_generator_state(path):
    W, x = torch.rand(8, 16), torch.rand(10, 16)
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    a = path("fused", read_forward, W, x, IOConfig(), g)
    g.set_state(state)
    b = path("fused", read_forward, W, x, IOConfig(), g)
    c = path("fused", read_forward, W, x, IOConfig(), g)
    assert torch.equal(a, b) and not torch.equal(b, c)


@needs_kernel
def test_noisy_reads_match_the_torch_path_in_distribution(path):
    # same model: per output, the mean and spread of many noisy reads of one input agree
    io = IOConfig()
    W = torch.rand(16, 32) * 0.2
    x = torch.rand(1, 32).expand(20000, 32).contiguous()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    a = path("torch", read_forward, W, x, io, g1).double()
    b = path("fused", read_forward, W, x, io, g2).double()
    n = x.shape[0]
    sd = a.std(0)
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * sd * math.sqrt(2 / n) + 1e-6).all()
    assert ((a.std(0) / b.std(0) - 1).abs() < 5 * math.sqrt(1 / n) + 0.01).all()


@needs_kernel
def test_read_kernel_choice_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        kernels.set_cpu_kernels("fast")
    monkeypatch.setenv("FFEBM_CPU_KERNELS", "torch")
    assert kernels.cpu_kernels() == "torch"
    monkeypatch.setenv("FFEBM_CPU_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FFEBM_CPU_KERNELS"):
        kernels.cpu_kernels()
    monkeypatch.setenv("FFEBM_CPU_KERNELS", "auto")
    assert kernels.cpu_kernels() == "fused"
    # CPU float32 / float64 only
    assert kernels.supports(torch.rand(2, 3)) and not kernels.supports(torch.rand(2, 3, dtype=torch.bfloat16))
    kernels.set_cpu_kernels("torch")
    try:
        assert kernels.cpu_kernels() == "torch" and not kernels.supports(torch.rand(2, 3))
    finally:
        kernels.set_cpu_kernels(None)


def test_without_a_compiler_reads_fall_back_with_one_warning(tmp_path):
    code = textwrap.dedent("""
        import warnings, torch
        from ffebm.analog import kernels
        from ffebm.analog.config import IOConfig
        from ffebm.analog.tile import read_forward
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = read_forward(torch.rand(4, 8), torch.rand(3, 8), IOConfig())
            y = read_forward(torch.rand(4, 8), torch.rand(3, 8), IOConfig())
        msgs = [str(m.message) for m in w if "fused analog CPU kernels" in str(m.message)]
        assert len(msgs) == 1 and "is not an executable compiler" in msgs[0] and "$CC" in msgs[0], msgs
        assert kernels.cpu_kernels() == "torch" and y.shape == (3, 4)
        try:
            kernels.set_cpu_kernels("fused")
        except kernels.KernelUnavailable as e:
            assert "is not an executable compiler" in str(e)
        else:
            raise AssertionError("fused was accepted without a kernel")
        print("ok")
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), FFEBM_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("FFEBM_CPU_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_broken_compiler_is_reported(tmp_path):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\ncase \"$1\" in --version) echo fake-cc 1.0; exit 0;; esac\n"
                  "echo 'cc: fatal error: something broke' >&2\nexit 3\n")
    cc.chmod(0o755)
    code = textwrap.dedent("""
        import os
        from ffebm.analog import kernels
        try:
            kernels.set_cpu_kernels("fused")
        except kernels.KernelUnavailable as e:
            assert "something broke" in str(e) and "exit code 3" in str(e), e
            assert not [f for f in os.listdir(os.environ["FFEBM_KERNEL_CACHE"]) if f.endswith(".so")]
            print("ok")
    """)
    env = dict(os.environ, CC=str(cc), FFEBM_KERNEL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pulse_bits_have_the_asked_probabilities_signs_and_lengths(path, dtype):
    g = torch.Generator().manual_seed(7)
    B, n, L = 3000, 40, 6
    p = torch.rand(B, n, generator=g, dtype=dtype)
    p[:, 0] = 0.0
    p[:, 1] = 1.0
    bl = torch.randint(1, L + 1, (B,), generator=g)
    sign = torch.sign(torch.randn(B, n, generator=g, dtype=dtype))
    bits = path("fused", sample_bits, p, bl, L, g, sign)
    assert bits.shape == (B, L, n) and bits.dtype == dtype
    slot = torch.arange(L).view(1, L, 1)
    assert (bits[(slot >= bl.view(B, 1, 1)).expand(B, L, n)] == 0).all()  # nothing beyond BL
    fired = bits != 0
    assert torch.equal(bits[fired], sign.unsqueeze(1).expand(B, L, n)[fired])  # the sign of x / d
    assert not fired[:, :, 0].any()  # p = 0 never fires, p = 1 always does (within BL)
    assert fired[:, :, 1].sum() == bl.sum()
    # per element: fired / BL estimates p; z-scores over all elements stay small
    k = fired.sum(1).to(torch.float64)
    m = bl.to(torch.float64).unsqueeze(1)
    pd = p.to(torch.float64)
    z = (k.sum(0) - (m * pd).sum(0)) / torch.sqrt((m * pd * (1 - pd)).sum(0)).clamp_min(1e-12)
    assert z[2:].abs().max() < 5, z
    # slots and samples independent: neighbouring slots' bits do not correlate beyond chance
    a, b = fired[:, 0, 2:].double().flatten(), fired[:, 1, 2:].double().flatten()
    keep = (bl >= 2).repeat_interleave(n - 2)
    a, b = a[keep], b[keep]
    pk = p[:, 2:].double().flatten()[keep]
    cov = ((a - pk) * (b - pk)).mean()
    assert abs(float(cov)) < 5 * float(torch.sqrt((pk * (1 - pk)) ** 2).mean().sqrt()) / math.sqrt(a.numel())


@needs_kernel
def test_fused_pulse_counts_match_the_torch_path_in_distribution(path):
    # the fast pulsed update's coincidence counts: same mean and spread per device on both paths
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)
    x = torch.rand(16, 12, generator=g1)
    d = torch.randn(16, 10, generator=g1) * 0.05
    cfg = UpdateConfig()
    runs = {}
    for choice, g in (("torch", g1), ("fused", g2)):
        ups, downs = [], []
        for _ in range(400):
            up, down, _ = path(choice, coincidence_counts, x, d, 0.1, cfg, 0.001, g)
            ups.append(up)
            downs.append(down)
        runs[choice] = (torch.stack(ups).double(), torch.stack(downs).double())
    for k in range(2):
        a, b = runs["torch"][k], runs["fused"][k]
        se = torch.sqrt((a.var(0) + b.var(0)) / a.shape[0]).clamp_min(1e-3)
        assert ((a.mean(0) - b.mean(0)).abs() / se).max() < 5
        assert (a.mean(0) - b.mean(0)).abs().mean() < 0.05 * a.mean(0).abs().mean() + 1e-3


@needs_kernel
def test_a_damaged_cached_library_is_built_again(tmp_path):
    code = "from ffebm.analog import kernels; assert kernels.kernel_library() is not None, kernels._failure"
    env = dict(os.environ, FFEBM_KERNEL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (so,) = (tmp_path / "cache").glob("fused-*.so")
    whole = so.read_bytes()
    for damaged in (whole[:40000], b"not a shared library"):  # cut short (a full disk), replaced
        so.write_bytes(damaged)  # a cut-short library, loaded, would end the process (SIGBUS)
        r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        assert so.read_bytes() == whole


@needs_kernel
def test_cc_with_arguments_builds(tmp_path):
    env = dict(os.environ, CC=f"{kernels._compiler()[0]} -O2", FFEBM_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("FFEBM_CPU_KERNELS", None)
    code = "from ffebm.analog import kernels; assert kernels.kernel_library() is not None, kernels._failure"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@needs_kernel
@pytest.mark.parametrize("dw_min", [1e-3, 1e-300])
def test_fused_counts_of_degenerate_scales_stay_finite(path, dw_min):
    # dw_min so small that the probability factors overflow: inf * |x| is probability 1, inf * 0
    # (a zero input) is no pulse, on both paths
    x = torch.rand(6, 5)
    x[:, 2] = 0.0
    x[0, 0] = -0.5
    d = torch.randn(6, 4)
    cfg = UpdateConfig()
    for choice in ("torch", "fused"):
        up, down, bl = path(choice, coincidence_counts, x, d, 0.1, cfg, dw_min, torch.Generator().manual_seed(3))
        assert torch.isfinite(up).all() and torch.isfinite(down).all() and (up >= 0).all() and (down >= 0).all()
        assert (up[:, 2] == 0).all() and (down[:, 2] == 0).all()
        if dw_min < 1e-100:  # every bit fires: counts are the full bit lengths
            assert torch.equal(up + down, bl.sum().to(up.dtype).expand_as(up).clone().masked_fill(
                torch.zeros_like(up, dtype=torch.bool).index_fill(1, torch.tensor([2]), True), 0))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_abs_max_equals_torch(dtype):
    v = torch.randn(300, 37, dtype=dtype)
    v[4] = 0.0
    v[7, 3] = -float("inf")
    v[9, 1] = float("nan")
    got, ref = kernels.row_abs_max(v), v.abs().amax(1)
    assert torch.equal(got[torch.arange(300) != 9], ref[torch.arange(300) != 9]) and torch.isnan(got[9])


@needs_kernel
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-40), (torch.float32, 1e-38), (torch.float64, 1e-310),
                                          (torch.float64, 1e-300)])
def test_subnormal_inputs_read_finite_and_equal_on_both_paths(path, dtype, scale):
    W = torch.randn(5, 8, dtype=dtype)
    x = torch.rand(2, 8, dtype=dtype) * scale
    io = IOConfig(out_noise=0.0)
    a = path("torch", read_forward, W, x, io)
    b = path("fused", read_forward, W, x, io)
    assert torch.isfinite(a).all() and torch.equal(a, b)


@needs_kernel
def test_empty_reads_on_the_fused_path(path):
    W = torch.randn(5, 8)
    assert path("fused", read_forward, W, torch.rand(2, 8, 0), IOConfig(), None, True).shape == (2, 5, 0)
    assert path("fused", read_backward, W, torch.rand(2, 5, 0), IOConfig(), None, True).shape == (2, 8, 0)
    assert path("fused", read_forward, W, torch.rand(0, 8), IOConfig()).shape == (0, 5)
    assert path("fused", read_forward, torch.randn(0, 8), torch.rand(3, 8), IOConfig()).shape == (3, 0)
