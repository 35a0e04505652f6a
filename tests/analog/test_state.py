"""Loading analog state: checked before anything changes (one clear error, module untouched), a
different split of the same matrix remapped; get/set_weights and writes into ``weight``."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn

from ffebm.analog import (AnalogConfig, AnalogConv2d, AnalogLinear, AnalogOptimizer, AnalogSGD, AnalogTile,
                          ChoppedTTv2, DeviceArray, IdealDevice, IOConfig, PowStep, SoftBounds, TikiTaka,
                          analog_parameters)
from ffebm.analog.state import IncompatibleState, StateRemapped


def _snapshot(module: nn.Module) -> dict:
    """Everything a load could change: parameters, buffers, tile states and device parameters."""
    out = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    for name, m in module.named_modules():
        if isinstance(m, AnalogTile):
            for i, row in enumerate(m.arrays):
                for j, a in enumerate(row):
                    out[f"{name}[{i},{j}].w"] = a.w.clone()
                    for k, v in a.params.items():
                        if isinstance(v, torch.Tensor):
                            out[f"{name}[{i},{j}].{k}"] = v.clone()
    return out


def _assert_unchanged(module: nn.Module, before: dict) -> None:
    after = _snapshot(module)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_other_split_is_remapped_not_half_loaded():
    """The issue's instance: AnalogLinear(12, 7, max_size=5) loading a max_size=512 state."""
    torch.manual_seed(0)
    src = AnalogLinear(12, 7, config=AnalogConfig(max_size=512, device=SoftBounds()), seed=1)
    dst = AnalogLinear(12, 7, config=AnalogConfig(max_size=5, device=SoftBounds()), seed=2)
    assert dst.tile.n_arrays == 6 and src.tile.n_arrays == 1
    with pytest.warns(StateRemapped, match="remapped"):
        dst.load_state_dict(_roundtrip(src.state_dict()))
    assert torch.equal(dst.get_weights()[0], src.get_weights()[0])
    assert torch.equal(dst.tile.tile_weights(), src.tile.tile_weights())
    # each device keeps its own sampled parameters through the remap
    for k in ("scale_up", "scale_down", "w_min", "w_max"):
        full = torch.cat([torch.cat([a.params[k].expand_as(a.w) for a in row], 1) for row in dst.tile.arrays], 0)
        torch.testing.assert_close(full, src.tile.arrays[0][0].params[k], rtol=0, atol=0)
    x = torch.rand(3, 12)
    with torch.no_grad():
        assert dst(x).shape == (3, 7)
    # and back the other way (6 arrays -> 1)
    back = AnalogLinear(12, 7, config=AnalogConfig(max_size=512, device=SoftBounds()), seed=3)
    with pytest.warns(StateRemapped):
        back.load_state_dict(dst.state_dict())
    assert torch.equal(back.tile.tile_weights(), src.tile.tile_weights())


@pytest.mark.parametrize("make_other, fragment", [
    (lambda: AnalogLinear(12, 8, config=AnalogConfig(device=SoftBounds())), "shape"),
    (lambda: AnalogLinear(13, 7, config=AnalogConfig(device=SoftBounds())), "shape"),
    (lambda: AnalogLinear(12, 7, config=AnalogConfig(device=PowStep())), "SoftBounds"),
    (lambda: AnalogLinear(12, 7, config=AnalogConfig(device=SoftBounds(dw_min=0.01))), "dw_min=0.001"),
], ids=["out", "in", "device", "settings"])
def test_mismatch_raises_one_clear_error_and_changes_nothing(make_other, fragment):
    torch.manual_seed(0)
    src = AnalogLinear(12, 7, config=AnalogConfig(device=SoftBounds()), seed=1)
    dst = make_other()
    before = _snapshot(dst)
    with pytest.raises((IncompatibleState, RuntimeError)) as ei:
        dst.load_state_dict(src.state_dict())
    assert fragment in str(ei.value), str(ei.value)
    _assert_unchanged(dst, before)
    with torch.no_grad():  # still usable
        dst(torch.rand(2, dst.in_features))


