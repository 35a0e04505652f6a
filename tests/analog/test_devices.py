"""Device models: per-pulse response, closed forms, bounds, behaviour numbers, validation, seeds."""
import math
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ffebm.analog import (ConstantStep, DeviceArray, ExpStep, IdealDevice, InvalidSetting,
                          IOConfig, LinearStep, PiecewiseStep, PowStep, PulsedDevice, SoftBounds,
                          UpdateConfig, apply_pulses, device_from_name, pulse_probabilities,
                          register_device)
from ffebm.analog.devices import DEVICE_REGISTRY

# ---------------------------------------------------------------------------------------------
# independent float64 per-pulse recursions, written from the equations (not from the library)


def _clip(w, lo, hi):
    return min(max(w, lo), hi)


def ref_step(model, w, up, dw, lo, hi):
    """One noiseless pulse of a nominal device, plain python floats."""
    if isinstance(model, (ConstantStep,)):
        s = dw
    elif isinstance(model, LinearStep):  # includes SoftBounds
        s = dw * max(1 - model.gamma_up * w / hi, 0) if up else dw * max(1 - model.gamma_down * w / lo, 0)
    elif isinstance(model, ExpStep):
        z = 2 * model.a * w / (hi - lo) + model.b
        s = dw * max(1 - model.A_up * math.exp(model.gamma_up * z), 0) if up else \
            dw * max(1 - model.A_down * math.exp(-model.gamma_down * z), 0)
    elif isinstance(model, PowStep):
        rng = hi - lo
        s = dw * max((hi - w) / rng, 0) ** model.gamma if up else dw * max((w - lo) / rng, 0) ** model.gamma
    elif isinstance(model, PiecewiseStep):
        nodes = model.piecewise_up if up else model.piecewise_down
        if len(nodes) == 1:
            f = nodes[0]
        else:
            t = min(max((w - lo) / (hi - lo), 0), 1) * (len(nodes) - 1)
            i = min(int(math.floor(t)), len(nodes) - 2)
            fr = t - i
            f = nodes[i] * (1 - fr) + nodes[i + 1] * fr
        s = dw * f
    else:
        raise AssertionError(model)
    return _clip(w + (s if up else -s), lo, hi)


def ref_run(model, w0, n, dw):
    lo, hi = model.w_min, model.w_max
    w = w0
    for _ in range(abs(n)):
        w = ref_step(model, w, n > 0, dw, lo, hi)
    return w


