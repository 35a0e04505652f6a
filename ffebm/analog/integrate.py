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
        c = _affine_constants(device, p)
        if c is not None:
            return affine_closed_form(device, w, n_up, n_down, p, generator, c)
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


def _affine_constants(device: PulsedDevice, p: DeviceParams) -> Optional[Dict[str, Any]]:
    """Per-device constants of :func:`affine_closed_form`, or None when the model has no affine
    pulse maps (``affine_up`` / ``affine_down``). Derived from the parameters alone, so computed
    once per parameter set (:meth:`~ffebm.analog.devices.DeviceParams.derived`: recomputed when
    a parameter tensor or the model's settings change), not on every call.

    With ``l = log(1 - k)`` of an up / down pulse and of a pair (``lp = lu + ld``,
    ``rho = exp(lp)``), every geometric sum ``sum_{i<n} (1-k)^i`` is written
    ``(1 - (1-k)^n) ik + n z``: ``ik = 1/k`` and ``z = 0``, or ``ik = 0`` and ``z = 1`` where
    ``k`` is below 1e-9 (the limit ``n`` as ``k -> 0``); the constants below are those sums'
    coefficients times the offsets, so a call needs no selection (``where``) per element.

    Finite for every device: ``k`` is capped below 1 (at ``1 - 1e-12``, or at the largest
    value below 1 where the dtype cannot hold that, float32: a ``k`` that rounds to 1, e.g.
    after a change of dtype, would make ``l = -inf``, then ``0 * l = NaN`` for a device without
    pulses and ``1 / (1 - k) = inf`` in the run variance), so ``l >= log(6e-8)`` in float32."""

    def compute() -> Optional[Dict[str, Any]]:
        au, ad = device.affine_up(p), device.affine_down(p)
        if au is None or ad is None:
            return None
        like = p.w_max
        ku, bu = (t.expand_as(like) for t in au)
        kd, bd = (t.expand_as(like) for t in ad)
        kcap = _k_cap(ku.dtype)
        lu = torch.log1p(-ku.clamp(max=kcap))
        ld = torch.log1p(-kd.clamp(max=kcap))
        lp = lu + ld
        kp = -torch.expm1(lp)  # 1 - rho, rho = (1-ku)(1-kd)

        def inv(k: Tensor, eps: float = 1e-9) -> Tuple[Tensor, Tensor]:  # (ik, z)
            small = k < eps
            return torch.where(small, torch.zeros_like(k), 1.0 / k.clamp(min=eps)), small.to(k.dtype)

        (iku, zu), (ikd, zd), (ikp, zp) = inv(ku), inv(kd), inv(kp)
        ikp2, zp2 = inv(-torch.expm1(2 * lp), 1e-12)  # 1 - rho^2
        ik2u, z2u = inv(-torch.expm1(2 * lu), 1e-12)  # 1 - (1-k)^2, additive run noise
        ik2d, z2d = inv(-torch.expm1(2 * ld), 1e-12)
        cp = bu + bd - 0.5 * (kd * bu + ku * bd)  # order-averaged constant of one up/down pair
        eu, ed = torch.exp(-lu), torch.exp(-ld)  # 1 / (1 - k)
        mult = device.mult_noise
        z = torch.zeros_like(bu)
        return {
            "lu": lu, "ld": ld, "lp": lp, "kp": kp, "cp": cp,
            # run offsets: b (1 - (1-k)^n) ik + b n z
            "biu": bu * iku, "bid": bd * ikd, "bzu": bu * zu, "bzd": bd * zd,
            # pairs: cp (1 - rho^m) ikp + cp m zp
            "cpi": cp * ikp, "cpz": cp * zp, "ikp2": ikp2, "zp2": zp2,
            # step of one pulse at w, over (1 - k): s0 + s1 w (multiplicative run noise)
            "s0u": bu * eu, "s1u": -ku * eu, "s0d": bd * ed, "s1d": -kd * ed,
            # squared step times the geometric sums of (1-k)^2 (additive run noise)
            "qiu": bu * bu * ik2u, "qid": bd * bd * ik2d, "qzu": bu * bu * z2u, "qzd": bd * bd * z2d,
            # s_up(w)^2 + s_down(w)^2 = q0 + 2 q1h w + 2 q2h w^2 (constant for additive noise)
            "q0": bu.square() + bd.square(),
            "q1h": -(bu * ku + bd * kd) if mult else z,
            "q2h": 0.5 * (ku.square() + kd.square()) if mult else z,
            "any_small": bool((torch.maximum(zu, zd).amax() > 0).item()) if zu.numel() else False,
            "any_small_pair": bool((zp.amax() > 0).item()) if zp.numel() else False,
        }

    return p.derived("_affine", compute, device)


