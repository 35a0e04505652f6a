"""Resistive device models (response of one device to one programming pulse) and device arrays.

Every model is a small dataclass holding its published default settings, validated on
construction, and deriving from :class:`PulsedDevice`. A device array (:class:`DeviceArray`)
draws the device-to-device spread once from a seed (per-device up/down step, bounds, model
extras), keeps the device states ``w`` and applies pulses with cycle-to-cycle noise, clipping
each device to its own bounds after every pulse.

Sign convention (the reference simulator's): an *up* pulse increases ``w``; in a pulsed update
``W <- W - lr d x^T`` a coincidence with ``x_j d_i > 0`` sends a *down* pulse to device (i, j).

Adding a device model
---------------------
Write one dataclass deriving from :class:`PulsedDevice` with

* its settings as dataclass fields with defaults (validate them in ``_validate``; call
  ``check_range(type(self).__name__, "field", value, lo, hi)`` so errors name the field),
* ``step_up(w, p)`` / ``step_down(w, p)``: expected magnitude (>= 0) of one up / down pulse at
  state ``w``; ``p`` holds the per-device parameters: ``p.scale_up``, ``p.scale_down`` (dw_min
  with its device-to-device spread and up/down asymmetry), ``p.w_min``, ``p.w_max`` (bounds),
* optionally ``_sample_extra(shape, randn, p)`` returning a dict of extra per-device tensors
  (e.g. a spread exponent) that then appear as attributes of ``p``,
* optionally ``affine_up(p)`` / ``affine_down(p)`` returning ``(k, beta)`` when one noiseless
  pulse is the affine map ``w -> (1 - k) w + beta`` (then n pulses are applied in closed form);
  otherwise n pulses are applied by a vectorised per-pulse loop (exact, slower).

and register it with ``@register_device("MyDevice", "my_device")`` so that
``device_from_name("my_device")`` finds it. Cycle-to-cycle noise
(``w += step * (1 + dw_min_std * xi)``), write noise, clipping, device-to-device spread of the
step and bounds, and the pulsed-update machinery come from the base class. Example::

    @register_device("SqrtStep")
    @dataclass
    class SqrtStep(PulsedDevice):
        def step_up(self, w, p):
            return p.scale_up * ((p.w_max - w) / (p.w_max - p.w_min)).clamp(min=0).sqrt()
        def step_down(self, w, p):
            return p.scale_down * ((w - p.w_min) / (p.w_max - p.w_min)).clamp(min=0).sqrt()
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from .config import InvalidSetting, UpdateConfig, Validated, check_range

__all__ = [
    "DeviceParams", "PulsedDevice", "IdealDevice", "ConstantStep", "LinearStep", "SoftBounds",
    "ExpStep", "PowStep", "PiecewiseStep", "DeviceArray", "device_from_name", "register_device",
    "DEVICE_REGISTRY",
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
        """Apply ``fn`` to every tensor (cached derived values, keys starting with ``_``, are
        dropped)."""
        return DeviceParams(**{k: (fn(v) if isinstance(v, Tensor) else v) for k, v in self.items()
                               if not k.startswith("_")})

    def to(self, *args: Any, **kw: Any) -> "DeviceParams":
        return self.map(lambda t: t.to(*args, **kw))

    def clone(self) -> "DeviceParams":
        return self.map(lambda t: t.clone())

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        inner = ", ".join(
            f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v}" for k, v in self.items())
        return f"DeviceParams({inner})"


def _randn(shape, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Standard normal draws of ``shape`` on ``like``'s device/dtype from ``generator`` (which may
    live on another device: then drawn there and moved)."""
    dev = like.device
    if generator is not None and generator.device.type != dev.type:
        return torch.randn(shape, generator=generator, device=generator.device,
                           dtype=like.dtype).to(dev)
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype)


