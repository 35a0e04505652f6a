"""The forward read with bound management, evaluated lazily: the same read model as
:func:`~ffebm.analog.tile.read_forward` (same distribution of every output; without noise the
same numbers as the plain published sequence, and as the tile's read up to rounding ties of the
quantisers, which the tile computes in DAC units), with one matrix product for the whole batch plus one for each sample
at each scale whose clip the first product cannot decide, instead of one per sample and scale.

The read model (:class:`~ffebm.analog.config.IOConfig`, forward direction, no input or weight
noise). A sample ``x`` is read as ``x_s = x / alpha`` (noise management), then at scales
``k = 1, 2, 4, ..., 2^m`` (``m = floor(log2(max_bm_factor))``) until a read does not clip:

    q_k = DAC(x_s / k),   v_k = W q_k + sigma xi_k   (xi_k ~ N(0, 1) per output, fresh per read),
    clipped_k = any_i |v_k,i| >= out_bound,
    y = alpha * k * ADC(v_k)   at the first k that does not clip (or at k = 2^m).

The reads at the scales that clip are thrown away: only their clip event matters. Here
``z_1 = W q_1`` is computed once for the whole batch, and at ``k > 1`` the event is first decided
from the estimate ``z_1 / k`` where that is certain: with ``e = q_k - q_1 / k``,

    |(W q_k)_i - (z_1)_i / k| = |W_i e| <= ||W_i||_2 ||e||_2          (Cauchy-Schwarz),

so if ``|z_1,r / k + sigma xi_r| - ||W_r||_2 ||e||_2 >= out_bound`` (plus a bound on the float
rounding of both products) for the row ``r`` with the largest estimate, the read at scale ``k``
clips whatever the other rows are: its other noise draws are never looked at and are not drawn.
Samples that are not decided this way get the exact read ``W q_k`` (a matrix product over those
samples only) with fresh noise on every row but ``r``, which keeps its draw ``xi_r`` (the event
"not certified" depends on it, so a fresh draw would bias the outcome). Every sample thus sees
the same events and outputs, in distribution, as in :func:`~ffebm.analog.tile.read_forward`; the
draws come from the generator in another order. Without noise the certified events are the ones
the reference computes, and the outputs are the same products.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .config import IOConfig
from .rng import randn
from .tile import dac, noise_management_scale, read_forward

__all__ = ["read_forward_managed", "has_lazy_bound_management"]


def has_lazy_bound_management(io: IOConfig) -> bool:
    """True when :func:`read_forward_managed` evaluates ``io``'s bound management lazily (forward
    reads with bound management at a finite output bound, no input or weight read noise); other
    settings are read by :func:`~ffebm.analog.tile.read_forward` itself."""
    return (not io.is_perfect and io.bound_management and math.isfinite(io.out_bound)
            and io.inp_noise == 0 and io.w_noise == 0 and io.max_bm_factor >= 2)


def read_forward_managed(W: Tensor, x: Tensor, io: Optional[IOConfig] = None,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """``y = W x`` (x: [..., in], W: [out, in]) through the read model ``io``: the same
    distribution as :func:`~ffebm.analog.tile.read_forward` (without noise the same numbers up to
    rounding ties of the quantisers), bound management evaluated lazily (see the module docstring)."""
    io = io if io is not None else IOConfig()
    if not has_lazy_bound_management(io):
        return read_forward(W, x, io, generator)
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the matrix expects {W.shape[1]}")
    if W.dtype != x.dtype or W.device != x.device:  # the read follows its input
        W = W.to(device=x.device, dtype=x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    alpha = noise_management_scale(x2, io)
    y = _managed(W, x2 / alpha, io, generator)
    return y.mul_(alpha).reshape(*lead, W.shape[0])


def _managed(W: Tensor, xs: Tensor, io: IOConfig, generator: Optional[torch.Generator]) -> Tensor:
    """Bound-managed read of the noise-managed inputs ``xs`` [N, in]; returns ``k * ADC(v_k)``
    [N, out] (before the multiplication by alpha). Written with few tensor operations, in place
    where the tensor is this read's own: at these sizes each costs a few percent of the product."""
    n, n_out = xs.shape[0], W.shape[0]
    ob, sigma = io.out_bound, io.out_noise
    if n == 0:
        return xs.new_empty(0, n_out)
    last = int(math.floor(math.log2(io.max_bm_factor)))
    unclipped = io.noise_management == "abs_max" and io.inp_bound >= 1  # |x_s| <= 1: the DAC never clips
    q1 = _dac_at(xs, 1, io) if unclipped else dac(xs, io)
    z1 = q1 @ W.t()
    # the row most likely to clip (the same at every scale: the estimates are z_1 / k)
    r = z1.abs().argmax(dim=1, keepdim=True)
    sxi = randn((n, last), generator, xs, std=sigma) if sigma > 0 else None  # sigma xi_r, scales 1 .. 2^(last-1)
    cert = _certain_clips(W, z1.gather(1, r), r, sxi, io, last, xs.shape[1])  # [N, last]
    # each sample's next exact read: its first scale that is not a certain clip
    at = cert.cumprod(dim=1).sum(dim=1)
    # one exact read per round, of the samples whose next scale is the smallest: they end there
    # unless it clips (then on to their next uncertain scale); the fast case, every sample in one
    # round in order, needs no indexing
    idx: Optional[Tensor] = None  # the samples still to read, aligned with ``at`` (None: all, in order)
    y: Optional[Tensor] = None
    while True:
        s = int(at.min())
        now = at == s
        every = bool(now.all())
        sel = idx if every else (now.nonzero().squeeze(1) if idx is None else idx[now])  # read now
        k = 2 ** s
        if s == 0:
            z = z1 if sel is None else z1.index_select(0, sel)  # z_1 is not needed after this read
        else:
            xk = xs if sel is None else xs.index_select(0, sel)
            z = (_dac_at(xk, k, io) if unclipped else dac(xk / k, io, inplace=True)) @ W.t()
        if sigma > 0:
            noise = randn(z.shape, generator, xs, std=sigma)  # sigma xi
            if s < last:  # the row r keeps the draw its certification looked at
                rs, xis = (r, sxi) if sel is None else (r.index_select(0, sel), sxi.index_select(0, sel))
                noise.scatter_(1, rs, xis[:, s:s + 1])
            z.add_(noise)
        clip = z.abs().amax(dim=1) >= ob if s < last else None
        if clip is not None and bool(clip.any()):
            # a clipped read: on to the next scale that is not a certain clip
            ids = torch.arange(n, device=xs.device) if sel is None else sel
            again = ids[clip]
            at_again = s + 1 + (cert.index_select(0, again)[:, s + 1:]).cumprod(dim=1).sum(dim=1)
            done = ~clip
            z, sel = z[done], ids[done]
            rest = ~now
            idx, at = (again, at_again) if every else (
                torch.cat([rest.nonzero().squeeze(1) if idx is None else idx[rest], again]),
                torch.cat([at[rest], at_again]))
        elif every:
            at = None
        else:
            rest = ~now
            idx, at = (rest.nonzero().squeeze(1) if idx is None else idx[rest]), at[rest]
            if sel is None:
                sel = torch.arange(n, device=xs.device)
        out = _adc_times(z, io, k)
        if sel is None:
            return out  # every sample read in one go, in order
        if y is None:
            y = xs.new_empty(n, n_out)
        y.index_copy_(0, sel, out)
        if at is None:
            return y


