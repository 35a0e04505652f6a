"""Integration of a device model's response over n pulses: ``n_up`` up and ``n_down`` down
pulses per device, applied to the states ``w`` of a device array.

A device model (:mod:`ffebm.analog.devices`) describes one pulse: the expected step
``s_up(w)`` / ``s_down(w)``, the cycle-to-cycle noise and the bounds (``pulse_once``), and
optionally a closed form for n pulses (``closed_form``) or the affine map of one noiseless pulse
(``affine_up`` / ``affine_down``). :func:`apply_pulses` picks, per call:

1. ``exact=True``: :func:`per_pulse_loop`, one pulse at a time through ``pulse_once`` (the
   reference semantics; cost ~ total pulses);
2. otherwise the model's own ``closed_form`` when it has one;
3. otherwise, when one up and one down pulse are both affine, ``w -> (1 - k) w + beta``:
   :func:`affine_closed_form`, the geometric sums of those maps;
4. otherwise :func:`per_pulse_loop`.

Mixed counts follow one schedule everywhere: half of the ``m = min(n_up, n_down)`` up/down pairs
(alternating order), then the ``|n_up - n_down|`` excess pulses of one sign, then the other half
of the pairs.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import rng
from .devices import DeviceParams, PulsedDevice

__all__ = ["apply_pulses", "per_pulse_loop", "affine_closed_form", "MAX_LOOP_PULSES"]

#: most pulses one device receives in one call of the per-pulse loop (models without a closed
#: form); larger counts are scaled down to it, keeping the up/down ratio, with a warning
MAX_LOOP_PULSES = 100_000

#: ``(k, beta)`` of one noiseless pulse ``w -> (1 - k) w + beta`` (per-device tensors)
Affine = Tuple[Tensor, Tensor]


def apply_pulses(device: PulsedDevice, w: Tensor, n_up: Tensor, n_down: Optional[Tensor] = None,
                 p: Optional[DeviceParams] = None, generator: Optional[torch.Generator] = None,
                 exact: bool = False) -> Tensor:
    """Apply ``n_up`` up and ``n_down`` down pulses of ``device`` to each state of ``w``
    (elementwise counts).

    ``n_down=None``: ``n_up`` holds signed counts (positive = up). ``p=None``: nominal
    devices. Mixed counts are applied as half of the ``min(n_up, n_down)`` up/down pairs
    (alternating order), the excess ``|n_up - n_down|`` pulses of one sign, then the other
    half of the pairs. ``exact=True`` forces the per-pulse loop; otherwise the model's
    ``closed_form`` is used if it has one, else, for models with an affine per-pulse map, the
    affine closed form (exact noiseless response for single-sign runs; order-averaged pairs;
    cycle-to-cycle noise with the variance of the noiseless trajectory; clipping at the end).
    Returns the new states (a new tensor).
    """
    if n_down is None:
        n = n_up
        n_up, n_down = n.clamp(min=0), (-n).clamp(min=0)
    if p is None:
        p = device.nominal(w.shape, w.device, w.dtype)
    n_up = n_up.to(w.dtype).expand_as(w)
    n_down = n_down.to(w.dtype).expand_as(w)
    if not exact:
        new = device.closed_form(w, n_up, n_down, p, generator)
        if new is not None:
            return new
        au, ad = device.affine_up(p), device.affine_down(p)
        if au is not None and ad is not None:
            return affine_closed_form(device, w, n_up, n_down, p, au, ad, generator)
    return per_pulse_loop(device, w, n_up, n_down, p, generator)


def per_pulse_loop(device: PulsedDevice, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                   generator: Optional[torch.Generator]) -> Tensor:
    """Exact per-pulse integration: ``device.pulse_once`` applied pulse after pulse, noise and
    clipping at every pulse.

    Schedule per device: ``floor(m/2)`` up/down pairs (``m = min(n_up, n_down)``; up first in
    even slots, down first in odd slots), the ``|n_up - n_down|`` excess pulses of one sign,
    then the remaining pairs. Vectorised over the devices that still have pulses to receive
    (devices sorted by count, so slot k touches a prefix: cost ~ total pulses).
    Finite for degenerate devices: each pulse is a finite step (the models guard their step
    formulas, :mod:`ffebm.analog.devices`) times a finite noise factor, then clipped to the
    bounds and the dtype's finite range (:meth:`~ffebm.analog.devices.PulsedDevice.clip`), so
    a stuck device stays exactly where it is."""
    m = torch.maximum(n_up, n_down).reshape(-1)
    if m.numel() and float(m.max()) > MAX_LOOP_PULSES:
        # far more pulses than any device needs to cross its range pulse by pulse: cap them
        # (the device sits at its bound long before) rather than loop for hours or overflow
        warnings.warn(f"{type(device).__name__}: {float(m.max()):.3g} pulses for one device in one call; capped at "
                      f"{MAX_LOOP_PULSES} (the per-pulse loop of a model without a closed form)", RuntimeWarning,
                      stacklevel=3)
        scale = (MAX_LOOP_PULSES / torch.maximum(n_up, n_down).clamp(min=1)).clamp(max=1.0)
        n_up, n_down = torch.floor(n_up * scale), torch.floor(n_down * scale)
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
            wk = device.pulse_once(wk, du, pk, generator)
            wk = device.pulse_once(wk, dd, pk, generator)
        else:
            wk = device.pulse_once(wk, dd, pk, generator)
            wk = device.pulse_once(wk, du, pk, generator)
        ws[:a] = wk
    flat = flat.clone()
    flat[order] = ws
    return flat.reshape(shape)


def _affine_constants(device: PulsedDevice, p: DeviceParams, au: Affine, ad: Affine) -> Dict[str, Any]:
    """Per-device constants of :func:`affine_closed_form` (cached on ``p`` as ``p._affine``,
    dropped by ``p.map``): logs ``l = log(1 - k)`` of the up, down and pair contractions,
    inverses of ``k``, the pair constant and the noise-variance coefficients.

    Finite for every device: ``k`` is capped below 1 (at ``1 - 1e-12``, or at the largest
    value below 1 where the dtype cannot hold that, float32: a ``k`` that rounds to 1, e.g.
    after a change of dtype, would make ``l = -inf``, then ``0 * l = NaN`` for a device without
    pulses and ``exp(-2 l) = inf`` in the run variance), so ``l >= log(6e-8)`` in float32 and
    ``exp(-2 l)`` stays finite."""
    c = p.__dict__.get("_affine")
    if c is not None:
        return c
    ku, bu = au
    kd, bd = ad
    ku, kd = ku.expand_as(p.w_max), kd.expand_as(p.w_max)
    bu, bd = bu.expand_as(p.w_max), bd.expand_as(p.w_max)
    kcap = _k_cap(ku.dtype)
    lu = torch.log1p(-ku.clamp(max=kcap))
    ld = torch.log1p(-kd.clamp(max=kcap))
    lp = lu + ld
    kp = -torch.expm1(lp)  # 1 - rho, rho = (1-ku)(1-kd)
    kp2 = -torch.expm1(2 * lp)  # 1 - rho^2

    def inv(k: Tensor, eps: float = 1e-9) -> Tensor:
        return torch.where(k < eps, torch.zeros_like(k), 1.0 / k.clamp(min=eps))

    kmin = float(torch.minimum(ku.min(), kd.min())) if ku.numel() else 1.0
    mult = device.mult_noise
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


@functools.lru_cache(maxsize=None)
def _k_cap(dtype: torch.dtype) -> float:
    """Largest contraction ``k`` used in the logs: ``1 - 1e-12`` when ``dtype`` holds it
    (float64, as always), else the largest number below 1 (``1 - 6e-8`` in float32, where
    ``1 - 1e-12`` rounds to 1)."""
    below_one = float(torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)))
    cap = float(torch.tensor(1.0 - 1e-12, dtype=dtype))
    return min(cap, below_one)


def affine_closed_form(device: PulsedDevice, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                       au: Affine, ad: Affine, generator: Optional[torch.Generator]) -> Tensor:
    """Closed form for pulses acting as ``w -> (1-k) w + beta`` (``au``, ``ad``: ``(k, beta)``
    of one up / one down pulse, from the device's ``affine_up`` / ``affine_down``).

    n pulses of one sign: ``w_n = (1-k)^n w + beta (1 - (1-k)^n) / k`` (``beta n`` as k -> 0).
    One order-averaged up/down pair: ``w -> rho w + c`` with ``rho = (1-k_up)(1-k_down)``,
    ``c = beta_up + beta_down - (k_down beta_up + k_up beta_down) / 2``.
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
    Finite for degenerate devices: the constants are finite (:func:`_affine_constants`); a
    noise term that is NaN (0 * inf or inf - inf once squared steps overflow the dtype) adds
    nothing, an infinite one saturates the state at a bound (or at the dtype's largest value,
    :meth:`~ffebm.analog.devices.PulsedDevice.clip`).
    """
    c = _affine_constants(device, p, au, ad)
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
    sig = device.dw_min_std
    if sig > 0:
        if device.mult_noise:
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
        noise = sig * var.clamp(min=0).sqrt() * rng.randn(w.shape, generator, w)
        # NaN only from 0 * inf or inf - inf once squared steps overflow (a phase without
        # pulses times an infinite squared step, a sig that rounds to 0 times an infinite
        # variance): no noise there rather than a NaN state
        new = new + torch.nan_to_num(noise, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return device.clip(new, p)