MODELS = [
    ConstantStep(),
    LinearStep(gamma_up=0.5, gamma_down=0.5),
    LinearStep(gamma_up=0.3, gamma_down=0.8),
    SoftBounds(),
    SoftBounds(w_max=1.0, w_min=-0.4),
    ExpStep(),
    PowStep(gamma=2.0),
    PowStep(gamma=0.7),
    PiecewiseStep(piecewise_up=(1.0, 0.6, 0.1), piecewise_down=(0.2, 0.7, 1.0, 0.9)),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_n_pulses_equal_independent_recursion(model):
    dw = 0.01
    m = model.replace(dw_min=dw).without_variability()
    gen = torch.Generator().manual_seed(0)
    lo, hi = m.w_min, m.w_max
    starts = [lo, hi, 0.0] + [lo + (hi - lo) * float(u) for u in torch.rand(5, generator=gen)]
    counts = [0, 1, -1, 7, -7, 33, -50, 200, -200]
    w0 = torch.tensor([s for s in starts for _ in counts], dtype=torch.float64)
    n = torch.tensor([c for _ in starts for c in counts], dtype=torch.float64)
    want = torch.tensor([ref_run(m, s, c, dw) for s in starts for c in counts], dtype=torch.float64)
    for exact in (False, True):
        got = apply_pulses(m, w0, n, exact=exact)
        assert torch.allclose(got, want, atol=1e-12, rtol=0), (exact, (got - want).abs().max())


def test_behaviour_numbers_anchors():
    """Published behaviour of the reference simulator: from 0, variability off, dw_min 0.01,
    200 up then 200 down pulses (float32)."""
    cases = [(ConstantStep(), 0.600, -0.600), (LinearStep(gamma_up=0.5, gamma_down=0.5), 0.600, -0.600),
             (ExpStep(), 0.600, -0.600), (SoftBounds(), 0.579, -0.559), (PowStep(gamma=2.0), 0.273, -0.206)]
    for model, up, down in cases:
        m = model.replace(dw_min=0.01).without_variability()
        da = DeviceArray(m, (1, 3), seed=0)
        da.pulse(torch.full((1, 3), 200))
        assert torch.allclose(da.w, torch.full_like(da.w, up), atol=6e-4), (model, da.w)
        da.pulse(torch.full((1, 3), -200))
        assert torch.allclose(da.w, torch.full_like(da.w, down), atol=6e-4), (model, da.w)


@pytest.mark.parametrize("model", [ConstantStep(), SoftBounds()], ids=lambda m: type(m).__name__)
def test_default_variability_spread(model):
    """With default variability, the spread across devices after 200 pulses is ~0.15-0.2."""
    da = DeviceArray(model.replace(dw_min=0.01), (100, 100), seed=3)
    da.pulse(torch.full((100, 100), 200))
    sd = float(da.w.std())
    assert 0.13 < sd < 0.21, sd


def test_softbounds_symmetry_point():
    m = SoftBounds(up_down=0.2, w_max=0.8, w_min=-0.5, dw_min=0.002).without_variability()
    m = m.replace(up_down=0.2)
    p = m.nominal((1,), dtype=torch.float64)
    a_up, a_dn = 0.002 * 1.2, 0.002 * 0.8
    w_star = (a_up - a_dn) / (a_up / 0.8 - a_dn / -0.5)
    assert math.isclose(float(m.symmetry_point(p)), w_star, rel_tol=1e-9)
    for start in (-0.5, 0.0, 0.8):
        w = torch.tensor([start], dtype=torch.float64)
        # literal alternation, one pulse at a time
        wl = w.clone()
        for _ in range(3000):
            wl = m.pulse_once(wl, torch.ones(1), p)
            wl = m.pulse_once(wl, -torch.ones(1), p)
        assert abs(float(wl) - w_star) < m.dw_min, (start, float(wl), w_star)
        # closed form of 3000 up/down pairs
        wc = apply_pulses(m, w, torch.tensor([3000.]), torch.tensor([3000.]), p)
        assert abs(float(wc) - w_star) < 0.1 * m.dw_min, (start, float(wc), w_star)
    # with device-to-device spread, each device settles at its own point
    da = DeviceArray(SoftBounds(dw_min_std=0.0), (20, 20), seed=1, dtype=torch.float64)
    sp = da.symmetry_point()
    for _ in range(60):
        da.pulse_counts(torch.full((20, 20), 50.), torch.full((20, 20), 50.))
    assert (da.w - sp).abs().max() < 2e-3


def test_mixed_counts_closed_form_matches_loop():
    m = SoftBounds(dw_min=0.01).without_variability()
    p = m.nominal((6,), dtype=torch.float64)
    w = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.4, 0.55], dtype=torch.float64)
    nu = torch.tensor([0., 5., 30., 12., 40., 3.], dtype=torch.float64)
    nd = torch.tensor([4., 5., 10., 30., 0., 3.], dtype=torch.float64)
    a = apply_pulses(m, w, nu, nd, p)
    b = apply_pulses(m, w, nu, nd, p, exact=True)
    assert (a - b).abs().max() < 2e-3


