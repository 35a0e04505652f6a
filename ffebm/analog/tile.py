"""Analog tiles: reads with the published non-idealities and pulsed updates.

:func:`read_forward` / :func:`read_backward` model one pass through a crossbar (``W x`` or
``W^T d``) with noise management, DAC/ADC quantisation and bounds, output noise, weight read
noise and (forward) bound management; see :class:`~ffebm.analog.config.IOConfig`.

:class:`AnalogTile` holds an ``out x in`` weight matrix as device states split over physical
arrays of at most ``max_size x max_size`` (partial outputs summed digitally), with a digital
per-output-column scale between tile units and network units:
``W_network[i, :] = out_scale[i] * W_tile[i, :]``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from .config import InvalidSetting, IOConfig, UpdateConfig, check_range
from .device_array import DeviceArray
from .devices import ConstantStep, DeviceParams, PulsedDevice, device_from_name
from .kernels import epilogue as _epilogue, prologue as _prologue, supports as _fused_supports
from .rng import fork_generator, make_generator, randn
from .state import _settings, check_module_state

__all__ = ["read_forward", "read_backward", "AnalogTile", "is_analog_tile", "find_analog_tiles"]


# ----------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------


def _quantise(v: Tensor, res: float, bound: float, inplace: bool = False) -> Tensor:
    if res <= 0 or not math.isfinite(bound):
        return v
    step = res * 2.0 * bound
    if inplace:
        return v.div_(step).round_().mul_(step)
    return torch.round(v / step) * step


def dac(x: Tensor, io: IOConfig, inplace: bool = False) -> Tensor:
    """The DAC of a read: ``x`` (noise-managed inputs) clipped to ``+-inp_bound`` and quantised
    with step ``inp_res * 2 * inp_bound`` (input noise not included). ``inplace``: ``x`` is the
    caller's own tensor and may be overwritten."""
    ib = io.inp_bound
    if math.isfinite(ib):
        x, inplace = (x.clamp_(-ib, ib) if inplace else x.clamp(-ib, ib)), True
    return _quantise(x, io.inp_res, ib, inplace)


def adc(y: Tensor, io: IOConfig, inplace: bool = False) -> Tensor:
    """The ADC of a read: ``y`` clipped to ``+-out_bound`` and quantised with step
    ``out_res * 2 * out_bound``. ``inplace``: ``y`` may be overwritten."""
    ob = io.out_bound
    if math.isfinite(ob):
        y, inplace = (y.clamp_(-ob, ob) if inplace else y.clamp(-ob, ob)), True
    return _quantise(y, io.out_res, ob, inplace)


def _dac_step(io: IOConfig) -> float:
    """The DAC's step (1 without input quantisation): the unit the reads compute in."""
    ib = io.inp_bound
    return io.inp_res * 2.0 * ib if io.inp_res > 0 and math.isfinite(ib) else 1.0


def _usable_scale(alpha: Tensor, io: IOConfig) -> Tensor:
    """Noise management's ``alpha``: 1 for an all-zero vector, NaN kept, and otherwise at least
    ``4 tiny / min(step, 1)`` (``tiny``: the dtype's smallest normal number), so that the read's
    factor ``(1 / alpha) / step`` stays finite for subnormal inputs (which are then read as
    ``x / alpha`` within the DAC's range instead of overflowing)."""
    lo = 4.0 * torch.finfo(alpha.dtype).tiny / min(_dac_step(io), 1.0)
    return torch.where(alpha > 0, alpha.clamp_min(lo), torch.where(alpha.isnan(), alpha, torch.ones_like(alpha)))


def noise_management_scale(x2: Tensor, io: IOConfig) -> Tensor:
    """``alpha`` [N, 1] of the inputs ``x2`` [N, in]: ``max_j |x_j|`` per sample (1 for an all-zero
    sample, at least the smallest normal number otherwise) with ``noise_management="abs_max"``,
    else 1. The read sees ``x / alpha``."""
    if io.noise_management == "abs_max":
        alpha = x2.abs().amax(dim=1, keepdim=True)
        return _usable_scale(alpha, io)
    return torch.ones(x2.shape[0], 1, dtype=x2.dtype, device=x2.device)


