import pytest

from train.__main__ import parse_args
from train.config import ConfigError, TrainConfig, apply_overrides, from_dict, to_dict
from train.validate import validate
from train.recipes import RECIPES, build_config


def test_string_values_are_parsed_by_type():
    cfg = apply_overrides(TrainConfig(), {"epochs": "3", "lr": "1e-2", "progress": "false", "beta": "none",
                                          "t1": "7", "dataset": "mnist"})
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.progress is False and cfg.beta is None and cfg.t1 == 7
    assert cfg.dataset == "mnist"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), {"epoch": "3"})
    msg = str(e.value)
    assert "unknown key 'epoch'" in msg and "did you mean 'epochs'" in msg and "batch_size" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key,value", [("epochs", "three"), ("lr", "fast"), ("progress", "maybe"),
                                       ("epochs", "1.5"), ("epochs", 2.0), ("progress", 1)])
def test_wrong_type_is_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(TrainConfig(), {key: value})


@pytest.mark.parametrize("over", [{"optimizer": "lion"}, {"epochs": "0"}, {"lr": "-1"}, {"device": "tpu"},
                                  {"dataset": "svhn"}, {"beta": "0"}, {"grad_clip": "-1"}])
def test_invalid_values_are_refused(over):
    with pytest.raises(ConfigError):
        validate(apply_overrides(TrainConfig(), over))


def test_roundtrip_through_dict():
    cfg = build_config("digits", {"epochs": "2"})
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(dict(to_dict(cfg), bogus=1))


def test_recipes_resolve_and_cli_wins():
    for name in RECIPES:
        cfg = build_config(name)
        assert cfg.recipe == name
    cfg = build_config("cifar10_l6_3blocks", {"epochs": "1", "t1": "3"})
    assert cfg.epochs == 1 and cfg.t1 == 3 and cfg.beta is None and cfg.dataset == "cifar10"  # beta: the model's
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("nope")


def test_published_recipes_are_present():
    import models

    for name in ["splitting_small_1block", "splitting_small_2block", "splitting_small_3block",
                 "splitting_large_3block", "splitting_large_4block", "splitting_large_6block", "scaling_small",
                 "scaling_large", "static_gradient_analysis", "cifar10_l6_3blocks", "gradient_study", "digits"]:
        assert name in RECIPES
    t1 = lambda name: models.published(RECIPES[name]["model"])["t1"]
    assert t1("cifar10_l6_2blocks") == 60 and t1("splitting_large_4block") == 20 and t1("scaling_large") == 15
    assert RECIPES["scaling_large"]["lr"] == 2e-5 and RECIPES["scaling_small"]["batch_size"] == 256
    assert (lambda c: (c["beta"], c["t1"], c["t2"], c["gain"]))(models.published("scaling_small")) == (0.2, 15, 5, 0.5)
    for name in ["cifar100_l12_6blocks", "imagenet32_l15_6blocks"]:
        r = RECIPES[name]
        assert r["optimizer"] == "adam" and r["weight_decay"] == 3e-4 and r["schedule"] == "cosine"
    assert RECIPES["cifar10_l6_3blocks_implicit"]["method"] == "implicit"


def test_cli_parsing():
    a = parse_args(["cifar10_l6_1block", "epochs=2", "--out", "x", "lr=0.1"])
    assert a.recipe == "cifar10_l6_1block" and a.overrides == {"epochs": "2", "lr": "0.1"} and a.out == "x"
    a = parse_args(["--resume=r", "progress=false"])
    assert a.resume == "r" and a.overrides == {"progress": "false"}
    for bad in (["--frobnicate"], ["a", "b"], ["--out"], ["--resume", "r", "--out", "x"], ["epochs=1", "epochs=2"],
                ["--resume", "r", "digits"]):
        with pytest.raises(ConfigError):
            parse_args(bad)


def test_grad_clip_is_a_typed_key_and_the_digits_recipe_uses_it():
    cfg = validate(apply_overrides(TrainConfig(), {"grad_clip": "0.5"}))
    assert cfg.grad_clip == 0.5
    assert RECIPES["digits"]["grad_clip"] > 0


def test_label_smoothing_is_the_training_loss(tmp_path):
    import torch

    from train.recipes import build_config as bc
    from train.trainer import Trainer

    cfg = bc("digits", {"label_smoothing": "0.2", "train_subset": "16", "test_subset": "8", "batch_size": "8",
                        "progress": "false", "tensorboard": "false", "num_threads": "1"})
    t = Trainer(cfg, None, log=lambda m: None).setup()
    _, xb, yb = next(iter(t.batches.epoch(0)))
    with torch.no_grad():
        logp = torch.log_softmax(t.core(t.pre(xb)).double(), 1)
    want = -(0.8 * logp.gather(1, yb[:, None]).squeeze(1) + 0.2 * logp.mean(1)).mean()
    loss = t.train_step(xb, yb, None)[0]
    assert abs(loss - want.item()) < 1e-5
    assert abs(loss - torch.nn.functional.nll_loss(logp, yb).item()) > 1e-3   # not the plain loss


@pytest.mark.parametrize("over", [{"inference_clip": "fixed", "inference_clip_value": "1.0"},
                                  {"inference_modifier": "add_gauss", "inference_modifier_std": "0.05"},
                                  {"inference_clip": "none"}])
