"""Warm starts from the previous equilibrium: a sample's free relaxation starts where its last one ended.

    starts = ffebm.WarmStarts(num_samples=len(train_set))
    for idx, x, y in batches:                      # idx: the samples' indices in the data set
        with ffebm.warm_start(starts, idx):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

Between two visits of a sample the weights move by a few optimiser steps, so its last free
equilibrium s*(x; theta_old) is close to the new one s*(x; theta) and a relaxation stopped by a
tolerance (``Relaxation(tol=...)``) needs fewer sweeps from there than from zeros. The fixed point
is the same, so EP's, Implicit's and Unrolled's gradients are those of the same equilibrium up to
the solve tolerance; for a block with several equilibria per input (strong couplings, max
pooling) the relaxation may settle in another one than from zeros, as with any other start.

A :class:`WarmStarts` object is the explicit, typed holder of these states (one tensor per layer
of each energy block, ``[num_samples, *layer_shape]``, on the block's device, allocated at the
block's first call); nothing is kept on the model. :func:`warm_start` makes it and the batch's
indices known to the block calls made inside it (a context variable, as ``ffebm.loss_nudge``):
each block's free relaxation in training mode starts from the stored states of the samples seen
before (the others as the block's ``Relaxation.init`` says) and stores its free equilibrium; a
block called twice in one pass keeps one set of states per call. Nudged phases start from the
free equilibrium as always. Outside the context, and in eval mode, blocks start as usual; a
block called on another number of samples than the indices raises ``ValueError``.
"""
from __future__ import annotations

import contextlib
import operator
import weakref
from contextvars import ContextVar
from typing import Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["WarmStarts", "WarmStartTooLarge", "warm_start", "active_warm_start"]


class WarmStartTooLarge(ValueError):
    """The states of one block for the whole data set would exceed ``WarmStarts.max_bytes``."""


class WarmStarts:
    """Per-sample free equilibria of every energy block, for :func:`warm_start`.

    ``num_samples``: size of the data set the indices refer to. ``max_bytes`` (default 2 GiB):
    refuse (:class:`WarmStartTooLarge`, naming the sizes) a block whose states for the whole data set would
    take more. ``hits`` / ``misses`` count samples that started from a stored state / not.
    """

    def __init__(self, num_samples: int, max_bytes: int = 2 ** 31) -> None:
        num_samples, max_bytes = _positive_int("num_samples", num_samples), _positive_int("max_bytes", max_bytes)
        self.num_samples, self.max_bytes = num_samples, max_bytes
        # block -> {k: (states, seen)}: k counts the block's calls within one forward pass (a block
        # called twice per pass keeps one set of states per call)
        self._blocks: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[int, Tuple[List[torch.Tensor], torch.Tensor]]]" = \
            weakref.WeakKeyDictionary()
        self.hits = 0
        self.misses = 0

    def _slot(self, block, call: int, like: List[torch.Tensor]):
        slots = self._blocks.setdefault(block, {})
        slot = slots.get(call)
        shapes = [tuple(t.shape[1:]) for t in like]
        if slot is not None and [tuple(t.shape[1:]) for t in slot[0]] == shapes \
                and slot[0][0].dtype == like[0].dtype and slot[0][0].device == like[0].device:
            return slot
        size = sum(self.num_samples * t[0].numel() * t.element_size() for t in like)
        if size > self.max_bytes:
            raise WarmStartTooLarge(f"WarmStarts: block '{getattr(block, 'name', type(block).__name__)}' needs "
                             f"{size / 2 ** 20:.0f} MiB for the states of {self.num_samples} samples "
                             f"(layers {shapes}), more than max_bytes={self.max_bytes / 2 ** 20:.0f} MiB")
        slot = ([torch.zeros((self.num_samples, *s), dtype=like[0].dtype, device=like[0].device) for s in shapes],
                torch.zeros(self.num_samples, dtype=torch.bool, device=like[0].device))
        slots[call] = slot
        return slot

    def initial(self, block, indices: torch.Tensor, fallback: List[torch.Tensor], call: int = 0) -> List[torch.Tensor]:
        """The start of a free relaxation of ``block`` (its ``call``-th call in the forward pass)
        for the samples ``indices``: the stored states where a sample was seen, ``fallback`` (the
        block's usual start) elsewhere."""
        states, seen = self._slot(block, call, fallback)
        idx = indices.to(seen.device)
        known = seen[idx]
        n_known = int(known.sum())
        self.hits += n_known
        self.misses += idx.numel() - n_known
        if n_known == 0:
            return fallback
        out = []
        for store, f in zip(states, fallback):
            rows = store.index_select(0, idx)
            mask = known.view(-1, *([1] * (f.dim() - 1)))
            out.append(torch.where(mask, rows.to(f.dtype), f))
        return out

    def store(self, block, indices: torch.Tensor, free: List[torch.Tensor], call: int = 0) -> None:
        """Keep ``free`` (the free equilibrium of the ``call``-th call for the samples ``indices``)."""
        states, seen = self._slot(block, call, free)
        idx = indices.to(seen.device)
        for store, s in zip(states, free):
            store.index_copy_(0, idx, s.detach().to(store.dtype))
        seen[idx] = True

    def clear(self) -> None:
        """Forget every stored state (e.g. after loading other weights)."""
        self._blocks = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return (f"WarmStarts(num_samples={self.num_samples}, blocks={len(self._blocks)}, hits={self.hits}, "
                f"misses={self.misses})")


