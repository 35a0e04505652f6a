"""The autograd bridge: free solve in forward, the block's gradient method in backward.

Parameter gradients are returned from ``backward`` (not written to ``.grad`` by hand), so
autograd accumulates them like any other: DistributedDataParallel's hooks, gradient clipping
and ordinary optimizers work unchanged.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

States = List[torch.Tensor]


class _Equilibrium(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, u: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        states, stats = block.solve(u.detach())
        block.state, block.stats = states, stats
        ctx.block = block
        ctx.num_layers = len(states)
        ctx.save_for_backward(u.detach(), *states)
        return states[-1].clone()

    @staticmethod
    def backward(ctx, delta: torch.Tensor):
        block = ctx.block
        saved = ctx.saved_tensors
        u, states = saved[0], list(saved[1:1 + ctx.num_layers])
        params = block.energy_parameters()
        grad_u, grad_params = block.gradient.backward(block, u, states, delta.contiguous())
        if not ctx.needs_input_grad[1]:
            grad_u = None
        return (None, grad_u, *grad_params)


def equilibrium(block, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Top-layer equilibrium state of ``block`` driven by ``u``, differentiable by its method."""
    return _Equilibrium.apply(block, u, *params)
