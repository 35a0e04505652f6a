"""Relaxation: settling an energy block to its equilibrium (the forward solve).

The block's state is the fixed point  s = sigma(dPhi/ds - nudge)  (nudge = beta * delta on the
top layer during EP's nudged phases, or a force beta * F(s_top) evaluated at the current state:
the loss nudge; zero in the free phase). Two schedules:

* ``sync``:  all layers at once, s_l <- sigma(drive_l(s)).
* ``async``: even/odd layers in turn. Layers only couple to neighbours, so updating every
  other layer given the rest is exact block-coordinate minimisation of the energy; it settles
  in far fewer steps than ``sync``.

Two steppers compute the drives: ``analytic`` (bottom-up conv + top-down transposed conv,
fast) and ``autograd`` (the gradient of the primitive function, used to check the analytic
one). Steppers are plain functions in a registry (``STEPPERS``), so new ones can be added.

Every solve returns a :class:`SolveStats` with the steps taken, the final residual (relative
change of the state in the last step), whether it converged, and the residual trace.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Union

import torch

from .acceleration import check_settings, initial_states, mixer_for, overrelaxed
from .errors import ConvergenceWarning, NotConverged, RelaxationDiverged

if TYPE_CHECKING:  # pragma: no cover
    from .blocks.base import EnergyBlock

States = List[torch.Tensor]
MODES = ("async", "sync")


@dataclass
class Relaxation:
    """Settings of one relaxation (free or nudged phase).

    steps: step budget (T1 for the free phase, T2 for nudged phases).
    tol:   stop once the relative change |s_k - s_{k-1}| / |s_k| falls below tol; None runs
           exactly ``steps`` steps (the published fixed schedules).
    mode:  "async" (even/odd layers) or "sync".
    stepper: "analytic" or "autograd" (see STEPPERS).
    strict: raise NotConverged instead of warning when the budget is hit above tol.
    check_every: how often (in steps) the tolerance is checked; each check synchronises with
           the device, so larger values help on GPUs.
    precision: run the steps under autocast to this dtype (e.g. torch.bfloat16: about twice
           the convolution throughput on CPUs with bf16 units and on GPUs); None = the input's.
    polish_steps: with ``precision`` set, the last steps run in full precision so that the
           returned state is a full-precision fixed point (EP reads gradients off differences
           of states, which low precision would blur).
    average_last: return the mean state over the last k steps instead of the last state
           (0: off). With noisy reads (analog tiles) the settled state fluctuates around the
           equilibrium; averaging k steps divides that noise's variance by about k.
    overrelax: omega of projected over-relaxation, s <- P_box(s + omega (a drive - s)), in
           (0, 2); 1 = the plain update (see :mod:`ffebm.acceleration`).
    anderson: Anderson mixing over the last m sweeps (0: off; m >= 2).
    init:  where a solve given no states starts: "zeros" or "feedforward" (one bottom-up pass).
    """

    steps: int = 50
    tol: Optional[float] = 1e-4
    mode: str = "async"
    stepper: str = "analytic"
    strict: bool = False
    check_every: int = 5
    precision: Optional[torch.dtype] = None
    polish_steps: int = 2
    average_last: int = 0
    overrelax: float = 1.0
    anderson: int = 0
    init: str = "zeros"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"Relaxation.steps must be an integer >= 1, got {self.steps!r}")
        if self.tol is not None and not (self.tol > 0 and math.isfinite(self.tol)):
            raise ValueError(f"Relaxation.tol must be a positive number or None, got {self.tol!r}")
        if self.mode not in MODES:
            raise ValueError(f"Relaxation.mode must be one of {MODES}, got {self.mode!r}")
        if self.stepper not in STEPPERS:
            raise ValueError(f"Relaxation.stepper must be one of {tuple(STEPPERS)}, got {self.stepper!r}")
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"Relaxation.check_every must be an integer >= 1, got {self.check_every!r}")
        if isinstance(self.precision, str):
            self.precision = getattr(torch, self.precision, None) if self.precision != "none" else None
        if self.precision is not None and self.precision not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"Relaxation.precision must be None, torch.bfloat16, torch.float16 or torch.float32, "
                             f"got {self.precision!r}")
        if not isinstance(self.average_last, int) or self.average_last < 0:
            raise ValueError(f"Relaxation.average_last must be an integer >= 0, got {self.average_last!r}")
        if not isinstance(self.polish_steps, int) or self.polish_steps < 0:
            raise ValueError(f"Relaxation.polish_steps must be an integer >= 0, got {self.polish_steps!r}")
        check_settings(self.overrelax, self.anderson, self.init)


@dataclass
class SolveStats:
    """Outcome of one relaxation."""

    steps: int
    residual: float
    converged: bool
    phase: str = "free"
    trace: List[float] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"SolveStats(phase={self.phase!r}, steps={self.steps}, residual={self.residual:.2e}, "
                f"converged={self.converged})")


#: a top-layer nudge: a fixed tensor, or a force evaluated at the current top state
Nudge = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def nudge_at(nudge: Nudge, top: torch.Tensor) -> torch.Tensor:
    """The top-layer nudge: a fixed tensor (beta * delta), or a force evaluated at the current
    top state ``top`` (the loss nudge, ``ffebm.gradients.loss_nudge``)."""
    return nudge(top).to(top.dtype) if callable(nudge) else nudge


# --------------------------------------------------------------------------------------------
# steppers: one relaxation step s -> s'
# --------------------------------------------------------------------------------------------
def analytic_step(block: "EnergyBlock", u: torch.Tensor, s: States, nudge: Optional[torch.Tensor],
                  mode: str, cache: Dict[int, object], omega: float = 1.0) -> States:
    """One step with hand-written drives.

    drive_i = [i == 0] u + [i > 0] f_{i-1}(s_{i-1}) + [i < L-1] J_{f_i}(s_i)^T s_{i+1} - [top] nudge

    ``cache[i]`` holds coupling i's adjoint context (max-pool indices...) computed at the
    current s_i; it is refreshed whenever coupling i runs bottom-up and dropped when s_i moves.
    Functional (no in-place update) so autograd can differentiate through it (``Unrolled``).
    ``omega`` != 1: over-relaxed updates (see :func:`update`).
    """
    L = len(s)
    cps = block.couplings
    if mode == "sync":
        bottom = [u] + [None] * (L - 1)
        for i in range(L - 1):
            bottom[i + 1], cache[i] = cps[i].bottom_up(s[i])
        new = []
        for i in range(L):
            v = bottom[i]
            if i < L - 1:
                td = cps[i].top_down(s[i + 1], cache[i])
                v = v + td if i == 0 else v.add_(td)  # bottom[i > 0] is a fresh tensor
            if i == L - 1 and nudge is not None:
                v = v - nudge_at(nudge, s[i])
            new.append(block.activate(i, v) if omega == 1.0 else update(block, i, s[i], v, omega))
        for i in range(L - 1):
            cache[i] = None
        return new
    new = list(s)
    for start in (0, 1):
        for i in range(start, L, 2):
            if i == 0:
                v = u
            else:
                v, cache[i - 1] = cps[i - 1].bottom_up(new[i - 1])
            if i < L - 1:
                ctx = cache.get(i)
                if ctx is None and cps[i].needs_ctx:
                    _, ctx = cps[i].bottom_up(new[i])
                td = cps[i].top_down(new[i + 1], ctx)
                # in place where v is a fresh bottom-up drive (never the block input u, never
                # a tensor autograd saved: the bias add's output is not saved)
                v = v + td if i == 0 else v.add_(td)
            if i == L - 1 and nudge is not None:
                v = v - nudge_at(nudge, new[i])
            new[i] = block.activate(i, v) if omega == 1.0 else update(block, i, s[i], v, omega)
            if i < L - 1:
                cache[i] = None
    return new


def autograd_step(block: "EnergyBlock", u: torch.Tensor, s: States, nudge: Optional[torch.Tensor],
                  mode: str, cache: Dict[int, object], omega: float = 1.0) -> States:
    """One step whose drives are d/ds of the nudged primitive  Phi(s; u) - <nudge, s_top>.

    Independent of the analytic drives (including the nudge's sign), used to check them.
    """

    def drives(states: States) -> States:
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(True) for t in states]
            phi = block.primitive(xs, u.detach())
            if nudge is not None:
                phi = phi - (nudge_at(nudge, states[-1]).detach() * xs[-1]).sum()
            return list(torch.autograd.grad(phi, xs))

    L = len(s)
    if mode == "sync":
        g = drives(s)
        return [update(block, i, s[i], g[i], omega) for i in range(L)]
    new = [t.detach() for t in s]
    for start in (0, 1):
        g = drives(new)
        for i in range(start, L, 2):
            new[i] = update(block, i, new[i], g[i], omega)
    return new


def update(block: "EnergyBlock", i: int, s_i: torch.Tensor, v: torch.Tensor, omega: float) -> torch.Tensor:
    """Layer i's new state from its drive v: sigma_i(v), or with omega != 1 the projected
    over-relaxed P_box(s_i + omega (a v - s_i)) (the block's own ``activate`` when omega = 1, so
    blocks with other state maps keep them)."""
    if omega == 1.0:
        return block.activate(i, v)
    return overrelaxed(s_i, v, block.gain, omega, block.bounded(i))


Stepper = Callable[..., States]  # (block, u, states, nudge, mode, cache, omega=1.0) -> new states
STEPPERS: Dict[str, Stepper] = {"analytic": analytic_step, "autograd": autograd_step}


# --------------------------------------------------------------------------------------------
# the solve loop
# --------------------------------------------------------------------------------------------
def _residual(new: States, old: States) -> torch.Tensor:
    num = sum(((a - b).float() ** 2).sum() for a, b in zip(new, old))
    den = sum((a.float() ** 2).sum() for a in new)
    return torch.sqrt(num) / torch.sqrt(den).clamp_min(1e-12)


def relax(block: "EnergyBlock", u: torch.Tensor, states: Optional[States] = None,
          nudge: Optional[Nudge] = None, config: Optional[Relaxation] = None,
          phase: str = "free", callback: Optional[Callable[[int, States], None]] = None) -> tuple[States, SolveStats]:
    """Relax ``block`` driven by ``u`` from ``states`` (zeros if None).

    Returns the final states and a :class:`SolveStats`. Raises :class:`RelaxationDiverged`
    on a non-finite state (naming block, phase and step); warns (or raises, if strict) when
    the step budget is hit above tolerance. ``callback(k, states)`` is called after each step.
    """
    cfg = config or block.relaxation
    step_fn = STEPPERS[cfg.stepper]
    s = list(states) if states is not None else initial_states(block, u, cfg.init)
    mixer = mixer_for(block, cfg.anderson)
    cache: Dict[int, object] = {}
    trace: List[float] = []
    converged = cfg.tol is None
    residual = float("nan")
    k = 0
    window: List[States] = []
    low = cfg.precision is not None and cfg.precision != u.dtype
    low_until = max(cfg.steps - cfg.polish_steps, 0) if low else 0
    if low_until:
        # states and drives live in the low dtype for the whole low phase (no per-step casts);
        # autocast casts the (small) weights inside the convolutions
        u_low = u.to(cfg.precision)
        nudge_low = nudge.to(cfg.precision) if isinstance(nudge, torch.Tensor) else nudge
        s = [t.to(cfg.precision) for t in s]
    for k in range(1, cfg.steps + 1):
        check = k % cfg.check_every == 0 or k == cfg.steps
        if k <= low_until:
            with torch.autocast(device_type=u.device.type, dtype=cfg.precision):
                new = step_fn(block, u_low, s, nudge_low, cfg.mode, cache, cfg.overrelax)
            if k == low_until:  # back to full precision for the polish steps
                new = [t.to(u.dtype) for t in new]
                cache.clear()
        else:
            new = step_fn(block, u, s, nudge, cfg.mode, cache, cfg.overrelax)
        if check:
            # the residual is only formed at check points: it costs as much as a small layer;
            # an over-relaxed change is omega times the plain one, so the tolerance keeps its meaning
            residual = float(_residual(new, s)) / cfg.overrelax
            trace.append(residual)
            if not math.isfinite(residual):
                raise RelaxationDiverged(block.name, k, phase)
        if mixer is not None:
            new = mixer(s, new)
            cache.clear()  # the mixed state is not the one the couplings' contexts were computed at
        s = new
        if cfg.average_last:
            window.append(s)
            if len(window) > cfg.average_last:
                window.pop(0)
        if callback is not None:
            callback(k, [t.to(u.dtype) for t in s] if k < low_until else s)
        if check and cfg.tol is not None and residual <= cfg.tol:
            converged = True
            break
    if cfg.average_last and len(window) > 1:
        s = [torch.stack([w[i].to(u.dtype) for w in window]).mean(0) for i in range(len(s))]
    if low:
        s = [t.to(u.dtype) for t in s]
    stats = SolveStats(steps=k, residual=residual, converged=converged, phase=phase, trace=trace)
    if not converged:
        if cfg.strict:
            raise NotConverged(block.name, phase, k, residual, cfg.tol)
        key = (phase,)
        warned = block.__dict__.setdefault("_convergence_warned", set())
        if key not in warned:  # once per block and phase; later misses show in SolveStats
            warned.add(key)
            warnings.warn(
                f"relaxation of block '{block.name}' ({phase} phase) hit its budget of {k} steps with "
                f"residual {residual:.2e} > tol {cfg.tol:.1e} (warned once per block; see block.stats)",
                ConvergenceWarning, stacklevel=3)
    return s, stats
