"""Hardware-aware training runs of the trainer (``analog_mode=inference``): configuration, conversion,
clipping, exact resume, the deployment curve of ``train.evaluate --times --draws`` and the
experiment's ``--quick`` path.  A small digits ff-EBM (and the MLP baseline) on a subset of digits."""

import json
import signal

import pytest
import torch
import torch.nn as nn

from conftest import assert_same, folder_digest, main_inproc, one_line_error, run_in_folder, run_train
from train import checkpoint as C
from train.config import ConfigError
from train.recipes import build_config
from train.trainer import Trainer

# 8 steps per epoch (256 samples, batch 32); relaxation on noisy reads averaged over the last 2 steps
SMALL = dict(model="digits", model_options="hidden=24,width=16,tol=none,average_last=2", t1="6", t2="4", beta="1.0",
             analog_mode="inference", train_subset="256", test_subset="64", batch_size="32", epochs="2",
             lr="5e-3", weight_decay="0", grad_clip="0", progress="false", tensorboard="false", num_threads="1")
ARGS = ["digits"] + [f"{k}={v}" for k, v in SMALL.items()]


def small_cfg(**kw):
    over = dict(SMALL)
    over.update({k: str(v) for k, v in kw.items()})
    return build_config("digits", over)


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,words", [
    ({"analog": "soft_bounds"}, ["analog='soft_bounds'", "analog_mode=inference", "analog="]),
    ({"analog_mode": "chip"}, ["analog_mode='chip'", "training", "inference"]),
    ({"inference_modifier": "gauss"}, ["inference_modifier='gauss'", "add_gauss", "pcm_prog", "none"]),
    ({"inference_modifier": "add_gauss"}, ["inference_modifier=add_gauss", "inference_modifier_std"]),
    ({"inference_modifier_std": "-0.1"}, ["inference_modifier_std=-0.1", ">= 0"]),
    ({"inference_clip": "fixed"}, ["inference_clip=fixed", "inference_clip_value"]),
    ({"inference_clip": "sigma", "inference_clip_value": "0"}, ["inference_clip_value=0", "> 0"]),
    ({"inference_clip": "box"}, ["inference_clip='box'", "sigma"]),
    ({"method": "unrolled"}, ["method=unrolled", "analog_mode=inference", "method=ep"]),
    ({"grad_check_every": "3"}, ["grad_check_every=3", "analog_mode=inference", "grad_check_every=0"]),
    ({"analog_omega": "-1"}, ["analog_omega=-1", ">= 0"]),
])
def test_config_errors(over, words):
    with pytest.raises(ConfigError) as e:
        small_cfg(**over)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_config_error_on_the_command_line(tmp_path, capsys, monkeypatch):
    line = one_line_error(main_inproc(ARGS + ["analog=soft_bounds", "--out", "r"], tmp_path, capsys, monkeypatch))
    assert line.startswith("error: analog='soft_bounds' with analog_mode=inference")
    assert not (tmp_path / "r").exists()


def test_training_mode_refuses_the_inference_keys_and_converts_nothing():
    with pytest.raises(ConfigError, match="apply to analog_mode=inference only"):
        small_cfg(analog_mode="training", inference_modifier="add_gauss", inference_modifier_std="0.05")
    with pytest.raises(ConfigError, match="inference_modifier=add_gauss: inference keys apply"):
        small_cfg(analog_mode="training", inference_modifier="add_gauss")
    with pytest.raises(ConfigError, match="inference_modifier_std"):   # on a chip: the missing strength
        small_cfg(inference_modifier="add_gauss")
    t = Trainer(small_cfg(analog_mode="training"), None, log=lambda m: None).setup()
    from ffebm.analog import inference_modules

    assert not inference_modules(t.core)


def test_keys_reach_the_inference_config():
    from ffebm.analog import IOConfig
    from train.inference import inference_config

    c = inference_config(small_cfg())
    assert c.modifier.kind == "pcm_prog" and c.modifier.strength == 1.0
    assert c.clip.kind == "sigma" and c.clip.bound == 2.5 and c.weight_scaling_omega == 1.0
    assert c.io == IOConfig() and c.drift_compensation
    c = inference_config(small_cfg(inference_modifier="add_gauss", inference_modifier_std="0.04",
                                   inference_clip="fixed", inference_clip_value="0.3", analog_reads="perfect",
                                   analog_omega="0"))
    assert (c.modifier.kind, c.modifier.strength, c.clip.kind, c.clip.bound) == ("add_gauss", 0.04, "fixed", 0.3)
    assert c.io.is_perfect and c.weight_scaling_omega is None
    c = inference_config(small_cfg(inference_modifier="none", inference_clip="none"))   # as typed on a command line
    assert c.modifier.kind == "none" and c.clip.kind == "none" and not c.modifier.active


