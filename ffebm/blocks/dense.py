"""DenseHopfield: a chain of dense layers settling to an energy minimum."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch.nn as nn

from ..couplings import DenseCoupling, init_weight
from ..solvers import Relaxation
from .base import EnergyBlock


class DenseHopfield(EnergyBlock):
    """Dense Hopfield block.

    ``sizes`` = [input size, layer 1 size, ..., layer L size]. The input coupling W_0 x + b_0
    drives layer 1; layers i and i+1 are coupled by <s_{i+1}, W_i s_i + b_i>. The input may be
    [B, n] or any [B, ...] with n elements per sample (it is flattened).

        E(s; x) = sum_i |s_i|^2/(2a) - <s_1, W_0 x + b_0> - sum_i <s_{i+1}, W_i s_i + b_i>
    """

    def __init__(
        self,
        sizes: Sequence[int],
        gain: float = 0.5,
        linear_top: bool = False,
        bias: bool = True,
        init_gain: float = 1.0,
        steps: int = 50,
        tol: Optional[float] = 1e-4,
        mode: str = "async",
        nudge_steps: int = 20,
        gradient=None,
        relaxation: Optional[Relaxation] = None,
        nudge_relaxation: Optional[Relaxation] = None,
        name: Optional[str] = None,
    ) -> None:
        sizes = list(sizes)
        if len(sizes) < 2 or any((not isinstance(n, int)) or n < 1 for n in sizes):
            raise ValueError(f"DenseHopfield sizes must be >= 2 positive integers (input, layers...), got {sizes}")
        n_in = sizes[0]
        input_map = nn.Sequential(nn.Flatten(), nn.Linear(n_in, sizes[1], bias=bias))
        init_weight(input_map[1].weight, n_in, init_gain)
        if bias:
            nn.init.zeros_(input_map[1].bias)
        couplings = [DenseCoupling((sizes[i],), sizes[i + 1], bias=bias, init_gain=init_gain)
                     for i in range(1, len(sizes) - 1)]
        relaxation = relaxation or Relaxation(steps=steps, tol=tol, mode=mode)
        nudge_relaxation = nudge_relaxation or Relaxation(steps=nudge_steps, tol=None, mode=relaxation.mode)
        super().__init__((n_in,), input_map, couplings, [(n,) for n in sizes[1:]], gain=gain,
                         linear_top=linear_top, relaxation=relaxation, nudge_relaxation=nudge_relaxation,
                         gradient=gradient, name=name)
        self.sizes = sizes

    def check_input(self, x):
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_shape[0]:
            raise ValueError(
                f"block '{self.name}' expects input of shape [B, {self.in_shape[0]}] (or [B, ...] with "
                f"{self.in_shape[0]} elements per sample), got {list(x.shape)}")
