"""The recipe table (names -> TrainConfig overrides, with descriptions); :mod:`train.recipes`
resolves and validates them. Kept apart so that the key checks can read a recipe's own values
(:func:`changed_keys`) without importing the validation that calls them."""

from __future__ import annotations

from typing import Any, Dict

from .config import ConfigError, TrainConfig, apply_overrides

_OPT = dict(optimizer="adam", weight_decay=3e-4, schedule="cosine", freeze_bn_affine=True)

RECIPES: Dict[str, Dict[str, Any]] = {}
DESCRIPTIONS: Dict[str, str] = {}


def _add(name: str, description: str, **overrides):
    RECIPES[name] = overrides
    DESCRIPTIONS[name] = description


# Default: the small digits ff-EBM, trained with centered EP on scikit-learn's digits (CPU, < 2 min).
# models.build("digits_conv"): its first energy block is convolutional (conv 1->16 + batch norm, 2x2 max pool, coupling 16->32 with
# a 2x2 max pool inside the energy), the second dense; training inputs get Gaussian pixel noise of
# std 0.1 (input_noise).  Over seeds 0-4 (python -m train.experiments.seeds) this gave 98.44 % mean
# (97.50-98.89); the dense first block gave 97.33 % (96.94-97.78) with the same optimiser, 97.67 %
# (96.67-98.33) with the noise; the conv block without the noise 97.67 % (96.94-98.33), with noise
# 0.05 97.83 % (97.22-98.33); noise 0.15 / 0.2 on the dense model hurt (README, Results).
# The free relaxation stops at tol 1e-4; its budget is 400 steps, not the model's 40: a few batches
# pass near a saddle where one slow sample sits on a plateau (residual 1e-4 to 3e-4 for 50-100
# steps) before it escapes and settles; a budget of 40 stopped those solves on the plateau (a
# warning per run), a looser tol would accept plateau states as equilibria.  AdamW with decoupled
# weight decay 0.05 (Adam with L2 3e-4 gave 97.0 % on the dense model).
_add("digits", "digits ff-EBM (conv + max-pool first block), centered EP, input noise, scikit-learn digits "
     "(default; CPU, ~1-2 min)",
     model="digits_conv", dataset="digits", method="ep", variant="centered",
     t1=400, input_noise=0.1, optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine",
     epochs=60, batch_size=64, grad_clip=1.0, freeze_bn_affine=False)

# The digits ff-EBM with its energy blocks on simulated analog tiles (SoftBounds devices, default
# read model, weights scaled to 0.5 tile units, couplings and input maps on tiles, pulsed EP
# updates by c-TTv2; biases and digital layers by Adam 5e-3).  The read noise (6 % of the output
# range on every relaxation read) sets the other choices: beta 1.0 so that the nudged states
# differ by more than the noise, T1 40 / T2 30 with the state averaged over the last 20 steps,
# hidden 256 / width 128, batch 64 with the last partial batch kept, 40 epochs, both learning
# rates x0.95 per epoch (at a constant rate the test accuracy wanders by +-5 points).  Other
# algorithms: analog_algorithm=tiki-taka (analog_lr 0.01) or sgd (analog_lr=1.0); other devices:
# analog=NAME (python -m train.experiments.device_sweep); the digital reference: analog= beta=0.5.
_ANALOG_DIGITS = dict(
    model="digits", dataset="digits", method="ep", variant="centered", beta=1.0, t1=40, t2=30,
    model_options="hidden=256,width=128,tol=none,average_last=20",
    optimizer="adam", lr=5e-3, weight_decay=0.0, schedule="exponential", lr_decay=0.95,
    epochs=40, batch_size=64, drop_last=False, grad_clip=0.0, freeze_bn_affine=False,
    analog="soft_bounds", analog_algorithm="c-ttv2", analog_lr=0.01, analog_reads="default",
    analog_omega=0.5, analog_input=True)
_add("digits-analog", "digits ff-EBM, energy blocks on SoftBounds tiles, pulsed EP with c-TTv2 (CPU, ~3 min)",
     **_ANALOG_DIGITS)
# The same with a convolutional first block: its coupling on a tile as an AnalogConvCoupling,
# its input conv as an AnalogConv2d.
_add("digits-analog-conv",
     "digits ff-EBM with a conv first block, on SoftBounds tiles, pulsed EP with c-TTv2 (CPU, ~5 min)",
     **dict(_ANALOG_DIGITS, model_options="arch=conv,width=128,tol=none,average_last=20"))

# Hardware-aware (HWA) training for an inference chip (analog_mode=inference, train/inference.py): every
# weight layer of the digits ff-EBM (couplings, input maps, digital layer, readout) on inference tiles
# read through the published read model (6 % output noise, 7-bit DAC, 9-bit ADC), each training-time
# read with one draw of the PCM programming noise (pcm_prog, std 1), weights clipped to 2.5 std per
# layer after every step; the torch optimiser trains every weight (dense gradients: EP inside the
# blocks).  Relaxation on noisy reads: T1 40 / T2 30 with the state averaged over the last 20 steps and
# beta 1.0 (as digits-analog); the optimiser is the digits recipe's, 30 epochs.  The digital reference
# with the same settings: analog_mode=training; the same-size MLP: digits-mlp-hwa / digits-mlp.
# Deployment curve: python -m train.evaluate RUN --times 0,3600,86400 (python -m train.experiments.inference).
_HWA_DIGITS = dict(
    model="digits", dataset="digits", method="ep", variant="centered", beta=1.0, t1=40, t2=30,
    model_options="tol=none,average_last=20", optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine",
    epochs=30, batch_size=64, grad_clip=1.0, freeze_bn_affine=False,
    analog_mode="inference", analog_reads="default", inference_modifier="pcm_prog", inference_clip="sigma")
