"""Couplings between adjacent layers of an energy block.

A coupling f maps the lower layer x to a drive on the upper layer y and contributes

    phi(x, y) = <y, f(x)>

to the block's primitive function Phi. The relaxation needs the bottom-up drive f(x) and the
top-down drive d phi / dx = J_f(x)^T y. Both are written analytically here (a transposed
convolution through the pooling's adjoint), because asking autograd for them at every
relaxation step costs several times more; `phi` stays autograd-friendly so that an autograd
stepper, EP's parameter gradient and the implicit adjoint can be derived from it.

`bottom_up` returns (f(x), ctx) where ctx holds what the adjoint needs at that x (max-pool
indices, soft-pool weights); `top_down(y, ctx)` applies J_f(x)^T with it.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLS = ("max", "avg", "soft", "none")


class Coupling(nn.Module):
    """Base class. Subclasses implement bottom_up, top_down and phi."""

    #: whether top_down needs the ctx of a bottom_up at the current lower state
    needs_ctx: bool = False

    def bottom_up(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def top_down(self, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def phi(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """<y, f(x)> summed over the batch (autograd-friendly)."""
        fx, _ = self.bottom_up(x)
        return (y * fx).sum()

    # -- the difference form (EP's nudged phases relaxed in s - s*, see ffebm.difference) ------
    def affine_problem(self) -> Optional[str]:
        """Why f is not affine in x with a state-independent adjoint (so the difference form
        cannot be used), or None when it is."""
        return f"{type(self).__name__} has no linear part written for the difference form"

    def linear_bottom_up(self, x: torch.Tensor) -> torch.Tensor:
        """A x: the linear part of an affine f(x) = A x + b (no bias), so that
        f(x* + d) = f(x*) + A d with no large-minus-large subtraction."""
        raise NotImplementedError(self.affine_problem())

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        with torch.no_grad():
            p = next(self.parameters())
            y, _ = self.bottom_up(torch.zeros((1, *in_shape), dtype=p.dtype, device=p.device))
        return tuple(y.shape[1:])


class DenseCoupling(Coupling):
    """f(x) = W flatten(x) + b.  Top-down: W^T y reshaped to x's shape."""

    def __init__(self, in_shape: Sequence[int], out_features: int, bias: bool = True, init_gain: float = 1.0):
        super().__init__()
        self.in_shape = tuple(in_shape)
        in_features = math.prod(self.in_shape)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        init_weight(self.weight, in_features, init_gain)

    def bottom_up(self, x):
        return F.linear(x.reshape(x.shape[0], -1), self.weight, self.bias), None

    def top_down(self, y, ctx):
        return (y @ self.weight).reshape(y.shape[0], *self.in_shape)

    def affine_problem(self):
        return _overridden(self, DenseCoupling)

    def linear_bottom_up(self, x):
        return F.linear(x.reshape(x.shape[0], -1), self.weight)

    def extra_repr(self):
        return f"{self.in_shape} -> {self.weight.shape[0]}"


