"""Settings of inference tiles (chips programmed once with digitally trained weights, then read):
the training-time *weight modifier*, the *weight clipper*, and :class:`InferenceConfig` composing
them with the read model (:class:`~ffebm.analog.config.IOConfig`) and the PCM-like
programming-noise / drift model (:class:`~ffebm.analog.drift.PCMDriftModel`).

This follows the reference simulator's inference configuration (IBM AIHWKit,
``InferenceRPUConfig``) and the hardware-aware (HWA) training study of Rasch et al., "Hardware-aware
training for large-scale and diverse deep learning inference workloads using in-memory
computing-based accelerators", Nat. Commun. 14, 5282 (2023):

* forward reads go through the read model (DAC/ADC quantisation and bounds, output noise, noise
  and bound management);
* in training mode only, each read sees weights with noise injected by the modifier (one draw per
  forward call of a layer);
* the backward is ideal: the dense gradient with respect to the *clean* weights, applied by any
  torch optimizer to ordinary parameters;
* after each optimiser step the clipper bounds the weights (:func:`~ffebm.analog.inference_layers.clip_weights`);
* at deployment the weights are programmed once (programming noise), drift, and the outputs are
  rescaled by global drift compensation (:mod:`ffebm.analog.deploy`).

Everything here is a validated dataclass (an invalid value raises
:class:`~ffebm.analog.config.InvalidSetting` naming the field, also on a later edit) and two pure
functions on tensors, :func:`modify_weight` and :func:`clip_tensor`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .config import InvalidSetting, IOConfig, Validated, _check_bool, check_choice, check_range
from .drift import PCMDriftModel
from .rng import randn

__all__ = ["WeightModifier", "WeightClip", "InferenceConfig", "modify_weight", "clip_tensor",
           "MODIFIER_KINDS", "CLIP_KINDS"]

MODIFIER_KINDS = ("none", "add_gauss", "mul_gauss", "pcm_prog")
CLIP_KINDS = ("none", "fixed", "sigma")


@dataclass
class WeightModifier(Validated):
    """Noise injected into the weights of each training-time read (hardware-aware training).

    ``kind`` (``w`` a weight, ``amax = max |W|`` of the layer, ``xi ~ N(0, 1)`` per weight, drawn
    once per forward call of a layer; nothing in eval mode):

    * ``"none"``: the reads see the trained weights;
    * ``"add_gauss"``: ``w + std * amax * xi`` (the reference's ``AddNormal`` with its default
      ``rel_to_actual_wmax=True``; Rasch et al. 2023);
    * ``"mul_gauss"``: ``w * (1 + std * xi)``: the reference's ``MultNormal``
      (``w + w * std * amax * xi``) on a tile mapped so that ``amax = 1``, its default weight
      scaling; here independent of the weights' scale;
    * ``"pcm_prog"``: one draw of the PCM-like *programming* noise of
      :class:`~ffebm.analog.drift.PCMDriftModel` (Nandakumar et al. 2019; Joshi et al. 2020), the
      reference's ``ProgNoise``: with the weight mapped to the conductance
      ``g = |w| / amax * g_max``, ``w' = sign(w) |w + std * amax * sigma_prog(g) / g_max * xi|``
      (the sign of ``w``: a weight keeps its device of the conductance pair),
      ``sigma_prog(g) = c0 + c1 g~ + c2 g~^2`` (uS, the noise model's ``prog_coeff``): ``std = 1``
      is the published programming noise.

    ``std`` (>= 0): required for the Gaussian kinds (no published default: it is the knob that
    HWA training tunes); for ``"pcm_prog"`` None means 1 (the published strength).
    """

    kind: str = "none"
    std: Optional[float] = None

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "kind", self.kind, MODIFIER_KINDS)
        if self.std is None:
            if self.kind in ("add_gauss", "mul_gauss"):
                raise InvalidSetting(o, "std", None, f"a number >= 0 for kind={self.kind!r} (the noise strength "
                                                    "relative to the layer's max |w|)")
        else:
            check_range(o, "std", self.std, 0, None)

    @property
    def strength(self) -> float:
        """``std`` with the kind's default filled in (0 for ``"none"``)."""
        if self.kind == "none":
            return 0.0
        return 1.0 if self.std is None else float(self.std)

    @property
    def active(self) -> bool:
        """True when a training-time read would see modified weights."""
        return self.kind != "none" and self.strength > 0


@dataclass
class WeightClip(Validated):
    """Bound on the trained weights, applied after each optimiser step by
    :func:`~ffebm.analog.inference_layers.clip_weights` (an explicit call, or
    :func:`~ffebm.analog.inference_layers.clip_after_step` as an optimizer step hook).

    * ``"none"``;
    * ``"fixed"``: clamp to ``[-value, value]`` (the reference's ``FixedValue``);
    * ``"sigma"``: clamp to ``+- value * std(W)`` of the layer's weights (population standard
      deviation; ``per_channel``: of each output row), the reference's ``LayerGaussian``
      (``LayerGaussianPerChannel``), default ``value`` 2.5 as its ``sigma``.
    """

    kind: str = "none"
    value: Optional[float] = None
    per_channel: bool = False

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "kind", self.kind, CLIP_KINDS)
        if self.value is None:
            if self.kind == "fixed":
                raise InvalidSetting(o, "value", None, "a number > 0 for kind='fixed' (the clip bound)")
        else:
            check_range(o, "value", self.value, 0, None, lo_open=True)
        _check_bool(o, "per_channel", self.per_channel)

    @property
    def bound(self) -> float:
        """``value`` with the kind's default filled in (2.5 for ``"sigma"``)."""
        return 2.5 if (self.value is None and self.kind == "sigma") else float(self.value or 0.0)