def _mvm(W: Tensor, x: Tensor) -> Tensor:
    """``W`` times each input vector of ``x``: rows of [N, in] (-> [N, out]) or columns of
    [B, in, L] (-> [B, out, L])."""
    return x @ W.t() if x.dim() == 2 else torch.matmul(W, x)


def _single_read(W: Tensor, x: Tensor, inv: Tensor, io: IOConfig, generator: Optional[torch.Generator],
                 want_clipped: bool):
    """One pass for the input vectors of ``x``, rows of [N, in] or columns of [B, in, L],
    scaled by ``inv`` ([N, 1] / [B, 1, L]: ``1 / alpha`` of noise management, divided by bound
    management's factor). Returns ``(y, unit, clipped)``: the ADC's output before multiplying
    back is ``y * unit`` ([N, out] / [B, out, L]); ``clipped`` ([N] / [B, L]) marks the vectors
    that reached the ADC bound (None when none did or ``want_clipped`` is False).

    The DAC input ``x inv`` is clipped to ``+-inp_bound`` and quantised with step
    ``inp_res * 2 * inp_bound``; the MVM, noise, clipping to ``+-out_bound`` and the ADC's
    quantisation (step ``out_res * 2 * out_bound``) follow. Computed in units of the DAC step
    (integers ``round(x inv / step)``: the step is factored out of the MVM, the noise and bounds
    are scaled by ``1 / step`` instead) and returned in units of the ADC step (``unit``, folded
    by the caller into its multiplication by ``alpha``), in place on one temporary of the
    input's and one of the output's size: the same numbers up to rounding, about half the
    element-wise passes of the plain sequence."""
    ib = io.inp_bound
    quant_in = io.inp_res > 0 and math.isfinite(ib)
    step = io.inp_res * 2.0 * ib if quant_in else 1.0
    xq = x * (inv / step) if step != 1.0 else x * inv
    # |x inv| <= 1 already when inv holds 1 / max|x| (noise management) and the bound is >= 1
    if math.isfinite(ib) and not (io.noise_management == "abs_max" and ib >= 1.0):
        xq.clamp_(-ib / step, ib / step)
    if quant_in:
        xq.round_()
    if io.inp_noise > 0:
        xq.add_(randn(xq.shape, generator, xq), alpha=io.inp_noise / step)
    y = _mvm(W, xq)
    if io.w_noise > 0:
        if io.w_noise_type == "additive":
            s = xq.norm(dim=1, keepdim=True)
        else:  # pcm
            s = torch.sqrt(_mvm(W.abs(), xq * xq))
        y.addcmul_(s, randn(y.shape, generator, y), value=io.w_noise)
    if io.out_noise > 0:
        y.add_(randn(y.shape, generator, y), alpha=io.out_noise / step)
    ob = io.out_bound
    clipped = None
    if math.isfinite(ob):
        if want_clipped:
            # one check of the whole block first: usually nothing reaches the bound, and then
            # neither the per-vector flags nor the clamp are needed
            mag = y.abs()
            if float(mag.max()) >= ob / step if mag.numel() else False:
                clipped = mag.amax(dim=1) >= ob / step
                y.clamp_(-ob / step, ob / step)
        else:
            y.clamp_(-ob / step, ob / step)
    if io.out_res > 0 and math.isfinite(ob):
        so = io.out_res * 2.0 * ob
        return y.mul_(step / so).round_(), so, clipped
    return y, step, clipped