def _positive_int(name: str, v) -> int:
    """``v`` as a positive int (Python, numpy and 0-d torch integers); ValueError otherwise."""
    try:
        if isinstance(v, bool):
            raise TypeError
        n = operator.index(v)
    except TypeError:
        raise ValueError(f"WarmStarts: {name} must be a positive integer, got {v!r}") from None
    if n < 1:
        raise ValueError(f"WarmStarts: {name} must be a positive integer, got {v!r}")
    return n


class _Active:
    """The warm start of one ``with warm_start(...)``: the states, the batch's indices and how
    often each block was called inside (a block called twice per pass keeps two sets)."""

    __slots__ = ("starts", "indices", "calls")

    def __init__(self, starts: WarmStarts, indices: torch.Tensor) -> None:
        self.starts, self.indices = starts, indices
        self.calls: Dict[int, int] = {}

    def next_call(self, block) -> int:
        k = self.calls.get(id(block), 0)
        self.calls[id(block)] = k + 1
        return k


_ACTIVE: ContextVar[Optional[_Active]] = ContextVar("ffebm_warm_start", default=None)


@contextlib.contextmanager
def warm_start(starts: WarmStarts, indices) -> Iterator[None]:
    """Inside: every energy block called on a batch of ``len(indices)`` samples starts its free
    relaxation from ``starts`` (see the module docstring). ``indices``: the batch's sample
    indices in ``[0, starts.num_samples)`` (1-d integers, no repeats)."""
    if not isinstance(starts, WarmStarts):
        raise TypeError(f"warm_start: starts must be a WarmStarts, got {type(starts).__name__}")
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"warm_start: indices must be a 1-d tensor of integers, got {idx.dtype} {list(idx.shape)}")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= starts.num_samples):
        raise ValueError(f"warm_start: indices must lie in [0, {starts.num_samples}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    if idx.numel() != torch.unique(idx).numel():
        raise ValueError("warm_start: indices repeat a sample (its stored state would be ambiguous)")
    token = _ACTIVE.set(_Active(starts, idx))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_warm_start(block, batch_size: int) -> Optional[Tuple[WarmStarts, torch.Tensor, int]]:
    """``(starts, indices, call)`` for a call of ``block`` on ``batch_size`` samples inside
    :func:`warm_start` (``call``: how many calls of ``block`` came before it in the context), None
    outside. A batch of another size than the indices raises ``ValueError`` (the indices would
    not say which sample is which)."""
    act = _ACTIVE.get()
    if act is None:
        return None
    if act.indices.numel() != batch_size:
        raise ValueError(f"warm_start: block '{getattr(block, 'name', type(block).__name__)}' was called on "
                         f"{batch_size} samples inside a warm_start of {act.indices.numel()} indices")
    return act.starts, act.indices, act.next_call(block)