def test_device_parameters_of_another_model_are_refused():
    """A state saved without the device name (older files) is still checked by its parameters."""
    src = AnalogTile(4, 6, PowStep(), seed=0)
    dst = AnalogTile(4, 6, SoftBounds(), seed=1)
    sd = src.state_dict()
    sd["_extra_state"] = {k: v for k, v in sd["_extra_state"].items() if k != "device"}
    before = _snapshot(dst)
    with pytest.raises(IncompatibleState, match="gamma"):
        dst.load_state_dict(sd)
    _assert_unchanged(dst, before)


def test_conv_and_energy_coupling_load_checked():
    from ffebm.analog import AnalogDenseCoupling

    src = AnalogConv2d(3, 4, 3, config=AnalogConfig(max_size=512))
    dst = AnalogConv2d(3, 5, 3)
    before = _snapshot(dst)
    with pytest.raises(IncompatibleState, match="AnalogConv2d"):
        dst.load_state_dict(src.state_dict())
    _assert_unchanged(dst, before)
    c1 = AnalogDenseCoupling((6,), 5, config=AnalogConfig(max_size=4))
    c2 = AnalogDenseCoupling((6,), 5, config=AnalogConfig(max_size=2))
    with pytest.warns(StateRemapped):
        c2.load_state_dict(c1.state_dict())
    assert torch.equal(c2.get_weights()[0], c1.get_weights()[0])
    c3 = AnalogDenseCoupling((7,), 5)
    before = _snapshot(c3)
    with pytest.raises(IncompatibleState, match="6"):
        c3.load_state_dict(c1.state_dict())
    _assert_unchanged(c3, before)


def test_nested_model_error_names_the_layer():
    net1 = nn.Sequential(nn.Linear(4, 6), AnalogLinear(6, 3))
    net2 = nn.Sequential(nn.Linear(4, 6), AnalogLinear(6, 3, config=AnalogConfig(device=SoftBounds())))
    with pytest.raises(IncompatibleState, match=r"AnalogLinear '1'.*ConstantStep"):
        net2.load_state_dict(net1.state_dict())


def test_missing_and_unexpected_keys_follow_torch_and_strict_false_loads():
    src = AnalogLinear(5, 3, config=AnalogConfig(device=SoftBounds()))
    nobias = AnalogLinear(5, 3, bias=False, config=AnalogConfig(device=SoftBounds()))
    with pytest.raises(RuntimeError, match="bias"):
        nobias.load_state_dict(src.state_dict())
    nobias.load_state_dict(src.state_dict(), strict=False)  # the weight loads, the bias is ignored
    assert torch.equal(nobias.get_weights()[0], src.get_weights()[0])