# ------------------------------------------------------------------------------------------
# conversion, optimiser, clipping
# ------------------------------------------------------------------------------------------
def test_model_on_inference_tiles_trained_by_the_torch_optimizer(tmp_path):
    from ffebm.analog import (InferenceDenseCoupling, InferenceEP, InferenceLinear, inference_modules)

    t = Trainer(small_cfg(max_steps="3"), tmp_path / "r", log=lambda m: None).setup()
    for name, blk in t.blocks:
        assert all(isinstance(c, InferenceDenseCoupling) for c in blk.couplings), name
        assert isinstance(blk.input_map[1], InferenceLinear) and isinstance(blk.gradient, InferenceEP)
    assert isinstance(t.core[1], InferenceLinear) and isinstance(t.core[4], InferenceLinear)  # analog_layers: none
    mods = inference_modules(t.core)
    assert len(mods) == 6 and t.inference.owned_parameters() == [] and t.analog.optimizer is None
    opt_ids = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in t.core.parameters()}           # every weight: the torch optimiser
    w0 = [m.weight.detach().clone() for m in mods]
    t.commit(existing=False)
    assert t.fit()["steps"] == 3
    assert all(not torch.equal(m.weight, w) for m, w in zip(mods, w0))
    # analog_layers=false: the digital layers stay digital; analog_input=false: the input maps too
    t = Trainer(small_cfg(analog_layers="false", analog_input="false"), None, log=lambda m: None).setup()
    assert type(t.core[1]) is nn.Linear and type(t.blocks[0][1].input_map[1]) is nn.Linear
    assert len(inference_modules(t.core)) == 2


@pytest.mark.parametrize("kind,value", [("sigma", None), ("fixed", 0.05)])
def test_clip_runs_after_the_optimizer_step(tmp_path, kind, value):
    """The final weights are exactly the torch optimiser's last step, clipped by the configured clip."""
    from ffebm.analog import WeightClip, inference_modules
    from ffebm.analog.inference import clip_tensor

    over = dict(max_steps="2", inference_clip=kind, lr="0.05")
    if value is not None:
        over["inference_clip_value"] = str(value)
    t = Trainer(small_cfg(**over), tmp_path / "r", log=lambda m: None).setup()
    mods = inference_modules(t.core)
    stepped = []
    t.opt.register_step_post_hook(lambda *a: stepped.append([m.weight.detach().clone() for m in mods]))
    t.commit(existing=False)
    t.fit()
    clip = WeightClip(kind, value)
    changed = 0
    for m, w in zip(mods, stepped[-1]):
        want = clip_tensor(w.clone(), clip)
        assert torch.equal(m.weight.detach(), want)
        changed += not torch.equal(want, w)
    assert changed   # the clip did bound some weights


def test_mlp_baseline_on_inference_tiles():
    import models
    from ffebm.analog import InferenceLinear

    m = models.build("digits_mlp")
    shapes = [tuple(l.weight.shape) for l in m if isinstance(l, nn.Linear)]
    assert shapes == [(512, 64), (256, 512), (256, 256), (256, 256), (128, 256), (10, 128)]
    ff = models.build("digits")
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ff.parameters())
    t = Trainer(build_config("digits-mlp-hwa", dict(SMALL, model="digits_mlp", model_options="hidden=24,width=16", t1="none",
                                                    t2="none", beta="none")), None, log=lambda m: None).setup()
    assert sum(isinstance(l, InferenceLinear) for l in t.core) == 6
    with pytest.raises(ConfigError, match="nothing to put on inference tiles.*analog_layers=true"):
        Trainer(build_config("digits-mlp-hwa", dict(SMALL, model="digits_mlp", model_options="hidden=24,width=16",
                                                   analog_layers="false")),
                None, log=lambda m: None).setup()


