"""EP's nudged phases in difference form: relax d = s - s* instead of s.

In float32 the nudged states of a block deep in a network differ from its free equilibrium s*
by less than s* resolves (the incoming gradient is small, the weights are small), so the
ordinary read-out ``s_a - s_b`` is mostly rounding. Here each nudged phase relaxes the
difference d = s - s* itself, which keeps full relative precision however small it is.

Why it is exact algebra. A layer's drive is affine in the state through the couplings (dense,
convolution, average pooling; a max pool with the free state's winners fixed is a fixed
selection, so also linear):

    pre_i(s* + d) = pre_i(s*) + L_i(d) - [top] nudge,
    L_i(d) = [i > 0] A_{i-1} d_{i-1} + [i < top] A_i^T d_{i+1}

with A_i the linear part of coupling i (``Coupling.linear_bottom_up``; its adjoint is
``top_down``, which carries no bias). The hard sigmoid sigma(v) = clamp(a v, 0, 1) then gives,
with p = a pre_i(s*), c = clamp(p, 0, 1) (= sigma(pre*)) and r = p - c (the overshoot, zero for a
unit inside the box) held fixed:

    d_i <- sigma(pre* + dpre) - sigma(pre*) = clamp(r + a dpre, -c, 1 - c)

(inside the box r = 0 and this is a dpre clamped to the box, no large-minus-large subtraction;
only a unit that crosses an edge of the box subtracts, and that is the box's own kink). A
linear layer gives d_i <- a dpre exactly. The schedules are those of the ordinary relaxation
(``async``: even layers then odd ones; ``sync``: all at once).

s* is taken as the fixed point: the free phase's leftover drift sigma(pre*) - s* (of the order of
its residual) is left out, which is what the implicit gradient assumes too. So a one-sided
variant needs no polish of the free state in this form, and in float64 the two forms agree to
the free state's residual.

The read-out (:func:`primitive_difference`) is the same quantity as the ordinary
Phi(s* + d_a) - Phi(s* + d_b), expanded so that only the small differences D = d_a - d_b are
subtracted: for a coupling <y, A x + b>

    <y_a, A x_a + b> - <y_b, A x_b + b> = <D_y, A x_a + b> + <y_b, A D_x>,

with x_a = x* + d_a and y_b = y* + d_b (sums, not differences, of a large and a small term).
"""
from __future__ import annotations

import copy

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

import torch

from .errors import DifferenceFormUnsupported, RelaxationDiverged
from .solvers import Nudge, Relaxation, SolveStats

if TYPE_CHECKING:  # pragma: no cover
    from .blocks.base import EnergyBlock

States = List[torch.Tensor]


def difference_problem(block: "EnergyBlock", latch_winners: bool = False) -> Optional[str]:
    """Why ``block`` cannot be relaxed in difference form (None: it can). ``latch_winners``: judge
    its max pools as the backward of ``EP(pool_winners="free")`` will see them, winners fixed."""
    from .blocks.base import EnergyBlock

    for name in ("activate", "primitive"):
        if getattr(type(block), name) is not getattr(EnergyBlock, name):
            return f"{type(block).__name__} overrides {name} (only the hard sigmoid / linear layers are written out)"
    for i, c in enumerate(block.couplings):
        if latch_winners and getattr(c, "pool", None) == "max" and getattr(c, "winners", 0) is None:
            c = copy.copy(c)  # a view with winners latched (any value: only their presence counts)
            object.__setattr__(c, "winners", torch.empty(0))
        problem = c.affine_problem()
        if problem:
            return f"coupling {i} ({type(c).__name__}): {problem}"
    return None


def check_difference_form(block: "EnergyBlock", config: Optional[Relaxation] = None,
                          latch_winners: bool = False) -> None:
    """Raise :class:`DifferenceFormUnsupported` naming what does not fit."""
    problem = difference_problem(block, latch_winners)
    if problem is None and config is not None and config.average_last:
        problem = "Relaxation.average_last (averaging noisy reads) has no meaning for an exact difference"
    if problem:
        raise DifferenceFormUnsupported(block.name, problem)


def check_before_use(block: "EnergyBlock") -> None:
    """Before any call: the check of :func:`check_difference_form` for a block whose method is EP
    in difference form, so that a run fails at its start, not in its first backward."""
    method = getattr(block, "gradient", None)
    if getattr(method, "form", "ordinary") == "difference":
        check_difference_form(block, block.nudge_relaxation,
                              latch_winners=getattr(method, "pool_winners", "live") == "free")


@dataclass
class Linearisation:
    """What the difference-form steps hold fixed, computed once at s*.

    free: s*; ctx: each coupling's adjoint context at s* (the fixed winners); low / high: the
    bounds -c and 1 - c of a bounded layer's d (None for a linear layer); over: r = a pre* - c.
    """

    free: States
    ctx: list
    low: List[Optional[torch.Tensor]]
    high: List[Optional[torch.Tensor]]
    over: List[Optional[torch.Tensor]]


