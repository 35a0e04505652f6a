"""Fewer relaxation steps to the same equilibrium: starts and accelerations of the fixed-point map.

The free phase solves  s = sigma(drive(s))  with sigma the hard sigmoid (the box [0, 1]) or a
linear top layer. Each asynchronous sweep minimises the energy exactly over the even layers, then
over the odd ones (block-coordinate descent). Three pieces cut the sweeps a solve needs; each is
a :class:`~ffebm.Relaxation` setting, so a block's relaxation says which it uses:

* ``init="feedforward"`` starts from one bottom-up pass, s_0 = sigma(u), s_{i+1} = sigma(f_i(s_i)),
  instead of zeros (the top-down drives are missing, the bottom-up ones are already there).
* ``overrelax=omega`` (projected over-relaxation, PSOR): each layer moves past its minimiser,
      s_i <- P_box( s_i + omega * (a * drive_i - s_i) ),
  omega in (0, 2); omega = 1 is the plain update clamp(a * drive_i). For a convex energy
  (quadratic over a box) PSOR converges for every omega in (0, 2); the best omega grows with the
  coupling strength (1.2-1.6 on the presets measured here).
* ``anderson=m`` (Anderson mixing, type II): the next iterate is the combination of the last m
  sweeps' outputs G(s_j) whose residuals G(s_j) - s_j have the least norm (weights summing to 1),
  per sample, projected back onto the box. It extrapolates along the slow modes of the sweep.

None of them changes the fixed point: at a fixed point every update above is the identity, so
the gradients (EP, Implicit, Unrolled through a converged state) are those of the same
equilibrium, up to the solve tolerance (``tests/test_acceleration.py`` checks them against
``Implicit``). The tolerance means the same thing with and without acceleration: the residual
is the relative change of one plain step (over-relaxed changes are divided by omega; Anderson's
residual is that of the plain sweep it mixes).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .blocks.base import EnergyBlock

States = List[torch.Tensor]
INITS = ("zeros", "feedforward")
MAX_ANDERSON = 32


def overrelaxed(s_old: torch.Tensor, v: torch.Tensor, gain: float, omega: float, bounded: bool) -> torch.Tensor:
    """P_box(s + omega * (gain * v - s)): the over-relaxed update of one layer (omega = 1: sigma(v))."""
    new = torch.lerp(s_old, v * gain, omega) if s_old.dtype == v.dtype else s_old + omega * (v * gain - s_old)
    return new.clamp_(0.0, 1.0) if bounded else new


def feedforward_state(block: "EnergyBlock", u: torch.Tensor) -> States:
    """One bottom-up pass: s_0 = sigma(u), s_{i+1} = sigma(f_i(s_i)) (no top-down drives)."""
    s = [block.activate(0, u)]
    for i, c in enumerate(block.couplings):
        v, _ = c.bottom_up(s[i])
        s.append(block.activate(i + 1, v))
    return s


def _flat(states: States) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in states], dim=1)


def _unflat(flat: torch.Tensor, like: States) -> States:
    out, at = [], 0
    for t in like:
        n = t[0].numel()
        out.append(flat[:, at:at + n].reshape(t.shape))
        at += n
    return out


class AndersonMixer:
    """Anderson mixing over the last ``memory`` sweeps, per sample (one object per solve).

    With residuals f_j = G(s_j) - s_j stacked as F [B, m, N], the weights alpha minimise
    |F^T alpha| subject to sum(alpha) = 1:  alpha = H^-1 1 / (1^T H^-1 1),  H = F F^T + lam I
    (lam scaled by trace(H) keeps H invertible when residuals are collinear). The mixed iterate
    sum_j alpha_j G(s_j) is projected back onto each layer's box. Safeguard: a sample whose
    plain residual grew since the last sweep (the extrapolation changed which units sit on the
    box's faces, so the secant information is stale) restarts its history from the plain step.
    History lives in ring buffers with an incrementally updated Gram matrix H, so a sweep costs
    about 2m extra passes over the state.
    """

    def __init__(self, block: "EnergyBlock", memory: int, reg: float = 1e-8) -> None:
        self.bounded = [block.bounded(i) for i in range(block.num_layers)]
        self.memory = memory
        self.reg = reg
        self.count = 0
        self.g: Optional[torch.Tensor] = None      # [B, m, N] outputs G(s_j)
        self.f: Optional[torch.Tensor] = None      # [B, m, N] residuals G(s_j) - s_j
        self.gram: Optional[torch.Tensor] = None   # [B, m, m] float64, F F^T
        self.last_norm: Optional[torch.Tensor] = None

    def __call__(self, s: States, g_states: States) -> States:
        work = torch.promote_types(g_states[0].dtype, torch.float32)  # bf16 states mix in float32
        g = _flat(g_states).to(work)
        f = g - _flat(s).to(work)
        B, N = f.shape
        m = self.memory
        if self.g is None:
            self.g = g.new_zeros(B, m, N)
            self.f = g.new_zeros(B, m, N)
            self.gram = torch.zeros(B, m, m, dtype=torch.float64, device=g.device)
        slot = self.count % m
        self.g[:, slot] = g
        self.f[:, slot] = f
        n = min(self.count + 1, m)
        # Gram row of the new residual against every stored one (unused slots are zero)
        row = (self.f @ f.unsqueeze(-1)).squeeze(-1).double()          # [B, m]
        self.gram[:, slot, :] = row
        self.gram[:, :, slot] = row
        norm = f.norm(dim=1)
        if self.last_norm is not None:
            grew = norm > self.last_norm
            if bool(grew.any()):
                # restart those samples: every slot holds the current sweep (alpha is then
                # irrelevant, the mixed state is the plain one)
                self.g[grew] = g[grew].unsqueeze(1).expand(-1, m, -1)
                self.f[grew] = f[grew].unsqueeze(1).expand(-1, m, -1)
                self.gram[grew] = (norm[grew].double() ** 2)[:, None, None].expand(-1, m, m)
        self.last_norm = norm
        self.count += 1
        if n < 2:
            return g_states
        H = self.gram[:, :n, :n] if n < m else self.gram
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        # + an absolute floor: a converged sample has F = 0 (then alpha is uniform over equal G's)
        lam = self.reg * H.diagonal(dim1=1, dim2=2).sum(-1) + 1e-300
        ones = torch.ones(B, n, 1, dtype=H.dtype, device=H.device)
        w = torch.linalg.solve(H + lam[:, None, None] * eye, ones)     # [B, n, 1]
        alpha = (w / w.sum(dim=1, keepdim=True)).to(work)
        mixed = (alpha.transpose(1, 2) @ self.g[:, :n]).squeeze(1)     # [B, N]
        out = _unflat(mixed.to(g_states[0].dtype), g_states)
        return [t.clamp_(0.0, 1.0) if b else t for t, b in zip(out, self.bounded)]


def check_settings(overrelax: float, anderson: int, init: str) -> None:
    """Clear errors for acceleration settings (called by :class:`~ffebm.Relaxation`)."""
    if isinstance(overrelax, bool) or not isinstance(overrelax, (int, float)) or not 0 < overrelax < 2:
        raise ValueError(f"Relaxation.overrelax must be a number in (0, 2) (1: plain updates), got {overrelax!r}")
    if isinstance(anderson, bool) or not isinstance(anderson, int) or anderson < 0 or anderson == 1:
        raise ValueError(f"Relaxation.anderson must be 0 (off) or a memory >= 2, got {anderson!r}")
    if anderson > MAX_ANDERSON:
        # each sweep solves an m x m system per sample and keeps 2m copies of the state: beyond a
        # few dozen sweeps old secants are stale and the bookkeeping costs more than the sweeps
        raise ValueError(f"Relaxation.anderson={anderson}: at most {MAX_ANDERSON} sweeps of memory (3-8 is typical)")
    if init not in INITS:
        raise ValueError(f"Relaxation.init must be one of {INITS}, got {init!r}")


def initial_states(block: "EnergyBlock", u: torch.Tensor, init: str) -> States:
    """The starting states of a solve that was given none."""
    return feedforward_state(block, u) if init == "feedforward" else block.initial_state(u)


def mixer_for(block: "EnergyBlock", anderson: int) -> Optional[AndersonMixer]:
    return AndersonMixer(block, anderson) if anderson else None
