"""Backpropagation through the relaxation steps.

``from_equilibrium=True`` (recurrent backprop / truncated BPTT): rerun ``steps`` relaxation
steps from the detached free equilibrium s* with the graph kept, and backprop the incoming
gradient through them; as steps grow this tends to the implicit gradient when the step map is
contractive. ``from_equilibrium=False`` (full BPTT): rerun the whole free relaxation from zero
for the same number of steps the forward solve took, which is the exact gradient of the
computed output. Memory grows linearly with the steps (EP's does not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UnsupportedGradient
from ..solvers import MODES, analytic_step
from .base import BackwardStats, BlockCall, GradientMethod, GradientResult, grad_wrt


@dataclass
class Unrolled(GradientMethod):
    steps: Optional[int] = None
    from_equilibrium: bool = True
    mode: Optional[str] = None

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"Unrolled.steps must be an integer >= 1 or None, got {self.steps!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"Unrolled.mode must be one of {MODES} or None, got {self.mode!r}")

    def describe(self) -> str:
        return f"Unrolled(steps={self.steps}, from_equilibrium={self.from_equilibrium})"

    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:
        block = call.block
        tiles = [i for i, c in enumerate(block.couplings) if hasattr(c, "analog_ctx")]
        if tiles:  # the steps read tiles: not differentiable w.r.t. the weights (nor through ADCs)
            raise UnsupportedGradient(
                f"Unrolled cannot differentiate block '{block.name}': couplings {tiles} are read through analog "
                "tiles, whose reads are not differentiable w.r.t. the tile weights; use AnalogEP / EP or Implicit")
        mode = self.mode or call.relaxation.mode
        if self.steps is not None:
            steps = self.steps
        elif self.from_equilibrium:
            steps = call.nudge_relaxation.steps
        else:  # the step count of *this* call's free solve
            steps = call.free_stats.steps
        with torch.enable_grad():
            u_ = call.u.detach().requires_grad_(call.wants_input)
            s = [t.detach() for t in call.states] if self.from_equilibrium else block.initial_state(u_)
            cache: dict = {}
            # full BPTT differentiates what the free solve computed, including its averaging of
            # the last k states (Relaxation.average_last)
            k = call.relaxation.average_last if not self.from_equilibrium else 0
            window: list = []
            for _ in range(steps):
                s = analytic_step(block, u_, s, None, mode, cache)
                if k:
                    window = (window + [s[-1]])[-k:]
            top = torch.stack(window).mean(0) if len(window) > 1 else s[-1]
            stats = BackwardStats(method=self.describe(), steps=steps)
            if not top.requires_grad:
                return GradientResult(None, (None,) * len(call.params), stats)
            g_u, g_p = grad_wrt(top, call, u_, grad_outputs=delta)
        return GradientResult(g_u, g_p, stats)
