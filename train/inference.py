"""Hardware-aware (HWA) training of the trainer: ``analog_mode=inference``.

The model is trained for an *inference chip* (programmed once, then read while its conductances
drift; :mod:`ffebm.analog.inference`): every energy block's couplings (and, with
``analog_input``, the ``Linear`` / ``Conv2d`` of its input map) and, with ``analog_layers``
(default for this mode), the digital ``Linear`` / ``Conv2d`` layers outside the blocks become
inference layers (:func:`ffebm.analog.to_analog_energy`, :func:`ffebm.analog.convert_to_analog`
with the :class:`~ffebm.analog.InferenceConfig` of :func:`inference_config`). Their weights stay
ordinary parameters of the run's torch optimiser (dense gradients: backprop outside the blocks,
EP / Implicit inside); every training-time read sees the weights through the read model
(``analog_reads``) and the weight modifier (``inference_modifier``, ``inference_modifier_std``),
and after each optimiser step the weights are clipped (``inference_clip``,
``inference_clip_value``). Everything random (modifier draws, read noise) comes from the layers'
own seeded generators, which are part of the model's ``state_dict``: ``--resume`` is exact.

Everything reaches the loop through :class:`InferencePlugin` (see :mod:`train.plugin`); the
deployment curve of a run (programming noise, drift, compensation over several draws) is
``python -m train.evaluate RUN --times ... --draws N``.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch.nn as nn

from .config import ConfigError, TrainConfig
from .plugin import TrainerPlugin

#: the chip's weight scaling when ``analog_omega`` is none (the reference's inference default)
INFERENCE_OMEGA = 1.0


def inference_mode(cfg: TrainConfig) -> bool:
    return cfg.analog_mode == "inference"


def inference_config(cfg: TrainConfig):
    """The :class:`~ffebm.analog.InferenceConfig` of ``cfg``'s keys: the read model of
    ``analog_reads`` (``default``: the published one; ``perfect``: exact reads), the weight
    modifier and clip, weight scaling ``analog_omega`` (none: 1.0; 0: off), the PCM-like
    programming / drift model with global drift compensation (published defaults). An invalid
    combination raises :class:`ConfigError` in one line naming the key."""
    from ffebm.analog import InferenceConfig, InvalidSetting, IOConfig, WeightClip, WeightModifier

    if cfg.inference_modifier in ("add_gauss", "mul_gauss") and cfg.inference_modifier_std is None:
        raise ConfigError(f"inference_modifier={cfg.inference_modifier}: set inference_modifier_std (the noise "
                          f"strength relative to each layer's max |w|, e.g. 0.05)")
    if cfg.inference_clip == "fixed" and cfg.inference_clip_value is None:
        raise ConfigError("inference_clip=fixed: set inference_clip_value (the bound on |w|, e.g. 1.0)")
    try:
        modifier = WeightModifier(cfg.inference_modifier or "none", cfg.inference_modifier_std)
        clip = WeightClip(cfg.inference_clip or "none", cfg.inference_clip_value)
    except InvalidSetting as e:  # the values were range-checked by check_config; kept as a guard
        raise ConfigError(f"inference keys: {' '.join(str(e).split())}") from None
    omega = INFERENCE_OMEGA if cfg.analog_omega is None else cfg.analog_omega
    io = IOConfig.perfect() if cfg.analog_reads == "perfect" else IOConfig()
    return InferenceConfig(io=io, modifier=modifier, clip=clip, weight_scaling_omega=omega if omega > 0 else None)


#: the keys only an inference-chip run reads
INFERENCE_KEYS = ("inference_modifier", "inference_modifier_std", "inference_clip", "inference_clip_value")


def check_config(cfg: TrainConfig) -> None:
    """Validation of ``analog_mode`` and the inference keys (called by :func:`train.validate.validate`)."""
    if cfg.inference_modifier_std is not None and cfg.inference_modifier_std < 0:
        raise ConfigError(f"inference_modifier_std={cfg.inference_modifier_std!r}: must be >= 0")
    if cfg.inference_clip_value is not None and cfg.inference_clip_value <= 0:
        raise ConfigError(f"inference_clip_value={cfg.inference_clip_value!r}: must be > 0")
    if not inference_mode(cfg):
        from .recipe_table import changed_keys

        set_keys = changed_keys(cfg, INFERENCE_KEYS)
        if set_keys:  # they would be ignored: say so rather than train something else than asked
            shown = " ".join(f"{k}={getattr(cfg, k)}" for k in set_keys)
            raise ConfigError(f"{shown}: inference keys apply to analog_mode=inference only "
                              f"(this run has analog_mode={cfg.analog_mode})")
    if cfg.inference_modifier is None and cfg.inference_modifier_std is not None:
        raise ConfigError(f"inference_modifier_std={cfg.inference_modifier_std}: inference_modifier=none draws no "
                          f"noise; drop the strength or name a modifier")
    if cfg.inference_clip is None and cfg.inference_clip_value is not None:
        raise ConfigError(f"inference_clip_value={cfg.inference_clip_value}: inference_clip=none clips nothing; "
                          f"drop the value or name a clip (sigma, fixed)")
    inference_config(cfg)
    if not inference_mode(cfg):
        return
    if cfg.analog:
        raise ConfigError(f"analog={cfg.analog!r} with analog_mode=inference: an inference chip is not trained by "
                          f"pulses on a device model; leave analog empty (analog=) or use analog_mode=training")
    if cfg.method == "unrolled":
        raise ConfigError("method=unrolled with analog_mode=inference: the read model is not differentiable; "
                          "use method=ep or method=implicit")
    if cfg.grad_check_every:
        raise ConfigError(f"grad_check_every={cfg.grad_check_every}: not available with analog_mode=inference "
                          f"(each block call draws its own weight noise, so no reference sees the same weights); "
                          f"set grad_check_every=0")


def make_inference(model: nn.Module, cfg: TrainConfig, icfg=None) -> nn.Module:
    """Put ``model`` on inference tiles as ``cfg`` says (in place; returns it): the energy blocks
    (couplings, and their input maps with ``analog_input``), then, with ``analog_layers`` (none:
    true), the ``Linear`` / ``Conv2d`` layers outside them. ``icfg``: the
    :class:`~ffebm.analog.InferenceConfig` (default :func:`inference_config` of ``cfg``); seeded
    by ``cfg.seed`` as the training-tile conversion is, so a saved run is rebuilt identically.
    Also used to deploy a digitally trained model on the same chip."""
    from ffebm.analog import inference_modules

    from .analog import put_on_tiles

    icfg = inference_config(cfg) if icfg is None else icfg
    layers = True if cfg.analog_layers is None else cfg.analog_layers
    model = put_on_tiles(model, icfg, cfg, layers=layers, what="analog_mode=inference",
                         layers_what="analog_mode=inference", tiles="inference tiles")
    if not inference_modules(model):
        hint = "" if layers else "; analog_layers=true also converts its Linear/Conv2d layers"
        raise ConfigError(f"analog_mode=inference: model {cfg.model!r} has nothing to put on inference tiles "
                          f"(no energy blocks, Linear or Conv2d layers{hint})")
    return model


class InferencePlugin(TrainerPlugin):
    """HWA training at the loop's fixed points (see :mod:`train.plugin`): ``build`` converts the
    model, ``step`` clips the weights after the torch optimiser's step. No parameters of its own
    (the torch optimiser trains the weights), no optimiser state (the noise generators are in the
    model's state_dict). Inert unless ``analog_mode=inference``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model: Optional[nn.Module] = None
        self.clip = False

    def build(self, model: nn.Module) -> nn.Module:
        if not inference_mode(self.cfg):
            return model
        return make_inference(model, self.cfg)

    def attach(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        if inference_mode(self.cfg):
            self.model = model
            self.clip = inference_config(self.cfg).clip.kind != "none"

    def step(self, ctx: Any) -> None:
        if self.model is not None and self.clip:
            from ffebm.analog import clip_weights

            clip_weights(self.model)

    def optimizers(self) -> List:
        return []
