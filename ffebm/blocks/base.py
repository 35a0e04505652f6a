"""EnergyBlock: a Hopfield-style block whose output is the equilibrium of an energy.

Layers s_0..s_{L-1} (index 0 is the block's first layer), driven by u = input_map(x):

    Phi(s; u) = <s_0, u> + sum_i <s_{i+1}, f_i(s_i)>
    E(s; u)   = sum_i |s_i|^2 / (2a) - Phi(s; u)
    s*        = argmin over the box [0,1]^n (top layer unbounded if ``linear_top``)

Calling the block returns the top layer of s*. The free solve runs without a graph; the
gradient w.r.t. the block's parameters and its input is produced in backward by the block's
``gradient`` method object (EP, Implicit, Unrolled), so a model mixing digital layers and
energy blocks trains with a plain ``loss.backward()``. ``input_map`` (conv / pool / batch norm
of the block input, folded into the first coupling) is differentiated by autograd: the energy
is linear in u, so dL/du from the block's method back-propagated through it is the same as
folding it into the energy.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..activations import hard_sigmoid, linear
from ..errors import FunctorchUnsupported, NonFiniteInput
from ..couplings import Coupling
from ..solvers import Relaxation, SolveStats, relax

States = List[torch.Tensor]


class EnergyBlock(nn.Module):
    """Base class of energy blocks. Subclasses build ``input_map`` and ``couplings``."""

    def __init__(
        self,
        in_shape: Sequence[int],
        input_map: nn.Module,
        couplings: Sequence[Coupling],
        layer_shapes: Sequence[Sequence[int]],
        gain: float = 0.5,
        linear_top: bool = False,
        relaxation: Optional[Relaxation] = None,
        nudge_relaxation: Optional[Relaxation] = None,
        gradient=None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not (isinstance(gain, (int, float)) and 0 < gain < math.inf):
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.input_map = input_map
        self.couplings = nn.ModuleList(couplings)
        self.layer_shapes = [tuple(int(d) for d in sh) for sh in layer_shapes]
        self.gain = float(gain)
        self.linear_top = bool(linear_top)
        self.relaxation = relaxation or Relaxation()
        self.nudge_relaxation = nudge_relaxation or Relaxation(steps=20, tol=None, mode=self.relaxation.mode)
        if gradient is None:
            from ..gradients import EP

            gradient = EP()
        self.gradient = gradient
        self.block_name = name
        # records of the last call, for inspection only: no gradient method reads them (what a
        # backward needs travels in that call's autograd context, see ffebm.function)
        self.state: Optional[States] = None
        self.stats: Optional[SolveStats] = None
        self.backward_stats = None

    # ---------------------------------------------------------------- identity and settings
    @property
    def name(self) -> str:
        return self.block_name or type(self).__name__

    @property
    def num_layers(self) -> int:
        return len(self.layer_shapes)

    def bounded(self, i: int) -> bool:
        return not (self.linear_top and i == self.num_layers - 1)

    def energy_parameters(self) -> List[nn.Parameter]:
        """Parameters inside the energy (the couplings), which the block's method differentiates."""
        return [p for p in self.couplings.parameters()]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, layers={self.layer_shapes}, gain={self.gain}, linear_top={self.linear_top}, "
                f"gradient={self.gradient!r}")

    # ---------------------------------------------------------------- the energy
    def activate(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """sigma_i(v): hard sigmoid, or linear for an unbounded top layer."""
        return hard_sigmoid(v, self.gain) if self.bounded(i) else linear(v, self.gain)

    def primitive(self, s: States, u: torch.Tensor) -> torch.Tensor:
        """Phi(s; u) = <s_0, u> + sum_i <s_{i+1}, f_i(s_i)>, summed over the batch."""
        phi = (s[0] * u).sum()
        for i, c in enumerate(self.couplings):
            phi = phi + c.phi(s[i], s[i + 1])
        return phi

    def energy(self, s: States, u: torch.Tensor) -> torch.Tensor:
        """E(s; u) = sum_i |s_i|^2/(2a) - Phi(s; u), summed over the batch."""
        quad = sum((t * t).sum() for t in s) / (2 * self.gain)
        return quad - self.primitive(s, u)

    def with_pool_winners(self, states: States) -> "EnergyBlock":
        """A view of this block whose max-pooling couplings keep the winners they have at
        ``states`` (see :meth:`ConvCoupling.with_winners`): its energy is smooth in the state (a
        quadratic over the box), the energy of the block *at that winner pattern*. The view
        shares parameters, settings and method with the block and is meant for one backward (EP
        with ``pool_winners="free"``); the block itself when nothing max-pools."""
        fixed = [c.with_winners(states[i]) if hasattr(c, "with_winners") else c for i, c in enumerate(self.couplings)]
        if all(f is c for f, c in zip(fixed, self.couplings)):
            return self
        self.__dict__.setdefault("_convergence_warned", set())  # warnings once per block, view or not
        view = copy.copy(self)
        mods = dict(self._modules)
        mods["couplings"] = nn.ModuleList(fixed)
        object.__setattr__(view, "_modules", mods)
        return view

    def initial_state(self, u: torch.Tensor) -> States:
        """Neurons start at zero."""
        return [u.new_zeros((u.shape[0], *sh)) for sh in self.layer_shapes]

    # ---------------------------------------------------------------- solving
    def check_input(self, x: torch.Tensor) -> None:
        """Shape check (subclasses may accept other layouts)."""
        if x.dim() < 2 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"block '{self.name}' expects input of shape [B, {', '.join(map(str, self.in_shape))}], "
                f"got {list(x.shape)}")

    def check_finite(self, x: torch.Tensor) -> None:
        # a relaxation would clip inf to the box and hide it, leaving non-finite gradients
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteInput(self.name)

    def solve(self, u: torch.Tensor, states: Optional[States] = None, nudge: Optional[torch.Tensor] = None,
              config: Optional[Relaxation] = None, phase: str = "free", callback=None):
        """Relax from ``states`` (zeros by default) with an optional top-layer nudge."""
        with torch.no_grad():
            return relax(self, u, states, nudge, config or self.relaxation, phase, callback)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..function import equilibrium, under_functorch
        from ..solvers import initial_states
        from ..warm_start import active_warm_start

        if under_functorch():
            raise FunctorchUnsupported(self.name)
        self.check_input(x)
        self.check_finite(x)
        if x.shape[0] == 0:  # an empty batch: an empty equilibrium, still part of the graph
            u = self.input_map(x)
            return u.new_zeros((0, *self.layer_shapes[-1])) + 0 * u.sum()
        u = self.input_map(x)
        params = self.energy_parameters()
        needs_grad = torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in params))
        # ffebm.warm_start (training mode): start from the samples' last equilibria
        warm = active_warm_start(self, u.shape[0]) if self.training else None
        init = None
        if warm is not None:
            with torch.no_grad():
                init = warm[0].initial(self, warm[1], initial_states(self, u.detach(), self.relaxation.init), warm[2])
        if needs_grad:
            top, states, stats = equilibrium(self, u, params, init)
        else:
            states, stats = self.solve(u, states=init)
            top = states[-1]
        if warm is not None:
            warm[0].store(self, warm[1], states, warm[2])
        self.state, self.stats = states, stats
        return top

    # ---------------------------------------------------------------- state of the method
    def get_extra_state(self) -> dict:
        """The gradient method's own state (EP's random-sign generator), so that a checkpoint of
        ``state_dict()`` resumes every random stream."""
        return {"gradient": self.gradient.state_dict()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            # a state dict saved before blocks carried their method's state (or by a block whose
            # method has none): the method keeps its own state
            missing_keys.remove(key)

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("gradient", {}), dict):
            raise ValueError(f"block '{self.name}': extra state must be a dict with a 'gradient' dict")
        self.gradient.load_state_dict(state.get("gradient", {}))