# ------------------------------------------------------------------------------------------
# checkpoints, exact resume, deployment curve
# ------------------------------------------------------------------------------------------
RESUME = ARGS + ["ckpt_every=3", "seed=5", "max_steps=11"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return run_in_folder(tmp_path_factory, "iref", RESUME)


def assert_same_run(a, b):
    ca, cb = C.load(a / C.CKPT), C.load(b / C.CKPT)
    for key in ("model", "optimizer", "scheduler", "position"):
        assert_same(ca[key], cb[key], key)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    strip = lambda m: [{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]]
    assert strip(ma) == strip(mb) and ma["test_accuracy"] == mb["test_accuracy"]


def test_checkpoint_holds_the_noise_generators(reference_run):
    ck = C.load(reference_run / C.CKPT)
    gens = [k for k, v in ck["model"].items() if k.endswith("_extra_state") and isinstance(v, dict) and "rng" in v]
    assert len(gens) == 6 and all(isinstance(ck["model"][k]["rng"], torch.Tensor) for k in gens)
    assert {k.rsplit(".", 1)[0] for k in gens} == {"0.input_map.1", "0.couplings.0", "1", "3.input_map.1",
                                                   "3.couplings.0", "4"}
    m = json.loads((reference_run / "metrics.json").read_text())
    assert m["steps"] == 11 and "InferenceEP" in m["gradient_method"]


def test_killed_then_resumed_run_is_bit_exact(tmp_path, reference_run, capsys, monkeypatch):
    """11 steps straight against a run killed (SIGKILL) right after step 10 and resumed from its
    checkpoint of step 9 (mid-epoch 2): the noise generators (modifier draws, read noise), the
    optimiser and the clipped weights continue exactly, to the last bit."""
    res = run_train(RESUME + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=10)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert json.loads((tmp_path / "run" / C.SUMMARY).read_text())["global_step"] == 9
    res = main_inproc(["--resume", "run"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "global step 9" in res.stdout
    assert_same_run(reference_run, tmp_path / "run")


def test_uninterrupted_runs_are_reproducible(tmp_path, reference_run, capsys, monkeypatch):
    res = main_inproc([a if a != "seed=5" else "seed=6" for a in RESUME] + ["--out", "other"], tmp_path, capsys,
                      monkeypatch)
    assert res.returncode == 0, res.stderr
    with pytest.raises(AssertionError):   # the comparison sees a different seed
        assert_same_run(reference_run, tmp_path / "other")


def test_evaluate_deployment_curve_with_draws(reference_run, tmp_path, capsys, monkeypatch):
    before = folder_digest(reference_run)
    out = tmp_path / "eval.json"
    res = main_inproc([str(reference_run), "--times", "0,3600,86400", "--draws", "3", "--seed", "7",
                       "--json", str(out)], tmp_path, capsys, monkeypatch, module="train.evaluate")
    assert res.returncode == 0, res.stderr
    ev = json.loads(out.read_text())
    assert list(ev["accuracy_over_time"]) == ["0.0", "3600.0", "86400.0"] and ev["draws"] == 3
    for t in ev["accuracy_over_time"]:
        draws = ev["accuracy_draws"][t]
        assert len(draws) == 3 and all(0.0 <= a <= 1.0 for a in draws)
        assert abs(ev["accuracy_over_time"][t] - sum(draws) / 3) < 1e-12 and ev["accuracy_std"][t] >= 0
    assert "t = 86400 s after programming: test accuracy" in res.stdout and "+-" in res.stdout
    assert "over 3 programming draws" in res.stdout
    assert folder_digest(reference_run) == before   # the run folder is only read
    # the same seed gives the same curve; another seed another one
    again = main_inproc([str(reference_run), "--times", "0,3600,86400", "--draws", "3", "--seed", "7"], tmp_path,
                        capsys, monkeypatch, module="train.evaluate")
    assert [l for l in again.stdout.splitlines() if "after programming" in l] == \
           [l for l in res.stdout.splitlines() if "after programming" in l]
    bad = main_inproc([str(reference_run), "--times", "0", "--draws", "0"], tmp_path, capsys, monkeypatch,
                      module="train.evaluate")
    assert one_line_error(bad).startswith("error: --draws")


# ------------------------------------------------------------------------------------------
# the experiment (python -m train.experiments.inference --quick)
# ------------------------------------------------------------------------------------------
def test_experiment_quick_writes_table_json_and_png(tmp_path, capsys):
    from train.experiments import inference as E

    res = E.main(["--quick", "--out", str(tmp_path / "exp"), "--relax", "6:2,6:0"])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "exp" / "inference.json").read_text())
    png = (tmp_path / "exp" / "inference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert data["times"] == [0.0, 3600.0, 86400.0, 2592000.0, 31536000.0] and data["draws"] == 2
    assert data["size"] == [24, 16] and "hidden 24 / width 16" in E.plot_title(data)   # the models it trained
    assert [(r["model"], r["training"]) for r in data["summary"]] == [
        ("ff-EBM", "digital"), ("ff-EBM", "HWA"), ("MLP", "digital"), ("MLP", "HWA")]
    for r in data["runs"]:
        assert all(len(v) == 2 for v in r["curve"]["accuracy_draws"].values())
    assert {(r["training"], r["steps"], r["average_last"]) for r in data["relaxation"]} == {
        ("digital", 6, 2), ("digital", 6, 0), ("HWA", 6, 2), ("HWA", 6, 0)}
    assert "| ff-EBM | HWA |" in out and "| MLP | digital |" in out and "1 year" in out
    assert res["summary"] == data["summary"]
    # the results are never overwritten
    with pytest.raises(SystemExit):
        E.main(["--quick", "--out", str(tmp_path / "exp")])


def test_digital_model_is_deployed_on_the_hwa_chip(tmp_path):
    """A digitally trained model goes onto the same chip (read model, noise model, compensation,
    scaling) and the same layers as its HWA twin, keeping its trained weights."""
    from ffebm.analog import inference_modules
    from train.experiments import inference as E

    out = tmp_path / "exp"
    for name in ("ffebm-digital", "ffebm-hwa"):
        E.train_one(name, 0, out, True, {}, log=lambda m: None)
    chip = E.chip(True, {})
    dig = E.deployed_trainer("ffebm-digital", 0, out, True, {}, chip)
    hwa = E.deployed_trainer("ffebm-hwa", 0, out, True, {}, chip)
    md, mh = inference_modules(dig.core), inference_modules(hwa.core)
    assert [type(m) for m in md] == [type(m) for m in mh] and len(md) == 6
    names = lambda core: [n for n, m in core.named_modules() if m in set(inference_modules(core))]
    assert names(dig.core) == names(hwa.core)
    ck = C.load(out / "seed0" / "ffebm-digital" / C.CKPT)
    for n, p in dig.core.named_parameters():
        assert torch.equal(p.detach(), ck["model"][n]), n


@pytest.mark.parametrize("argv,expect", [
    (["--draws", "0"], "argument --draws: must be >= 1, got 0"),
    (["--seeds", "x"], "argument --seeds"),
    (["--relax", "5:9"], "argument --relax: '5:9': expected T1 >= 1 and 0 <= K <= T1"),
    (["--size", "64"], "argument --size: '64': expected HIDDEN,WIDTH"),
    (["inference_modifier=gauss"], "inference_modifier='gauss'"),
    (["lr"], "'lr': expected key=value"),
])
def test_experiment_flags_are_argparse_errors(tmp_path, capsys, argv, expect):
    from train.experiments import inference as E

    with pytest.raises(SystemExit) as e:
        E.main(argv + ["--quick", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and expect in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_evaluate_draws_on_a_training_tile_run(tmp_path, capsys, monkeypatch):
    """Runs on training tiles keep the one-draw drift evaluation; --draws N gives them N draws."""
    args = [a for a in ARGS if not a.startswith("analog_mode=")] + ["analog=soft_bounds", "max_steps=2"]
    assert main_inproc(args + ["--out", "tiles"], tmp_path, capsys, monkeypatch).returncode == 0
    one = main_inproc(["tiles", "--times", "0,3600"], tmp_path, capsys, monkeypatch, module="train.evaluate")
    assert one.returncode == 0 and "t = 3600.0 s after programming" in one.stdout and "+-" not in one.stdout
    out = tmp_path / "ev.json"
    res = main_inproc(["tiles", "--times", "0,3600", "--draws", "2", "--json", str(out)], tmp_path, capsys,
                      monkeypatch, module="train.evaluate")
    assert res.returncode == 0, res.stderr
    ev = json.loads(out.read_text())
    assert ev["draws"] == 2 and all(len(v) == 2 for v in ev["accuracy_draws"].values())
    assert "t = 3600 s after programming" in res.stdout and "over 2 draws" in res.stdout