_models = st.sampled_from(["ConstantStep", "LinearStep", "SoftBounds", "ExpStep", "PowStep",
                           "PiecewiseStep"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_models, seq=st.lists(st.integers(-400, 400), min_size=1, max_size=6),
       seed=st.integers(0, 2 ** 31 - 1), dw=st.sampled_from([0.001, 0.01, 0.05]),
       exact=st.booleans(), start=st.floats(-1.0, 1.0))
def test_weights_never_leave_bounds(name, seq, seed, dw, exact, start):
    kw = {"gamma_up": 0.7, "gamma_down": 1.3} if name == "LinearStep" else {}
    if name == "PiecewiseStep":
        kw = {"piecewise_up": (2.0, 1.0, 0.0), "piecewise_down": (0.5, 3.0)}
    model = device_from_name(name, dw_min=dw, dw_min_std=1.0, write_noise_std=2.0, **kw)
    da = DeviceArray(model, (4, 5), seed=seed)
    da.set_weights(torch.full((4, 5), start))
    gen = torch.Generator().manual_seed(seed + 1)
    for n in seq:
        counts = torch.randint(0, abs(n) + 1, (4, 5), generator=gen) * (1 if n >= 0 else -1)
        da.pulse(counts, exact=exact)
        assert (da.w >= da.params.w_min).all() and (da.w <= da.params.w_max).all()
        da.pulse_counts(counts.abs(), torch.randint(0, abs(n) + 1, (4, 5), generator=gen), exact=exact)
        assert (da.w >= da.params.w_min).all() and (da.w <= da.params.w_max).all()
    x = torch.rand(3, 5, generator=gen)
    d = torch.randn(3, 4, generator=gen)
    da.pulsed_update(x, d, 0.5, exact=exact)
    assert (da.w >= da.params.w_min).all() and (da.w <= da.params.w_max).all()


@pytest.mark.parametrize("make, field, fragment", [
    (lambda: ConstantStep(dw_min=0.0), "dw_min", "(0, inf)"),
    (lambda: ConstantStep(dw_min=-1e-3), "dw_min", "(0, inf)"),
    (lambda: SoftBounds(w_min=0.6, w_max=0.6), "w_min", "w_max"),
    (lambda: ConstantStep(w_min=1.0, w_max=-1.0), "w_min", "w_max"),
    (lambda: ConstantStep(corrupt_devices_prob=1.5), "corrupt_devices_prob", "[0, 1]"),
    (lambda: ConstantStep(corrupt_devices_prob=-0.1), "corrupt_devices_prob", "[0, 1]"),
    (lambda: ConstantStep(dw_min_std=-0.1), "dw_min_std", "[0, inf)"),
    (lambda: UpdateConfig(bl=0), "bl", "[1, 10000]"),
    (lambda: UpdateConfig(bl=2.5), "bl", "integer"),
    (lambda: IOConfig(out_noise=-1.0), "out_noise", "[0, inf)"),
    (lambda: IOConfig(inp_res=2.0), "inp_res", "[0, 1]"),
    (lambda: IOConfig(w_noise_type="bogus"), "w_noise_type", "one of"),
    (lambda: device_from_name("NoSuchDevice"), "name", "one of"),
    (lambda: PowStep(gamma=0.0), "gamma", "(0, inf)"),
    (lambda: PiecewiseStep(piecewise_up=()), "piecewise_up", "non-empty"),
])
def test_invalid_settings_name_field_and_range(make, field, fragment):
    with pytest.raises(InvalidSetting) as ei:
        make()
    msg = str(ei.value)
    assert ei.value.field == field and field in msg and fragment in msg, msg
    assert isinstance(ei.value, ValueError)


def test_registry_names():
    assert isinstance(device_from_name("SoftBoundsDevice"), SoftBounds)
    assert isinstance(device_from_name("soft_bounds", dw_min=0.01), SoftBounds)
    assert isinstance(device_from_name("constant_step"), ConstantStep)
    assert isinstance(device_from_name("ideal"), IdealDevice)
    for name in ["LinearStep", "ExpStep", "PowStep", "PiecewiseStep"]:
        assert type(device_from_name(name)).__name__ == name


def test_new_device_model_is_one_small_class():
    from dataclasses import dataclass

    @register_device("sqrt_step_test")
    @dataclass
    class SqrtStepTest(PulsedDevice):
        def step_up(self, w, p):
            return p.scale_up * ((p.w_max - w) / (p.w_max - p.w_min)).clamp(min=0).sqrt()

        def step_down(self, w, p):
            return p.scale_down * ((w - p.w_min) / (p.w_max - p.w_min)).clamp(min=0).sqrt()

    m = device_from_name("sqrt_step_test", dw_min=0.01)
    da = DeviceArray(m, (8, 8), seed=0)
    da.pulse(torch.full((8, 8), 100))
    assert (da.w > 0.1).all() and (da.w <= da.params.w_max).all()
    st_ = da.pulsed_update(torch.rand(4, 8), torch.randn(4, 8) * 0.1, 0.01)
    assert float(st_["n_up"] + st_["n_down"]) > 0


def test_same_seed_same_results_different_seed_different():
    def run(seed):
        da = DeviceArray(SoftBounds(), (16, 12), seed=seed)
        x = torch.rand(8, 12, generator=torch.Generator().manual_seed(5))
        d = torch.randn(8, 16, generator=torch.Generator().manual_seed(6)) * 0.1
        for _ in range(3):
            da.pulsed_update(x, d, 0.05)
        da.pulse(torch.full((16, 12), -20))
        return da.params.scale_up.clone(), da.params.w_max.clone(), da.w.clone()

    a, b, c = run(11), run(11), run(12)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for u, v in zip(a, c):
        assert not torch.equal(u, v)


def test_ideal_device_is_float_update():
    da = DeviceArray(IdealDevice(), (5, 4), seed=0, dtype=torch.float64)
    x = torch.rand(3, 4, dtype=torch.float64)
    d = torch.randn(3, 5, dtype=torch.float64)
    da.pulsed_update(x, d, 0.1)
    assert torch.allclose(da.w, -0.1 * d.t() @ x)


def test_write_noise_only_on_reads():
    da = DeviceArray(ConstantStep(write_noise_std=5.0), (30, 30), seed=0)
    da.pulse(torch.full((30, 30), 10))
    assert not torch.equal(da.w_read, da.w)
    r = (da.w_read - da.w).std()
    assert 0.003 < float(r) < 0.007  # 5 * dw_min


def test_plots_command_writes_pngs(tmp_path):
    from ffebm.analog.plots import device_response
    from train.experiments.device_response import main

    main(["--device", "SoftBounds", "--out", str(tmp_path), "--pulses", "50", "--devices", "10"])
    for name in ("SoftBounds_response.png", "SoftBounds_weights.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    ws = device_response(ConstantStep(dw_min=0.01).without_variability(), 100, 3)
    assert ws.shape == (201, 3) and abs(float(ws[100, 0]) - 0.6) < 1e-9 and abs(float(ws[-1, 0]) + 0.4) < 1e-9


# ---------------------------------------------------------------------------------------------
# degenerate devices: stuck, tiny steps, extreme shapes -- finite, inside the bounds, stuck
# devices never move

BUILTIN_DEVICE_NAMES = {"ConstantStep", "IdealDevice", "LinearStep", "SoftBounds", "ExpStep",
                        "PowStep", "PiecewiseStep"}


def _builtin_device_classes():
    """The device models defined in ffebm.analog.devices (other tests register their own)."""
    classes = {c for c in DEVICE_REGISTRY.values() if c.__module__ == "ffebm.analog.devices"}
    return sorted(classes, key=lambda c: c.__name__)


def test_builtin_device_list_is_complete():
    """A new built-in model must be added to BUILTIN_DEVICE_NAMES (and so to the tests below)."""
    assert {c.__name__ for c in _builtin_device_classes()} == BUILTIN_DEVICE_NAMES


# settings beyond the defaults where the defaults skip the code that divides by the range
_STUCK_EXTRA = {"PiecewiseStep": {"piecewise_up": (1.0, 0.6, 0.1),
                                  "piecewise_down": (0.2, 0.7, 1.0, 0.9)}}


@pytest.mark.parametrize("cls", _builtin_device_classes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("corrupt_range", [0.1, 0.0])
@pytest.mark.parametrize("exact", [False, True])
def test_stuck_devices_never_move(cls, corrupt_range, exact):
    """Every device stuck (w_min == w_max; with range 0 both are 0): pulses leave the states
    exactly where they are (was: NaN for PowStep, ExpStep, LinearStep, SoftBounds, an
    IndexError for PiecewiseStep)."""
    kw = _STUCK_EXTRA.get(cls.__name__, {})
    da = DeviceArray(cls(corrupt_devices_prob=1.0, corrupt_devices_range=corrupt_range, **kw),
                     (2, 2), seed=0)
    assert torch.equal(da.params.w_min, da.params.w_max)
    w0 = da.w.clone()
    da.pulse(torch.ones(2, 2), exact=exact)
    assert torch.isfinite(da.w).all() and torch.equal(da.w, w0), (da.w, w0)
    da.pulse_counts(torch.full((2, 2), 5.0), torch.full((2, 2), 3.0), exact=exact)
    da.pulsed_update(torch.rand(3, 2), torch.randn(3, 2), 0.1, exact=exact)
    assert torch.equal(da.w, w0), (da.w, w0)


@pytest.mark.parametrize("A", [0.0, 0.5, 1e30, 1e300])
@pytest.mark.parametrize("gamma", [0.0, 1e-3, 50.0, 1e4, 1e300])
def test_expstep_steps_finite_for_extreme_A_and_gamma(A, gamma):
    """A exp(gamma z) overflows for large gamma (then A = 0 gave 0 * inf = NaN) or underflows
    with an A beyond float32 (inf * 0): each factor stays in [0, 1], every step in [0, scale]."""
    m = ExpStep(A_up=A, A_down=A, gamma_up=gamma, gamma_down=gamma, corrupt_devices_prob=0.5)
    p = m.sample((4, 8), torch.Generator().manual_seed(0))
    for frac in (0.0, 0.3, 1.0):
        w = p.w_min + frac * (p.w_max - p.w_min)
        for step, scale in ((m.step_up(w, p), p.scale_up), (m.step_down(w, p), p.scale_down)):
            assert torch.isfinite(step).all() and (step >= 0).all() and (step <= scale).all()


def test_affine_closed_form_finite_when_contraction_rounds_to_one():
    """k = gamma dw / w_max just below 1 in float64 is 1 in float32 (parameters moved to float32
    keep the closed form): log(1 - k) = -inf gave 0 * inf = NaN for devices without pulses."""
    m = SoftBounds(dw_min=0.5, w_max=0.5000000001, w_min=-1.0).without_variability()
    p = m.nominal((2, 2), dtype=torch.float64).to(torch.float32)
    assert p.affine_ok and float(m.affine_up(p)[0].max()) == 1.0
    nu, nd = torch.tensor([[0., 1.], [3., 0.]]), torch.tensor([[0., 1.], [0., 2.]])
    for sigma in (0.0, 0.3):
        got = apply_pulses(m.replace(dw_min_std=sigma), torch.zeros(2, 2), nu, nd, p)
        assert torch.isfinite(got).all() and got[0, 0] == 0.0 and got[1, 0] == 0.5, got


@pytest.mark.parametrize("dw_min", [1e-300, 1e-45, 1e-12])
@pytest.mark.parametrize("lr", [1e-30, 1e-3, 1e4])
def test_pulse_probabilities_finite_for_tiny_steps(dw_min, lr):
    """lr / dw_min overflows (or dw_min is 0 in float32): probabilities in [0, 1], 0 for
    x_j = 0 or d_i = 0 (inf * 0 was NaN), bit lengths in [1, bl]."""
    x = torch.tensor([[0.0, 0.5, 1e-30], [0.0, 0.0, 0.0]])
    d = torch.tensor([[1e30, 0.0], [0.3, 0.0]])
    px, pd, bl = pulse_probabilities(x, d, lr, UpdateConfig(), dw_min)
    for prob, v in ((px, x), (pd, d)):
        assert torch.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all(), prob
        assert (prob[v == 0] == 0).all(), prob
    assert ((bl >= 1) & (bl <= 31)).all()


# corner values of every float setting (signed; each model keeps the ones it accepts): 0, tiny
# (1e-300 rounds to 0 in float32, 1e-45 to a denormal), around 1 (up_down near +-1), large
# (slopes, gammas, spreads), infinite (bounds)
_CORNER_MAGNITUDES = (0.0, 1e-300, 1e-45, 1e-12, 1e-3, 0.5, 1.0 - 1e-6, 1.0, 50.0, 1e4)
_CORNERS = tuple(sorted({s * v for v in _CORNER_MAGNITUDES for s in (1.0, -1.0)})) \
    + (math.inf, -math.inf)
# huge values too (1e300 is beyond float32) for every setting except the ones that scale the
# per-device step or its noise: a step that large, squared in a noise variance or times the
# pulse counts, is beyond float32 itself, and no model can keep an unbounded state finite then.
# So A_up/A_down, gammas, a, b, bounds, stuck values and node values are drawn huge as well.
_HUGE = (1e30, 1e300, -1e30, -1e300)
_STEP_FIELDS = {"dw_min", "dw_min_dtod", "dw_min_std", "up_down_dtod", "write_noise_std"}
_NODE_VALUES = st.one_of(st.sampled_from([v for v in _CORNER_MAGNITUDES + _HUGE if v >= 0]),
                         st.floats(0.0, 1e4))


def _accepted_corners(cls, name, default):
    """The corner values (and the default) that ``cls`` accepts for field ``name`` alone, so
    that most drawn combinations are valid."""
    vals = []
    for v in _CORNERS + (() if name in _STEP_FIELDS else _HUGE) + (default,):
        try:
            cls(**{name: v})
        except InvalidSetting:
            continue
        if v not in vals:
            vals.append(v)
    return vals


def _field_strategy(cls, f):
    default = f.default
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, tuple):
        return st.lists(_NODE_VALUES, min_size=1, max_size=50).map(tuple)
    if isinstance(default, (int, float)):
        return st.sampled_from(_accepted_corners(cls, f.name, float(default)))
    return st.just(default)


@st.composite
def _corner_devices(draw):
    cls = draw(st.sampled_from(_builtin_device_classes()))
    kw = {f.name: draw(_field_strategy(cls, f)) for f in fields(cls)
          if f.name != "corrupt_devices_prob"}
    if kw["w_min"] > kw["w_max"]:  # bounds: an ordered pair
        kw["w_min"], kw["w_max"] = kw["w_max"], kw["w_min"]
    kw["corrupt_devices_prob"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return cls, kw


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dev=_corner_devices(), seed=st.integers(0, 2 ** 31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), count=st.sampled_from([1, 4, 40]),
       lr=st.sampled_from([1e-3, 0.1, 1.0]))
def test_degenerate_devices_stay_finite_and_physical(dev, seed, dtype, count, lr):
    """Every built-in model with corner settings: states finite, inside each device's bounds,
    stuck devices exactly unchanged, through pulses, pulse counts and pulsed updates (fast and
    exact paths)."""
    cls, kw = dev
    try:
        model = cls(**kw)
    except InvalidSetting:
        assume(False)
    shape = (3, 4)
    da = DeviceArray(model, shape, seed=seed, dtype=dtype)
    w0 = da.w.clone()
    stuck = da.params.w_min == da.params.w_max
    if kw["corrupt_devices_prob"] == 1.0:
        assert stuck.all()
    gen = torch.Generator().manual_seed(seed)

    def check(what):
        w = da.w
        assert torch.isfinite(w).all() and torch.isfinite(da.w_read).all(), (what, model, w)
        assert ((w >= da.params.w_min) & (w <= da.params.w_max)).all(), (what, model, w)
        assert torch.equal(w[stuck], w0[stuck]), (what, model, w, w0)

    check("init")
    for exact in (False, True):
        da.pulse(torch.randint(-count, count + 1, shape, generator=gen), exact=exact)
        check(("pulse", exact))
        da.pulse_counts(torch.randint(0, count + 1, shape, generator=gen),
                        torch.randint(0, count + 1, shape, generator=gen), exact=exact)
        check(("pulse_counts", exact))
        x = torch.rand(3, shape[1], generator=gen) * (torch.rand(3, shape[1], generator=gen) > 0.3)
        d = torch.randn(3, shape[0], generator=gen) * (torch.rand(3, shape[0], generator=gen) > 0.3)
        da.pulsed_update(x, d, lr, exact=exact)
        check(("pulsed_update", exact))


def _schedule_reference(ku, bu, kd, bd, w, nu, nd):
    """The documented schedule of the affine closed form, pulse map by pulse map (python
    floats): floor(m/2) order-averaged pairs, the excess of one sign, the other pairs."""
    m = min(nu, nd)
    pair_rho = (1 - ku) * (1 - kd)
    pair_c = bu + bd - 0.5 * (kd * bu + ku * bd)
    for _ in range(m // 2):
        w = pair_rho * w + pair_c
    k, b = (ku, bu) if nu > nd else (kd, bd)
    for _ in range(abs(nu - nd)):
        w = (1 - k) * w + b
    for _ in range(m - m // 2):
        w = pair_rho * w + pair_c
    return w


@pytest.mark.parametrize("model", [SoftBounds(dw_min=0.01, up_down=0.2), LinearStep(dw_min=0.01),
                                   LinearStep(dw_min=0.02, gamma_up=0.3, gamma_down=0.9, mult_noise=False)],
                         ids=lambda m: f"{type(m).__name__}-{m.gamma_up}")
def test_affine_closed_form_mean_is_the_documented_schedule(model):
    """Noiseless: the closed form equals the pair / excess / pair schedule applied map by map
    (k = 0 included: LinearStep's default slopes), for every mix of counts, to rounding."""
    m = model.without_variability().replace(up_down=model.up_down)
    counts = [(0, 0), (5, 0), (0, 7), (4, 4), (5, 4), (9, 2), (3, 10), (40, 41)]
    nu = torch.tensor([float(a) for a, _ in counts], dtype=torch.float64)
    nd = torch.tensor([float(b) for _, b in counts], dtype=torch.float64)
    p = m.nominal((len(counts),), dtype=torch.float64)
    (ku, bu), (kd, bd) = m.affine_up(p), m.affine_down(p)
    for w0 in (-0.3, 0.0, 0.2):
        got = apply_pulses(m, torch.full((len(counts),), w0, dtype=torch.float64), nu, nd, p)
        for i, (a, b) in enumerate(counts):
            want = _schedule_reference(float(ku[i]), float(bu[i]), float(kd[i]), float(bd[i]), w0, a, b)
            want = min(max(want, float(p.w_min[i])), float(p.w_max[i]))
            assert abs(float(got[i]) - want) < 1e-12, (w0, a, b, float(got[i]), want)


def test_closed_form_constants_follow_parameter_changes():
    """Constants derived from the parameters are kept between calls but recomputed when a
    parameter tensor is changed in place or replaced, or the model's settings change."""
    m = SoftBounds(dw_min=0.01, dw_min_std=0.0).without_variability()
    p = m.nominal((3,), dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64)
    n = torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)
    first = apply_pulses(m, w, n, None, p)
    assert torch.equal(apply_pulses(m, w, n, None, p), first)
    p.scale_up.mul_(2.0)  # in place
    doubled = apply_pulses(m, w, n, None, p)
    assert doubled[0] > 1.9 * first[0]
    assert torch.equal(doubled, apply_pulses(m, w, n, None, p.clone()))
    p.scale_up = p.scale_up / 2.0  # replaced
    assert torch.allclose(apply_pulses(m, w, n, None, p), first, rtol=1e-15, atol=0)
    # the same parameters, other settings (the noise model enters the constants)
    def noisy(model, params):
        return apply_pulses(model, w, n, n.flip(0) + 1, params, torch.Generator().manual_seed(0))

    mult, add = m.replace(dw_min_std=0.5), m.replace(dw_min_std=0.5, mult_noise=False)
    assert not torch.equal(noisy(mult, p), noisy(add, p.clone()))
    assert torch.equal(noisy(add, p), noisy(add, p.clone()))
    # a flag among the parameters: without the closed form the per-pulse loop runs instead
    # (mixed counts: its alternating pairs differ from the closed form's order-averaged ones)
    nd = n.flip(0) + 1
    closed = apply_pulses(m, w, n, nd, p)
    p.affine_ok = False
    loop = apply_pulses(m, w, n, nd, p)
    assert torch.equal(loop, apply_pulses(m, w, n, nd, p, exact=True)) and not torch.equal(loop, closed)


@pytest.mark.parametrize("model", [SoftBounds(dw_min=0.01, dw_min_std=1.0, up_down=0.1),
                                   LinearStep(dw_min=0.01, dw_min_std=1.0, gamma_up=0.5, gamma_down=0.8,
                                              mult_noise=False)],
                         ids=lambda m: type(m).__name__)
def test_affine_closed_form_noise_matches_per_pulse_loop(model):
    """Fixed counts (pairs and an excess run), cycle-to-cycle noise only: mean and variance
    over 4000 devices per count mix of the closed form equal those of the per-pulse loop."""
    m = model.without_variability().replace(up_down=model.up_down, dw_min_std=1.0)
    shape = (4, 4000)
    p = m.nominal(shape, dtype=torch.float64)
    w = torch.full(shape, 0.1, dtype=torch.float64)
    nu = torch.tensor([30.0, 12.0, 0.0, 25.0], dtype=torch.float64).unsqueeze(1).expand(shape)
    nd = torch.tensor([10.0, 12.0, 20.0, 0.0], dtype=torch.float64).unsqueeze(1).expand(shape)
    a = apply_pulses(m, w, nu, nd, p, torch.Generator().manual_seed(1))
    b = apply_pulses(m, w, nu, nd, p, torch.Generator().manual_seed(2), exact=True)
    va, vb = a.var(1), b.var(1)
    assert ((a.mean(1) - b.mean(1)).abs() < 4 * (vb / shape[1]).sqrt() + 1e-3 * m.dw_min).all()
    assert ((va / vb - 1).abs() < 0.12).all(), va / vb  # 4000 draws each: sampling error ~3 %