def _fused_read(W: Tensor, x2: Tensor, io: IOConfig, generator: Optional[torch.Generator],
                allow_bm: bool, columns: bool) -> Tensor:
    """The read of :func:`_read` through the fused CPU kernels (:mod:`ffebm.analog.kernels`): the
    same model (noise management, DAC, output noise, ADC bound and quantisation, bound
    management), two passes around the product instead of a dozen, and the kernels' own normal
    draws (seeded from ``generator``). For reads without input or weight noise. ``x2``: rows
    [N, in] or columns [B, in, L]; returns [N, out] / [B, out, L]."""
    ib, ob = io.inp_bound, io.out_bound
    step = _dac_step(io)
    x3 = (x2 if columns else x2.unsqueeze(2)).contiguous()
    q, alpha = _prologue(x3, step, ib, io.noise_management == "abs_max", io.inp_res > 0 and math.isfinite(ib))
    y = torch.matmul(W, q) if columns else (q.squeeze(2) @ W.t()).unsqueeze(2)
    bounded = math.isfinite(ob)
    quant_out = io.out_res > 0 and bounded
    so = io.out_res * 2.0 * ob if quant_out else step
    bm = allow_bm and io.bound_management and bounded
    clipped = _epilogue(y, alpha, io.out_noise / step, generator, ob / step if bounded else math.inf,
                        step / so if quant_out else 0.0, so, bm)
    if clipped is not None:
        # bound management: the vectors that reached the ADC bound are read again with the input
        # halved, up to max_bm_factor (the torch path's loop, on these few vectors only)
        xv = x3.transpose(1, 2) if columns else x3.squeeze(2)  # [B, L, in] / [N, in]
        yv = y.transpose(1, 2) if columns else y.squeeze(2)
        av = alpha.unsqueeze(-1) if columns else alpha  # [B, L, 1] / [N, 1]
        scale = torch.ones_like(av)
        flags = clipped if columns else clipped.squeeze(1)
        for _ in range(int(math.floor(math.log2(io.max_bm_factor)))):
            idx = flags.nonzero(as_tuple=True)
            scale[idx] = scale[idx] * 2.0
            ys, unit, cl = _single_read(W, xv[idx], 1.0 / (av[idx] * scale[idx]), io, generator, True)
            yv[idx] = ys * (scale[idx] * av[idx] * unit)
            if cl is None:
                break
            flags = torch.zeros_like(flags)
            flags[idx] = cl
    return y if columns else y.squeeze(2)


def _read(W: Tensor, x: Tensor, io: IOConfig, generator: Optional[torch.Generator],
          allow_bm: bool, columns: bool = False) -> Tensor:
    """Reads of ``W`` for the input vectors of ``x``: ``[..., in]`` (-> ``[..., out]``) or, with
    ``columns``, the columns of ``[B, in, L]`` (-> ``[B, out, L]``; the im2col layout of a
    convolution, read without transposing it)."""
    fdim = 1 if columns else -1
    if columns and x.dim() != 3:
        raise ValueError(f"a read of columns expects [batch, {W.shape[1]}, positions], got {list(x.shape)}")
    if x.shape[fdim] != W.shape[1]:
        raise ValueError(f"input has {x.shape[fdim]} features, the matrix expects {W.shape[1]}")
    if W.dtype != x.dtype or W.device != x.device:  # the read follows its input
        W = W.to(device=x.device, dtype=x.dtype)
    if io.is_perfect:
        return _mvm(W, x) if columns else x @ W.t()
    lead = x.shape[:-1]
    x2 = x if columns else x.reshape(-1, x.shape[-1])
    if io.inp_noise == 0 and io.w_noise == 0 and x2.numel() and W.numel() and _fused_supports(x2, generator):
        y = _fused_read(W, x2, io, generator, allow_bm, columns)
        return y if columns else y.reshape(*lead, W.shape[0])
    if io.noise_management == "abs_max":
        alpha = x2.abs().amax(dim=1, keepdim=True) if x2.numel() > 0 else x2.sum(dim=1, keepdim=True)
        alpha = _usable_scale(alpha, io)
    else:
        alpha = torch.ones_like(x2.sum(dim=1, keepdim=True))
    inv = 1.0 / alpha
    bm = allow_bm and io.bound_management and math.isfinite(io.out_bound)
    y, unit, clipped = _single_read(W, x2, inv, io, generator, bm)
    if bm:
        # re-read the clipped vectors with the input halved (as rows: a view [B, L, .] of columns)
        def vectors(t: Tensor) -> Tensor:
            return t.transpose(1, 2) if columns else t

        max_iter = int(math.floor(math.log2(io.max_bm_factor)))
        scale = torch.ones_like(alpha)
        xv, invv, yv, sv = vectors(x2), vectors(inv), vectors(y), vectors(scale)
        for _ in range(max_iter):
            if clipped is None:
                break
            idx = clipped.nonzero(as_tuple=True)
            sv[idx] = sv[idx] * 2.0
            ys, _, cl = _single_read(W, xv[idx], invv[idx] / sv[idx], io, generator, True)
            yv[idx] = ys * sv[idx]
            if cl is not None:
                clipped = torch.zeros_like(clipped)
                clipped[idx] = cl
            else:
                clipped = None
    y.mul_(alpha.mul_(unit))
    return y if columns else y.reshape(*lead, W.shape[0])


