"""Gradient methods: objects that turn the gradient arriving at a block's output into the
gradients of the block's parameters and of its input.

    result = method.backward(call, delta)     # -> GradientResult(grad_input, grad_params, stats)

``call`` (a :class:`BlockCall`) is everything one call of the block produced and its backward
needs: the block input ``u``, the free equilibrium, the statistics and relaxation settings of
*that* call, and which gradients autograd asked for. It travels in the call's autograd context,
so a block called twice before one ``backward()`` differentiates each call at its own
equilibrium; no method reads state left on the block by another call.

``delta`` = dL/ds_top at the free equilibrium. ``grad_params`` follows ``call.params`` (the
block's ``energy_parameters()`` at call time), with ``None`` where no gradient was asked for
(frozen parameters). Methods are plain objects: a block's method can be swapped at any time
(``block.gradient = Implicit()``; a call already made keeps the method it was made with), and
blocks of one model may use different ones.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..solvers import Relaxation, SolveStats

States = List[torch.Tensor]
Grads = Tuple[Optional[torch.Tensor], Tuple[Optional[torch.Tensor], ...]]


@dataclass
class BlockCall:
    """One call of an energy block, as its backward sees it.

    block: the block (its energy and couplings; never its per-call records).
    u: the block's drive ``input_map(x)`` of this call (detached).
    states: the free equilibrium of this call.
    free_stats: the free relaxation's :class:`SolveStats` of this call.
    relaxation / nudge_relaxation: the block's settings at call time.
    params: the block's energy parameters at call time (``block.energy_parameters()``).
    wants_input: whether dL/du was asked for.
    wants: per parameter, whether its gradient was asked for (False: frozen).
    records: per parameter, whether autograd will accumulate its gradient into ``.grad`` in this
        backward (``loss.backward()``: yes; ``autograd.grad(out, x)``: no). Pulsed analog updates
        are recorded only where this is True.
    cost: the loss cost loss(readout(s_top), y) of this call when it was made inside
        ``ffebm.loss_nudge`` and its method nudges by the loss (``EP(nudge="loss")``), else None.
    """

    block: Any
    u: torch.Tensor
    states: States
    free_stats: SolveStats
    relaxation: Relaxation
    nudge_relaxation: Relaxation
    params: Tuple[torch.Tensor, ...]
    wants_input: bool = True
    wants: Tuple[bool, ...] = ()
    records: Tuple[bool, ...] = ()
    cost: Any = None

    @classmethod
    def at(cls, block, u: torch.Tensor, states: States, free_stats: Optional[SolveStats] = None,
           wants_input: bool = True, cost: Any = None) -> "BlockCall":
        """A call of ``block`` at given states (to run a method by hand, e.g. in a comparison)."""
        if free_stats is None:
            free_stats = SolveStats(steps=block.relaxation.steps, residual=0.0, converged=True)
        params = tuple(block.energy_parameters())
        return cls(block=block, u=u.detach(), states=[t.detach() for t in states], free_stats=free_stats,
                   relaxation=block.relaxation, nudge_relaxation=block.nudge_relaxation, params=params,
                   wants_input=wants_input, cost=cost)

    def __post_init__(self) -> None:
        if not self.wants:
            self.wants = tuple(bool(p.requires_grad) for p in self.params)
        if not self.records:
            self.records = tuple(self.wants)


@dataclass
class BackwardStats:
    """What one backward of a block did (returned next to the gradients).

    method: the method's description (``describe()``); nudged: the nudged relaxations (EP);
    polish: an extra free relaxation run before nudging (EP, when the free state was not
    converged tightly enough for its beta); adjoint_iterations / adjoint_residual (Implicit);
    steps (Unrolled); fallback: the method actually used when the first choice failed.
    """

    method: str
    nudged: List[SolveStats] = field(default_factory=list)
    polish: Optional[SolveStats] = None
    adjoint_iterations: Optional[int] = None
    adjoint_residual: Optional[float] = None
    steps: Optional[int] = None
    fallback: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []}


@dataclass
class GradientResult:
    """Gradients of one block call: ``grad_input`` (dL/du), ``grad_params`` (following
    ``call.params``; None where not asked for) and the method's :class:`BackwardStats`."""

    grad_input: Optional[torch.Tensor]
    grad_params: Tuple[Optional[torch.Tensor], ...]
    stats: BackwardStats

    def __iter__(self):  # ``grad_u, grad_params = result`` still reads naturally
        return iter((self.grad_input, self.grad_params))


class GradientMethod:
    """Base class; subclasses implement :meth:`backward`.

    Methods holding random state (EP's random sign) expose it through :meth:`state_dict` /
    :meth:`load_state_dict`; a block stores its method's state in its own ``state_dict()``, so
    checkpoints resume every random stream.
    """

    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)

    def snapshot(self) -> "GradientMethod":
        """The settings of this method as of now, for one call's backward (a shallow copy:
        editing the block's method later does not change a call already made; random streams
        stay shared with the method)."""
        return copy.copy(self)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A method without random state ignores what another kind
        of method saved (a checkpoint of an EP-trained block loads into an Implicit one)."""


def grad_wrt(output: torch.Tensor, call: BlockCall, u_: torch.Tensor, grad_outputs=None,
             skip: Sequence[bool] = ()) -> Grads:
    """Gradients of ``output`` w.r.t. ``u_`` (if ``call.wants_input``) and the wanted parameters
    (``call.wants``, minus those where ``skip`` is True); None for the rest."""
    skip = tuple(skip) or (False,) * len(call.params)
    want_p = [w and not s for w, s in zip(call.wants, skip)]
    inputs = ([u_] if call.wants_input else []) + [p for p, w in zip(call.params, want_p) if w]
    if not inputs:
        return None, (None,) * len(call.params)
    gs = list(torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, allow_unused=True))
    g_u = gs.pop(0) if call.wants_input else None
    out = []
    for p, w in zip(call.params, want_p):
        out.append(gs.pop(0) if w else None)
    return g_u, tuple(out)


def primitive_difference_grads(call: BlockCall, s_a: States, s_b: States, scale: float,
                               skip: Sequence[bool] = ()) -> Grads:
    """Gradients of  scale * (E(s_a) - E(s_b)) = -scale * (Phi(s_a) - Phi(s_b))  w.r.t. u and θ,
    with both states held fixed (EP's read-out). For a dense coupling this is the local rule
    -scale * (y_a x_a^T - y_b x_b^T): a difference of two outer products.
    """
    block = call.block
    sa = [t.detach() for t in s_a]
    sb = [t.detach() for t in s_b]
    return difference_read_out(call, lambda u_: block.primitive(sa, u_) - block.primitive(sb, u_), scale, skip)


def difference_read_out(call: BlockCall, phi_difference, scale: float, skip: Sequence[bool] = ()) -> Grads:
    """Gradients of  -scale * phi_difference(u)  w.r.t. u and θ, where ``phi_difference(u)`` is
    Phi(s_a; u) - Phi(s_b; u) at two fixed states, however it is formed (directly, or from the
    difference form's d_a, d_b: ``ffebm.difference.primitive_difference``)."""
    with torch.enable_grad():
        u_ = call.u.detach().requires_grad_(call.wants_input)
        delta_e = -phi_difference(u_) * scale
        if not delta_e.requires_grad:
            return None, (None,) * len(call.params)
        return grad_wrt(delta_e, call, u_, skip=skip)
