"""Every recipe builds its model (from models.available()) and runs one optimiser step on tiny
synthetic data (reduced image size, 2 relaxation steps); the digits recipe's accuracy target is
a slow test."""

import json

import pytest
import torch

import models
from train.recipes import DESCRIPTIONS, RECIPES, build_config
from train.trainer import Trainer

TINY_RUN = dict(dataset="fake", image_size="16", fake_train_size="4", fake_test_size="2", batch_size="2",
                eval_batch_size="2", epochs="1", max_steps="1", progress="false", tensorboard="false",
                num_threads="1", grad_check_every="0")


ALIASES = {n: d.split()[-1] for n, d in DESCRIPTIONS.items() if d.startswith("alias of ")}


def test_aliases_are_the_same_runs():
    assert {"cifar10_l6_3blocks", "gradient_study", "cifar100_l12_6blocks"} <= set(ALIASES)
    for old, new in ALIASES.items():
        assert RECIPES[old] == RECIPES[new], old


@pytest.mark.parametrize("name", sorted(set(RECIPES) - set(ALIASES)))
def test_recipe_builds_and_takes_one_step(name, tmp_path):
    recipe = RECIPES[name]
    assert recipe["model"] in models.available(), recipe["model"]
    over = dict(TINY_RUN)
    if not recipe["model"].startswith("digits"):
        over.update(t1="2", t2="2", in_channels="3")
    else:
        over.update(image_size="8", in_channels="1")
    cfg = build_config(name, over)
    t = Trainer(cfg, tmp_path / "run", log=lambda m: None).setup()
    before = {k: v.detach().clone() for k, v in t.core.named_parameters() if v.requires_grad}
    t.commit(existing=False)
    m = t.fit()
    assert m["steps"] == 1 and 0.0 <= m["test_accuracy"] <= 1.0
    changed = [k for k, v in t.core.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed, "no parameter was updated"
    if recipe["model"] == "digits_mlp":   # the ff-EBM's feedforward baseline: no energy block
        assert not t.block_paths and "backprop" in m["gradient_method"]
        return
    # energy-block parameters get gradients too (EP or implicit), not only the digital ones
    block_paths = list(t.block_paths)
    assert block_paths and any(any(k.startswith(p + ".") for p in block_paths) for k in changed)
    assert m["relaxation"], "no relaxation statistics"
    want = "Implicit" if recipe.get("method") == "implicit" else "EP"
    assert want in m["gradient_method"]
    if recipe["model"] in models.PRESETS:
        p = models.PRESETS[recipe["model"]]
        for key in ("beta", "t1", "t2"):
            assert recipe[key] == p[key], (name, key, recipe[key], p[key])
    if recipe["model"] in models.PUBLISHED:   # the published beta / T1 / T2 come from the model
        assert not {"beta", "t1", "t2"} & set(recipe), name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == name


def _digits_tiny(tmp_path, name, **over):
    # the dense digits model (the recipe's conv block has max pools, where float32 EP is rougher)
    cfg = build_config("digits", dict(TINY_RUN, dataset="digits", image_size="none", model="digits",
                                      train_subset="8",
                                      test_subset="8", max_steps="2", grad_check_batch="2", log_every="1",
                                      tensorboard="true", **over))
    t = Trainer(cfg, tmp_path / name, log=lambda m: None).setup()
    t.commit(existing=False)
    t.fit()
    return t


def test_gradient_check_is_logged_and_does_not_perturb_training(tmp_path):
    from train.tblog import read_scalars

    checked = _digits_tiny(tmp_path, "checked", grad_check_every="1")
    plain = _digits_tiny(tmp_path, "plain", grad_check_every="0")
    sc = read_scalars(tmp_path / "checked" / "tb")
    cos = {k: v for k, v in sc.items() if k.startswith("gradcheck/")}
    assert set(cos) == {"gradcheck/block1/cosine", "gradcheck/block2/cosine", "gradcheck/digital/cosine"}
    for tag, vals in cos.items():
        assert [s for s, _ in vals] == [1, 2]
        # EP (beta 0.5, float32) against Implicit on the digits model: well aligned (0.89-0.999)
        assert all(0.8 < v <= 1.0 for _, v in vals), (tag, vals)
    assert all(v > 0.99 for _, v in cos["gradcheck/digital/cosine"])
    # EP at beta 0.5 is compared with Implicit, not with itself: not a perfect match
    assert min(v for vals in cos.values() for _, v in vals) < 0.9999
    assert not any(k.startswith("gradcheck/") for k in read_scalars(tmp_path / "plain" / "tb"))
    for tag in ("relax/block1/steps", "relax/block1/residual", "relax/block2/steps"):
        assert tag in sc
    # the check restores parameters, buffers and the RNG: training is unchanged
    for (k, a), (_, b) in zip(checked.core.state_dict().items(), plain.core.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
        else:  # a block's extra state (its gradient method's random stream)
            assert repr(a) == repr(b), k


@pytest.mark.slow
def test_digits_recipe_reaches_97_percent(tmp_path):
    cfg = build_config("digits", dict(progress="false", tensorboard="false"))
    t = Trainer(cfg, tmp_path / "run", log=print).setup()
    t.commit(existing=False)
    m = t.fit()
    print(f"digits: {100 * m['test_accuracy']:.2f}% in {m['wall_seconds']:.1f} s")
    assert m["test_accuracy"] >= 0.97


def test_gradient_check_does_not_perturb_a_stochastic_method(tmp_path):
    """EP's random sign stream lives in the method: the check must not advance it."""
    checked = _digits_tiny(tmp_path, "checked", grad_check_every="1", variant="random")
    plain = _digits_tiny(tmp_path, "plain", grad_check_every="0", variant="random")
    other = _digits_tiny(tmp_path, "other", grad_check_every="0", variant="random", seed="7")
    sa, sb, so = checked.core.state_dict(), plain.core.state_dict(), other.core.state_dict()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert torch.equal(sa[k]["gradient"]["sign_generator"], sb[k]["gradient"]["sign_generator"]), k
    assert any(isinstance(sa[k], torch.Tensor) and not torch.equal(sa[k], so[k]) for k in sa)
