"""Analog convolutions: ``AnalogConv1d`` / ``AnalogConv2d`` (one tile, im2col reads) and
``AnalogGroupedConv`` (grouped and depthwise convolutions: one tile per group).

A convolution with kernel ``k``, ``C_in`` input and ``C_out`` output channels holds its kernel on a
tile of shape ``C_out x (C_in * prod(k))``: the input is padded (any ``padding_mode`` of
``nn.Conv1d``/``nn.Conv2d``, ``padding="same"``/``"valid"`` or numbers), cut into im2col patches
(``unfold``) and every patch is one forward read of the tile; the backward read is the transposed
read, folded back; the update pulses one ``(patch, output gradient)`` pair per output position.
A 1-d convolution is the 2-d one on a ``1 x L`` image.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import InvalidSetting, check_range
from .layers import AnalogConfig, _AnalogLayer

__all__ = ["AnalogConv1d", "AnalogConv2d", "AnalogGroupedConv"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(v: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (int(v),) * n
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return v


class _AnalogConvNd(_AnalogLayer):
    """Shared machinery of the analog convolutions (``n`` = 1 or 2 spatial dimensions)."""

    n_dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 config: Optional[AnalogConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        o, n = type(self).__name__, self.n_dims
        check_range(o, "in_channels", in_channels, 1, None, integer=True)
        check_range(o, "out_channels", out_channels, 1, None, integer=True)
        if groups != 1:
            raise InvalidSetting(o, "groups", groups, "1 (grouped convolutions: AnalogGroupedConv, one tile per "
                                                      "group; convert_to_analog picks it)")
        if padding_mode not in PADDING_MODES:
            raise InvalidSetting(o, "padding_mode", padding_mode, "one of " + ", ".join(PADDING_MODES))
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.padding_mode = padding_mode
        try:
            self.kernel_size = _tuple(kernel_size, n)
            self.stride, self.dilation = _tuple(stride, n), _tuple(dilation, n)
            if not isinstance(padding, str):
                padding = _tuple(padding, n)
        except (TypeError, ValueError):
            raise InvalidSetting(o, "kernel_size/stride/padding/dilation", (kernel_size, stride, padding, dilation),
                                 f"ints or tuples of {n} ints") from None
        for name in ("kernel_size", "stride", "dilation"):
            for v in getattr(self, name):
                check_range(o, name, v, 1, None, integer=True)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise InvalidSetting(o, "padding", padding, "'same', 'valid', an int or a tuple of ints")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise InvalidSetting(o, "padding", padding, "'same' with stride 1 only (as torch)")
        else:
            for v in padding:
                check_range(o, "padding", v, 0, None, integer=True)
        self.padding = padding
        self._pads = self._pad_amounts()
        fan_in = self.in_channels * math.prod(self.kernel_size)
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self._init_analog(self.out_channels, fan_in, shape, config, seed, device, dtype)
        self._init_like_torch(fan_in, bias)

    def _pad_amounts(self) -> Tuple[int, ...]:
        """``F.pad`` amounts (last dimension first, (left, right) each), torch's convention: for
        ``"same"`` the odd extra element goes to the right/bottom."""
        if self.padding == "valid":
            per_dim = [(0, 0)] * self.n_dims
        elif self.padding == "same":
            per_dim = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                per_dim.append((total // 2, total - total // 2))
        else:
            per_dim = [(p, p) for p in self.padding]
        out: List[int] = []
        for lo, hi in reversed(per_dim):
            out += [lo, hi]
        return tuple(out)

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Optional[AnalogConfig] = None,
                  seed: Optional[int] = None) -> "_AnalogConvNd":
        """Program a digital convolution's kernel onto a tile (the bias is copied)."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, 1, conv.bias is not None, conv.padding_mode, config, seed,
                device=conv.weight.device, dtype=conv.weight.dtype)
        return m._copy_from(conv.weight, conv.bias)

    def _as_2d(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2) if self.n_dims == 1 else x

    def forward(self, x: Tensor) -> Tensor:
        n = self.n_dims
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            dims = ", ".join("HW"[:n] if n == 2 else "L")
            raise ValueError(f"{type(self).__name__}({self.in_channels}, {self.out_channels}): expected input "
                             f"[N, {self.in_channels}, {dims}] or [{self.in_channels}, {dims}], got {list(x.shape)}")
        if x.dim() == n + 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if any(self._pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pads, mode=mode)
        x2 = self._as_2d(x)
        k2 = (1, *self.kernel_size) if n == 1 else self.kernel_size
        s2 = (1, *self.stride) if n == 1 else self.stride
        d2 = (1, *self.dilation) if n == 1 else self.dilation
        out_hw = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(x2.shape[2:], k2, s2, d2)]
        if min(out_hw) < 1:
            raise ValueError(f"{type(self).__name__}: input {list(x.shape)} (padded) is smaller than the kernel "
                             f"{list(self.kernel_size)} with dilation {list(self.dilation)}")
        cols = F.unfold(x2, k2, dilation=d2, stride=s2)  # [N, C*prod(k), L]
        y = self._mvm(cols.transpose(1, 2))  # [N, L, out]
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *(out_hw[1:] if n == 1 else out_hw))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * n))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}"
                + (f", padding_mode={self.padding_mode}" if self.padding_mode != "zeros" else ""))


