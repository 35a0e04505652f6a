"""State non-linearities of Hopfield energy blocks.

A block's state obeys s = sigma(dPhi/ds) with the hard sigmoid sigma(v) = clamp(a*v, 0, 1):
the exact minimiser over the box [0, 1] of |s|^2/(2a) - <s, v>. A linear layer (no box) uses
sigma(v) = a*v, the minimiser of the same quadratic over the reals.
"""
from __future__ import annotations

import torch


def hard_sigmoid(v: torch.Tensor, gain: float) -> torch.Tensor:
    """sigma(v) = clamp(gain * v, 0, 1)."""
    if gain == 1.0:
        return torch.clamp(v, 0.0, 1.0)
    return (v * gain).clamp_(0.0, 1.0)  # in place on the fresh product: autograd-safe


def linear(v: torch.Tensor, gain: float) -> torch.Tensor:
    """sigma(v) = gain * v (unbounded top layer feeding a digital readout)."""
    return v * gain


def free_mask(v: torch.Tensor, gain: float, bounded: bool) -> torch.Tensor:
    """Units whose state moves with its drive v: strictly inside the box (or all, if unbounded)."""
    if not bounded:
        return torch.ones_like(v, dtype=torch.bool)
    av = v * gain
    return (av > 0) & (av < 1)
