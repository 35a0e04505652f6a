"""Gradient methods: objects that turn the gradient arriving at a block's output into the
gradients of the block's parameters and of its input.

    grad_u, grad_params = method.backward(block, u, free_states, delta)

``delta`` = dL/ds_top at the free equilibrium. ``grad_params`` follows
``block.energy_parameters()``. Methods are plain objects: a block's method can be swapped at
any time (``block.gradient = Implicit()``), and blocks of one model may use different ones.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

States = List[torch.Tensor]
Grads = Tuple[Optional[torch.Tensor], Tuple[Optional[torch.Tensor], ...]]


class GradientMethod:
    """Base class; subclasses implement :meth:`backward`."""

    def backward(self, block, u: torch.Tensor, states: States, delta: torch.Tensor) -> Grads:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


def primitive_difference_grads(block, u: torch.Tensor, s_a: States, s_b: States, scale: float) -> Grads:
    """Gradients of  scale * (E(s_a) - E(s_b)) = -scale * (Phi(s_a) - Phi(s_b))  w.r.t. u and θ,
    with both states held fixed (EP's read-out). For a dense coupling this is the local rule
    -scale * (y_a x_a^T - y_b x_b^T): a difference of two outer products.
    """
    params = block.energy_parameters()
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        sa = [t.detach() for t in s_a]
        sb = [t.detach() for t in s_b]
        delta_e = -(block.primitive(sa, u_) - block.primitive(sb, u_)) * scale
        grads = torch.autograd.grad(delta_e, [u_, *params], allow_unused=True)
    return grads[0], tuple(grads[1:])