def _rand(shape, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    dev = like.device
    if generator is not None and generator.device.type != dev.type:
        return torch.rand(shape, generator=generator, device=generator.device,
                          dtype=like.dtype).to(dev)
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype)


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

    # multiplicative cycle-to-cycle noise (step * (1 + std xi)); additive otherwise
    # (step + std * scale * xi). A class attribute here; LinearStep makes it a field.
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
        """Draw the device-to-device spread once for an array of ``shape``."""
        shape = tuple(int(s) for s in shape)
        like = torch.empty(0, device=device, dtype=dtype)

        def randn() -> Tensor:
            return _randn(shape, generator, like)

        one = torch.ones(shape, device=like.device, dtype=dtype)
        gain = (one + self.dw_min_dtod * randn()).abs() if self.dw_min_dtod > 0 else one
        r = self.up_down_dtod * randn() if self.up_down_dtod > 0 else torch.zeros_like(one)
        scale_up = (self.dw_min * gain * (1.0 + self.up_down + r)).clamp(min=0.0)
        scale_down = (self.dw_min * gain * (1.0 - self.up_down - r)).clamp(min=0.0)
        w_max = self._bound(self.w_max, self.w_max_dtod, randn, one)
        w_min = self._bound(self.w_min, self.w_min_dtod, randn, one)
        lo, hi = torch.minimum(w_min, w_max), torch.maximum(w_min, w_max)
        p = DeviceParams(scale_up=scale_up, scale_down=scale_down, w_min=lo, w_max=hi)
        if self.corrupt_devices_prob > 0:
            bad = _rand(shape, generator, like) < self.corrupt_devices_prob
            val = (2 * _rand(shape, generator, like) - 1) * self.corrupt_devices_range
            p.w_min = torch.where(bad, val, p.w_min)
            p.w_max = torch.where(bad, val, p.w_max)
            p.scale_up = torch.where(bad, torch.zeros_like(scale_up), p.scale_up)
            p.scale_down = torch.where(bad, torch.zeros_like(scale_down), p.scale_down)
        extra = self._sample_extra(shape, randn, p)
        p.__dict__.update(extra)
        return p

    @staticmethod
    def _bound(nominal: float, dtod: float, randn: Callable[[], Tensor], one: Tensor) -> Tensor:
        if dtod > 0 and math.isfinite(nominal):
            # relative spread, kept away from 0 (a bound shrunk to nothing is not a device)
            return nominal * (one + dtod * randn()).clamp(min=0.05)
        return nominal * one

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
        range, k in [0, 1)); None otherwise."""
        return None

    def affine_down(self, p: DeviceParams) -> Optional[Tuple[Tensor, Tensor]]:
        return None

    def symmetry_point(self, p: DeviceParams) -> Optional[Tensor]:
        """State where up and down steps are equal (None if the model has none)."""
        return None

    def clip(self, w: Tensor, p: DeviceParams) -> Tensor:
        return torch.minimum(torch.maximum(w, p.w_min), p.w_max)

    def pulse_once(self, w: Tensor, direction: Tensor, p: DeviceParams,
                   generator: Optional[torch.Generator] = None) -> Tensor:
        """Apply at most one pulse per device: ``direction`` is +1 (up), -1 (down) or 0 (none).
        Cycle-to-cycle noise on every pulse, then clipping to the device's bounds."""
        up = direction > 0
        down = direction < 0
        step = torch.where(up, self.step_up(w, p), torch.zeros((), dtype=w.dtype, device=w.device))
        step = torch.where(down, -self.step_down(w, p), step)
        if self.dw_min_std > 0:
            xi = _randn(w.shape, generator, w)
            if self.mult_noise:
                step = step * (1.0 + self.dw_min_std * xi)
            else:
                sc = torch.where(up, p.scale_up, p.scale_down) * (up | down)
                step = step + self.dw_min_std * sc * xi
        return self.clip(w + step, p)

    # -- n pulses ---------------------------------------------------------------------------
    def apply_pulses(self, w: Tensor, n_up: Tensor, n_down: Optional[Tensor] = None,
                     p: Optional[DeviceParams] = None,
                     generator: Optional[torch.Generator] = None, exact: bool = False) -> Tensor:
        """Apply ``n_up`` up and ``n_down`` down pulses to each device (elementwise counts).

        ``n_down=None``: ``n_up`` holds signed counts (positive = up). ``p=None``: nominal
        devices. Mixed counts are applied as half of the ``min(n_up, n_down)`` up/down pairs
        (alternating order), the excess ``|n_up - n_down|`` pulses of one sign, then the other
        half of the pairs. ``exact=True`` forces the per-pulse loop; otherwise models with an
        affine per-pulse map use the closed form (exact noiseless response for single-sign runs;
        order-averaged pairs; cycle-to-cycle noise with the variance of the noiseless
        trajectory; clipping at the end).
        Returns the new states (a new tensor).
        """
        if n_down is None:
            n = n_up
            n_up, n_down = n.clamp(min=0), (-n).clamp(min=0)
        if p is None:
            p = self.nominal(w.shape, w.device, w.dtype)
        n_up = n_up.to(w.dtype).expand_as(w)
        n_down = n_down.to(w.dtype).expand_as(w)
        if not exact:
            au, ad = self.affine_up(p), self.affine_down(p)
            if au is not None and ad is not None:
                return self._apply_affine(w, n_up, n_down, p, au, ad, generator)
        return self._apply_loop(w, n_up, n_down, p, generator)

    def _apply_loop(self, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                    generator: Optional[torch.Generator]) -> Tensor:
        """Per-pulse vectorised loop over the devices that still have pulses to receive
        (devices sorted by count, so step k touches a prefix: cost ~ total pulses)."""
        m = torch.maximum(n_up, n_down).reshape(-1)
        kmax = int(m.max().item()) if m.numel() else 0
        w = w.clone()
        if kmax == 0:
            return w
        shape = w.shape
        order = torch.argsort(m, descending=True)
        ms = m[order]
        n_active = int((ms > 0).sum().item())
        order, ms = order[:n_active], ms[:n_active]
        flat = w.reshape(-1)
        ws = flat[order]
        us = n_up.reshape(-1)[order]
        ds = n_down.reshape(-1)[order]
        mp = torch.minimum(us, ds)  # pairs
        m1 = torch.floor(mp / 2)  # pairs before the excess
        rs = (us - ds).abs()
        sgn = torch.sign(us - ds)
        ps = p.map(lambda t: t.expand(shape).reshape(-1)[order])
        # number of devices with more than k pulses, for each k
        hist = torch.bincount(ms.long(), minlength=kmax + 1)
        active = (n_active - torch.cumsum(hist, 0)).tolist()
        one = torch.ones((), dtype=w.dtype, device=w.device)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        for k in range(kmax):
            a = active[k]
            if a <= 0:
                break
            pk = ps.map(lambda t: t[:a])
            wk = ws[:a]
            # schedule per device: m1 pairs, the |n_up - n_down| excess pulses, the other pairs
            in_excess = (m1[:a] <= k) & (k < m1[:a] + rs[:a])
            is_pair = ~in_excess
            du = torch.where(is_pair, one, torch.where(sgn[:a] > 0, one, zero))
            dd = torch.where(is_pair, -one, torch.where(sgn[:a] < 0, -one, zero))
            if k % 2 == 0:
                wk = self.pulse_once(wk, du, pk, generator)
                wk = self.pulse_once(wk, dd, pk, generator)
            else:
                wk = self.pulse_once(wk, dd, pk, generator)
                wk = self.pulse_once(wk, du, pk, generator)
            ws[:a] = wk
        flat = flat.clone()
        flat[order] = ws
        return flat.reshape(shape)

    def _affine_cache(self, p: DeviceParams, au, ad) -> Dict[str, Any]:
        """Per-device constants of the closed form (cached on ``p``, dropped by ``p.map``)."""
        c = p.__dict__.get("_affine")
        if c is not None:
            return c
        ku, bu = au
        kd, bd = ad
        ku, kd = ku.expand_as(p.w_max), kd.expand_as(p.w_max)
        bu, bd = bu.expand_as(p.w_max), bd.expand_as(p.w_max)
        lu = torch.log1p(-ku.clamp(max=1.0 - 1e-12))
        ld = torch.log1p(-kd.clamp(max=1.0 - 1e-12))
        lp = lu + ld
        kp = -torch.expm1(lp)  # 1 - rho, rho = (1-ku)(1-kd)
        kp2 = -torch.expm1(2 * lp)  # 1 - rho^2

        def inv(k: Tensor, eps: float = 1e-9) -> Tensor:
            return torch.where(k < eps, torch.zeros_like(k), 1.0 / k.clamp(min=eps))

        kmin = float(torch.minimum(ku.min(), kd.min())) if ku.numel() else 1.0
        mult = self.mult_noise
        c = {"ku": ku, "kd": kd, "bu": bu, "bd": bd, "lu": lu, "ld": ld, "lp": lp,
             "iku": inv(ku), "ikd": inv(kd), "ikp": inv(kp), "ikp2": inv(kp2, 1e-12),
             # order-averaged constant of one up/down pair
             "cp": bu + bd - 0.5 * (kd * bu + ku * bd),
             # squared step of one pulse of the excess run, / (1-k)^2 (for the run variance)
             "e2u": torch.exp(-2 * lu), "e2d": torch.exp(-2 * ld),
             # su(w)^2 + sd(w)^2 = q0 + q1 w + q2 w^2 (multiplicative noise; constant otherwise)
             "q0": bu.square() + bd.square(),
             "q1h": -(bu * ku + bd * kd) if mult else torch.zeros_like(bu),
             "q2h": 0.5 * (ku.square() + kd.square()) if mult else torch.zeros_like(bu),
             "any_small": kmin < 1e-9}
        p.__dict__["_affine"] = c
        return c

    def _apply_affine(self, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                      au: Tuple[Tensor, Tensor], ad: Tuple[Tensor, Tensor],
                      generator: Optional[torch.Generator]) -> Tensor:
        """Closed form for pulses acting as ``w -> (1-k) w + beta``.

        Mean: of ``m = min(n_up, n_down)`` order-averaged up/down pairs (``w -> rho w + c``)
        half are applied, then the ``|n_up - n_down|`` pulses of one sign, then the other half
        (Strang splitting: the excess is spread through the sequence in reality); each phase is
        affine-geometric, so single-sign runs are exact.
        Noise (cycle-to-cycle, one draw per device): variance of the excess run exact along its
        noiseless trajectory, ``s(w_1)^2 n (1-k)^(2(n-1))``; of the pairs
        ``qbar (1 - rho^(2m)) / (1 - rho^2)`` with ``qbar`` the mean of
        ``s_up(w)^2 + s_down(w)^2`` at the start and end states (exact for constant steps and
        at the symmetry point); cross-contraction between phases to first order. Clipping at
        the end (exact for noiseless single-sign runs; otherwise the closed form ignores a bound
        reached in the middle of the batch).
        """
        c = self._affine_cache(p, au, ad)
        exact_fp = w.dtype == torch.float64
        any_small = c["any_small"]

        def om_exp(t: Tensor, a: Tensor) -> Tensor:  # 1 - exp(t), a = exp(t)
            return -torch.expm1(t) if exact_fp else 1.0 - a

        def geom(n: Tensor, om: Tensor, ik: Tensor) -> Tensor:
            # sum_{i<n} (1-k)^i = (1 - (1-k)^n)/k, limit n as k -> 0 (ik = 0 there)
            g = om * ik
            return torch.where(ik == 0, n, g) if any_small else g

        m = torch.minimum(n_up, n_down)
        r = n_up - n_down
        up_r = r > 0
        n_r = r.abs()
        l_r = torch.where(up_r, c["lu"], c["ld"])
        b_r = torch.where(up_r, c["bu"], c["bd"])
        ik_r = torch.where(up_r, c["iku"], c["ikd"])
        any_pairs = bool((m > 0).any())

        def pairs(w0: Tensor, mm: Tensor) -> Tuple[Tensor, Tensor]:
            t = mm * c["lp"]
            a = torch.exp(t)
            return a * w0 + c["cp"] * geom(mm, om_exp(t, a), c["ikp"]), a

        if any_pairs:
            m1 = torch.floor(m * 0.5)
            w1, _ = pairs(w, m1)
        else:
            w1 = w
        t2 = n_r * l_r
        a2 = torch.exp(t2)
        new = a2 * w1 + b_r * geom(n_r, om_exp(t2, a2), ik_r)
        if any_pairs:
            new, a3 = pairs(new, m - m1)
        sig = self.dw_min_std
        if sig > 0:
            if self.mult_noise:
                s_r = b_r - torch.where(up_r, c["ku"], c["kd"]) * w1  # step at the run's start
                var = (s_r * s_r) * n_r * (a2 * a2) * torch.where(up_r, c["e2u"], c["e2d"])
            else:
                k2 = -torch.expm1(2 * l_r)
                g2 = (-torch.expm1(2 * t2) if exact_fp else 1.0 - (a2 * a2))
                var = (b_r * b_r) * torch.where(k2 < 1e-12, n_r, g2 / k2.clamp(min=1e-12))
            if any_pairs:
                qbar = c["q0"] + c["q1h"] * (w + new) + c["q2h"] * ((w * w + new * new))
                t = 2 * m * c["lp"]
                g2 = geom(m, om_exp(t, torch.exp(t)), c["ikp2"])
                # the run's noise is contracted by the later pairs, half of the pairs' noise by
                # the run
                var = var * (a3 * a3) + qbar * g2 * (0.5 + 0.5 * (a2 * a2))
            new = new + sig * var.clamp(min=0).sqrt() * _randn(w.shape, generator, w)
        return self.clip(new, p)


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

    def _apply_affine(self, w, n_up, n_down, p, au, ad, generator):
        # constant steps commute: w + a+ n_up - a- n_down, noise variance
        # sigma^2 (a+^2 n_up + a-^2 n_down) (additive and multiplicative noise coincide);
        # clipped once at the end (exact unless a bound is reached during the batch).
        new = w + p.scale_up * n_up - p.scale_down * n_down
        if self.dw_min_std > 0:
            var = p.scale_up * p.scale_up * n_up + p.scale_down * p.scale_down * n_down
            new = new + self.dw_min_std * var.sqrt() * _randn(w.shape, generator, w)
        return self.clip(new, p)


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
        def spread(v: float, dtod: float) -> Tensor:
            if dtod > 0 and v != 0:
                return (v * (1.0 + dtod * randn())).clamp(min=0.0)
            return torch.full(shape, float(v), dtype=p.w_max.dtype, device=p.w_max.device)

        gu = spread(self.gamma_up, self.gamma_up_dtod)
        gd = spread(self.gamma_down, self.gamma_down_dtod)
        ku = gu * p.scale_up / p.w_max
        kd = gd * p.scale_down / p.w_min.abs()
        # closed form valid when no step changes sign inside the range and (1-k) > 0
        affine_ok = bool(((gu <= 1) & (gd <= 1) & (ku < 1) & (kd < 1)).all().item())
        return {"gamma_up": gu, "gamma_down": gd, "affine_ok": affine_ok}

    def _ku(self, p):
        return p.gamma_up * p.scale_up / p.w_max

    def _kd(self, p):
        return p.gamma_down * p.scale_down / p.w_min.abs()

    def step_up(self, w, p):
        return (p.scale_up - self._ku(p) * w).clamp(min=0.0)

    def step_down(self, w, p):
        return (p.scale_down + self._kd(p) * w).clamp(min=0.0)

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
    ``max(1 - A_up exp(gamma_up z), 0)``, down by ``max(1 - A_down exp(-gamma_down z), 0)``."""

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
        return 2.0 * self.a * w / (p.w_max - p.w_min) + self.b

    def step_up(self, w, p):
        return p.scale_up * (1.0 - self.A_up * torch.exp(self.gamma_up * self._z(w, p))).clamp(min=0.0)

    def step_down(self, w, p):
        return p.scale_down * (1.0 - self.A_down * torch.exp(-self.gamma_down * self._z(w, p))).clamp(min=0.0)


@register_device("pow_step", "power")
@dataclass
class PowStep(PulsedDevice):
    """Power-law saturation: up ``dw+ ((b_max - w)/range)^gamma``, down
    ``dw- ((w - b_min)/range)^gamma`` (range = b_max - b_min), ``gamma`` with relative
    device-to-device spread ``gamma_dtod``."""

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
        if self.gamma_dtod > 0:
            g = (self.gamma * (1.0 + self.gamma_dtod * randn())).clamp(min=1e-3)
        else:
            g = torch.full(shape, float(self.gamma), dtype=p.w_max.dtype, device=p.w_max.device)
        return {"gamma": g}

    def step_up(self, w, p):
        rng = p.w_max - p.w_min
        return p.scale_up * ((p.w_max - w) / rng).clamp(min=0.0) ** p.gamma

    def step_down(self, w, p):
        rng = p.w_max - p.w_min
        return p.scale_down * ((w - p.w_min) / rng).clamp(min=0.0) ** p.gamma


@register_device("piecewise_step", "piecewise")
@dataclass
class PiecewiseStep(PulsedDevice):
    """Step scale linearly interpolated from node values spread evenly over each device's range
    (``piecewise_up[0]`` at ``b_min`` ... ``piecewise_up[-1]`` at ``b_max``)."""

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
        if n == 1:
            return torch.full_like(w, nodes[0])
        t = ((w - p.w_min) / (p.w_max - p.w_min)).clamp(0.0, 1.0) * (n - 1)
        i0 = t.floor().clamp(max=n - 2)
        frac = t - i0
        tab = torch.tensor(nodes, dtype=w.dtype, device=w.device)
        i0l = i0.long()
        return tab[i0l] * (1 - frac) + tab[i0l + 1] * frac

    def step_up(self, w, p):
        return p.scale_up * self._interp(self.piecewise_up, w, p)

    def step_down(self, w, p):
        return p.scale_down * self._interp(self.piecewise_down, w, p)


# ----------------------------------------------------------------------------------------------
# device array
# ----------------------------------------------------------------------------------------------


def make_generator(seed: Optional[int], device: Any = None) -> torch.Generator:
    """A torch.Generator on ``device``; seeded from ``seed``, or from the global RNG if None."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=dev)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    g.manual_seed(int(seed))
    return g


