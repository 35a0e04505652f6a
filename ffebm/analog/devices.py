"""Resistive device models: the response of one device to one programming pulse.

Every model is a small dataclass holding its published default settings, validated on
construction, and deriving from :class:`PulsedDevice`. A model *describes* a device:

* the expected step of one up / down pulse as a function of the state, ``s_up(w)`` /
  ``s_down(w)`` (:meth:`PulsedDevice.step_up` / :meth:`PulsedDevice.step_down`), and, when it
  has one, a closed form for n pulses (``affine_up``/``affine_down`` or ``closed_form``);
* its device-to-device spread (:meth:`PulsedDevice.sample` draws the per-device parameters
  :class:`DeviceParams` once: up/down step, bounds, model extras);
* its cycle-to-cycle noise and bounds: one pulse is
  ``w <- clip(w + s(w) (1 + dw_min_std xi), w_min, w_max)`` (:meth:`PulsedDevice.pulse_once`).

Applying pulses is not a model's job: :mod:`ffebm.analog.integrate` applies n pulses (closed
forms or a per-pulse loop), :mod:`ffebm.analog.pulses` turns a pulsed update into pulse trains,
and :class:`~ffebm.analog.device_array.DeviceArray` holds the states of an array of devices.
This module imports none of them.

Sign convention (the reference simulator's): an *up* pulse increases ``w``; in a pulsed update
``W <- W - lr d x^T`` a coincidence with ``x_j d_i > 0`` sends a *down* pulse to device (i, j).

Adding a device model
---------------------
Write one dataclass deriving from :class:`PulsedDevice` with

* its settings as dataclass fields with defaults (validate them in ``_validate``; call
  ``check_range(type(self).__name__, "field", value, lo, hi)`` so errors name the field),
* ``step_up(w, p)`` / ``step_down(w, p)``: expected magnitude (>= 0, finite) of one up / down
  pulse at state ``w``; ``p`` holds the per-device parameters: ``p.scale_up``, ``p.scale_down``
  (dw_min with its device-to-device spread and up/down asymmetry), ``p.w_min``, ``p.w_max``
  (bounds). The step must be finite for *every* device, degenerate ones included (see
  "Degenerate devices" below): divide by the range with :func:`safe_span`, by other per-device
  quantities with :func:`safe_ratio`,
* optionally ``_sample_extra(shape, randn, p)`` returning a dict of extra per-device tensors
  (e.g. a spread exponent) that then appear as attributes of ``p``,
* optionally ``affine_up(p)`` / ``affine_down(p)`` returning ``(k, beta)`` when one noiseless
  pulse is the affine map ``w -> (1 - k) w + beta`` (then n pulses are applied in closed form),
  or ``closed_form(w, n_up, n_down, p, generator)`` for a closed form of the model's own;
  otherwise n pulses are applied by a vectorised per-pulse loop (exact, slower).

and register it with ``@register_device("MyDevice", "my_device")`` so that
``device_from_name("my_device")`` finds it. Cycle-to-cycle noise
(``w += step * (1 + dw_min_std * xi)``), write noise, clipping and device-to-device spread of the
step and bounds come from the base class, the pulsed-update machinery works unchanged for the new
model. Example::

    @register_device("SqrtStep")
    @dataclass
    class SqrtStep(PulsedDevice):
        def step_up(self, w, p):
            return p.scale_up * ((p.w_max - w) / safe_span(p)).clamp(0, 1).sqrt()
        def step_down(self, w, p):
            return p.scale_down * ((w - p.w_min) / safe_span(p)).clamp(0, 1).sqrt()

Degenerate devices
------------------
Valid nominal settings can still give degenerate *per-device* parameters, and every model must
stay finite and physical for them (a NaN step is not removed by the clip to the bounds: it
turns the state into NaN for good):

* stuck devices: ``corrupt_devices_prob`` (or any spread) gives ``w_min == w_max`` (with
  ``corrupt_devices_range = 0`` both are 0); the range ``w_max - w_min`` is then 0 and a step
  written as ``(w_max - w) / (w_max - w_min)`` is 0/0. A stuck device never moves: its state
  equals both bounds and every pulse is clipped to them, so only a NaN can move it;
* zero or tiny steps: ``dw_min`` of 1e-12 or less (0 in float32 below 1e-45), a zero gain
  from ``dw_min_dtod``, ``up_down`` near +-1 give ``scale_up`` / ``scale_down`` of 0, so any
  infinite factor multiplying them gives 0 * inf = NaN;
* extreme shape settings: exponentials that overflow (``A exp(gamma z)``), powers of ratios
  outside [0, 1], ratios by a bound that is 0 or tiny, settings beyond the dtype's range
  (``1e300`` is inf in float32).

Hence the rules the built-in models follow: :meth:`PulsedDevice.sample` keeps every per-device
value finite; divide by the range with :func:`safe_span` (never 0), by other per-device
quantities with :func:`safe_ratio` (finite), clamp ratios to the range they mean, clamp
exponents before ``exp`` (:func:`_exp_limits`), and return finite steps. The pulse machinery
(:mod:`ffebm.analog.integrate`, :mod:`ffebm.analog.pulses`) keeps its closed forms and pulse
probabilities finite on top of that. Not covered: per-device *steps* so large that a step
squared (a noise variance) or times the pulse counts leaves the dtype's range (``dw_min`` and
its spreads beyond ~1e19 in float32) -- an unbounded device cannot hold such a state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from . import rng
from .config import InvalidSetting, Validated, check_range

__all__ = [
    "DeviceParams", "PulsedDevice", "IdealDevice", "ConstantStep", "LinearStep", "SoftBounds",
    "ExpStep", "PowStep", "PiecewiseStep", "device_from_name", "register_device",
    "DEVICE_REGISTRY", "safe_span", "safe_ratio",
]

DEVICE_REGISTRY: Dict[str, Type["PulsedDevice"]] = {}


def register_device(*names: str) -> Callable[[Type["PulsedDevice"]], Type["PulsedDevice"]]:
    """Class decorator: make a device model known to :func:`device_from_name` (case-insensitive;
    the class name is always registered, plus any aliases given)."""

    def deco(cls: Type["PulsedDevice"]) -> Type["PulsedDevice"]:
        for n in (cls.__name__,) + tuple(names):
            DEVICE_REGISTRY[_norm_name(n)] = cls
        return cls

    return deco


def _norm_name(name: str) -> str:
    n = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    if n.endswith("device") and n != "device":
        n = n[: -len("device")]
    return n


def device_from_name(name: str, **kw: Any) -> "PulsedDevice":
    """Build a device model from its name (``"SoftBounds"``, ``"soft_bounds"``,
    ``"SoftBoundsDevice"``, ...) and settings."""
    if isinstance(name, PulsedDevice):
        return name
    cls = DEVICE_REGISTRY.get(_norm_name(str(name)))
    if cls is None:
        known = sorted({c.__name__ for c in DEVICE_REGISTRY.values()})
        raise InvalidSetting("device_from_name", "name", name, "one of " + ", ".join(known))
    return cls(**kw)


# ----------------------------------------------------------------------------------------------
# per-device parameters
# ----------------------------------------------------------------------------------------------


class DeviceParams:
    """Per-device parameters: tensors of the array's shape, as attributes.

    Always present: ``scale_up``, ``scale_down`` (step of one up/down pulse, >= 0), ``w_min``,
    ``w_max`` (each device's bounds). Models add their own (e.g. ``gamma_up``). Non-tensor
    attributes (python flags) are kept as they are by :meth:`map`.
    """

    def __init__(self, **items: Any) -> None:
        self.__dict__.update(items)

    def items(self):
        return [(k, v) for k, v in self.__dict__.items() if not k.startswith("_")]

    def keys(self):
        return [k for k in self.__dict__ if not k.startswith("_")]

    def __getitem__(self, key: str) -> Any:
        return self.__dict__[key]

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def map(self, fn: Callable[[Tensor], Tensor]) -> "DeviceParams":
        """Apply ``fn`` to every tensor. Cached derived values (keys starting with ``_``) follow
        when they are per-device tensors (``fn`` slices or moves them like the rest) and are
        dropped otherwise (recomputed on use)."""
        out = {k: (fn(v) if isinstance(v, Tensor) else v) for k, v in self.items()}
        out.update({k: fn(v) for k, v in self.__dict__.items() if k.startswith("_") and isinstance(v, Tensor)})
        if "_bounded" in self.__dict__:  # "all bounds finite" holds for any slice or copy too
            out["_bounded"] = self.__dict__["_bounded"]
        return DeviceParams(**out)

    def derived(self, name: str, compute: Callable[[], Any], *extra: Any) -> Any:
        """A constant derived from the parameters (``compute()``), computed once and kept under
        ``name`` until a parameter tensor is replaced or modified in place (each tensor's
        identity and ``_version`` are checked on every use), another parameter (a flag such as
        ``affine_ok``) or ``extra`` (e.g. the device model's settings) changes. Not carried by
        :meth:`map` (recomputed for the new tensors)."""
        srcs = [v for _, v in self.items() if isinstance(v, Tensor)]
        key = (extra, [(k, v) for k, v in self.items() if not isinstance(v, Tensor)])
        hit = self.__dict__.get(name)
        if hit is not None:
            tensors, versions, k0, value = hit
            if (len(tensors) == len(srcs) and k0 == key
                    and all(a is b and a._version == v for a, b, v in zip(tensors, srcs, versions))):
                return value
        value = compute()
        self.__dict__[name] = (srcs, [t._version for t in srcs], key, value)
        return value

    def to(self, *args: Any, **kw: Any) -> "DeviceParams":
        return self.map(lambda t: t.to(*args, **kw))

    def clone(self) -> "DeviceParams":
        return self.map(lambda t: t.clone())

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        inner = ", ".join(
            f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v}" for k, v in self.items())
        return f"DeviceParams({inner})"


# ----------------------------------------------------------------------------------------------
# guarded arithmetic for step formulas (degenerate devices, see the module docstring)
# ----------------------------------------------------------------------------------------------


def safe_span(p: DeviceParams) -> Tensor:
    """Each device's range ``w_max - w_min`` for dividing by it: clamped to the dtype's normal
    finite numbers ``[tiny, max]`` (``tiny`` = 1.2e-38 in float32), so never 0 nor inf.

    A stuck device (``w_min == w_max``) has range 0; its state equals both bounds, so the
    numerators ``w_max - w`` / ``w - w_min`` of the step formulas are 0 there and the ratio
    becomes 0 instead of 0/0 = NaN; whatever its step, the clip to the bounds keeps the device
    where it is. A range that overflows (bounds near +-max) would make inf / inf = NaN. Ranges
    in ``[tiny, max]`` are returned unchanged (bit-identical results for every other device)."""
    fi = torch.finfo(p.w_max.dtype)
    return (p.w_max - p.w_min).clamp(fi.tiny, fi.max)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` for per-device coefficients, finite: a divisor below the dtype's smallest
    normal number (0, negative) counts as that number, the quotient is capped at the largest
    finite value, and an undefined one (inf / inf: an infinite bound) is 0.

    For coefficients such as LinearStep's ``gamma scale / w_max``: a divisor that is 0 (a bound
    of a stuck device with ``corrupt_devices_range = 0``) or of the wrong sign (a stuck device's
    bound at a random value) only occurs for devices whose numerator is 0 (their scale is 0),
    so the coefficient is 0 instead of 0/0 = NaN; a tiny divisor (a bound that rounds to 0)
    would give inf, then inf * 0 = NaN in the step. Unchanged where the divisor is at least
    the smallest normal number and the quotient is finite."""
    fi = torch.finfo(num.dtype)
    return torch.nan_to_num(num / den.clamp(min=fi.tiny), nan=0.0, posinf=fi.max, neginf=-fi.max)


def _exp_limits(dtype: torch.dtype) -> Tuple[float, float]:
    """Exponent range ``(lo, hi)`` within which ``exp`` stays a finite, normal, positive number
    of ``dtype`` (with one unit of margin: 1.3e38 and 3.2e-38 in float32). Clamping an exponent
    to it before ``A * exp(x)`` keeps the product finite or +inf, never 0 * inf = NaN (A = 0 with
    an overflowing exponent, an A beyond the dtype's range with an underflowing one), and, for A
    in the dtype's normal range (not beyond 1e29 in float32), changes no result: beyond ``hi``
    ``A exp(x) > 1`` anyway, below ``lo`` it vanishes next to 1."""
    fi = torch.finfo(dtype)
    return math.log(fi.tiny) + 1.0, math.log(fi.max) - 1.0


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------


@dataclass
class PulsedDevice(Validated):
    """Base of all pulsed device models (published defaults of the reference simulator).

    Fields: ``dw_min`` nominal step; ``dw_min_dtod`` device-to-device spread of the step (gain
    ``|1 + dw_min_dtod xi|``); ``dw_min_std`` cycle-to-cycle noise of every pulse
    (``step * (1 + dw_min_std xi)``); ``w_min``/``w_max`` nominal bounds with relative spreads
    ``w_min_dtod``/``w_max_dtod``; ``up_down`` systematic up/down asymmetry and ``up_down_dtod``
    its spread (up step ``dw_min gain (1 + up_down + r)``, down step
    ``dw_min gain (1 - up_down - r)``, ``r ~ N(0, up_down_dtod)``); ``write_noise_std``: reads
    see ``w + write_noise_std dw_min xi``, redrawn after every update; ``corrupt_devices_prob``:
    probability that a device is stuck (both bounds equal to a random value within
    ``+-corrupt_devices_range``).
    """

    dw_min: float = 0.001
    dw_min_dtod: float = 0.3
    dw_min_std: float = 0.3
    w_max: float = 0.6
    w_min: float = -0.6
    w_max_dtod: float = 0.3
    w_min_dtod: float = 0.3
    up_down: float = 0.0
    up_down_dtod: float = 0.01
    write_noise_std: float = 0.0
    corrupt_devices_prob: float = 0.0
    corrupt_devices_range: float = 0.1

    #: multiplicative cycle-to-cycle noise (step * (1 + std xi)); additive otherwise
    #: (step + std * scale * xi). A class attribute here; LinearStep makes it a field.
    mult_noise = True
    #: capability: a pulsed update of this device *is* the floating-point update ``W -= lr d x^T``
    #: (no pulse trains needed); the pulse machinery then applies it directly
    exact_updates = False

    def __post_init__(self) -> None:
        self._validate()

    # -- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        o = type(self).__name__
        check_range(o, "dw_min", self.dw_min, 0, None, lo_open=True)
        check_range(o, "dw_min_dtod", self.dw_min_dtod, 0, None)
        check_range(o, "dw_min_std", self.dw_min_std, 0, None)
        for name in ("w_min", "w_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise InvalidSetting(o, name, v, "a number (w_min < w_max)")
        if not self.w_min < self.w_max:
            raise InvalidSetting(o, "w_min", self.w_min,
                                 f"(-inf, w_max) with w_max = {self.w_max} (need w_min < w_max)")
        check_range(o, "w_max_dtod", self.w_max_dtod, 0, None)
        check_range(o, "w_min_dtod", self.w_min_dtod, 0, None)
        check_range(o, "up_down", self.up_down, -1, 1, lo_open=True, hi_open=True)
        check_range(o, "up_down_dtod", self.up_down_dtod, 0, None)
        check_range(o, "write_noise_std", self.write_noise_std, 0, None)
        check_range(o, "corrupt_devices_prob", self.corrupt_devices_prob, 0, 1)
        check_range(o, "corrupt_devices_range", self.corrupt_devices_range, 0, None)

    def without_variability(self) -> "PulsedDevice":
        """The same model with device-to-device spread and pulse noise off."""
        kw = {f.name: 0.0 for f in fields(self)
              if f.name.endswith("_dtod") or f.name in ("dw_min_std", "write_noise_std",
                                                        "corrupt_devices_prob")}
        return self.replace(**kw)

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
               device: Any = None, dtype: torch.dtype = torch.float32) -> DeviceParams:
        """Draw the device-to-device spread once for an array of ``shape``.

        Every per-device value is finite for finite settings (steps in ``[0, max]``, bounds
        and stuck values in ``[-max, max]``, ``max`` the dtype's largest finite number: a
        setting beyond float32's range would otherwise become inf, and inf - inf or 0 * inf
        NaN in the step formulas); infinite nominal bounds stay infinite."""
        shape = tuple(int(s) for s in shape)
        like = torch.empty(0, device=device, dtype=dtype)
        fmax = torch.finfo(dtype).max

        def randn() -> Tensor:
            return rng.randn(shape, generator, like)

        one = torch.ones(shape, device=like.device, dtype=dtype)
        if self.dw_min_dtod > 0:
            gain = (one + self.dw_min_dtod * randn()).abs().clamp(max=fmax)
        else:
            gain = one
        if self.up_down_dtod > 0:
            r = (self.up_down_dtod * randn()).clamp(-fmax, fmax)
        else:
            r = torch.zeros_like(one)
        scale_up = (self.dw_min * gain * (1.0 + self.up_down + r)).clamp(0.0, fmax)
        scale_down = (self.dw_min * gain * (1.0 - self.up_down - r)).clamp(0.0, fmax)
        w_max = self._bound(self.w_max, self.w_max_dtod, randn, one)
        w_min = self._bound(self.w_min, self.w_min_dtod, randn, one)
        lo, hi = torch.minimum(w_min, w_max), torch.maximum(w_min, w_max)
        p = DeviceParams(scale_up=scale_up, scale_down=scale_down, w_min=lo, w_max=hi)
        if self.corrupt_devices_prob > 0:
            bad = rng.rand(shape, generator, like) < self.corrupt_devices_prob
            val = (2 * rng.rand(shape, generator, like) - 1) * min(self.corrupt_devices_range, fmax)
            p.w_min = torch.where(bad, val, p.w_min)
            p.w_max = torch.where(bad, val, p.w_max)
            p.scale_up = torch.where(bad, torch.zeros_like(scale_up), p.scale_up)
            p.scale_down = torch.where(bad, torch.zeros_like(scale_down), p.scale_down)
        extra = self._sample_extra(shape, randn, p)
        p.__dict__.update(extra)
        return p

    @staticmethod
    def _bound(nominal: float, dtod: float, randn: Callable[[], Tensor], one: Tensor) -> Tensor:
        if not math.isfinite(nominal):
            return nominal * one
        fmax = torch.finfo(one.dtype).max
        if dtod > 0:
            # relative spread, kept away from 0 (a bound shrunk to nothing is not a device)
            return (nominal * (one + dtod * randn()).clamp(0.05, fmax)).clamp(-fmax, fmax)
        return (nominal * one).clamp(-fmax, fmax)

    def nominal(self, shape: Sequence[int], device: Any = None,
                dtype: torch.dtype = torch.float32) -> DeviceParams:
        """Parameters without device-to-device spread (every device nominal)."""
        return self.without_variability().sample(shape, None, device, dtype)

    def _sample_extra(self, shape: Tuple[int, ...], randn: Callable[[], Tensor],
                      p: DeviceParams) -> Dict[str, Any]:
        """Model-specific per-device parameters (override)."""
        return {}

    # -- response -----------------------------------------------------------------------------
    def step_up(self, w: Tensor, p: DeviceParams) -> Tensor:
        """Expected magnitude (>= 0) of one up pulse at state ``w``."""
        raise NotImplementedError

    def step_down(self, w: Tensor, p: DeviceParams) -> Tensor:
        """Expected magnitude (>= 0) of one down pulse at state ``w``."""
        raise NotImplementedError

    def affine_up(self, p: DeviceParams) -> Optional[Tuple[Tensor, Tensor]]:
        """``(k, beta)`` if one noiseless up pulse is ``w -> (1-k) w + beta`` (valid over the whole
        range, k in [0, 1)); None otherwise. With both maps the pulse machinery applies n pulses
        by their geometric sums (:func:`ffebm.analog.integrate.affine_closed_form`)."""
        return None

    def affine_down(self, p: DeviceParams) -> Optional[Tuple[Tensor, Tensor]]:
        """``(k, beta)`` if one noiseless down pulse is ``w -> (1-k) w + beta``; None otherwise."""
        return None

    def closed_form(self, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                    generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """States after ``n_up`` up and ``n_down`` down pulses (elementwise counts, noise and
        clipping included), when the model has a closed form of its own; None (the default)
        lets the pulse machinery integrate :meth:`affine_up`/:meth:`affine_down` or loop over
        single pulses (:func:`ffebm.analog.integrate.apply_pulses`)."""
        return None

    def symmetry_point(self, p: DeviceParams) -> Optional[Tensor]:
        """State where up and down steps are equal (None if the model has none)."""
        return None

    def clip(self, w: Tensor, p: DeviceParams, inplace: bool = False) -> Tensor:
        """``w`` clipped to each device's bounds and to the dtype's finite range: a state of an
        unbounded device (``w_min = -inf`` / ``w_max = inf``) whose steps overflow saturates at
        ``+-max`` instead of becoming inf (and then NaN as inf - inf in the next pulse).
        ``inplace``: clip ``w`` itself (a temporary of the caller: saves allocating the
        array's size again) and return it."""
        out = w.clamp_(p.w_min, p.w_max) if inplace else torch.clamp(w, p.w_min, p.w_max)
        bounded = p.__dict__.get("_bounded")  # finite bounds everywhere: one clamp is enough
        if bounded is None:
            bounded = p.__dict__["_bounded"] = bool(torch.isfinite(p.w_min).all() and torch.isfinite(p.w_max).all())
        if bounded:
            return out
        fmax = torch.finfo(w.dtype).max
        return out.clamp_(-fmax, fmax)

    def pulse_once(self, w: Tensor, direction: Tensor, p: DeviceParams,
                   generator: Optional[torch.Generator] = None) -> Tensor:
        """Apply at most one pulse per device: ``direction`` is +1 (up), -1 (down) or 0 (none).

        ``w <- clip(w + s (1 + dw_min_std xi), w_min, w_max)`` with ``s = step_up(w)`` for an up
        pulse, ``-step_down(w)`` for a down pulse, ``xi ~ N(0, 1)`` drawn for every device;
        with additive noise (``mult_noise`` False) ``s + dw_min_std scale xi`` instead
        (``scale``: the device's ``scale_up`` / ``scale_down``). The reference semantics of
        one pulse, which the n-pulse closed forms reproduce."""
        up = direction > 0
        down = direction < 0
        step = torch.where(up, self.step_up(w, p), torch.zeros((), dtype=w.dtype, device=w.device))
        step = torch.where(down, -self.step_down(w, p), step)
        if self.dw_min_std > 0:
            xi = rng.randn(w.shape, generator, w)
            if self.mult_noise:
                step = step * (1.0 + self.dw_min_std * xi)
            else:
                sc = torch.where(up, p.scale_up, p.scale_down) * (up | down)
                step = step + self.dw_min_std * sc * xi
        return self.clip(w + step, p, inplace=True)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


@register_device("constant_step", "constant")
@dataclass
class ConstantStep(PulsedDevice):
    """``w +- dw (1 + sigma xi)``: the same step everywhere in the range (published defaults)."""

    def step_up(self, w: Tensor, p: DeviceParams) -> Tensor:
        return p.scale_up.expand_as(w)

    def step_down(self, w: Tensor, p: DeviceParams) -> Tensor:
        return p.scale_down.expand_as(w)

    def affine_up(self, p):
        return torch.zeros_like(p.scale_up), p.scale_up

    def affine_down(self, p):
        return torch.zeros_like(p.scale_down), -p.scale_down

    def closed_form(self, w, n_up, n_down, p, generator=None):
        """Constant steps commute: ``w + a+ n_up - a- n_down + sigma sqrt(a+^2 n_up + a-^2 n_down) xi``
        (additive and multiplicative noise coincide), clipped once at the end (exact unless a
        bound is reached during the batch). A noise term that is NaN (0 * inf: a
        ``dw_min_std`` that rounds to 0 in the dtype times a variance that overflows) adds
        nothing."""
        new = w + p.scale_up * n_up - p.scale_down * n_down
        if self.dw_min_std > 0:
            var = p.scale_up * p.scale_up * n_up + p.scale_down * p.scale_down * n_down
            noise = self.dw_min_std * var.sqrt() * rng.randn(w.shape, generator, w)
            new = new + torch.nan_to_num(noise, nan=0.0, posinf=math.inf, neginf=-math.inf)
        return self.clip(new, p, inplace=True)


@register_device("ideal", "floating_point", "fp")
@dataclass
class IdealDevice(ConstantStep):
    """No device physics: a pulsed update is the exact floating-point update ``W -= lr d x^T``;
    single pulses move by exactly ``dw_min``. No spread, no noise, unbounded by default."""

    exact_updates = True

    dw_min_dtod: float = 0.0
    dw_min_std: float = 0.0
    w_max: float = math.inf
    w_min: float = -math.inf
    w_max_dtod: float = 0.0
    w_min_dtod: float = 0.0
    up_down_dtod: float = 0.0


@register_device("linear_step", "linear")
@dataclass
class LinearStep(PulsedDevice):
    """Step linear in the state: up ``dw+ (1 - gamma_up w / b_max)``, down
    ``dw- (1 - gamma_down w / b_min)`` (each >= 0), times ``(1 + sigma xi)``.
    ``gamma_*_dtod``: relative device-to-device spread of the slopes. Requires
    ``w_min < 0 < w_max``. For gamma <= 1 the n-pulse map is affine-geometric (closed form)."""

    gamma_up: float = 0.0
    gamma_down: float = 0.0
    gamma_up_dtod: float = 0.05
    gamma_down_dtod: float = 0.05
    mult_noise: bool = True

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "gamma_up", self.gamma_up, 0, None)
        check_range(o, "gamma_down", self.gamma_down, 0, None)
        check_range(o, "gamma_up_dtod", self.gamma_up_dtod, 0, None)
        check_range(o, "gamma_down_dtod", self.gamma_down_dtod, 0, None)
        if not isinstance(self.mult_noise, bool):
            raise InvalidSetting(o, "mult_noise", self.mult_noise, "True or False")
        if not self.w_min < 0:
            raise InvalidSetting(o, "w_min", self.w_min, "(-inf, 0) (the slope is relative to it)")
        if not self.w_max > 0:
            raise InvalidSetting(o, "w_max", self.w_max, "(0, inf] (the slope is relative to it)")

    def _sample_extra(self, shape, randn, p):
        fmax = torch.finfo(p.w_max.dtype).max

        def spread(v: float, dtod: float) -> Tensor:  # finite (an inf slope times a 0 step: NaN)
            if dtod > 0 and v != 0:
                return (v * (1.0 + dtod * randn()).clamp(-fmax, fmax)).clamp(0.0, fmax)
            return torch.full(shape, min(float(v), fmax), dtype=p.w_max.dtype, device=p.w_max.device)

        gu = spread(self.gamma_up, self.gamma_up_dtod)
        gd = spread(self.gamma_down, self.gamma_down_dtod)
        ku = safe_ratio(gu * p.scale_up, p.w_max)
        kd = safe_ratio(gd * p.scale_down, p.w_min.abs())
        # closed form valid when no step changes sign inside the range and (1-k) > 0
        affine_ok = bool(((gu <= 1) & (gd <= 1) & (ku < 1) & (kd < 1)).all().item())
        return {"gamma_up": gu, "gamma_down": gd, "affine_ok": affine_ok}

    # slopes k = gamma scale / bound, by safe_ratio: 0 for a device whose bound is 0 or has the
    # wrong sign (stuck devices only: w_min == w_max == a random value, 0 with
    # corrupt_devices_range = 0; their scale is 0), capped at the largest finite value for a
    # bound that is tiny (the step is then 0 or capped, on either side of 0)
    def _ku(self, p):
        k = p.__dict__.get("_ku")  # a per-device constant: computed once per parameter set
        if k is None:
            k = p.__dict__["_ku"] = safe_ratio(p.gamma_up * p.scale_up, p.w_max)
        return k

    def _kd(self, p):
        k = p.__dict__.get("_kd")
        if k is None:
            k = p.__dict__["_kd"] = safe_ratio(p.gamma_down * p.scale_down, p.w_min.abs())
        return k

    def step_up(self, w, p):
        return (p.scale_up - self._ku(p) * w).clamp(0.0, torch.finfo(w.dtype).max)

    def step_down(self, w, p):
        return (p.scale_down + self._kd(p) * w).clamp(0.0, torch.finfo(w.dtype).max)

    def affine_up(self, p):
        if not getattr(p, "affine_ok", False):
            return None
        return self._ku(p), p.scale_up

    def affine_down(self, p):
        if not getattr(p, "affine_ok", False):
            return None
        return self._kd(p), -p.scale_down

    def symmetry_point(self, p):
        """``w* = (a+ - a-) / (gamma+ a+/b_max - gamma- a-/b_min)`` (nan where undefined: with
        both slopes 0, as in the default ``gamma_up = gamma_down = 0``, there is no symmetry point)."""
        den = self._ku(p) + self._kd(p)
        sp = (p.scale_up - p.scale_down) / torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, sp, torch.full_like(sp, float("nan")))


@register_device("soft_bounds", "softbound")
@dataclass
class SoftBounds(LinearStep):
    """LinearStep with gamma = 1: the step shrinks linearly to zero at each device's bound.
    Repeated up/down pairs drift to the symmetry point
    ``w* = (a+ - a-) / (a+/b_max - a-/b_min)``."""

    gamma_up: float = 1.0
    gamma_down: float = 1.0
    gamma_up_dtod: float = 0.0
    gamma_down_dtod: float = 0.0


@register_device("exp_step", "exponential")
@dataclass
class ExpStep(PulsedDevice):
    """Exponential saturation: ``z = 2 a w / (b_max - b_min) + b``; up step scaled by
    ``max(1 - A_up exp(gamma_up z), 0)``, down by ``max(1 - A_down exp(-gamma_down z), 0)``.

    Guards (degenerate devices): the range is never 0 (:func:`safe_span`); ``a``, ``b`` and
    ``gamma`` are kept finite in the dtype and so is ``z`` (0 times an infinite ``z``, or an
    infinite ``a`` times ``w = 0``, would be NaN), and the exponent is clamped to
    :func:`_exp_limits` (``A = 0`` times an overflowing ``exp`` would be NaN; a saturated
    ``A exp`` only needs to exceed 1), so each factor is in [0, 1]."""

    A_up: float = 0.00081
    A_down: float = 0.36833
    gamma_up: float = 12.44625
    gamma_down: float = 12.78785
    a: float = 0.244
    b: float = 0.2425

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        for n in ("A_up", "A_down", "gamma_up", "gamma_down"):
            check_range(o, n, getattr(self, n), 0, None)
        check_range(o, "a", self.a, None, None)
        check_range(o, "b", self.b, None, None)
        if not (math.isfinite(self.w_min) and math.isfinite(self.w_max)):
            raise InvalidSetting(o, "w_max", self.w_max, "finite bounds (z is relative to the range)")

    def _z(self, w, p):
        # a and b kept finite in the dtype (an a beyond it times w = 0 would be NaN), z clamped
        # to the finite range (a gamma that is or rounds to 0 times an infinite z would be NaN;
        # z is never NaN: a, b, w and the range are finite); the same operations as
        # 2 a w / range + b otherwise
        fmax = torch.finfo(w.dtype).max
        a2 = min(max(2.0 * self.a, -fmax), fmax)
        b = min(max(self.b, -fmax), fmax)
        return (a2 * w / safe_span(p) + b).clamp(-fmax, fmax)

    @staticmethod
    def _factor(A: float, gamma: float, z: Tensor) -> Tensor:
        """``max(1 - A exp(gamma z), 0)``: ``gamma`` kept finite in the dtype (one beyond it
        times z = 0 would be NaN), the exponent clamped to :func:`_exp_limits`."""
        fmax = torch.finfo(z.dtype).max
        lo, hi = _exp_limits(z.dtype)
        x = min(max(gamma, -fmax), fmax) * z
        return (1.0 - A * torch.exp(x.clamp(lo, hi))).clamp(min=0.0)

    def step_up(self, w, p):
        return p.scale_up * self._factor(self.A_up, self.gamma_up, self._z(w, p))

    def step_down(self, w, p):
        return p.scale_down * self._factor(self.A_down, -self.gamma_down, self._z(w, p))


@register_device("pow_step", "power")
@dataclass
class PowStep(PulsedDevice):
    """Power-law saturation: up ``dw+ ((b_max - w)/range)^gamma``, down
    ``dw- ((w - b_min)/range)^gamma`` (range = b_max - b_min), ``gamma`` with relative
    device-to-device spread ``gamma_dtod``.

    Guards (degenerate devices): the range is never 0 (:func:`safe_span`: a stuck device's 0/0
    would be NaN), and the ratio is clamped to [0, 1] (a state outside the bounds counts as
    at the nearest bound; a ratio above 1 to a large gamma would overflow)."""

    gamma: float = 1.0
    gamma_dtod: float = 0.1

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "gamma", self.gamma, 0, None, lo_open=True)
        check_range(o, "gamma_dtod", self.gamma_dtod, 0, None)
        if not (math.isfinite(self.w_min) and math.isfinite(self.w_max)):
            raise InvalidSetting(o, "w_max", self.w_max, "finite bounds (the step is relative to the range)")

    def _sample_extra(self, shape, randn, p):
        fmax = torch.finfo(p.w_max.dtype).max
        if self.gamma_dtod > 0:
            spread = (1.0 + self.gamma_dtod * randn()).clamp(-fmax, fmax)
            g = (self.gamma * spread).clamp(1e-3, fmax)
        else:
            g = torch.full(shape, min(float(self.gamma), fmax), dtype=p.w_max.dtype,
                           device=p.w_max.device)
        return {"gamma": g}

    def step_up(self, w, p):
        return p.scale_up * ((p.w_max - w) / safe_span(p)).clamp(0.0, 1.0) ** p.gamma

    def step_down(self, w, p):
        return p.scale_down * ((w - p.w_min) / safe_span(p)).clamp(0.0, 1.0) ** p.gamma


