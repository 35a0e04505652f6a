"""``AnalogContext``: the one interface between an analog weight, the gradient that records its
pulsed update, the optimizer that applies it and the multi-process gather.

An analog weight (``layer.weight`` of :class:`AnalogLinear`, :class:`AnalogConv2d`, analog
energy couplings) is not updated from a dense ``.grad`` but from *pairs* ``(x, d)``: the
update is ``W -= lr * sum_b d_b x_b^T``, applied as pulsed outer products. The pairs are
recorded here, exactly when torch would accumulate a gradient into the weight's ``.grad``
(``loss.backward()``; not ``torch.autograd.grad(out, x)``, not ``no_grad``), and consumed by the
:class:`~ffebm.analog.optimizer.AnalogOptimizer` that owns the weight:

    ctx = layer.weight.analog_ctx      # AnalogContext
    ctx.tile                           # the AnalogTile holding W
    ctx.pending()                      # (X, D) recorded since the last step / zero_grad, or None
    ctx.optimizer                      # the AnalogOptimizer that pulses this weight (or None)

Pairs can only be applied by an :class:`AnalogOptimizer` (a torch optimizer cannot pulse a
tile). Recorded while none owns the weight, they are kept (an optimizer created after a first
backward still applies them) but bounded: when a torch optimizer steps a weight that no
AnalogOptimizer owns, or more than ``UNOWNED_LIMIT`` backward passes pile up without an owner,
the pairs are dropped with a one-time :class:`UnownedAnalogWeight` warning saying that analog
weights need an AnalogOptimizer. An owned weight that records more than ``OWNED_LIMIT``
backward passes without a ``step()`` or ``zero_grad()`` (input-saliency loops that call
``loss.backward()``) has its pending pairs folded into their dense sum ``(I, G^T)`` (the same
update, the size of the weight), with a one-time warning. The optimizer's algorithm runtime (a Tiki-Taka fast array that
the reads also see) is published here too, as ``runtime``.

Copies (``copy.deepcopy`` of a model, pickling) keep the tile and drop the pending pairs, the
owner and the runtime: they belong to one training loop, not to the weights.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["AnalogContext", "UnownedAnalogWeight"]

Pair = Tuple[Tensor, Tensor]


UNOWNED_LIMIT = 64  # recorded backward passes kept for a weight no AnalogOptimizer owns
OWNED_LIMIT = 64    # recorded backward passes before an owned weight's pairs are folded


class UnownedAnalogWeight(UserWarning):
    """An analog weight recorded an update but no AnalogOptimizer owns it (the update is dropped)."""


class AnalogContext:
    """What an analog weight's layer recorded for its optimizer (see the module docstring).

    Attributes: ``tile``, ``layer`` (the layer's class name), ``runtime`` (the owning optimizer's
    algorithm state for this weight, or None).
    """

    def __init__(self, tile: Any, layer: str) -> None:
        self.tile = tile
        self.layer = layer
        self.runtime: Any = None
        self._pairs: List[Pair] = []
        self._owner: Optional[weakref.ReferenceType] = None
        self._records = 0
        self._warned = False
        self._folded_warned = False
        self._mirror: Optional[Tensor] = None  # what sync() last wrote into the weight

    # -- the mirror weight ----------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, weight: Tensor, refresh: bool = True) -> None:
        """Make ``weight`` (the layer's mirror parameter) equal to the tile, in network units.

        If ``weight`` no longer holds what the last sync wrote into it, someone wrote into it
        (``weight.data``, an in-place op under ``no_grad``, ``nn.init``, a torch optimizer's step):
        that value is programmed onto the tile first (``tile.set_weights``: clipped to the device
        bounds), so the write is applied, not silently lost at the next read. ``refresh=False``:
        only that (the weight is refreshed later, e.g. after the optimizer's pulses)."""
        tile = self.tile
        snap = self._mirror
        w = weight.detach()
        if w.numel() != tile.out_size * tile.in_size or (snap is not None and snap.shape != w.shape):
            raise ValueError(f"{self.layer}: its weight was replaced by a tensor of shape {list(w.shape)}; "
                             f"expected {list(snap.shape) if snap is not None else [tile.out_size, tile.in_size]} "
                             f"(write values with weight.copy_(...) or layer.set_weights(...))")
        if (snap is not None and snap.shape == w.shape and snap.device == w.device and snap.dtype == w.dtype
                and not torch.equal(snap, w)):
            tile.set_weights(w.reshape(tile.out_size, tile.in_size).to(tile.out_scale))
            self._mirror = None  # refresh (below or later) takes the programmed values
        if not refresh:
            return
        now = tile.get_weights()
        if weight.device != now.device:
            weight.data = weight.data.to(now.device)
        weight.data.copy_(now.reshape(weight.shape))
        if snap is not None and self._mirror is snap and snap.device == w.device and snap.dtype == w.dtype:
            snap.copy_(weight.detach())  # the same buffer, no new allocation
        else:
            self._mirror = weight.detach().clone()

    def forget_mirror(self) -> None:
        """Treat the tile as the truth at the next :meth:`sync` (after a load, a move, programming)."""
        self._mirror = None

    # -- ownership ----------------------------------------------------------------------------
    @property
    def optimizer(self) -> Any:
        """The AnalogOptimizer that pulses this weight (None if none, or if it was deleted)."""
        return self._owner() if self._owner is not None else None

    def attach(self, optimizer: Any) -> None:
        """Called by an AnalogOptimizer taking this weight (the newest one owns it)."""
        if self.optimizer is not optimizer:
            self.runtime = None
        self._owner = weakref.ref(optimizer)

    # -- pairs ----------------------------------------------------------------------------------
    def record(self, x: Tensor, d: Tensor) -> None:
        """Append the pair ``(x, d)`` (``[N, in]``, ``[N, out]``: update ``-lr d^T x``)."""
        if x.dim() != 2 or d.dim() != 2 or x.shape[0] != d.shape[0]:
            raise ValueError(f"analog pair of {self.layer}: expected x [N, in] and d [N, out], got "
                             f"{list(x.shape)} and {list(d.shape)}")
        if self.optimizer is None and self._records >= UNOWNED_LIMIT:
            self.drop_unowned(f"{UNOWNED_LIMIT} backward passes recorded pulsed updates that no AnalogOptimizer "
                              "applied")
        elif self._records >= OWNED_LIMIT:
            self._fold()
        self._pairs.append((x.detach(), d.detach()))
        self._records += 1

    def _fold(self) -> None:
        """Replace the pending pairs by their dense sum: ``sum_b d_b x_b^T = G`` as the pairs
        ``(e_j, G[:, j])`` (bounded memory; the same expected pulsed update)."""
        pair = self.pending()
        if pair is None:
            return
        x, d = pair
        if not self._folded_warned:
            self._folded_warned = True
            warnings.warn(f"{self.layer}: {self._records} backward passes recorded pulsed updates without an "
                          "AnalogOptimizer step() or zero_grad(); their pairs are folded into the dense update "
                          "(call opt.zero_grad() to discard them) (warned once per weight)", UserWarning,
                          stacklevel=4)
        g_t = x.t() @ d  # [in, out] = G^T
        self._pairs[:] = [(torch.eye(x.shape[1], dtype=x.dtype, device=x.device), g_t)]
        self._records = 1

    def drop_unowned(self, why: str) -> None:
        """Drop the pending pairs of a weight no AnalogOptimizer owns, warning once."""
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.layer}: {why}; the updates are dropped. Analog weights are trained by pulses, which "
                "only ffebm.analog.AnalogOptimizer applies: AnalogOptimizer(analog_parameters(model), ...) for "
                "them and a torch optimizer for digital_parameters(model) (warned once per weight)",
                UnownedAnalogWeight, stacklevel=3)
        self.clear()

    def record_pairs(self, pairs: List[Pair]) -> None:
        for x, d in pairs:
            self.record(x, d)

    def pending(self) -> Optional[Pair]:
        """All pairs recorded since the last :meth:`take` / :meth:`clear`, concatenated, or None."""
        if not self._pairs:
            return None
        if len(self._pairs) > 1:
            self._pairs[:] = [(torch.cat([a for a, _ in self._pairs]), torch.cat([b for _, b in self._pairs]))]
        return self._pairs[0]

    def take(self) -> Optional[Pair]:
        """:meth:`pending`, then clear."""
        out = self.pending()
        self.clear()
        return out

    def replace(self, x: Tensor, d: Tensor) -> None:
        """Replace the pending pairs by ``(x, d)`` (the multi-process gather does this)."""
        self._pairs[:] = [(x, d)]

    def clear(self) -> None:
        self._pairs.clear()
        self._records = 0

    @property
    def num_pairs(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self._pairs)

    # -- reads ----------------------------------------------------------------------------------
    def read_extra(self) -> Optional[Tensor]:
        """What the owning algorithm adds to the tile's reads (Tiki-Taka's fast array), or None."""
        return self.runtime.read_extra() if self.runtime is not None else None

    # -- copies ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # the mirror travels with the copy: a write into the weight not yet programmed onto the
        # tile is still recognised (and programmed) by the copy
        return {"tile": self.tile, "layer": self.layer, "mirror": self._mirror}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tile"], state["layer"])
        self._mirror = state.get("mirror")

    def __repr__(self) -> str:
        owner = "none" if self.optimizer is None else type(self.optimizer).__name__
        return f"AnalogContext(layer={self.layer}, pairs={self.num_pairs}, optimizer={owner})"


def _torch_optimizer_step_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Global pre-step hook of every torch optimizer: analog weights it holds that no
    AnalogOptimizer owns cannot be trained by it; their recorded pairs are dropped (bounded
    memory) with a one-time warning."""
    if getattr(optimizer, "pulses_analog_weights", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ctx = p.__dict__.get("analog_ctx") if hasattr(p, "__dict__") else None
            if isinstance(ctx, AnalogContext) and ctx.optimizer is None:
                ctx.drop_unowned(f"weight stepped by {type(optimizer).__name__}, which cannot pulse a tile (its recorded "
                                 "pulse pairs are dropped; a value the optimizer writes into the weight is "
                                 "programmed onto the tile at the next read)")


register_optimizer_step_pre_hook(_torch_optimizer_step_hook)
