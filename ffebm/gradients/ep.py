"""Equilibrium Propagation.

Nudge the block with the incoming gradient delta, settle again from the free equilibrium s*:

    s^beta = argmin_s E(s; u, θ) + beta <delta, s_top>

and read the gradient off two equilibria at nudges beta_a != beta_b:

    dL/dθ ~= (dE/dθ(s^{beta_a}) - dE/dθ(s^{beta_b})) / (beta_a - beta_b)     (same for u)

Variants: positive (beta_a = beta, beta_b = 0; bias O(beta)), negative (0, -beta), centered
(beta, -beta; bias O(beta^2), the standard choice) and random (one-sided with a random sign
per call).

Scaling: with ``scale="batch"`` (default) the nudge is beta * B * delta, i.e. beta applies to
each sample's own loss gradient when the loss is a batch mean (so published beta values keep
their meaning at any batch size); the estimate is divided by the same factor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ..solvers import Relaxation
from .base import GradientMethod, Grads, primitive_difference_grads

VARIANTS = ("positive", "negative", "centered", "random")
SCALES = ("batch", "none")


@dataclass
class EP(GradientMethod):
    """Equilibrium Propagation with nudging strength ``beta``.

    steps: nudged steps T2 (None: the block's ``nudge_relaxation``); tol: optional early stop
    of the nudged phases; seed: generator seed for the random-sign variant.
    """

    beta: float = 0.5
    variant: str = "centered"
    steps: Optional[int] = None
    tol: Optional[float] = None
    scale: str = "batch"
    seed: Optional[int] = None
    _gen: Optional[torch.Generator] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"EP.beta must be > 0, got {self.beta!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"EP.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"EP.steps must be an integer >= 1 or None, got {self.steps!r}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"EP.tol must be > 0 or None, got {self.tol!r}")
        if self.scale not in SCALES:
            raise ValueError(f"EP.scale must be one of {SCALES}, got {self.scale!r}")

    def describe(self) -> str:
        return f"EP(beta={self.beta}, variant={self.variant})"

    # ------------------------------------------------------------------------------------------
    def nudges(self) -> tuple[float, float]:
        """(beta_a, beta_b) of the two equilibria compared."""
        b = float(self.beta)
        if self.variant == "positive":
            return b, 0.0
        if self.variant == "negative":
            return 0.0, -b
        if self.variant == "centered":
            return b, -b
        if self._gen is None:
            self._gen = torch.Generator()
            self._gen.manual_seed(self.seed if self.seed is not None else torch.initial_seed() % (2**63))
        sign = 1.0 if torch.randint(0, 2, (1,), generator=self._gen).item() == 1 else -1.0
        return (sign * b, 0.0) if sign > 0 else (0.0, sign * b)

    def nudge_config(self, block) -> Relaxation:
        base = block.nudge_relaxation
        if self.steps is None and self.tol is None:
            return base
        return dataclasses.replace(base, steps=self.steps or base.steps, tol=self.tol)

    def _phase(self, block, u, states, delta, beta, cfg, callback=None):
        if beta == 0.0:
            return states, None
        phase = "nudged+" if beta > 0 else "nudged-"
        return block.solve(u, states=states, nudge=beta * delta, config=cfg, phase=phase, callback=callback)

    def backward(self, block, u: torch.Tensor, states: List[torch.Tensor], delta: torch.Tensor) -> Grads:
        c = float(delta.shape[0]) if self.scale == "batch" else 1.0
        d = delta * c
        cfg = self.nudge_config(block)
        ba, bb = self.nudges()
        sa, st_a = self._phase(block, u, states, d, ba, cfg)
        sb, st_b = self._phase(block, u, states, d, bb, cfg)
        block.backward_stats = {"method": self.describe(), "nudged": [s for s in (st_a, st_b) if s is not None]}
        return primitive_difference_grads(block, u, sa, sb, 1.0 / ((ba - bb) * c))

    def trace(self, block, u: torch.Tensor, states: List[torch.Tensor], delta: torch.Tensor) -> List[Grads]:
        """EP's running estimate after each nudged step k = 1..T2 (for convergence plots).

        Both phases are relaxed in lockstep from s*; entry k-1 is the estimate read off the
        states after k steps.
        """
        c = float(delta.shape[0]) if self.scale == "batch" else 1.0
        d = delta * c
        cfg = self.nudge_config(block)
        cfg = dataclasses.replace(cfg, tol=None)
        ba, bb = self.nudges()
        hist_a: list = []
        hist_b: list = []
        if ba != 0.0:
            self._phase(block, u, states, d, ba, cfg, callback=lambda k, s: hist_a.append([t.clone() for t in s]))
        if bb != 0.0:
            self._phase(block, u, states, d, bb, cfg, callback=lambda k, s: hist_b.append([t.clone() for t in s]))
        n = max(len(hist_a), len(hist_b))
        out = []
        for k in range(n):
            sa = hist_a[k] if hist_a else states
            sb = hist_b[k] if hist_b else states
            out.append(primitive_difference_grads(block, u, sa, sb, 1.0 / ((ba - bb) * c)))
        return out