_add("digits-hwa", "digits ff-EBM trained hardware-aware for a PCM inference chip (read noise, programming-noise "
     "modifier, 2.5-sigma clip; CPU, ~8 min)", **_HWA_DIGITS)
_MLP_DIGITS = dict(model="digits_mlp", dataset="digits", optimizer="adamw", lr=2e-3, weight_decay=0.05,
                   schedule="cosine", epochs=30, batch_size=64, grad_clip=1.0, freeze_bn_affine=False)
_add("digits-mlp", "the digits ff-EBM's same-size MLP (64-512-256-256-256-128-10), backprop (CPU, < 1 min)",
     **_MLP_DIGITS)
_add("digits-mlp-hwa", "digits-mlp trained hardware-aware as digits-hwa (CPU, ~1 min)",
     **dict(_MLP_DIGITS, analog_mode="inference", analog_reads="default", inference_modifier="pcm_prog",
            inference_clip="sigma"))

# The published configurations (models/published.py), each with its published training recipe:
# Adam, weight decay 3e-4, cosine schedule, random crop (pad 4) + flip (the CIFAR/ImageNet32
# default), batch-norm affine parameters frozen; beta, T1, T2 from the model.
_SPLITTING = dict(dataset="cifar10", method="ep", variant="centered", lr=5e-4, epochs=200, batch_size=128, **_OPT)
for _name, _what in (("splitting_small_1block", "L=6 as 1 block"), ("splitting_small_2block", "L=6 as 2 blocks"),
                     ("splitting_small_3block", "L=6 as 3 blocks"), ("splitting_large_3block", "L=12 as 3 blocks"),
                     ("splitting_large_4block", "L=12 as 4 blocks"), ("splitting_large_6block", "L=12 as 6 blocks")):
    _add(_name, f"CIFAR-10 splitting run: {_what}, centered EP (published configuration)", model=_name, **_SPLITTING)
    _add(f"{_name}_implicit", f"EP-vs-implicit study: {_what} trained with implicit differentiation",
         model=_name, **dict(_SPLITTING, method="implicit"))
# published scaling recipes (Nest & Ernoult 2024): batch 256, cosine to lr/100
_add("scaling_small", "CIFAR-100 scaling run: L=12, 6 blocks, a 0.5, T1 15, T2 5 (published configuration)",
     model="scaling_small", dataset="cifar100", method="ep", variant="centered",
     **dict(_OPT, lr=5e-5, min_lr=5e-7, epochs=200, batch_size=256))
_add("scaling_large", "ImageNet32 scaling run: L=15, 8 blocks, a 0.5, T1 15, T2 5 (published configuration)",
     model="scaling_large", dataset="imagenet32", method="ep", variant="centered",
     **dict(_OPT, lr=2e-5, min_lr=1e-7, epochs=100, batch_size=256))
# the static gradient study (per-block cosine EP vs implicit differentiation, random inputs)
_add("static_gradient_analysis",
     "EP-vs-implicit gradient study: 15 layers, 6 blocks, random 3x32x32 inputs, batch 2, beta 0.02, T2 20",
     model="static_gradient_analysis", dataset="fake", image_size=32, in_channels=3, num_classes=10,
     fake_train_size=64, fake_test_size=16, method="ep", variant="centered", lr=5e-4, epochs=1, batch_size=2,
     max_steps=8, grad_check_every=1, grad_check_batch=2, **_OPT)

# our older recipe names: the same runs
for _old, _new in (("cifar10_l6_1block", "splitting_small_1block"), ("cifar10_l6_2blocks", "splitting_small_2block"),
                   ("cifar10_l6_3blocks", "splitting_small_3block"), ("cifar10_l12_3blocks", "splitting_large_3block"),
                   ("cifar10_l12_4blocks", "splitting_large_4block"), ("cifar10_l12_6blocks", "splitting_large_6block")):
    _add(_old, f"alias of {_new}", **RECIPES[_new])
    _add(f"{_old}_implicit", f"alias of {_new}_implicit", **RECIPES[f"{_new}_implicit"])
_add("cifar100_l12_6blocks", "alias of scaling_small", **RECIPES["scaling_small"])
_add("gradient_study", "alias of static_gradient_analysis", **RECIPES["static_gradient_analysis"])

# our own scaling variants (models/presets.py; no published configuration)
for _ds, _epochs, _batch, _L in (("cifar100", 200, 128, 15), ("imagenet32", 100, 256, 12), ("imagenet32", 100, 256, 15)):
    _model = f"{_ds}_l{_L}_6blocks"
    _add(_model, f"{_ds}: our L={_L}, 6-block VGG-style ff-EBM, beta 0.2, T1 15, T2 5, centered EP",
         model=_model, dataset=_ds, method="ep", variant="centered", beta=0.2, t1=15, t2=5,
         lr=5e-4, epochs=_epochs, batch_size=_batch, **_OPT)

del _name, _what, _old, _new, _ds, _epochs, _batch, _L, _model


def available():
    return list(RECIPES)


def get(name: str) -> Dict[str, Any]:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; available: {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def changed_keys(cfg: TrainConfig, keys) -> list:
    """The ``keys`` whose value in ``cfg`` differs from both the defaults and the values of the
    recipe the run started from: the ones a user set (for refusing keys that would be ignored)."""
    base = [TrainConfig()]
    if cfg.recipe in RECIPES:
        base.append(apply_overrides(TrainConfig(), dict(RECIPES[cfg.recipe], recipe=cfg.recipe)))
    return [k for k in keys if all(getattr(cfg, k) != getattr(b, k) for b in base)]