class ConvCoupling(Coupling):
    """f(x) = P(conv(x, W)) + b with P one of max / avg / soft pooling (kernel = stride) or none.

    Top-down: conv_transpose(P^T y): the pooling's adjoint at x (max: scatter to the winners;
    avg: spread evenly; soft: through the Jacobian of the soft-max weighted mean), then the
    transposed convolution.

    ``with_winners(x)`` gives a view of a max-pooling coupling (sharing its parameters) whose pool
    keeps the winners it has at lower state x: a fixed selection, so f is affine in x there (EP's
    nudged phases with ``EP(pool_winners="free")``).
    """

    #: max-pool winners held fixed (flat indices per channel plane, as ``max_pool2d`` returns
    #: them); set only on a view made by :meth:`with_winners`, None: the live max
    winners: Optional[torch.Tensor] = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: Sequence[int],
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        pool: str = "max",
        pool_size: int = 2,
        soft_temperature: float = 0.1,
        bias: bool = True,
        init_gain: float = 1.0,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size = tuple(in_size)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.pool = pool
        self.pool_size = pool_size if pool != "none" else 1
        self.soft_temperature = soft_temperature
        self.needs_ctx = pool in ("max", "soft")
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        init_weight(self.weight, in_channels * kernel_size * kernel_size, init_gain)
        h, w = self.in_size
        self.conv_size = (
            (h + 2 * padding - kernel_size) // stride + 1,
            (w + 2 * padding - kernel_size) // stride + 1,
        )
        # output_padding so that conv_transpose lands exactly on in_size
        self._out_pad = tuple(
            n - ((c - 1) * stride - 2 * padding + kernel_size) for n, c in zip(self.in_size, self.conv_size)
        )
        if pool != "none" and any(c % pool_size for c in self.conv_size):
            raise ValueError(f"conv output {self.conv_size} is not divisible by pool_size {pool_size}")

    # -- pooling and its adjoint -------------------------------------------------------------
    def _pool(self, c: torch.Tensor) -> tuple[torch.Tensor, Any]:
        k = self.pool_size
        if self.pool == "none":
            return c, None
        if self.pool == "avg":
            return F.avg_pool2d(c, k), None
        if self.pool == "max":
            if self.winners is not None:
                return _take(c, self.winners), self.winners
            return F.max_pool2d(c, k, return_indices=True)
        p, w = soft_pool(c, k, self.soft_temperature)
        return p, (w, c, p)

    def _pool_adjoint(self, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        k = self.pool_size
        if self.pool == "none":
            return y
        if self.pool == "avg":
            return _up(y, k) / (k * k)
        if self.pool == "max":
            return F.max_unpool2d(y, ctx, k, output_size=self.conv_size)
        # d p / d c_i = w_i (1 + (c_i - p) / T)
        w, c, p = ctx
        return _up(y, k) * w * (1 + (c - _up(p, k)) / self.soft_temperature)

    def with_winners(self, x: torch.Tensor) -> "ConvCoupling":
        """A view of this coupling whose max pool selects, for every sample and window, the input
        that wins at lower state ``x`` (the coupling itself if it does not max-pool). The view
        shares the parameters (gradients reach them) and lives for one backward."""
        if self.pool != "max":
            return self
        with torch.no_grad():
            _, idx = self.bottom_up(x)
        view = copy.copy(self)  # a shallow copy: same parameters, tiles and contexts
        object.__setattr__(view, "winners", idx)
        return view

    # -- coupling interface ------------------------------------------------------------------
    def bottom_up(self, x):
        c = F.conv2d(x, self.weight, None, self.stride, self.padding)
        y, ctx = self._pool(c)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y, ctx

    def top_down(self, y, ctx):
        g = self._pool_adjoint(y, ctx)
        return F.conv_transpose2d(g, self.weight, None, self.stride, self.padding, self._out_pad)

    def affine_problem(self):
        if self.pool == "soft":
            return "soft pooling is not piecewise linear"
        if self.pool == "max" and self.winners is None:
            return "a max pool with live winners is only piecewise linear (use EP(pool_winners='free'))"
        return _overridden(self, ConvCoupling)

    def linear_bottom_up(self, x):
        problem = self.affine_problem()
        if problem:
            raise ValueError(f"linear_bottom_up: {problem}")
        return self._pool(F.conv2d(x, self.weight, None, self.stride, self.padding))[0]

    def extra_repr(self):
        return (
            f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
            f"p={self.padding}, pool={self.pool}{self.pool_size if self.pool != 'none' else ''}, in={self.in_size}"
        )


def _overridden(c: Coupling, base: type) -> Optional[str]:
    """A subclass that computes its drives its own way (an analog tile's noisy reads) has no
    exact linear part: refuse it rather than read its weight as if it were digital."""
    for name in ("bottom_up", "top_down", "phi"):
        if getattr(type(c), name) is not getattr(base, name):
            return f"{type(c).__name__} overrides {name} (its drive is not the digital affine map)"
    return None


def _take(c: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Max pooling with given winners: ``c`` at the flat per-plane indices ``idx``."""
    if c.shape[:2] != idx.shape[:2]:
        raise ValueError(f"pool winners were taken for a batch of shape {tuple(idx.shape[:2])}, the pool input has "
                         f"{tuple(c.shape[:2])}")
    return c.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def _up(t: torch.Tensor, k: int) -> torch.Tensor:
    """Nearest upsampling by k (adjoint of sum-pooling over non-overlapping k x k windows)."""
    if k == 1:
        return t
    return t.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)


def init_weight(weight: torch.Tensor, fan_in: int, gain: float) -> None:
    """Published-style initialisation: zero-mean Gaussian, std = gain / sqrt(fan_in).

    Small, zero-mean weights keep the block's fixed-point map contractive at the start of
    training so that relaxations settle in tens of steps.
    """
    with torch.no_grad():
        weight.normal_(0.0, gain / math.sqrt(fan_in))


class SoftPool2d(nn.Module):
    """Soft pooling over non-overlapping k x k windows: sum_i softmax(c/T)_i c_i (smooth max)."""

    def __init__(self, kernel_size: int, temperature: float = 0.1):
        super().__init__()
        self.k, self.t = kernel_size, temperature

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return soft_pool(c, self.k, self.t)[0]


def soft_pool(c: torch.Tensor, k: int, t: float) -> tuple:
    """Soft pooling over non-overlapping k x k windows: ``p = sum_i w_i c_i`` with
    ``w = softmax(c / T)`` per window. Returns ``(p, w)``."""
    m = F.max_pool2d(c, k).detach()  # shift for stability; softmax is shift-invariant
    e = torch.exp((c - _up(m, k)) / t)
    w = e / _up(F.avg_pool2d(e, k) * (k * k), k)
    return F.avg_pool2d(w * c, k) * (k * k), w