def _dac_at(xs: Tensor, k: int, io: IOConfig) -> Tensor:
    """``DAC(x_s / k)`` for inputs the DAC does not clip: ``round(x_s / (k delta)) delta``, the
    reference's ``round((x_s / k) / delta) delta`` in one division (``k delta`` and ``x_s / k`` are
    exact for a power of two ``k``: the same correctly rounded quotient)."""
    ib = io.inp_bound
    if io.inp_res <= 0 or not math.isfinite(ib):
        return xs / k if k != 1 else xs
    step = io.inp_res * 2.0 * ib
    return xs.div(step * k).round_().mul_(step)


def _adc_times(z: Tensor, io: IOConfig, k: int) -> Tensor:
    """``k * ADC(z)`` in place on ``z`` (this read's own tensor): ``round(clamp(z) / step) (step k)``
    equals ``(round(clamp(z) / step) step) k`` for a power of two ``k``."""
    ob = io.out_bound
    z = z.clamp_(-ob, ob)
    if io.out_res <= 0:
        return z.mul_(k) if k != 1 else z
    step = io.out_res * 2.0 * ob
    return z.div_(step).round_().mul_(step * k)


def _certain_clips(W: Tensor, z1_r: Tensor, r: Tensor, sxi: Optional[Tensor], io: IOConfig, last: int,
                   n_in: int) -> Tensor:
    """``cert`` [N, last]: True where the read of a sample at scale ``k = 2^s`` (``s < last``)
    certainly clips, decided from row ``r`` alone (``z1_r = (W q_1)_r``, ``sxi`` its output noise):
    exactly at ``s = 0``; at ``s > 0`` from ``z1_r / k`` with ``|W_r e| <= ||W_r||_2 ||e||_2``,
    ``e = q_k - q_1 / k``. With noise management and ``inp_bound >= 1`` the DAC never clips
    (``|x_s| <= 1``), so with DAC step ``delta`` and ``n`` inputs ``|q_k - x_s / k| <= delta / 2``
    per input and ``||e||_2 <= sqrt(n) delta / 2 (1 + 1 / k)``; the margin adds the float
    rounding of both products (``n eps ||W_r||_2 (||q_k||_2 + ||q_1||_2 / k)``, ``|q_k| <= 1 / k +
    delta / 2``) and of the comparison. In other settings only the scale-1 event is decided here."""
    ob = io.out_bound
    v = z1_r / torch.pow(2.0, torch.arange(last, device=z1_r.device, dtype=z1_r.dtype))  # [N, last], exact
    if sxi is not None:
        v = v.add_(sxi)
    v = v.abs_()
    cert0 = v[:, :1] >= ob  # z_1 is the reference's own product: its own event
    if io.noise_management != "abs_max" or io.inp_bound < 1 or last < 2:
        return torch.cat([cert0, torch.zeros_like(v[:, 1:], dtype=torch.bool)], dim=1)
    eps = torch.finfo(z1_r.dtype).eps
    delta = io.inp_res * 2 * io.inp_bound if io.inp_res > 0 and math.isfinite(io.inp_bound) else 0.0
    rt = math.sqrt(n_in)
    coef = [0.0]  # scale 1: replaced by cert0
    for s in range(1, last):
        k = 2.0 ** s
        e = rt * delta / 2 * (1 + 1 / k)
        rnd = n_in * eps * rt * (2 / k + delta)
        coef.append((e + rnd) * (1 + 1e-3))
    w_r = torch.linalg.vector_norm(W.index_select(0, r.squeeze(1)), dim=1, keepdim=True)  # [N, 1]
    margin = w_r * torch.tensor(coef, dtype=v.dtype, device=v.device)
    cert = v.mul_(1 - 8 * eps).sub_(margin) >= ob * (1 + 8 * eps)
    cert[:, :1] = cert0
    return cert