def read_forward(W: Tensor, x: Tensor, io: Optional[IOConfig] = None,
                 generator: Optional[torch.Generator] = None, columns: bool = False) -> Tensor:
    """``y = W x`` (x: [..., in], W: [out, in]) through the read model ``io``. ``columns``: x is
    [B, in, L], one input vector per column (-> [B, out, L])."""
    return _read(W, x, io if io is not None else IOConfig(), generator, allow_bm=True, columns=columns)


def read_backward(W: Tensor, d: Tensor, io: Optional[IOConfig] = None,
                  generator: Optional[torch.Generator] = None, columns: bool = False) -> Tensor:
    """``z = W^T d`` (d: [..., out]) through the read model ``io`` (no bound management, as
    published for the backward pass). ``columns``: d is [B, out, L] (-> [B, in, L])."""
    return _read(W.t(), d, io if io is not None else IOConfig(), generator, allow_bm=False, columns=columns)


def count_reads(module: nn.Module, name: str, k: int) -> None:
    """Add ``k`` to the plain int counter ``name`` of ``module`` (a read counter), bypassing
    ``nn.Module.__setattr__``: its checks for parameters, buffers and submodules cost a few
    microseconds, paid on every read of every relaxation step."""
    module.__dict__[name] = module.__dict__.get(name, 0) + k


# ----------------------------------------------------------------------------------------------
# tile
# ----------------------------------------------------------------------------------------------


def _splits(n: int, max_size: int) -> List[int]:
    k = max(1, math.ceil(n / max_size))
    base, rem = divmod(n, k)
    return [base + (1 if i < rem else 0) for i in range(k)]