def linearise(block: "EnergyBlock", u: torch.Tensor, free: States) -> Linearisation:
    """The fixed part of the difference form at the free state (see the module doc): each
    coupling runs bottom-up once at s*, giving both its drive f_i(s*_i) and its adjoint context.

        pre_i(s*) = [i == 0] u + [i > 0] f_{i-1}(s*_{i-1}) + [i < top] J_{f_i}^T s*_{i+1}
    """
    L = len(free)
    ups = [c.bottom_up(free[i]) for i, c in enumerate(block.couplings)]
    ctx = [c_ctx if c.needs_ctx else None for c, (_, c_ctx) in zip(block.couplings, ups)]
    low, high, over = [], [], []
    for i in range(L):
        if not block.bounded(i):
            low.append(None), high.append(None), over.append(None)
            continue
        v = u if i == 0 else ups[i - 1][0]
        if i < L - 1:
            v = v + block.couplings[i].top_down(free[i + 1], ctx[i])
        p = v * block.gain
        c = p.clamp(0.0, 1.0)
        low.append(-c)
        high.append(1.0 - c)
        over.append(p - c)
    return Linearisation(free=list(free), ctx=ctx, low=low, high=high, over=over)


def _update(block: "EnergyBlock", lin: Linearisation, d: States, i: int, nudge: Optional[Nudge]) -> torch.Tensor:
    """d_i <- sigma(pre* + dpre) - sigma(pre*), dpre = L_i(d) - [top] nudge (see the module doc)."""
    L = len(d)
    cps = block.couplings
    # in place on fresh tensors only (the bottom-up drive, the products): this runs without a graph
    v = cps[i - 1].linear_bottom_up(d[i - 1]) if i > 0 else None
    if i < L - 1:
        td = cps[i].top_down(d[i + 1], lin.ctx[i])
        v = td if v is None else v.add_(td)
    if i == L - 1 and nudge is not None:
        force = nudge(lin.free[i] + d[i]) if callable(nudge) else nudge
        v = -force if v is None else v.sub_(force)
    if v is None:  # a one-layer block without a nudge: nothing moves
        return torch.zeros_like(d[i])
    q = v.mul_(block.gain)
    if lin.over[i] is None:
        return q
    q.add_(lin.over[i])
    return torch.minimum(torch.maximum(q, lin.low[i], out=q), lin.high[i], out=q)


def difference_step(block: "EnergyBlock", lin: Linearisation, d: States, nudge: Optional[Nudge],
                    mode: str) -> States:
    """One step of the difference-form relaxation, schedule ``mode`` ("async" or "sync")."""
    L = len(d)
    if mode == "sync":
        return [_update(block, lin, d, i, nudge) for i in range(L)]
    new = list(d)
    for start in (0, 1):
        for i in range(start, L, 2):
            new[i] = _update(block, lin, new, i, nudge)
    return new


def relax_difference(block: "EnergyBlock", u: torch.Tensor, free: States, nudge: Optional[Nudge],
                     config: Relaxation, phase: str = "nudged",
                     callback: Optional[Callable[[int, States], None]] = None) -> tuple[States, SolveStats]:
    """Relax the nudged block from s* in difference form; returns (d, stats) with d = s - s*.

    The residual is the ordinary one, |d_k - d_{k-1}| / |s* + d_k|, so ``config.tol`` keeps its
    meaning. ``config.precision`` is not used: d is held in the state's own dtype (its point is
    full precision). ``callback(k, d)`` is called after each step.
    """
    check_difference_form(block, config)
    with torch.no_grad():
        lin = linearise(block, u, free)
        d = [torch.zeros_like(t) for t in free]
        trace: List[float] = []
        converged = config.tol is None
        residual = float("nan")
        k = 0
        for k in range(1, config.steps + 1):
            new = difference_step(block, lin, d, nudge, config.mode)
            check = k % config.check_every == 0 or k == config.steps
            if check:
                residual = float(_residual(new, d, free))
                trace.append(residual)
                if not math.isfinite(residual):
                    raise RelaxationDiverged(block.name, k, phase, "difference form")
            d = new
            if callback is not None:
                callback(k, d)
            if check and config.tol is not None and residual <= config.tol:
                converged = True
                break
    return d, SolveStats(steps=k, residual=residual, converged=converged, phase=phase, trace=trace)


def _residual(new: States, old: States, free: States) -> torch.Tensor:
    """|d_new - d_old| / |s* + d_new| (the ordinary relative change of the state)."""
    num = sum(((a - b).float() ** 2).sum() for a, b in zip(new, old))
    den = sum(((f + a).float() ** 2).sum() for f, a in zip(free, new))
    return torch.sqrt(num) / torch.sqrt(den).clamp_min(1e-12)


def primitive_difference(block: "EnergyBlock", free: States, d_a: States, d_b: States,
                         u: torch.Tensor) -> torch.Tensor:
    """Phi(s* + d_a; u) - Phi(s* + d_b; u), summed over the batch, with only the small
    differences D = d_a - d_b subtracted (see the module doc); autograd-friendly in u and the
    couplings' parameters."""
    delta = [a - b for a, b in zip(d_a, d_b)]
    phi = (delta[0] * u).sum()
    for i, c in enumerate(block.couplings):
        x_a = free[i] + d_a[i]
        y_b = free[i + 1] + d_b[i + 1]
        phi = phi + c.phi(x_a, delta[i + 1]) + (y_b * c.linear_bottom_up(delta[i])).sum()
    return phi
