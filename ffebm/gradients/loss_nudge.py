"""The published nudge of a model's last energy block: beta * loss(readout(s_top), y).

EP nudges a block by adding beta * C(s_top) to its energy. The default cost is linear,
C(s) = <delta, s> with delta = dL/ds_top at the free state (every block of an ff-EBM: the
incoming gradient is all a block below the last one can know). The *last* block can instead be
nudged by the loss itself, as published: C(s) = loss(readout(s), y), whose force

    F(s) = d loss(readout(s), y) / d s          (evaluated at the current state each step)

follows the state. Both costs have the same gradient at s* (F(s*) = delta), so both estimate the
same exact gradient; they differ in EP's own O(beta^2) (centered) bias, since the loss's
curvature enters the nudged phases.

The readout and the target are not the block's: they travel in the call's autograd context,
like everything else its backward needs. Run the forward inside the context that names them::

    with ffebm.loss_nudge(model, loss_fn, y):
        out = model(x)
    loss_fn(out, y).backward()

A call of an energy block of ``model`` whose method has ``nudge="loss"``, made while the context
is active, is nudged in its backward by ``loss_fn(readout(s_top), y)``, with ``readout`` the
modules that follow the block in the ``nn.Sequential`` that holds it (the published models:
Flatten -> Linear). A call made without the context falls back to the linear nudge, says so
once (a warning) and records it in its backward statistics (``fallback``).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn

_ACTIVE: ContextVar[Optional["_Active"]] = ContextVar("ffebm_loss_nudge", default=None)


@dataclass(frozen=True)
class LossCost:
    """The cost loss_fn(readout(s_top), target) of one block in one backward."""

    readout: Callable[[torch.Tensor], torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: torch.Tensor

    def force(self, s_top: torch.Tensor) -> torch.Tensor:
        """F(s) = d loss_fn(readout(s), target) / d s at the state ``s_top`` (readout parameters
        held fixed: nothing is accumulated into them)."""
        with torch.enable_grad():
            s = s_top.detach().requires_grad_(True)
            # the readout sees a non-leaf view of s: module backward hooks (e.g. torch's
            # FlopCounterMode) ask the engine about their inputs' nodes, which torch refuses for
            # a leaf inside a nested autograd.grad
            loss = self.loss_fn(self.readout(s.view_as(s)), self.target)
            (g,) = torch.autograd.grad(loss, (s,))
        return g.to(s_top.dtype)


@dataclass
class _Active:
    model: nn.Module
    loss_fn: Callable
    target: torch.Tensor
    tails: Optional[Dict[int, nn.Module]] = None

    def cost(self, block: nn.Module) -> LossCost:
        if self.tails is None:
            self.tails = _tails(self.model)
        tail = self.tails.get(id(block))
        if tail is None:
            raise ValueError(f"loss nudge: block '{getattr(block, 'name', block)}' is not a direct child of an "
                             "nn.Sequential inside the model given to ffebm.loss_nudge, so its readout (the modules "
                             "after it) is not known")
        from ..blocks.base import EnergyBlock

        later = [m.name for m in tail.modules() if isinstance(m, EnergyBlock)]
        if later:
            raise ValueError(f"loss nudge: block '{block.name}' is not the last energy block ({', '.join(later)} "
                             "follow it); only the last block can be nudged by the loss, earlier ones take "
                             "EP(nudge='delta')")
        return LossCost(readout=tail, loss_fn=self.loss_fn, target=self.target)


def _tails(model: nn.Module) -> Dict[int, nn.Module]:
    """id(child) -> nn.Sequential of the modules after it, for every child of every Sequential."""
    out: Dict[int, nn.Module] = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            kids = list(seq.children())
            for k, m in enumerate(kids):
                out.setdefault(id(m), nn.Sequential(*kids[k + 1:]))
    return out


@contextlib.contextmanager
def loss_nudge(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               target: torch.Tensor) -> Iterator[None]:
    """Calls made within this context of blocks of ``model`` with ``EP(nudge="loss")`` are nudged
    in their backward by ``loss_fn(readout(s_top), target)`` (see the module doc). ``loss_fn`` must be the loss whose
    gradient is back-propagated (the backward checks that its force at s* is the incoming delta)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"loss_nudge: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_nudge: loss_fn must be callable, got {type(loss_fn).__name__}")
    token = _ACTIVE.set(_Active(model, loss_fn, target))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_cost(block: nn.Module) -> Optional[LossCost]:
    """The loss cost of a call of ``block`` made now, None outside :func:`loss_nudge`."""
    act = _ACTIVE.get()
    return None if act is None else act.cost(block)