def test_inference_keys_on_a_run_that_is_no_inference_chip_are_refused(over):
    with pytest.raises(ConfigError, match="apply to analog_mode=inference only") as e:
        validate(apply_overrides(TrainConfig(), over))
    assert next(iter(over)) in str(e.value)
    validate(apply_overrides(TrainConfig(), dict(over, analog_mode="inference")))  # the same keys on a chip


def test_the_hardware_aware_recipe_trains_digitally_with_analog_mode_training():
    validate(build_config("digits-hwa", {"analog_mode": "training"}))


@pytest.mark.parametrize("over, key", [({"overrelax": "2"}, "overrelax"), ({"overrelax": "0"}, "overrelax"),
                                       ({"anderson": "1"}, "anderson"), ({"relax_start": "ones"}, "relax_start")])
def test_relaxation_acceleration_keys_are_checked(over, key):
    with pytest.raises(ConfigError, match=key):
        validate(apply_overrides(TrainConfig(), over))


def test_acceleration_keys_reach_every_free_relaxation():
    import torch

    import ffebm
    import models
    from train.step import prepare_model

    model = models.build("digits")
    cfg = validate(apply_overrides(TrainConfig(), {"relax_start": "feedforward", "anderson": "4", "overrelax": "1.2"}))
    prepare_model(model, cfg, torch.device("cpu"))
    blocks = list(ffebm.energy_blocks(model))
    assert blocks and all((b.relaxation.init, b.relaxation.anderson, b.relaxation.overrelax) == ("feedforward", 4, 1.2)
                          and b.nudge_relaxation.anderson == 0 for _, b in blocks)


@pytest.mark.parametrize("recipe, over, words", [
    ("digits", {"analog_reads": "perfect"}, "analog keys need a run on tiles"),
    ("digits", {"analog_omega": "0.3"}, "analog keys need a run on tiles"),
    ("digits-hwa", {"analog_lr": "0.5"}, "pulsed-update keys do not apply"),
    ("digits-hwa", {"inference_modifier": "none", "inference_modifier_std": "0.5"}, "draws no noise"),
    ("digits-hwa", {"inference_clip": "none", "inference_clip_value": "3"}, "clips nothing"),
])
def test_keys_the_run_would_ignore_are_refused(recipe, over, words):
    with pytest.raises(ConfigError, match=words):
        build_config(recipe, over)


def test_a_recipes_own_analog_keys_do_not_block_its_digital_twin():
    build_config("digits-analog", {"analog": ""})   # the README's "the same model digital"
    build_config("digits-hwa", {"analog_mode": "training"})


def test_relax_start_previous_warm_starts_the_trainers_free_phases():
    # the trainer's loop hands each batch's sample indices to ffebm.warm_start: the second visit
    # of the same samples starts from their stored equilibria and needs fewer free sweeps
    import torch

    from train.recipes import build_config as bc
    from train.trainer import Trainer

    over = {"train_subset": "16", "test_subset": "8", "batch_size": "8", "progress": "false",
            "tensorboard": "false", "num_threads": "1", "relax_start": "previous",
            "lr": "1e-9"}  # the weights barely move: the stored equilibria are this step's
    t = Trainer(bc("digits", over), None, log=lambda m: None).setup()
    assert isinstance(t.warm_starts, __import__("ffebm").WarmStarts) and t.warm_starts.num_samples == 16
    for _, b in t.blocks:
        b.relaxation.check_every = 1
    step, idx, xb, yb = next(iter(t.batches.indexed_epoch(0)))
    assert torch.equal(t.batches.dataset.images[idx], xb)
    first = t.train_step(xb, yb, None, idx)[3]
    assert t.warm_starts.hits == 0 and t.warm_starts.misses > 0
    second = t.train_step(xb, yb, None, idx)[3]
    assert t.warm_starts.hits > 0
    assert all(second[k][0] < first[k][0] for k in first), (first, second)
    # without the key, no warm starts
    t2 = Trainer(bc("digits", dict(over, relax_start="zeros")), None, log=lambda m: None).setup()
    assert t2.warm_starts is None


def test_relax_start_previous_too_large_stops_in_words(monkeypatch):
    import ffebm
    from train.failures import TrainingStopped
    from train.recipes import build_config as bc
    from train.trainer import Trainer

    over = {"train_subset": "16", "test_subset": "8", "batch_size": "8", "progress": "false",
            "tensorboard": "false", "num_threads": "1", "relax_start": "previous"}
    t = Trainer(bc("digits", over), None, log=lambda m: None).setup()
    t.warm_starts = ffebm.WarmStarts(16, max_bytes=64)
    _, idx, xb, yb = next(iter(t.batches.indexed_epoch(0)))
    with pytest.raises(TrainingStopped, match="relax_start=previous: WarmStarts: block .* MiB"):
        t.train_step(xb, yb, None, idx)


def test_a_bad_cpu_kernel_setting_stops_before_the_first_step(monkeypatch):
    from train.recipes import build_config as bc
    from train.trainer import Trainer

    monkeypatch.setenv("FFEBM_CPU_KERNELS", "bogus")
    over = {"train_subset": "16", "test_subset": "8", "batch_size": "8", "progress": "false",
            "tensorboard": "false", "num_threads": "1"}
    for recipe in ("digits", "digits-analog"):
        with pytest.raises(ConfigError, match="FFEBM_CPU_KERNELS='bogus' is not one of"):
            Trainer(bc(recipe, over), None, log=lambda m: None).setup()
