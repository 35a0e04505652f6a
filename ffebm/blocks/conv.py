"""ConvHopfield: convolutional layers (with pooling) and optional dense layers on top.

Layer 1 is driven by the block input through ``input_map`` = conv -> pool -> batch norm
(each optional), the published VGG-style ff-EBM's first coupling; then

    Phi = <s_1, u> + sum_i <s_{i+1}, P_i(conv_i(s_i)) + b_i> + sum_j <s_{j+1}, W_j s_j + b_j>

with P_i max, average or soft pooling (kernel = stride). Max pooling makes the energy
non-smooth (a winner switching between the nudged phases biases EP); average and soft pooling
keep it smooth.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch.nn as nn

from ..couplings import POOLS, ConvCoupling, DenseCoupling, SoftPool2d, init_weight
from ..solvers import Relaxation
from .base import EnergyBlock

IntOrList = Union[int, Sequence[int]]


def _per_layer(v, n: int, what: str) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{what} must have {n} entries (one per conv layer), got {len(v)}")
        return list(v)
    return [v] * n


def make_pool(kind: str, size: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(size)
    if kind == "avg":
        return nn.AvgPool2d(size)
    if kind == "soft":
        return SoftPool2d(size)
    return nn.Identity()


class ConvHopfield(EnergyBlock):
    """Convolutional Hopfield block.

    in_channels, in_size: the block input's channels and (H, W).
    channels: conv layer channels [c_1, ..., c_K]; layer 1 is the input map's output.
    kernel_size, stride, padding: int or one per conv layer (entry 0 is the input map's conv).
    pool: "max" | "avg" | "soft" | "none", or one per conv layer (entry 0: the input map's).
    dense: sizes of dense layers on top of the conv layers (the last may be ``linear_top``).
    input_conv / input_bn: fold a conv / a batch norm (affine frozen by default, as published)
    into the first coupling; with input_conv=False the input itself drives layer 1 (then
    in_channels must equal channels[0]).
    """

    def __init__(
        self,
        in_channels: int,
        in_size: Sequence[int],
        channels: Sequence[int],
        kernel_size: IntOrList = 3,
        stride: IntOrList = 1,
        padding: IntOrList = 1,
        pool: Union[str, Sequence[str]] = "max",
        pool_size: int = 2,
        dense: Sequence[int] = (),
        input_conv: bool = True,
        input_bn: bool = True,
        bn_affine: bool = False,
        gain: float = 0.5,
        linear_top: bool = False,
        init_gain: float = 1.0,
        soft_temperature: float = 0.1,
        steps: int = 50,
        tol: Optional[float] = 1e-4,
        mode: str = "async",
        nudge_steps: int = 20,
        gradient=None,
        relaxation: Optional[Relaxation] = None,
        nudge_relaxation: Optional[Relaxation] = None,
        name: Optional[str] = None,
    ) -> None:
        channels = list(channels)
        if not channels or any((not isinstance(c, int)) or c < 1 for c in channels):
            raise ValueError(f"ConvHopfield channels must be a non-empty list of positive ints, got {channels}")
        n = len(channels)
        ks = _per_layer(kernel_size, n, "kernel_size")
        st = _per_layer(stride, n, "stride")
        pd = _per_layer(padding, n, "padding")
        pools = _per_layer(pool, n, "pool")
        for p in pools:
            if p not in POOLS:
                raise ValueError(f"pool must be one of {POOLS}, got {p!r}")
        h, w = (int(in_size), int(in_size)) if isinstance(in_size, int) else tuple(int(v) for v in in_size)

        # input map: conv -> pool -> batch norm of the block input
        mods: List[nn.Module] = []
        if input_conv:
            conv = nn.Conv2d(in_channels, channels[0], ks[0], st[0], pd[0], bias=not input_bn)
            init_weight(conv.weight, in_channels * ks[0] * ks[0], init_gain)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            mods.append(conv)
            h, w = (h + 2 * pd[0] - ks[0]) // st[0] + 1, (w + 2 * pd[0] - ks[0]) // st[0] + 1
        elif in_channels != channels[0]:
            raise ValueError(f"input_conv=False needs in_channels == channels[0], got {in_channels} and {channels[0]}")
        if pools[0] != "none":
            mods.append(make_pool(pools[0], pool_size))
            h, w = h // pool_size, w // pool_size
        if input_bn:
            mods.append(nn.BatchNorm2d(channels[0], affine=bn_affine))
        input_map = nn.Sequential(*mods) if mods else nn.Identity()

        couplings = []
        shapes = [(channels[0], h, w)]
        for i in range(1, n):
            c = ConvCoupling(channels[i - 1], channels[i], (h, w), ks[i], st[i], pd[i], pools[i], pool_size,
                             soft_temperature=soft_temperature, init_gain=init_gain)
            couplings.append(c)
            shape = c.out_shape(shapes[-1])
            shapes.append(shape)
            h, w = shape[1], shape[2]
        for m in dense:
            couplings.append(DenseCoupling(shapes[-1], int(m), init_gain=init_gain))
            shapes.append((int(m),))
        relaxation = relaxation or Relaxation(steps=steps, tol=tol, mode=mode)
        nudge_relaxation = nudge_relaxation or Relaxation(steps=nudge_steps, tol=None, mode=relaxation.mode)
        in_hw = (int(in_size), int(in_size)) if isinstance(in_size, int) else tuple(in_size)
        super().__init__((in_channels, *in_hw), input_map, couplings, shapes, gain=gain, linear_top=linear_top,
                         relaxation=relaxation, nudge_relaxation=nudge_relaxation, gradient=gradient, name=name)