class AnalogConv2d(_AnalogConvNd):
    """``nn.Conv2d`` (groups 1) with its kernel on a tile ``out_channels x (in_channels kh kw)``.

    Same arguments as ``nn.Conv2d`` (``padding`` may be ``"same"`` / ``"valid"``, every
    ``padding_mode``), plus ``config`` (:class:`AnalogConfig`), ``seed``; grouped convolutions
    are :class:`AnalogGroupedConv`."""

    n_dims = 2


class AnalogConv1d(_AnalogConvNd):
    """``nn.Conv1d`` (groups 1) with its kernel on a tile ``out_channels x (in_channels k)``:
    the 2-d machinery on a ``1 x L`` image."""

    n_dims = 1


class AnalogGroupedConv(nn.Module):
    """A grouped (or depthwise) ``nn.Conv1d`` / ``nn.Conv2d`` on analog tiles, one tile per group:
    group ``g`` maps input channels ``g C_in/G ... (g+1) C_in/G - 1`` to its ``C_out/G`` output
    channels (an :class:`AnalogConv1d`/:class:`AnalogConv2d` each, in ``self.groups_``); the outputs
    are concatenated as ``nn.Conv2d(groups=G)`` does. ``weight`` / ``bias`` of the digital layer
    are ``get_weights()``."""

    def __init__(self, convs: Sequence[_AnalogConvNd]) -> None:
        super().__init__()
        if not convs:
            raise InvalidSetting("AnalogGroupedConv", "convs", convs, "one analog convolution per group")
        self.groups_ = nn.ModuleList(convs)
        self.groups = len(convs)
        c0 = convs[0]
        self.in_channels = c0.in_channels * self.groups
        self.out_channels = c0.out_channels * self.groups
        self.kernel_size, self.stride, self.padding = c0.kernel_size, c0.stride, c0.padding
        self.dilation, self.padding_mode = c0.dilation, c0.padding_mode

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Optional[AnalogConfig] = None,
                  seed: Optional[int] = None) -> "AnalogGroupedConv":
        """Split a grouped ``nn.Conv1d`` / ``nn.Conv2d`` into one analog convolution per group
        (tile seeds ``seed, seed + 1, ...``), each programmed with its group's kernel and bias."""
        make = AnalogConv1d if isinstance(conv, nn.Conv1d) else AnalogConv2d
        g = int(conv.groups)
        ci, co = conv.in_channels // g, conv.out_channels // g
        convs = []
        for i in range(g):
            c = make(ci, co, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, conv.bias is not None,
                     conv.padding_mode, config, None if seed is None else seed + i,
                     device=conv.weight.device, dtype=conv.weight.dtype)
            c._copy_from(conv.weight[i * co:(i + 1) * co], None if conv.bias is None else conv.bias[i * co:(i + 1) * co])
            convs.append(c)
        return cls(convs)

    def forward(self, x: Tensor) -> Tensor:
        n = self.groups_[0].n_dims
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise ValueError(f"AnalogGroupedConv({self.in_channels}, {self.out_channels}, groups={self.groups}): "
                             f"expected {self.in_channels} input channels, got input {list(x.shape)}")
        parts = x.chunk(self.groups, dim=-n - 1)
        return torch.cat([c(p) for c, p in zip(self.groups_, parts)], dim=-n - 1)

    def get_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)`` in the shapes of the digital grouped convolution."""
        ws, bs = zip(*(c.get_weights() for c in self.groups_))
        return torch.cat(ws), (None if bs[0] is None else torch.cat(bs))

    def set_weights(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Program the grouped kernel ``[C_out, C_in / G, *k]`` (and copy ``bias``) group by group."""
        weight = torch.as_tensor(weight)
        co = self.out_channels // self.groups
        if weight.shape[0] != self.out_channels:
            raise ValueError(f"AnalogGroupedConv.set_weights: weight of shape {list(weight.shape)}, expected "
                             f"[{self.out_channels}, {self.in_channels // self.groups}, ...]")
        for i, c in enumerate(self.groups_):
            c.set_weights(weight[i * co:(i + 1) * co], None if bias is None else bias[i * co:(i + 1) * co])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, groups={self.groups} (one tile per group)"