@dataclass
class InferenceConfig(Validated):
    """How a layer's weight is held on an inference tile (see the module docstring).

    ``io``: read model of every forward read (published defaults; ``IOConfig.perfect()`` for exact
    reads); ``modifier``: training-time weight noise (:class:`WeightModifier`); ``clip``: weight
    clipping after each optimiser step (:class:`WeightClip`); ``noise_model``: PCM-like programming
    noise, drift and 1/f read noise used by ``program`` / ``drift_to`` (published defaults,
    :class:`~ffebm.analog.drift.PCMDriftModel`); ``drift_compensation``: global drift compensation
    at deployment (Le Gallo et al. 2018; Joshi et al. 2020); ``weight_scaling_omega``: the read
    maps the largest |w| of the layer (of each output row with ``weight_scaling_columnwise``) to
    this many conductance units and scales the outputs back digitally, so that the read model's
    bounds and noise are relative to the weight range, as on a chip (None: the weights are read in
    network units); ``max_size``: largest physical array: inputs longer than it are split over
    several arrays, each read on its own (own noise management and ADC), partial outputs summed
    digitally. Biases stay digital.
    """

    io: IOConfig = field(default_factory=IOConfig)
    modifier: WeightModifier = field(default_factory=WeightModifier)
    clip: WeightClip = field(default_factory=WeightClip)
    noise_model: PCMDriftModel = field(default_factory=PCMDriftModel)
    drift_compensation: bool = True
    weight_scaling_omega: Optional[float] = 1.0
    weight_scaling_columnwise: bool = False
    max_size: int = 512

    def __post_init__(self) -> None:
        o = type(self).__name__
        for name, typ in (("io", IOConfig), ("modifier", WeightModifier), ("clip", WeightClip),
                          ("noise_model", PCMDriftModel)):
            if not isinstance(getattr(self, name), typ):
                raise InvalidSetting(o, name, getattr(self, name), f"a {typ.__name__}")
        _check_bool(o, "drift_compensation", self.drift_compensation)
        if self.weight_scaling_omega is not None:
            check_range(o, "weight_scaling_omega", self.weight_scaling_omega, 0, None, lo_open=True)
        _check_bool(o, "weight_scaling_columnwise", self.weight_scaling_columnwise)
        check_range(o, "max_size", self.max_size, 1, None, integer=True)
        self.max_size = int(self.max_size)

    @property
    def is_digital(self) -> bool:
        """Perfect reads and no modifier: the layer computes exactly what its digital layer does."""
        return self.io.is_perfect and not self.modifier.active

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def perfect(cls, **kw) -> "InferenceConfig":
        """Exact reads, no modifier, no clipping (checks and digital baselines); deployment still
        uses the PCM model unless ``noise_model`` is given."""
        return cls(io=IOConfig.perfect(), **kw)

    @classmethod
    def pcm(cls, **kw) -> "InferenceConfig":
        """A PCM-like inference chip with the reference simulator's published defaults: the
        published read model (``IOConfig()``: 7-bit DAC, 9-bit ADC, output bound 12, output noise
        0.06, noise and bound management), the PCM-like programming-noise / drift / 1/f read-noise
        model (``PCMDriftModel()``: g_max 25 uS, t0 20 s, t_read 250 ns; Nandakumar et al. 2019,
        Joshi et al. 2020) with global drift compensation, and for HWA training the PCM-like
        programming-noise modifier at its published strength (``std=1``) and clipping at 2.5
        standard deviations of each layer's weights (the reference's ``LayerGaussian`` default).
        Any field can be overridden: ``InferenceConfig.pcm(modifier=WeightModifier("add_gauss", std=0.05))``."""
        kw.setdefault("modifier", WeightModifier("pcm_prog", 1.0))
        kw.setdefault("clip", WeightClip("sigma", 2.5))
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def _amax(w: Tensor) -> Tensor:
    a = w.abs().amax()
    return torch.where(a > 0, a, torch.ones_like(a))


