"""Implicit differentiation at the equilibrium (the exact gradient of the loss at s*).

At a fixed point s* = sigma(dPhi/ds), units strictly inside the box ("free", F) satisfy
s_F = a (dPhi/ds)_F while saturated units stay put under small perturbations. Differentiating,

    (I/a - d^2Phi/ds^2)_FF  lambda_F = delta_F,      lambda = 0 off F,
    dL/dθ = d/dθ <lambda, dPhi/ds(s*; u, θ)>,    dL/du = the same with u.

Equivalently dL/dθ = -lambda^T d^2E/(ds dθ) with (d^2E/ds^2)_FF lambda_F = delta_F. The system
matrix is never formed: Hessian-vector products come from double backward through
dPhi/ds (a symmetric Hessian, so a vector-Jacobian product is the Hessian-vector product),
and the system is solved per sample by conjugate gradients ("cg") or by the fixed-point
(Neumann) iteration lambda <- a M (delta + H_Phi lambda) ("fixed_point", i.e. recurrent backprop
run to convergence).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..activations import free_mask
from ..errors import AdjointNotConverged, ConvergenceWarning
from .base import BackwardStats, BlockCall, GradientMethod, GradientResult, grad_wrt

SOLVERS = ("cg", "fixed_point")


class _NegativeCurvature(Exception):
    """CG met a direction of non-positive curvature."""


def _bdot(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """Per-sample inner product of two state lists -> [B]."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))


def _bshape(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (t.dim() - 1)))


@dataclass
class Implicit(GradientMethod):
    """Exact gradient at the equilibrium by an adjoint solve with vector-Jacobian products.

    tol: relative residual of the adjoint system (per sample); max_iter: iteration budget;
    solver: "cg" or "fixed_point"; strict: raise instead of warn when the budget is hit.
    fallback: what to do when the state is not a strict local minimum (CG meets negative
    curvature: the free relaxation stopped on an unstable face, typically with its budget hit)
    or the adjoint solve fails: "unrolled" backpropagates through the block's nudged-phase
    number of steps from the state (recurrent backprop, the gradient of what the relaxation
    computes), warning once per block; None raises AdjointNotConverged.
    """

    tol: float = 1e-8
    max_iter: int = 500
    solver: str = "cg"
    strict: bool = False
    fallback: Optional[str] = "unrolled"

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise ValueError(f"Implicit.tol must be > 0, got {self.tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"Implicit.max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"Implicit.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.fallback not in (None, "unrolled"):
            raise ValueError(f"Implicit.fallback must be 'unrolled' or None, got {self.fallback!r}")

    def describe(self) -> str:
        return f"Implicit(solver={self.solver})"

    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:
        block = call.block
        try:
            return self._adjoint(call, delta)
        except (_NegativeCurvature, AdjointNotConverged) as err:
            if self.fallback is None:
                if isinstance(err, _NegativeCurvature):
                    raise AdjointNotConverged(
                        f"implicit adjoint of block '{block.name}': the energy's Hessian on the free units is not "
                        "positive definite (the state is not a strict local minimum); relax further, or use "
                        "Implicit(fallback='unrolled'), Unrolled or EP") from None
                raise
            from .unrolled import Unrolled

            warned = block.__dict__.setdefault("_convergence_warned", set())
            if "adjoint" not in warned:
                warned.add("adjoint")
                warnings.warn(f"implicit adjoint of block '{block.name}' failed ({type(err).__name__}); "
                              "falling back to backprop through the relaxation steps (warned once per block; "
                              "see block.backward_stats)", ConvergenceWarning, stacklevel=3)
            res = Unrolled().backward(call, delta)
            res.stats = BackwardStats(method=self.describe(), fallback="unrolled", steps=res.stats.steps)
            return res

    def _adjoint(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:
        block, states = call.block, call.states
        a = block.gain
        L = len(states)
        with torch.enable_grad():
            u_ = call.u.detach().requires_grad_(call.wants_input)
            s = [t.detach().requires_grad_(True) for t in states]
            g = torch.autograd.grad(block.primitive(s, u_), s, create_graph=True)
            masks = [free_mask(g[i].detach(), a, block.bounded(i)).to(g[i].dtype) for i in range(L)]

            def hess_phi(v: List[torch.Tensor]) -> List[torch.Tensor]:
                out = torch.autograd.grad(g, s, grad_outputs=v, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(x) if o is None else o for o, x in zip(out, s)]

            rhs = [torch.zeros_like(t) for t in states]
            rhs[-1] = delta.to(states[-1].dtype)
            rhs = [m * r for m, r in zip(masks, rhs)]
            if self.solver == "cg":
                lam, iters, res = self._cg(hess_phi, masks, rhs, a)
            else:
                lam, iters, res = self._fixed_point(hess_phi, masks, rhs, a)
            stats = BackwardStats(method=self.describe(), adjoint_iterations=iters, adjoint_residual=res)
            if not any(t.requires_grad for t in g):
                return GradientResult(None, (None,) * len(call.params), stats)
            g_u, g_p = grad_wrt(list(g), call, u_, grad_outputs=lam)
        return GradientResult(g_u, g_p, stats)

    # -- solvers --------------------------------------------------------------------------
    def _apply(self, hess_phi, masks, v, a):
        """(I/a - H_Phi) restricted to the free units."""
        hv = hess_phi([m * x for m, x in zip(masks, v)])
        return [m * (x / a - h) for m, x, h in zip(masks, v, hv)]

    def _finish(self, iters, res):
        if not res <= self.tol:
            msg = f"implicit adjoint solve stopped after {iters} iterations with residual {res:.2e} > tol {self.tol:.1e}"
            if self.strict or not math.isfinite(res) or res > 1e-2:
                raise AdjointNotConverged(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    def _cg(self, hess_phi, masks, b, a):
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
        p = [t.clone() for t in r]
        rs = _bdot(r, r)
        bnorm = rs.sqrt().clamp_min(1e-30)
        res = float((rs.sqrt() / bnorm).max())
        it = 0
        for it in range(1, self.max_iter + 1):
            if res <= self.tol:
                it -= 1
                break
            ap = self._apply(hess_phi, masks, p, a)
            pap = _bdot(p, ap)
            active = rs > 0
            if bool((pap[active] <= 0).any()):
                raise _NegativeCurvature()
            alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
            x = [xi + _bshape(alpha, xi) * pi for xi, pi in zip(x, p)]
            r = [ri - _bshape(alpha, ri) * api for ri, api in zip(r, ap)]
            rs_new = _bdot(r, r)
            res = float((rs_new.sqrt() / bnorm).max())
            beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.zeros_like(rs))
            p = [ri + _bshape(beta, ri) * pi for ri, pi in zip(r, p)]
            rs = rs_new
        self._finish(it, res)
        return x, it, res

    def _fixed_point(self, hess_phi, masks, b, a):
        lam = [a * t for t in b]
        bnorm = _bdot(b, b).sqrt().clamp_min(1e-30)
        res = float("inf")
        it = 0
        for it in range(1, self.max_iter + 1):
            hv = hess_phi(lam)
            new = [a * m * (bi + h) for m, bi, h in zip(masks, b, hv)]
            diff = [n - l for n, l in zip(new, lam)]
            lam = new
            res = float((_bdot(diff, diff).sqrt() / (a * bnorm)).max())
            if res <= self.tol or not math.isfinite(res):
                break
        self._finish(it, res)
        return lam, it, res