@register_device("piecewise_step", "piecewise")
@dataclass
class PiecewiseStep(PulsedDevice):
    """Step scale linearly interpolated from node values spread evenly over each device's range
    (``piecewise_up[0]`` at ``b_min`` ... ``piecewise_up[-1]`` at ``b_max``).

    Guards (degenerate devices): the range is never 0 (:func:`safe_span`; a stuck device's
    0/0 would be a NaN table index), node values are capped at half the dtype's largest finite
    value (so their interpolation stays finite: a node beyond float32's range would be inf, and
    0 * inf = NaN) and steps at the largest finite value."""

    piecewise_up: Tuple[float, ...] = (1.0,)
    piecewise_down: Tuple[float, ...] = (1.0,)

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        for n in ("piecewise_up", "piecewise_down"):
            v = getattr(self, n)
            try:
                vals = [float(x) for x in v]
            except TypeError:
                raise InvalidSetting(o, n, v, "a non-empty list of numbers >= 0") from None
            if len(vals) == 0 or any((not math.isfinite(x)) or x < 0 for x in vals):
                raise InvalidSetting(o, n, v, "a non-empty list of numbers >= 0")
            setattr(self, n, tuple(vals))
        if not (math.isfinite(self.w_min) and math.isfinite(self.w_max)):
            raise InvalidSetting(o, "w_max", self.w_max, "finite bounds (nodes span the range)")

    @staticmethod
    def _interp(nodes: Tuple[float, ...], w: Tensor, p: DeviceParams) -> Tensor:
        n = len(nodes)
        fmax = torch.finfo(w.dtype).max
        if n == 1:
            return torch.full_like(w, min(nodes[0], 0.5 * fmax))
        t = ((w - p.w_min) / safe_span(p)).clamp(0.0, 1.0) * (n - 1)
        i0 = t.floor().clamp(0, n - 2)
        frac = t - i0
        tab = torch.tensor(nodes, dtype=w.dtype, device=w.device).clamp(max=0.5 * fmax)
        i0l = i0.long()
        return tab[i0l] * (1 - frac) + tab[i0l + 1] * frac

    def step_up(self, w, p):
        step = p.scale_up * self._interp(self.piecewise_up, w, p)
        return step.clamp(max=torch.finfo(w.dtype).max)

    def step_down(self, w, p):
        step = p.scale_down * self._interp(self.piecewise_down, w, p)
        return step.clamp(max=torch.finfo(w.dtype).max)