class AnalogTile(nn.Module):
    """A weight matrix held on analog devices.

    Args:
        out_size, in_size: logical shape (network units ``W`` is ``out x in``).
        device_cfg: a :class:`PulsedDevice` or its name (default ``ConstantStep()``).
        io / bwd_io: read models of the forward and backward passes (bwd_io defaults to io).
        update: :class:`UpdateConfig` of the pulsed update.
        max_size: largest physical array (rows and columns); larger matrices are split.
        seed / generator: randomness of the device spread, pulses and read noise.
        weight_scaling_omega: if set, :meth:`set_weights` chooses the output scale so that the
            largest |w| of each output row (``weight_scaling_columnwise``) or of the whole matrix
            maps to ``omega`` tile units; otherwise the current scale is kept.

    The tile moves with ``.to(device)`` and follows its inputs' device.
    """

    is_analog_tile = True

    def __init__(self, out_size: int, in_size: int, device_cfg: Any = None,
                 io: Optional[IOConfig] = None, bwd_io: Optional[IOConfig] = None,
                 update: Optional[UpdateConfig] = None, max_size: int = 512,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 device: Any = None, dtype: torch.dtype = torch.float32,
                 weight_scaling_omega: Optional[float] = None,
                 weight_scaling_columnwise: bool = True) -> None:
        super().__init__()
        check_range("AnalogTile", "out_size", out_size, 1, None, integer=True)
        check_range("AnalogTile", "in_size", in_size, 1, None, integer=True)
        check_range("AnalogTile", "max_size", max_size, 1, None, integer=True)
        if weight_scaling_omega is not None:
            check_range("AnalogTile", "weight_scaling_omega", weight_scaling_omega, 0, None,
                        lo_open=True)
        if device_cfg is None:
            device_cfg = ConstantStep()
        elif isinstance(device_cfg, str):
            device_cfg = device_from_name(device_cfg)
        if not isinstance(device_cfg, PulsedDevice):
            raise InvalidSetting("AnalogTile", "device_cfg", device_cfg, "a PulsedDevice or a device name")
        self.out_size, self.in_size = int(out_size), int(in_size)
        self.device_cfg = device_cfg
        self.io = io if io is not None else IOConfig()
        self.bwd_io = bwd_io if bwd_io is not None else self.io
        self.update_cfg = update if update is not None else UpdateConfig()
        self.max_size = int(max_size)
        self.weight_scaling_omega = weight_scaling_omega
        self.weight_scaling_columnwise = bool(weight_scaling_columnwise)
        if generator is None:
            generator = make_generator(seed, device)
        self.generator = generator
        dev = torch.device(device) if device is not None else generator.device
        self.row_sizes = _splits(self.out_size, self.max_size)
        self.col_sizes = _splits(self.in_size, self.max_size)
        self.arrays: List[List[DeviceArray]] = [
            [DeviceArray(device_cfg, (r, c), generator=generator, device=dev, dtype=dtype)
             for c in self.col_sizes] for r in self.row_sizes]
        self.register_buffer("out_scale", torch.ones(self.out_size, device=dev, dtype=dtype))
        self.register_load_state_dict_pre_hook(_check_before_load)
        # vectors read in each direction (crossbar operations; statistics, not state)
        self.n_forward_reads = 0
        self.n_backward_reads = 0

    # -- layout helpers --------------------------------------------------------------------
    def _row_slices(self):
        s = 0
        for r in self.row_sizes:
            yield slice(s, s + r)
            s += r

    def _col_slices(self):
        s = 0
        for c in self.col_sizes:
            yield slice(s, s + c)
            s += c

    @property
    def device(self) -> torch.device:
        return self.out_scale.device

    @property
    def n_arrays(self) -> int:
        return len(self.row_sizes) * len(self.col_sizes)

    def _follow(self, t: Tensor) -> None:
        if t.device != self.out_scale.device:
            self.to(t.device)

    def _apply(self, fn, recurse: bool = True):  # moves device arrays with the module
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(1, device=self.arrays[0][0].w.device, dtype=self.arrays[0][0].w.dtype))
        for row in self.arrays:
            for a in row:
                a.to(probe.device, probe.dtype if probe.is_floating_point() else None)
        if self.generator.device != probe.device:
            self.generator = fork_generator(self.generator, probe.device)
        return self

    # -- weights ---------------------------------------------------------------------------
    def tile_weights(self, read: bool = False) -> Tensor:
        """Device states (tile units), assembled [out, in]; ``read=True``: what reads see."""
        return torch.cat([torch.cat([(a.w_read if read else a.w) for a in row], dim=1)
                          for row in self.arrays], dim=0)

    def set_tile_weights(self, w: Tensor) -> None:
        w = torch.as_tensor(w, device=self.device)
        for row, rs in zip(self.arrays, self._row_slices()):
            for a, cs in zip(row, self._col_slices()):
                a.set_weights(w[rs, cs])

    def get_weights(self) -> Tensor:
        """Weights in network units: ``out_scale[:, None] * W_tile``."""
        return self.out_scale.unsqueeze(1) * self.tile_weights()

    def set_weights(self, w: Tensor) -> None:
        """Program network-unit weights (clipped to each device's bounds in tile units)."""
        w = torch.as_tensor(w, dtype=self.out_scale.dtype, device=self.device)
        if w.shape != (self.out_size, self.in_size):
            raise ValueError(f"weights of shape {tuple(w.shape)}, tile is {(self.out_size, self.in_size)}")
        if self.weight_scaling_omega is not None:
            if self.weight_scaling_columnwise:
                m = w.abs().amax(dim=1)
            else:
                m = w.abs().amax().expand(self.out_size)
            s = m / self.weight_scaling_omega
            self.out_scale.copy_(torch.where(s > 0, s, torch.ones_like(s)))
        self.set_tile_weights(w / self.out_scale.unsqueeze(1))

    @torch.no_grad()
    def weight_stats(self) -> Dict[str, float]:
        """Health of the devices: ``abs_mean`` (mean |w| in tile units), ``range_used`` (mean of
        |w| / the device's bound on that side) and ``at_bound`` (fraction of devices within 2 %
        of their range from a bound, i.e. saturated: further pulses towards it do nothing). Devices
        without bounds (``IdealDevice``) count as 0 in both."""
        used, at, absw, n = 0.0, 0.0, 0.0, 0
        for row in self.arrays:
            for a in row:
                w, lo, hi = a.w, a.params.w_min.expand_as(a.w), a.params.w_max.expand_as(a.w)
                finite = torch.isfinite(lo) & torch.isfinite(hi)  # unbounded (ideal) devices never saturate
                bound = torch.where(w >= 0, hi, -lo).clamp(min=1e-12)
                used += torch.where(finite, w.abs() / bound, torch.zeros_like(w)).sum().item()
                span = torch.where(finite, hi - lo, torch.zeros_like(w))
                sat = (w - lo <= 0.02 * span) | (hi - w <= 0.02 * span)
                at += (sat & finite).sum().item()
                absw += w.abs().sum().item()
                n += w.numel()
        return {"abs_mean": absw / n, "range_used": used / n, "at_bound": at / n}

    def symmetry_point(self) -> Optional[Tensor]:
        """Per-device symmetry points (tile units) or None for models without one."""
        rows = []
        for row in self.arrays:
            parts = [a.symmetry_point() for a in row]
            if any(p is None for p in parts):
                return None
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    # -- passes ----------------------------------------------------------------------------
    def forward(self, x: Tensor, columns: bool = False) -> Tensor:  # type: ignore[override]
        """``y = W x`` for x [..., in] (network units); ``columns``: x is [B, in, L], one input
        vector per column (the im2col layout), y is [B, out, L]."""
        self._follow(x)
        count_reads(self, "n_forward_reads", x.numel() // max(self.in_size, 1))
        fdim = 1 if columns else -1
        if len(self.arrays) == 1 and len(self.arrays[0]) == 1:  # one physical array: no slices
            y = read_forward(self.arrays[0][0].w_read, x, self.io, self.generator, columns)
            return y.mul_(self._scale_for(y, columns))
        outs = []
        for row in self.arrays:
            acc = None
            for a, cs in zip(row, self._col_slices()):
                part = read_forward(a.w_read, x.narrow(fdim, cs.start, cs.stop - cs.start), self.io,
                                    self.generator, columns)
                acc = part if acc is None else acc + part
            outs.append(acc)
        y = torch.cat(outs, dim=fdim) if len(outs) > 1 else outs[0]
        return y.mul_(self._scale_for(y, columns))  # a fresh tensor of the reads

    def backward(self, d: Tensor, columns: bool = False) -> Tensor:
        """``z = W^T d`` for d [..., out] (network units); ``columns``: d is [B, out, L], z is
        [B, in, L]."""
        self._follow(d)
        count_reads(self, "n_backward_reads", d.numel() // max(self.out_size, 1))
        fdim = 1 if columns else -1
        ds = d * self._scale_for(d, columns)
        if len(self.arrays) == 1 and len(self.arrays[0]) == 1:  # one physical array: no slices
            return read_backward(self.arrays[0][0].w_read, ds, self.bwd_io, self.generator, columns)
        outs = []
        for j, cs in enumerate(self._col_slices()):
            acc = None
            for row, rs in zip(self.arrays, self._row_slices()):
                part = read_backward(row[j].w_read, ds.narrow(fdim, rs.start, rs.stop - rs.start), self.bwd_io,
                                     self.generator, columns)
                acc = part if acc is None else acc + part
            outs.append(acc)
        return torch.cat(outs, dim=fdim) if len(outs) > 1 else outs[0]

    def _scale_for(self, t: Tensor, columns: bool) -> Tensor:
        """``out_scale`` shaped to multiply outputs of ``t``'s layout."""
        s = self.out_scale.to(t.dtype)
        return s.unsqueeze(1) if columns else s

    @torch.no_grad()
    def update(self, x: Tensor, d: Tensor, lr: float, cfg: Optional[UpdateConfig] = None,
               exact: Optional[bool] = None) -> Dict[str, Tensor]:
        """``W <- W - lr * sum_b d_b x_b^T`` (network units) by pulses on every array."""
        self._follow(x)
        cfg = cfg if cfg is not None else self.update_cfg
        x = x.reshape(-1, self.in_size)
        d = d.reshape(-1, self.out_size)
        dt = d / self.out_scale.to(d.dtype)
        n_up = n_down = None
        for row, rs in zip(self.arrays, self._row_slices()):
            for a, cs in zip(row, self._col_slices()):
                st = a.pulsed_update(x[:, cs], dt[:, rs], lr, cfg, exact=exact)
                n_up = st["n_up"] if n_up is None else n_up + st["n_up"]
                n_down = st["n_down"] if n_down is None else n_down + st["n_down"]
        return {"n_up": n_up, "n_down": n_down}

    @torch.no_grad()
    def pulse(self, n: Tensor, exact: bool = False) -> None:
        """Signed pulse counts [out, in] (positive = up) applied to the devices."""
        n = torch.as_tensor(n, device=self.device)
        for row, rs in zip(self.arrays, self._row_slices()):
            for a, cs in zip(row, self._col_slices()):
                a.pulse(n[rs, cs], exact=exact)

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """Device states and sampled parameters of every array, the device model's name and the
        split (``max_size``); ``load_state_dict`` checks them before loading (see
        :mod:`ffebm.analog.state`) and remaps a different split of the same matrix."""
        return {"w": [[a.w.clone() for a in row] for row in self.arrays],
                "params": [[a.param_state() for a in row] for row in self.arrays],
                "device": type(self.device_cfg).__name__, "max_size": self.max_size,
                "settings": _settings(self.device_cfg),
                # what the reads see (write noise drawn at the last update): exact resume
                "w_read": [[a._w_read.clone() if a._w_read is not None else None for a in row] for row in self.arrays]}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        from .state import check_tile_state

        state = check_tile_state(self, state, f"AnalogTile {self.out_size}x{self.in_size}")
        for row, wrow, prow in zip(self.arrays, state["w"], state["params"]):
            for a, w, p in zip(row, wrow, prow):
                a.set_params(DeviceParams(**{k: (v.to(a.w.device) if isinstance(v, Tensor) else v)
                                             for k, v in p.items() if k != "__draw__"}), p.get("__draw__"))
                a.set_weights(w.to(a.w.device))
        w_read = state.get("w_read")
        if isinstance(w_read, list) and len(w_read) == len(self.arrays):
            for row, rrow in zip(self.arrays, w_read):
                for a, r in zip(row, rrow if isinstance(rrow, list) else []):
                    if isinstance(r, Tensor) and r.shape == a.w.shape and a._w_read is not None:
                        a._w_read = r.to(device=a.w.device, dtype=a.w.dtype).clone()

    def extra_repr(self) -> str:
        return (f"out={self.out_size}, in={self.in_size}, device={type(self.device_cfg).__name__}, "
                f"arrays={len(self.row_sizes)}x{len(self.col_sizes)}")


def _check_before_load(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any,
                       strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                       error_msgs: List[str]) -> None:
    """``load_state_dict`` pre-hook of tiles and analog layers: check (and, for another split of
    the same matrix, remap) the saved analog state before anything of the module is loaded."""
    check_module_state(module, state_dict, prefix, strict)
    if isinstance(getattr(module, "tile", None), AnalogTile):
        # a digital layer's state (a weight, no tile state): the loaded weight is programmed
        # onto the tile after the load (see _AnalogLayer._post_load), not overwritten by it
        module._program_loaded_weight = (prefix + "weight" in state_dict
                                         and prefix + "tile._extra_state" not in state_dict)


def is_analog_tile(obj: Any) -> bool:
    """True for objects exposing the analog tile API (``is_analog_tile`` marker plus
    ``get_weights`` / ``set_weights``)."""
    return (getattr(type(obj), "is_analog_tile", False) is True or getattr(obj, "is_analog_tile", False) is True) \
        and callable(getattr(obj, "get_weights", None)) and callable(getattr(obj, "set_weights", None))


def find_analog_tiles(model: Any) -> List[Any]:
    """All distinct analog tiles reachable from ``model``: the model itself, its sub-modules, and
    tile objects held as plain attributes (or in lists/tuples/dicts) of those modules."""
    found: List[Any] = []
    seen = set()

    def add(o: Any) -> None:
        if is_analog_tile(o) and id(o) not in seen:
            seen.add(id(o))
            found.append(o)

    mods = list(model.modules()) if isinstance(model, nn.Module) else [model]
    for m in mods:
        add(m)
        for v in vars(m).values():
            if isinstance(v, (list, tuple)):
                for e in v:
                    add(e)
            elif isinstance(v, dict):
                for e in v.values():
                    add(e)
            else:
                add(v)
    return found