def test_digital_state_programs_an_analog_twin_with_strict_false():
    """A digital layer's state has no tile state: its weight is programmed onto the tile."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    a = AnalogLinear(5, 3, config=AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()))
    res = a.load_state_dict(lin.state_dict(), strict=False)
    assert "tile._extra_state" in res.missing_keys
    torch.testing.assert_close(a.get_weights()[0], lin.weight.detach())
    x = torch.rand(2, 5)
    torch.testing.assert_close(a(x), lin(x))


def test_device_array_state_roundtrip_and_checks():
    a = DeviceArray(SoftBounds(), (3, 4), seed=0)
    a.pulse(torch.randint(-20, 20, (3, 4)))
    b = DeviceArray(SoftBounds(), (3, 4), seed=1)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert torch.equal(b.w, a.w) and torch.equal(b.params.w_max, a.params.w_max)
    n = torch.randint(-5, 5, (3, 4))
    a.pulse(n)
    b.pulse(n)
    assert torch.equal(a.w, b.w)  # the generator state came along
    for other, frag in ((DeviceArray(SoftBounds(), (4, 3), seed=0), "shape"),
                        (DeviceArray(PowStep(), (3, 4), seed=0), "SoftBounds")):
        w0, p0 = other.w.clone(), other.params.w_max.clone()
        with pytest.raises(IncompatibleState, match=frag):
            other.load_state_dict(a.state_dict())
        assert torch.equal(other.w, w0) and torch.equal(other.params.w_max, p0)
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        a.set_weights(torch.zeros(5, 4))


def _trained(algo, n_in=6, seed=0):
    torch.manual_seed(seed)
    m = AnalogLinear(n_in, 3, config=AnalogConfig(device=SoftBounds()), seed=seed)
    o = AnalogOptimizer(analog_parameters(m), algo, lr=0.1, seed=seed)
    for _ in range(3):
        o.zero_grad()
        (m(torch.rand(4, n_in)) ** 2).sum().backward()
        o.step()
    return m, o


def test_optimizer_load_checks_algorithm_and_shapes_first():
    m1, o1 = _trained(ChoppedTTv2())
    sd = _roundtrip(o1.state_dict())
    assert sd["algorithm"] == "ChoppedTTv2"
    m2, o2 = _trained(TikiTaka(), seed=1)
    before = {k: v.clone() for k, v in o2._export(m2.weight).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(IncompatibleState, match="ChoppedTTv2"):
        o2.load_state_dict(sd)
    after = o2._export(m2.weight)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # an older file without the algorithm's name: caught by its state's tensors
    old = dict(sd)
    old.pop("algorithm")
    with pytest.raises(IncompatibleState, match="chop"):
        o2.load_state_dict(old)
    # same algorithm, another weight shape
    m3, o3 = _trained(ChoppedTTv2(), n_in=5)
    with pytest.raises(IncompatibleState, match=r"AnalogLinear 3x5.*shapes"):
        o3.load_state_dict(sd)
    # the right one loads
    m4, o4 = _trained(ChoppedTTv2(), seed=2)
    m4.load_state_dict(m1.state_dict())
    o4.load_state_dict(sd)
    assert torch.equal(o4._export(m4.weight)["H"], o1._export(m1.weight)["H"])


# -- get_weights / set_weights / writes into weight ----------------------------------------------

def test_get_set_weights_with_bias():
    lin = AnalogLinear(4, 3, config=AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()))
    w, b = lin.get_weights()
    assert w.shape == (3, 4) and b.shape == (3,)
    w2, b2 = torch.randn(3, 4), torch.randn(3)
    lin.set_weights(w2, b2)
    torch.testing.assert_close(lin.get_weights()[0], w2)
    torch.testing.assert_close(lin.get_weights()[1], b2)
    lin.set_weights(2 * w2)  # the single-argument form keeps the bias
    torch.testing.assert_close(lin.get_weights()[0], 2 * w2)
    torch.testing.assert_close(lin.bias.detach(), b2)
    nb = AnalogLinear(4, 3, bias=False)
    assert nb.get_weights()[1] is None
    with pytest.raises(ValueError, match="no"):
        nb.set_weights(w2, b2)
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        lin.set_weights(torch.zeros(4, 4))
    conv = AnalogConv2d(2, 3, 3)
    w, b = conv.get_weights()
    assert w.shape == (3, 2, 3, 3) and b.shape == (3,)


@pytest.mark.parametrize("write", ["data", "copy_", "init", "torch_optimizer"])
def test_write_into_weight_is_applied_not_overwritten(write):
    """Issue: the optimizer moves the weight, the next forward overwrote it from the tile."""
    torch.manual_seed(0)
    lin = AnalogLinear(4, 3, config=AnalogConfig(device=IdealDevice(), io=IOConfig.perfect(), dense_grad=True))
    new = torch.randn(3, 4) * 0.3
    if write == "data":
        lin.weight.data = new.clone()
    elif write == "copy_":
        with torch.no_grad():
            lin.weight.copy_(new)
    elif write == "init":
        torch.manual_seed(5)
        nn.init.normal_(lin.weight, std=0.3)
        torch.manual_seed(5)
        new = torch.empty(3, 4).normal_(std=0.3)
    else:
        w0 = lin.get_weights()[0]
        x = torch.rand(2, 4)
        opt = torch.optim.SGD([lin.weight], lr=0.5)
        (lin(x) ** 2).sum().backward()
        g = lin.weight.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        new = w0 - 0.5 * g
    x = torch.rand(5, 4)
    y = lin(x)  # the next read
    torch.testing.assert_close(y, x @ new.t() + lin.bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.get_weights()[0], new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.detach(), new, rtol=1e-6, atol=1e-6)


def test_write_is_clipped_to_device_bounds_and_saved():
    lin = AnalogLinear(4, 3, config=AnalogConfig(device=SoftBounds()))
    with torch.no_grad():
        lin.weight.fill_(100.0)
    sd = lin.state_dict()  # a write reaches the tile before saving
    hi = lin.tile.arrays[0][0].params.w_max * lin.tile.out_scale.unsqueeze(1)
    torch.testing.assert_close(sd["weight"], hi)
    torch.testing.assert_close(lin.get_weights()[0], hi)


def test_analog_optimizer_after_a_write_pulses_from_the_written_value():
    lin = AnalogLinear(4, 3, config=AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()))
    opt = AnalogOptimizer(analog_parameters(lin), AnalogSGD(), lr=0.1)
    x = torch.rand(2, 4)
    (lin(x).sum()).backward()
    new = torch.full((3, 4), 0.2)
    with torch.no_grad():
        lin.weight.copy_(new)  # written between backward and step
    opt.step()
    torch.testing.assert_close(lin.get_weights()[0], new - 0.1 * torch.ones(3, 2) @ x)


# -- one optimizer for a mixed model -------------------------------------------------------------

def _mixed_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    from ffebm.analog import convert_to_analog
    return convert_to_analog(net, AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()), exclude=["2"], seed=seed)


def test_one_optimizer_steps_analog_by_pulses_and_digital_by_torch():
    m = _mixed_model()
    ref = _mixed_model()
    opt = AnalogOptimizer(m.parameters(), AnalogSGD(), lr=0.1, digital=torch.optim.SGD)
    x = torch.rand(6, 5)
    for mod in (m, ref):
        (mod(x) ** 2).sum().backward()
    opt.step()
    # reference: the same model, analog weight by the ideal pulsed update, digital by torch SGD
    AnalogOptimizer(analog_parameters(ref), AnalogSGD(), lr=0.1).step()
    torch.optim.SGD([p for n, p in ref.named_parameters() if n != "0.weight"], lr=0.1).step()
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert m[0].weight.analog_ctx.num_pairs == 0


def test_one_optimizer_scheduler_and_state_dict_cover_both(tmp_path):
    m = _mixed_model()
    opt = AnalogOptimizer(m.named_parameters(), ChoppedTTv2(), lr=0.05, seed=0, digital=torch.optim.Adam,
                          digital_options=dict(lr=1e-3))
    sch = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]
    for _ in range(2):
        opt.zero_grad()
        (m(torch.rand(4, 5)) ** 2).sum().backward()
        opt.step()
        sch.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0125, 0.00025]
    assert opt.digital.param_groups[0]["lr"] == 0.00025  # the scheduler reached the torch optimizer
    sd = _roundtrip({"m": m.state_dict(), "o": opt.state_dict(), "s": sch.state_dict()})
    m2 = _mixed_model(seed=1)
    opt2 = AnalogOptimizer(m2.named_parameters(), ChoppedTTv2(), lr=0.05, seed=3, digital=torch.optim.Adam,
                           digital_options=dict(lr=1e-3))
    sch2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    m2.load_state_dict(sd["m"])
    opt2.load_state_dict(sd["o"])
    sch2.load_state_dict(sd["s"])
    x = torch.rand(4, 5)
    for mod, o, s in ((m, opt, sch), (m2, opt2, sch2)):
        torch.manual_seed(7)
        o.zero_grad()
        (mod(x) ** 2).sum().backward()
        o.step()
        s.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[1] is opt2.digital.param_groups[0]
    # a pulsed-only optimizer cannot load the mixed state, and says so
    only = AnalogOptimizer(analog_parameters(m2), ChoppedTTv2(), lr=0.05)
    with pytest.raises(IncompatibleState, match="digital"):
        only.load_state_dict(sd["o"])


def test_digital_parameter_in_a_pulsed_only_optimizer_is_named():
    m = _mixed_model()
    with pytest.raises(ValueError, match=r"'0\.bias'.*digital=torch\.optim"):
        AnalogOptimizer(m.named_parameters(), AnalogSGD())
    with pytest.raises(ValueError, match=r"#1 of group 0.*named_parameters"):
        AnalogOptimizer(m.parameters(), AnalogSGD())
    with pytest.raises(ValueError, match="no analog weights"):
        AnalogOptimizer(nn.Linear(2, 2).parameters(), AnalogSGD(), digital=torch.optim.SGD)


# -- compact checkpoints: device spread drawn again, not stored -----------------------------------

def _nbytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def test_ctt_checkpoint_is_a_few_times_the_weights_and_resumes_exactly():
    torch.manual_seed(0)
    m = AnalogLinear(256, 256, config=AnalogConfig(device=SoftBounds()), seed=0)
    o = AnalogOptimizer(analog_parameters(m), ChoppedTTv2(), lr=0.05, seed=0)
    for _ in range(2):
        o.zero_grad()
        (m(torch.rand(4, 256)) ** 2).sum().backward()
        o.step()
    weights = 4 * 256 * 256
    model_b, opt_b = _nbytes(m.state_dict()), _nbytes(o.state_dict())
    # model: the mirror weight + the device states; optimizer: A's states, its reference, H
    assert model_b < 2.2 * weights and opt_b < 3.2 * weights, (model_b / weights, opt_b / weights)
    ck = _roundtrip({"m": m.state_dict(), "o": o.state_dict()})
    m2 = AnalogLinear(256, 256, config=AnalogConfig(device=SoftBounds()), seed=5)
    o2 = AnalogOptimizer(analog_parameters(m2), ChoppedTTv2(), lr=0.05, seed=7)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    for k, v in m.tile.arrays[0][0].params.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, m2.tile.arrays[0][0].params[k]), k
    x = torch.rand(4, 256)
    for mod, opt in ((m, o), (m2, o2)):
        opt.zero_grad()
        (mod(x) ** 2).sum().backward()
        opt.step()
    assert torch.equal(m.tile.tile_weights(), m2.tile.tile_weights())
    assert torch.equal(o._runtimes[id(m.weight)].A.w, o2._runtimes[id(m2.weight)].A.w)


def test_tampered_or_foreign_draw_record_is_refused():
    src = AnalogTile(3, 4, SoftBounds(), seed=0)
    sd = src.state_dict()
    rec = sd["_extra_state"]["params"][0][0]["__draw__"]
    rec["fingerprint"] = rec["fingerprint"] + 1.0
    dst = AnalogTile(3, 4, SoftBounds(), seed=1)
    before = _snapshot(dst)
    with pytest.raises(IncompatibleState, match="fingerprint"):
        dst.load_state_dict(sd)
    _assert_unchanged(dst, before)


def test_explicit_parameter_tensors_still_load():
    """Older files (and arrays whose parameters were set by hand) carry the tensors themselves."""
    src = AnalogTile(3, 4, SoftBounds(), seed=0)
    a = src.arrays[0][0]
    a.params = a.params.clone()  # assigned: how they were drawn is no longer known
    entry = src.state_dict()["_extra_state"]["params"][0][0]
    assert "__draw__" not in entry and isinstance(entry["scale_up"], torch.Tensor)
    dst = AnalogTile(3, 4, SoftBounds(), seed=1)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.arrays[0][0].params.scale_up, a.params.scale_up)


def test_copied_model_parameters_still_tell_analog_weights():
    """copy.deepcopy (to_analog_energy, convert_to_analog copy their input) drops a Parameter's
    Python attributes; the one optimizer must still put the analog weights on the pulsed side."""
    import copy

    m = copy.deepcopy(_mixed_model())
    opt = AnalogOptimizer(m.parameters(), AnalogSGD(), lr=0.1, digital=torch.optim.SGD)
    assert [p is m[0].weight for p in opt.analog_groups[0]["params"]] == [True]
    assert id(m[0].weight) not in {id(p) for g in opt.digital.param_groups for p in g["params"]}


def test_add_param_group_reaches_both_sides():
    a1, a2 = _mixed_model(), _mixed_model(seed=1)
    opt = AnalogOptimizer([a1[0].weight, a1[0].bias], AnalogSGD(), lr=0.1, digital=torch.optim.SGD)
    opt.add_param_group({"params": [a2[0].weight]})
    opt.add_param_group({"params": list(a2[2].parameters())})
    assert len(opt.analog_groups) == 2 and len(opt.digital.param_groups) == 2 and len(opt.param_groups) == 4
    w_a, w_d = a2[0].get_weights()[0].clone(), a2[2].weight.detach().clone()
    (a2(torch.rand(3, 5)) ** 2).sum().backward()
    opt.step()
    assert not torch.equal(a2[0].get_weights()[0], w_a) and not torch.equal(a2[2].weight.detach(), w_d)
    opt.zero_grad()
    assert a2[0].weight.analog_ctx.num_pairs == 0
    assert len(opt.state_dict()["param_groups"]) == 2
    only = AnalogOptimizer([a1[0].weight], AnalogSGD(), lr=0.1)
    with pytest.raises(ValueError, match="digital"):
        only.add_param_group({"params": [a1[0].bias]})


def test_optimizer_state_of_another_fast_device_or_tampered_is_refused_first():
    m1, o1 = _trained(ChoppedTTv2())
    sd = _roundtrip(o1.state_dict())
    torch.manual_seed(3)
    m2 = AnalogLinear(6, 3, config=AnalogConfig(device=PowStep()), seed=3)
    o2 = AnalogOptimizer(analog_parameters(m2), ChoppedTTv2(), lr=0.1, seed=3)
    (m2(torch.rand(2, 6)) ** 2).sum().backward()
    o2.step()
    before = {k: v.clone() for k, v in o2._export(m2.weight).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(IncompatibleState, match="SoftBounds"):
        o2.load_state_dict(sd)
    bad = _roundtrip(o1.state_dict())
    st = next(iter(bad["state"].values()))
    st["A.params"] = {"scale_up": torch.ones(2)}
    m3, o3 = _trained(ChoppedTTv2(), seed=4)
    with pytest.raises(IncompatibleState, match="fast array A"):
        o3.load_state_dict(bad)
    after = o2._export(m2.weight)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_write_noise_devices_resume_exactly_and_copies_keep_writes():
    import copy

    cfg = AnalogConfig(device=SoftBounds(write_noise_std=1.0), io=IOConfig.perfect())
    x = torch.rand(3, 4)
    a = AnalogLinear(4, 3, config=cfg, seed=0)
    sd = _roundtrip(a.state_dict())
    b = AnalogLinear(4, 3, config=cfg, seed=5)
    b.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    lin = AnalogLinear(4, 3, config=AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()))
    new = torch.full((3, 4), 0.25)
    with torch.no_grad():
        lin.weight.copy_(new)
    c = copy.deepcopy(lin)
    torch.testing.assert_close(c.get_weights()[0], new)
    torch.testing.assert_close(lin.effective_weight(), new)
    with pytest.raises(ValueError, match="shape"):
        lin.set_weights(torch.zeros(4, 3))  # transposed
    lin.weight.data = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        lin(x)


def test_huge_pulse_counts_are_capped_not_crashing(monkeypatch):
    import warnings as w

    from ffebm.analog import integrate

    monkeypatch.setattr(integrate, "MAX_LOOP_PULSES", 2000)  # (the default 1e5 takes ~30 s here)
    a = DeviceArray(PowStep(), (2, 2), seed=0)
    with w.catch_warnings(record=True) as rec:
        w.simplefilter("always")
        a.pulse(torch.full((2, 2), 1e19))
    assert torch.isfinite(a.w).all() and (a.w <= a.params.w_max).all()
    assert any("capped" in str(r.message) for r in rec)


def test_write_into_a_coupling_weight_reaches_the_relaxation():
    import ffebm
    from ffebm.analog import analog_couplings, to_analog_energy

    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([6, 5, 4], steps=40, tol=None, nudge_steps=10).double()
    a = to_analog_energy(blk, AnalogConfig(device=IdealDevice(), io=IOConfig.perfect()))
    new = torch.randn(4, 5, dtype=torch.float64) * 0.3
    with torch.no_grad():
        analog_couplings(a)[-1].weight.copy_(new)
        blk.couplings[-1].weight.copy_(new)
    x = torch.rand(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), blk(x), rtol=0, atol=1e-10)