class DeviceArray:
    """An ``out x in`` array of devices of one model, with its sampled spread and states.

    ``w``: device states (tile units). ``params``: the per-device parameters drawn once.
    ``generator``: torch.Generator used for the spread and, by default, for every pulse and
    write-noise draw (same seed -> identical results). Reads should use :attr:`w_read`
    (``w`` plus write noise when the model has it).
    """

    def __init__(self, device_cfg: Any, shape: Sequence[int],
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(device_cfg, str):
            device_cfg = device_from_name(device_cfg)
        if not isinstance(device_cfg, PulsedDevice):
            raise InvalidSetting("DeviceArray", "device_cfg", device_cfg, "a PulsedDevice or a device name")
        self.device_cfg = device_cfg
        self.shape = tuple(int(s) for s in shape)
        if generator is None:
            generator = make_generator(seed, device)
        if device is None:
            device = generator.device
        self.generator = generator
        self.params = device_cfg.sample(self.shape, generator, device, dtype)
        self.w = torch.zeros(self.shape, device=device, dtype=dtype)
        self.w = device_cfg.clip(self.w, self.params)
        self._w_read: Optional[Tensor] = None
        self._redraw_write_noise()

    # -- basics ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def w_read(self) -> Tensor:
        """What a read sees: ``w`` plus write noise (if the model has any)."""
        return self.w if self._w_read is None else self._w_read

    def _redraw_write_noise(self, generator: Optional[torch.Generator] = None) -> None:
        s = self.device_cfg.write_noise_std
        if s > 0:
            g = generator if generator is not None else self.generator
            self._w_read = self.w + s * self.device_cfg.dw_min * _randn(self.w.shape, g, self.w)
        else:
            self._w_read = None

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "DeviceArray":
        """Move states and parameters (in place; returns self). A new generator on the target
        device is seeded from the current one, so runs stay reproducible."""
        device = torch.device(device) if device is not None else self.w.device
        dtype = dtype or self.w.dtype
        if device != self.w.device:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator,
                                     device=self.generator.device).item())
            self.generator = make_generator(seed, device)
        self.w = self.w.to(device=device, dtype=dtype)
        self.params = self.params.to(device=device, dtype=dtype)
        if self._w_read is not None:
            self._w_read = self._w_read.to(device=device, dtype=dtype)
        return self

    def set_weights(self, w: Tensor) -> None:
        """Program the states (clipped to each device's bounds)."""
        w = torch.as_tensor(w, dtype=self.w.dtype, device=self.w.device)
        self.w = self.device_cfg.clip(w.expand(self.shape).clone(), self.params)
        self._redraw_write_noise()

    def get_weights(self) -> Tensor:
        return self.w.clone()

    def symmetry_point(self) -> Optional[Tensor]:
        return self.device_cfg.symmetry_point(self.params)

    # -- pulses ------------------------------------------------------------------------------
    def pulse(self, n: Tensor, generator: Optional[torch.Generator] = None,
              exact: bool = False) -> None:
        """Apply signed pulse counts (positive = up) to each device."""
        g = generator if generator is not None else self.generator
        n = torch.as_tensor(n, device=self.w.device)
        self.w = self.device_cfg.apply_pulses(self.w, n, None, self.params, g, exact=exact)
        self._redraw_write_noise(g)

    def pulse_counts(self, n_up: Tensor, n_down: Tensor,
                     generator: Optional[torch.Generator] = None, exact: bool = False) -> None:
        """Apply separate up and down counts (pairs first, then the excess)."""
        g = generator if generator is not None else self.generator
        self.w = self.device_cfg.apply_pulses(self.w, n_up, n_down, self.params, g, exact=exact)
        self._redraw_write_noise(g)

    def pulsed_update(self, x: Tensor, d: Tensor, lr: float, cfg: Optional[UpdateConfig] = None,
                      generator: Optional[torch.Generator] = None,
                      exact: Optional[bool] = None) -> Dict[str, Tensor]:
        """``W <- W - lr * sum_b d_b x_b^T`` realised as stochastic pulse trains.

        ``x``: [B, in] (or [in]), ``d``: [B, out] (or [out]). ``exact``: None -> ``cfg.exact``.
        Returns pulse statistics (tensors, no host sync): ``n_up``, ``n_down`` (totals),
        ``bl`` (bit length used per sample).
        """
        from .pulses import pulsed_update  # local import: pulses builds on this module

        cfg = cfg if cfg is not None else UpdateConfig()
        g = generator if generator is not None else self.generator
        ex = cfg.exact if exact is None else bool(exact)
        self.w, stats = pulsed_update(self.device_cfg, self.params, self.w, x, d, lr, cfg, g, ex)
        self._redraw_write_noise(g)
        return stats

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"DeviceArray({self.device_cfg!r}, shape={self.shape}, device={self.w.device})"
