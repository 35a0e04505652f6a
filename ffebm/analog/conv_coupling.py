"""Convolutional couplings on analog tiles.

An :class:`AnalogConvCoupling` is a :class:`~ffebm.couplings.ConvCoupling` whose kernel ``W``
(``C_out x C_in x k x k``) is held on a tile of shape ``C_out x (C_in k k)``, as a crossbar
computes a convolution: each im2col patch ``p`` of the lower layer is one input vector, so

    bottom-up:  c[:, :, i] = W p_i                         (one forward read per output position)
                f(x) = P(c) + b                            (pooling P and bias are digital)
    top-down:   J_f(x)^T y = fold_i( W^T (P^T y)[:, :, i] )  (one transposed read per position)

with ``P^T`` the pooling's adjoint at x (max: scatter to the winners; avg; soft), exactly as the
digital coupling. ``phi(x, y) = <y, P(conv(x, W_eff)) + b>`` uses the tile's effective weight
(what the reads see), and its weight gradient ``sum_i (P^T y)_i p_i^T`` is, inside
:class:`~ffebm.analog.energy.AnalogEP`, recorded as the pulsed outer-product pairs
``(p_i, (P^T y)_i)`` (one per output position and sample, :meth:`AnalogConvCoupling.weight_pairs`)
instead of being formed densely.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..couplings import ConvCoupling
from .config import InvalidSetting
from .layers import AnalogConfig, _AnalogLayer, _post_load_hook
from .tile import count_reads

__all__ = ["AnalogConvCoupling"]


class AnalogConvCoupling(_AnalogLayer, ConvCoupling):
    """``f(x) = P(conv(x, W)) + b`` with ``W`` on an analog tile (``C_out x C_in k k``).

    Same geometry arguments as :class:`~ffebm.couplings.ConvCoupling`, plus ``config``
    (:class:`AnalogConfig`), ``seed`` (device spread, read noise), ``device`` and ``dtype``.
    ``n_forward_reads`` / ``n_backward_reads`` count calls of the bottom-up / top-down drive
    (each is one tile read per output position and sample).
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: Sequence[int], kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, pool: str = "max", pool_size: int = 2,
                 soft_temperature: float = 0.1, bias: bool = True, init_gain: float = 1.0,
                 config: Optional[AnalogConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("stride", stride), ("pool_size", pool_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidSetting("AnalogConvCoupling", name, v, "integer in [1, inf)")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise InvalidSetting("AnalogConvCoupling", "padding", padding, "integer in [0, inf)")
        try:  # the digital coupling's geometry checks and initialisation
            ConvCoupling.__init__(self, in_channels, out_channels, in_size, kernel_size, stride, padding,
                                  pool, pool_size, soft_temperature, bias, init_gain)
        except ValueError as e:
            raise InvalidSetting("AnalogConvCoupling", "pool" if "pool must" in str(e) else "in_size",
                                 pool if "pool must" in str(e) else in_size, str(e)) from None
        w0 = self._parameters.pop("weight").detach()
        fan_in = in_channels * kernel_size * kernel_size
        self._init_analog(out_channels, fan_in, tuple(w0.shape), config, seed, device, dtype)
        if self.bias is not None:
            self.bias.data = self.bias.data.to(device=self.weight.device, dtype=self.weight.dtype)
        self.set_weights(w0.to(device=self.weight.device, dtype=self.weight.dtype))
        self.n_forward_reads = 0
        self.n_backward_reads = 0
        self.register_load_state_dict_post_hook(_post_load_hook)

    @classmethod
    def from_conv(cls, c: ConvCoupling, config: Optional[AnalogConfig] = None,
                  seed: Optional[int] = None) -> "AnalogConvCoupling":
        """Program a :class:`ConvCoupling`'s kernel onto a tile (geometry and bias are copied)."""
        if not isinstance(c, ConvCoupling) or isinstance(c, AnalogConvCoupling):
            raise InvalidSetting("AnalogConvCoupling.from_conv", "c", type(c).__name__, "a digital ConvCoupling")
        m = cls(c.in_channels, c.out_channels, c.in_size, c.kernel_size, c.stride, c.padding, c.pool,
                c.pool_size if c.pool != "none" else 2, c.soft_temperature, c.bias is not None,
                config=config, seed=seed, device=c.weight.device, dtype=c.weight.dtype)
        return m._copy_from(c.weight, c.bias)

    # -- im2col ------------------------------------------------------------------------------
    def _patches(self, x: Tensor) -> Tensor:
        """``[B * L, C_in k k]``: one row per output position (b-major, then row-major position)."""
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # [B, Ckk, L]
        return rearrange(cols, "b ckk l -> (b l) ckk")

    # -- coupling interface ------------------------------------------------------------------
    def bottom_up(self, x: Tensor):
        count_reads(self, "n_forward_reads", 1)
        b = x.shape[0]
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # [B, Ckk, L]
        c = self._read_forward(cols, columns=True)  # one read per column: [B, C_out, L]
        y, ctx = self._pool(c.view(b, self.out_channels, *self.conv_size))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y, ctx

    def top_down(self, y: Tensor, ctx: Any) -> Tensor:
        count_reads(self, "n_backward_reads", 1)
        g = self._pool_adjoint(y, ctx)  # [B, C_out, Hc, Wc]
        b = g.shape[0]
        z = self._read_backward(g.reshape(b, self.out_channels, -1), columns=True)  # one transposed read per position
        return F.fold(z, self.in_size, self.kernel_size, padding=self.padding, stride=self.stride)

    def phi(self, x: Tensor, y: Tensor) -> Tensor:
        self._link()
        self._refresh()
        c = F.conv2d(x, self.read_weight(x), None, self.stride, self.padding)
        p, _ = self._pool(c)
        if self.bias is not None:
            p = p + self.bias.view(1, -1, 1, 1)
        return (y * p).sum()

    @torch.no_grad()
    def weight_pairs(self, x: Tensor, y: Tensor):
        """``(X, D)`` with ``d phi / d W = D^T X`` at the states (x, y): one row per output position
        and sample, ``X`` the im2col patches of x and ``D`` the pooling's adjoint ``P^T y`` at
        ``conv(x, W_eff)`` (what the reads see)."""
        W = self.effective_weight().to(dtype=x.dtype, device=x.device)
        c = F.conv2d(x, W, None, self.stride, self.padding)
        _, ctx = self._pool(c)
        g = self._pool_adjoint(y, ctx)
        return self._patches(x), rearrange(g, "b c h w -> (b h w) c")

    def out_shape(self, in_shape):
        k = self.pool_size
        return (self.out_channels, self.conv_size[0] // k, self.conv_size[1] // k)

    def extra_repr(self) -> str:
        return ConvCoupling.extra_repr(self) + f", tile={self.tile.extra_repr()}"