@torch.no_grad()
def modify_weight(w: Tensor, modifier: WeightModifier, generator: Optional[torch.Generator] = None,
                  noise_model: Optional[PCMDriftModel] = None) -> Tensor:
    """The weights one training-time read sees: ``w`` (any shape, one layer's weights) with the
    modifier's noise (see :class:`WeightModifier`), drawn from ``generator``. ``w`` itself is
    returned when the modifier is off. Not differentiable (the caller routes the gradient to the
    clean weights)."""
    if not modifier.active:
        return w
    w = w.detach()
    std = modifier.strength
    xi = randn(w.shape, generator, w)  # (in-place arithmetic below: one weight-sized draw dominates)
    if modifier.kind == "add_gauss":
        return xi.mul_(std * _amax(w)).add_(w)
    if modifier.kind == "mul_gauss":
        return xi.mul_(std).add_(1.0).mul_(w)
    nm = noise_model if noise_model is not None else PCMDriftModel()
    amax = _amax(w)
    sigma = nm.prog_sigma(w.abs().mul_(nm.g_max / amax))  # uS at g = |w| / amax * g_max
    noisy = sigma.mul_(xi).mul_(std * amax / nm.g_max).add_(w).abs_()
    return noisy.copysign_(w)


@torch.no_grad()
def clip_tensor(w: Tensor, clip: WeightClip) -> Tensor:
    """``w`` (one layer's weights, first dimension = output channels) clipped by ``clip``, in place;
    returns ``w``."""
    if clip.kind == "none":
        return w
    if clip.kind == "fixed":
        return w.clamp_(-clip.bound, clip.bound)
    w2 = w.reshape(w.shape[0], -1)
    if clip.per_channel:
        bound = (clip.bound * w2.std(dim=1, correction=0)).view(-1, *([1] * (w.dim() - 1)))
        return w.copy_(torch.maximum(torch.minimum(w, bound), -bound))
    bound = clip.bound * float(w2.std(correction=0)) if w2.numel() > 1 else math.inf
    return w.clamp_(-bound, bound)
