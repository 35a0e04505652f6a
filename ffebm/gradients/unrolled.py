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
from typing import List, Optional

import torch

from ..solvers import MODES, analytic_step
from .base import GradientMethod, Grads


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

    def backward(self, block, u: torch.Tensor, states: List[torch.Tensor], delta: torch.Tensor) -> Grads:
        params = block.energy_parameters()
        mode = self.mode or block.relaxation.mode
        if self.steps is not None:
            steps = self.steps
        elif self.from_equilibrium:
            steps = block.nudge_relaxation.steps
        else:
            steps = block.stats.steps if block.stats is not None else block.relaxation.steps
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            s = [t.detach() for t in states] if self.from_equilibrium else block.initial_state(u_)
            cache: dict = {}
            for _ in range(steps):
                s = analytic_step(block, u_, s, None, mode, cache)
            grads = torch.autograd.grad(s[-1], [u_, *params], grad_outputs=delta, allow_unused=True)
        block.backward_stats = {"method": self.describe(), "steps": steps}
        return grads[0], tuple(grads[1:])
