"""Equilibrium Propagation.

Nudge the block with the incoming gradient delta, settle again from the free equilibrium s*:

    s^beta = argmin_s E(s; u, θ) + beta <delta, s_top>

and read the gradient off two equilibria at nudges beta_a != beta_b:

    dL/dθ ~= (dE/dθ(s^{beta_a}) - dE/dθ(s^{beta_b})) / (beta_a - beta_b)     (same for u)

Variants: positive (beta_a = beta, beta_b = 0; bias O(beta)), negative (0, -beta), centered
(beta, -beta; bias O(beta^2), the standard choice) and random (one-sided with a random sign
per call).

Tolerance that follows beta: EP divides state differences by beta, so a free state that is
only converged to a residual r adds an error of order r / beta to a one-sided estimate (the
nudged phase keeps settling the free state's leftover while it is nudged; the centered variant
cancels this drift to first order, since both phases inherit it). One-sided variants therefore
first *polish* the free state (relax it further from where the forward stopped) until its
residual is at most ``polish * beta**2``, within ``polish_steps`` steps: the state error left,
of order residual / beta, is then below EP's own O(beta) bias, so tightening further would buy
nothing. Measured on the digits model in float64 (``tests/test_torch_module.py``): one-sided EP at
beta 1e-3 has cosine 0.13-0.20 against Implicit without polishing, >= 0.999 with it. The polish is
recorded in the backward statistics and warned about (once per block) when its budget is not
enough, e.g. in float32 at small beta, where the residual cannot fall below ~1e-7.

Max pooling inside the block (``pool_winners``): a max pool is piecewise linear, so the energy
is smooth only at a fixed winner pattern. The exact gradient of the free equilibrium (what
Implicit computes, differentiating at s*) is the gradient at the free state's winners. With the
live max (``pool_winners="live"``, the default) a winner that switches between the two nudged
phases moves the read-out by O(1), and the estimate grows like 1/beta there. With
``pool_winners="free"`` the nudged phases and the read-out use the winners of the free
equilibrium (``EnergyBlock.with_pool_winners``): the block's energy at that pattern is smooth,
EP's estimate keeps its O(beta^2) (centered) bias against that exact gradient, and the forward
(inference) model is unchanged. In a circuit: the max-pool stage (a winner-take-all) latches its
decision at the end of the free phase, and the nudged phases route each window through the
latched input, a switch set once per sample, like the phase control that turns the nudge on.

Difference form (``form="difference"``, see :mod:`ffebm.difference`): the nudged phases relax
d = s - s* instead of s, and the read-out uses d_a - d_b directly, so the estimate keeps full
relative precision however little the nudge moves the block (float32 blocks deep in a network,
where ``s_a - s_b`` is otherwise mostly rounding). Exact algebra for the blocks it applies to
(affine couplings, hard-sigmoid / linear layers, max pools only with ``pool_winners="free"``);
any other block raises :class:`~ffebm.errors.DifferenceFormUnsupported`. It takes s* as the
fixed point (the free state's leftover drift is left out, as the implicit gradient does), so a
one-sided variant needs no polish in this form.

Nudge (``nudge``): "delta" adds beta * <delta, s_top> to the energy (every block; delta = dL/ds_top
at s*); "loss" adds beta * loss(readout(s_top), y) (the published nudge of the last block: the
force follows the state), for calls made inside ``ffebm.loss_nudge(model, loss_fn, y)`` (see
:mod:`ffebm.gradients.loss_nudge`). Both estimate the same exact gradient. With the difference
form the loss's force is evaluated at s* + d: the force itself is the small drive (not a
difference of large terms), so it keeps its relative precision.

Scaling: with ``scale="batch"`` (default) the nudge is beta * B * delta, i.e. beta applies to
each sample's own loss gradient when the loss is a batch mean (so published beta values keep
their meaning at any batch size); the estimate is divided by the same factor.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

import warnings

from ..difference import primitive_difference, relax_difference
from ..solvers import Relaxation
from .base import (BackwardStats, BlockCall, GradientMethod, GradientResult, difference_read_out,
                   primitive_difference_grads)

VARIANTS = ("positive", "negative", "centered", "random")
FORMS = ("ordinary", "difference")
NUDGES = ("delta", "loss")
#: the relative mismatch between the loss's force at s* and delta above which a loss nudge is refused
LOSS_MISMATCH = 1e-3
POOL_WINNERS = ("live", "free")
SCALES = ("batch", "none")


@dataclass
class EP(GradientMethod):
    """Equilibrium Propagation with nudging strength ``beta``.

    steps: nudged steps T2 (None: the block's ``nudge_relaxation``); tol: optional early stop
    of the nudged phases; seed: generator seed for the random-sign variant (None: drawn from
    ``torch.initial_seed()`` at the first draw); polish: one-sided variants relax the free state
    further until its residual <= ``polish * beta**2`` (0 disables); polish_steps: budget of that
    extra relaxation (None: the block's free step budget); pool_winners: "live" (max pools select
    their winner at every step of every phase) or "free" (the nudged phases and the read-out keep
    the free equilibrium's winners; see the module doc).
    """

    beta: float = 0.5
    variant: str = "centered"
    steps: Optional[int] = None
    tol: Optional[float] = None
    scale: str = "batch"
    seed: Optional[int] = None
    polish: float = 1e-3
    polish_steps: Optional[int] = None
    pool_winners: str = "live"
    form: str = "ordinary"
    nudge: str = "delta"
    _gen: Optional[torch.Generator] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < math.inf:
            raise ValueError(f"EP.beta must be > 0 and finite, got {self.beta!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"EP.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"EP.steps must be an integer >= 1 or None, got {self.steps!r}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"EP.tol must be > 0 or None, got {self.tol!r}")
        if self.scale not in SCALES:
            raise ValueError(f"EP.scale must be one of {SCALES}, got {self.scale!r}")
        if not (isinstance(self.polish, (int, float)) and 0 <= self.polish < math.inf):
            raise ValueError(f"EP.polish must be a finite number >= 0, got {self.polish!r}")
        if self.polish_steps is not None and (not isinstance(self.polish_steps, int) or self.polish_steps < 1):
            raise ValueError(f"EP.polish_steps must be an integer >= 1 or None, got {self.polish_steps!r}")
        if self.pool_winners not in POOL_WINNERS:
            raise ValueError(f"EP.pool_winners must be one of {POOL_WINNERS}, got {self.pool_winners!r}")
        if self.form not in FORMS:
            raise ValueError(f"EP.form must be one of {FORMS}, got {self.form!r}")
        if self.nudge not in NUDGES:
            raise ValueError(f"EP.nudge must be one of {NUDGES}, got {self.nudge!r}")

    def describe(self) -> str:
        extra = ", pool_winners=free" if self.pool_winners == "free" else ""
        extra += ", form=difference" if self.form == "difference" else ""
        extra += ", nudge=loss" if self.nudge == "loss" else ""
        return f"EP(beta={self.beta}, variant={self.variant}{extra})"

    # -- random state -----------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator()
            self._gen.manual_seed(self.seed if self.seed is not None else torch.initial_seed() % (2**63))
        return self._gen

    def snapshot(self) -> "EP":
        if self.variant == "random":
            self._generator()  # create the stream first, so that the copy shares it
        return super().snapshot()

    def state_dict(self) -> Dict[str, Any]:
        if self.variant != "random":
            return {}
        return {"sign_generator": self._generator().get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        g = state.get("sign_generator")
        if g is not None and self.variant == "random":
            if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
                raise ValueError("EP state 'sign_generator' must be a uint8 tensor (a torch.Generator state)")
            self._generator().set_state(g.cpu())

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
        sign = 1.0 if torch.randint(0, 2, (1,), generator=self._generator()).item() == 1 else -1.0
        return (sign * b, 0.0) if sign > 0 else (0.0, sign * b)

    def nudge_config(self, call: BlockCall) -> Relaxation:
        base = call.nudge_relaxation
        if self.steps is None and self.tol is None:
            return base
        return dataclasses.replace(base, steps=self.steps or base.steps, tol=self.tol)

    def forces(self, call: BlockCall, delta: torch.Tensor, c: float):
        """``(nudge_of, fallback)``: ``nudge_of(beta)`` is the top-layer nudge of a phase at beta
        (a tensor, or a force of the current top state with the loss nudge); ``fallback`` says
        why a loss nudge was not used (None when it was, or was not asked for)."""
        d = delta * c
        if self.nudge == "delta":
            return (lambda beta: beta * d), None
        cost = call.cost
        if cost is None:
            why = "nudge=delta: the call was made outside ffebm.loss_nudge(model, loss_fn, y)"
            warned = call.block.__dict__.setdefault("_convergence_warned", set())
            if "loss_nudge" not in warned:
                warned.add("loss_nudge")
                warnings.warn(f"block '{call.block.name}': EP(nudge='loss') fell back to the linear nudge "
                              f"({why}; warned once per block)", UserWarning, stacklevel=4)
            return (lambda beta: beta * d), why
        at_free = cost.force(call.states[-1])
        gap = float((at_free - delta).double().norm() / delta.double().norm().clamp_min(1e-30))
        if gap > LOSS_MISMATCH:
            raise ValueError(f"block '{call.block.name}': the loss given to ffebm.loss_nudge does not give this "
                             f"backward's incoming gradient at the free state (relative difference {gap:.2e}); a loss "
                             "nudge would estimate the gradient of another loss. Give loss_nudge the loss that is "
                             "back-propagated, or use EP(nudge='delta')")
        return (lambda beta: (lambda top: (beta * c) * cost.force(top))), None

    def _phase(self, call, free, nudge_of, beta, cfg, callback=None):
        """One nudged phase from the free state: (its state, or d = s - s* in difference form;
        its SolveStats, None for a zero nudge)."""
        if beta == 0.0:
            return (free if self.form == "ordinary" else [torch.zeros_like(t) for t in free]), None
        phase = "nudged+" if beta > 0 else "nudged-"
        if self.form == "difference":
            return relax_difference(call.block, call.u, free, nudge_of(beta), cfg, phase, callback)
        return call.block.solve(call.u, states=free, nudge=nudge_of(beta), config=cfg, phase=phase,
                                callback=callback)

    def read_out(self, call: BlockCall, free, a, b, scale: float, skip=()):
        """EP's estimate -scale * (Phi(s_a) - Phi(s_b)) from the phases' results (states, or
        differences d from ``free`` in difference form)."""
        if self.form == "difference":
            return difference_read_out(call, lambda u_: primitive_difference(call.block, free, a, b, u_), scale, skip)
        return primitive_difference_grads(call, a, b, scale, skip=skip)

    def _polished(self, call: BlockCall, ba: float, bb: float):
        """The free state, relaxed further when a one-sided estimate needs it (see module doc)."""
        if ba != 0.0 and bb != 0.0 or self.polish == 0 or self.form == "difference":
            return call.states, None
        target = self.polish * float(self.beta) ** 2
        r = call.free_stats.residual
        if r <= target:  # NaN (no check made) falls through to polishing
            return call.states, None
        cfg = dataclasses.replace(call.relaxation, steps=self.polish_steps or call.relaxation.steps, tol=target,
                                  strict=False, precision=None, average_last=0)
        return call.block.solve(call.u, states=call.states, config=cfg, phase="polish")

    def at_winners(self, call: BlockCall, free) -> BlockCall:
        """The call whose block keeps the max-pool winners of ``free`` (``pool_winners="free"``)."""
        if self.pool_winners == "live":
            return call
        view = call.block.with_pool_winners(free)
        return call if view is call.block else dataclasses.replace(call, block=view)

    def skip(self, call: BlockCall) -> Sequence[bool]:
        """Parameters whose gradient autograd should not form (AnalogEP: pulsed weights)."""
        return ()

    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:
        c = float(delta.shape[0]) if self.scale == "batch" else 1.0
        cfg = self.nudge_config(call)
        ba, bb = self.nudges()
        nudge_of, fallback = self.forces(call, delta, c)
        free, polish = self._polished(call, ba, bb)
        call = self.at_winners(call, free)
        sa, st_a = self._phase(call, free, nudge_of, ba, cfg)
        sb, st_b = self._phase(call, free, nudge_of, bb, cfg)
        scale = 1.0 / ((ba - bb) * c)
        g_u, g_p = self.read_out(call, free, sa, sb, scale, skip=self.skip(call))
        stats = BackwardStats(method=self.describe(), nudged=[s for s in (st_a, st_b) if s is not None],
                              polish=polish, fallback=fallback)
        if self.form == "difference":  # the hook reads states
            sa, sb = [f + t for f, t in zip(free, sa)], [f + t for f, t in zip(free, sb)]
        g_p = self.read_out_extra(call, sa, sb, scale, g_p)
        return GradientResult(g_u, g_p, stats)

    def read_out_extra(self, call, sa, sb, scale, grads):
        """Hook for subclasses that read some gradients off the two states another way."""
        return grads

    def trace(self, call: BlockCall, delta: torch.Tensor) -> List[GradientResult]:
        """EP's running estimate after each nudged step k = 1..T2 (for convergence plots).

        Both phases are relaxed in lockstep from s*; entry k-1 is the estimate read off the
        states after k steps.
        """
        tr = self.trajectories(call, delta)
        return [GradientResult(*tr.estimate(k), BackwardStats(method=self.describe(), polish=tr.polish))
                for k in range(tr.steps)]

    def trajectories(self, call: BlockCall, delta: torch.Tensor) -> "Trajectories":
        """The results of both nudged phases after each step k = 1..T2 (no early stop), and what
        reading an estimate off them needs (see :class:`Trajectories`)."""
        c = float(delta.shape[0]) if self.scale == "batch" else 1.0
        cfg = self.nudge_config(call)
        cfg = dataclasses.replace(cfg, tol=None)
        ba, bb = self.nudges()
        nudge_of, _ = self.forces(call, delta, c)
        free, polish = self._polished(call, ba, bb)
        call = self.at_winners(call, free)
        hist_a: list = []
        hist_b: list = []
        if ba != 0.0:
            self._phase(call, free, nudge_of, ba, cfg, callback=lambda k, s: hist_a.append([t.clone() for t in s]))
        if bb != 0.0:
            self._phase(call, free, nudge_of, bb, cfg, callback=lambda k, s: hist_b.append([t.clone() for t in s]))
        return Trajectories(call=call, free=free, a=hist_a, b=hist_b, scale=1.0 / ((ba - bb) * c), polish=polish,
                            method=self)


@dataclass
class Trajectories:
    """Both nudged phases of one EP backward, step by step.

    call: the call the phases ran on (its block keeps the free winners with
    ``pool_winners="free"``); free: the (polished) free state they started from; a, b: the
    phases' results after each step at beta_a and beta_b (states, or d = s - s* when
    ``method.form == "difference"``; empty for a zero nudge); scale: 1 / ((beta_a - beta_b) * c),
    the factor of EP's read-out; method: the EP that ran them.
    """

    call: BlockCall
    free: List[torch.Tensor]
    a: List[List[torch.Tensor]]
    b: List[List[torch.Tensor]]
    scale: float
    polish: Any = None
    method: Optional[EP] = None

    @property
    def steps(self) -> int:
        return max(len(self.a), len(self.b))

    def _raw(self, k: int):
        zero = self.free if self.method is None or self.method.form == "ordinary" else \
            [torch.zeros_like(t) for t in self.free]
        return (self.a[k] if self.a else zero), (self.b[k] if self.b else zero)

    def estimate(self, k: int):
        """EP's estimate ``(grad_u, grad_params)`` after k + 1 steps (k = 0..steps-1)."""
        a, b = self._raw(k)
        method = self.method or EP()
        return method.read_out(self.call, self.free, a, b, self.scale)

    def layer_difference(self, k: int) -> List[torch.Tensor]:
        """s_a - s_b per layer after k + 1 steps (exact d_a - d_b in difference form)."""
        a, b = self._raw(k)
        return [x - y for x, y in zip(a, b)]

    def pairs(self):
        """(s_a, s_b) after each step k = 1..T2 (states, s* + d in difference form)."""
        diff = self.method is not None and self.method.form == "difference"
        for k in range(self.steps):
            a, b = self._raw(k)
            if diff:
                a, b = [f + t for f, t in zip(self.free, a)], [f + t for f, t in zip(self.free, b)]
            yield a, b