@functools.lru_cache(maxsize=None)
def _k_cap(dtype: torch.dtype) -> float:
    """Largest contraction ``k`` used in the logs: ``1 - 1e-12`` when ``dtype`` holds it
    (float64, as always), else the largest number below 1 (``1 - 6e-8`` in float32, where
    ``1 - 1e-12`` rounds to 1)."""
    below_one = float(torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)))
    cap = float(torch.tensor(1.0 - 1e-12, dtype=dtype))
    return min(cap, below_one)


def affine_closed_form(device: PulsedDevice, w: Tensor, n_up: Tensor, n_down: Tensor, p: DeviceParams,
                       generator: Optional[torch.Generator], c: Optional[Dict[str, Any]] = None) -> Tensor:
    """Closed form for pulses acting as ``w -> (1-k) w + beta`` (``(k, beta)`` of one up / one
    down pulse from the device's ``affine_up`` / ``affine_down``; ``c``: their constants,
    :func:`_affine_constants`, computed here when not given).

    n pulses of one sign: ``w_n = (1-k)^n w + beta (1 - (1-k)^n) / k`` (``beta n`` as k -> 0).
    One order-averaged up/down pair: ``w -> rho w + c`` with ``rho = (1-k_up)(1-k_down)``,
    ``c = beta_up + beta_down - (k_down beta_up + k_up beta_down) / 2``.
    Mean: of ``m = min(n_up, n_down)`` order-averaged up/down pairs (``w -> rho w + c``)
    ``m1 = floor(m/2)`` are applied, then the ``|n_up - n_down|`` pulses of one sign, then the
    other ``m2 = m - m1`` (Strang splitting: the excess is spread through the sequence in
    reality); each phase is affine-geometric, so single-sign runs are exact. ``m2 - m1`` is 0
    or 1, so the second half reuses the first: ``rho^m2 = rho^m1 (1 - (m2 - m1)(1 - rho))``.
    Noise (cycle-to-cycle, one draw per device): variance of the excess run exact along its
    noiseless trajectory, ``s(w_1)^2 n (1-k)^(2(n-1))``; of the pairs
    ``qbar (1 - rho^(2m)) / (1 - rho^2)`` with ``qbar`` the mean of
    ``s_up(w)^2 + s_down(w)^2`` at the start and end states (exact for constant steps and
    at the symmetry point); cross-contraction between phases to first order. Clipping at
    the end (exact for noiseless single-sign runs; otherwise the closed form ignores a bound
    reached in the middle of the batch).

    Cost: two ``exp`` and a few dozen element-wise passes (mostly in place); up and down
    constants are picked per element by ``lerp`` with a 0/1 weight (exactly one of them), not
    by ``where``.
    Finite for degenerate devices: the constants are finite (:func:`_affine_constants`); a
    noise term that is NaN (0 * inf or inf - inf once squared steps overflow the dtype) adds
    nothing, an infinite one saturates the state at a bound (or at the dtype's largest value,
    :meth:`~ffebm.analog.devices.PulsedDevice.clip`).
    """
    if c is None:
        c = _affine_constants(device, p)
        if c is None:
            raise ValueError(f"{type(device).__name__} has no affine pulse maps (affine_up / affine_down) "
                             "for these parameters")
    exact_fp = w.dtype == torch.float64  # 1 - exp(t) by expm1 (slow on CPU) only in float64

    def exp_om(t: Tensor) -> Tuple[Tensor, Tensor]:  # (exp(t), 1 - exp(t)), t overwritten
        om = torch.expm1(t).neg_() if exact_fp else None
        a = t.exp_()
        return a, (om if om is not None else torch.sub(1.0, a))

    # Temporaries of the array's size are reused in place where they are dead: a fresh one
    # costs about as much as three element-wise passes on CPU (page faults of a new buffer).
    # excess run: n = |n_up - n_down| pulses of one sign; up = 1 where it is up, else 0
    r = n_up - n_down
    up = torch.sign(r).clamp_(min=0.0)
    n = r.abs_()
    m = torch.minimum(n_up, n_down)
    m1 = torch.mul(m, 0.5).floor_()
    odd = torch.add(m, m1, alpha=-2.0)  # m2 - m1, 0 or 1

    # first m1 pairs: w1 = rho^m1 w + cp geom_rho(m1)
    A1, om1 = exp_om(torch.mul(m1, c["lp"]))
    G = torch.mul(om1, c["cpi"])
    if c["any_small_pair"]:
        G.addcmul_(m1, c["cpz"])
    w1 = torch.addcmul(G, A1, w)
    # run: w2 = (1-k)^n w1 + b geom_k(n)
    a2, om2 = exp_om(torch.lerp(c["ld"], c["lu"], up).mul_(n))
    w2 = torch.lerp(c["bid"], c["biu"], up).mul_(om2).addcmul_(a2, w1)
    if c["any_small"]:
        w2.addcmul_(n, torch.lerp(c["bzd"], c["bzu"], up))
    # last m2 pairs: rho^m2 = rho^m1 (1 - odd kp), geom_rho(m2) = geom_rho(m1) + odd rho^m1
    A1odd = torch.mul(A1, odd)
    A3 = torch.addcmul(A1, A1odd, c["kp"], value=-1.0)
    new = G.addcmul_(A1odd, c["cp"]).addcmul_(A3, w2)
    sig = device.dw_min_std
    if sig > 0:
        tmp = A1odd  # dead from here on: a scratch buffer
        if device.mult_noise:
            # (s(w1) (1-k)^(n-1))^2 n: s(w1) / (1-k) = s0 + s1 w1
            var = torch.lerp(c["s0d"], c["s0u"], up, out=w2)
            var.addcmul_(torch.lerp(c["s1d"], c["s1u"], up, out=tmp), w1).mul_(a2)
            var.mul_(var).mul_(n)
        else:
            # b^2 (1 - (1-k)^(2n)) / (1 - (1-k)^2), 1 - a^2 = om (2 - om)
            var = torch.lerp(c["qid"], c["qiu"], up, out=w2).mul_(om2).mul_(torch.sub(2.0, om2, out=tmp))
            if c["any_small"]:
                var.addcmul_(n, torch.lerp(c["qzd"], c["qzu"], up, out=tmp))
        # pairs: 1 - rho^m = om1 (2 - om1) + odd kp A1^2, 1 - rho^(2m) = that (2 - that)
        omm = torch.sub(2.0, om1, out=tmp).mul_(om1).addcmul_(odd.mul_(c["kp"]), A1.mul_(A1))
        g2 = torch.sub(2.0, omm, out=om1).mul_(omm).mul_(c["ikp2"])
        if c["any_small_pair"]:
            g2.addcmul_(m, c["zp2"])
        if device.mult_noise:
            qbar = torch.add(w, new, out=tmp).mul_(c["q1h"]).add_(c["q0"])
            qbar.addcmul_(c["q2h"], torch.mul(w, w, out=m1).addcmul_(new, new))
            g2.mul_(qbar)
        else:
            g2.mul_(c["q0"])
        # the run's noise is contracted by the later pairs, half of the pairs' noise by the run
        half = a2.mul_(a2).mul_(0.5).add_(0.5)
        var.mul_(A3.mul_(A3)).addcmul_(g2, half)
        noise = var.clamp_(min=0).sqrt_().mul_(sig).mul_(rng.randn(w.shape, generator, w))
        # NaN only from 0 * inf or inf - inf once squared steps overflow (a phase without
        # pulses times an infinite squared step, a sig that rounds to 0 times an infinite
        # variance): no noise there rather than a NaN state
        new.add_(torch.nan_to_num_(noise, nan=0.0, posinf=math.inf, neginf=-math.inf))
    return device.clip(new, p, inplace=True)
