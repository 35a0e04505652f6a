"""Analog training on several processes (DDP / torchrun): pulsed updates instead of all-reduce.

DDP averages dense gradients; analog weights have none (their updates are pulse pairs recorded
in each weight's :class:`~ffebm.analog.context.AnalogContext`). Keep the analog weights out of
DDP (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``), then after each
backward call :func:`gather_pairs` before ``AnalogOptimizer.step()``: every process then pulses
the same global update and, with the optimiser's pulse generator seeded alike, the tiles stay
identical without being sent; :func:`tiles_in_sync` checks it cheaply.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["gather_pairs", "tiles_in_sync"]


# ------------------------------------------------------------------------------------------
def gather_pairs(params: List[nn.Parameter], world: int) -> None:
    """Make every process pulse the same, global update.

    Each process's backward recorded its own pulsed-update pairs ``(x_b, d_b)`` (local batch).
    DDP would average dense gradients over processes; the pulsed equivalent is to pulse the
    pairs of *all* processes, with ``d`` divided by the number of processes:
    ``sum_r sum_b (d_rb / R) x_rb^T`` is the mean of the per-process updates. The pairs are
    all-gathered (padded to the largest count), so every process hands its
    :class:`~ffebm.analog.AnalogOptimizer` the same pairs; with the optimiser's pulse generator
    seeded alike everywhere, the tiles stay identical on every process without being sent.
    """

    for p in params:
        actx = p.analog_ctx
        tile = actx.tile
        pair = actx.pending()
        if pair is not None:
            x = pair[0].reshape(-1, tile.in_size)
            d = pair[1].reshape(-1, tile.out_size).to(x.dtype)
        else:
            x = p.detach().new_zeros(0, tile.in_size)
            d = p.detach().new_zeros(0, tile.out_size)
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        m = max(counts)
        if m == 0:
            continue

        def padded(t):
            return torch.cat([t, t.new_zeros(m - t.shape[0], t.shape[1])]) if t.shape[0] < m else t.contiguous()

        xs = [x.new_empty(m, x.shape[1]) for _ in range(world)]
        ds = [d.new_empty(m, d.shape[1]) for _ in range(world)]
        dist.all_gather(xs, padded(x))
        dist.all_gather(ds, padded(d))
        X = torch.cat([t[:c] for t, c in zip(xs, counts)])
        Dm = torch.cat([t[:c] for t, c in zip(ds, counts)]) / world
        actx.replace(X, Dm)


def tiles_in_sync(params: List[nn.Parameter], device) -> bool:
    """Whether every process holds the same tile states (a float64 checksum compared by
    all-reduce MIN / MAX); pulses are identical everywhere unless something drew on a
    process-local random stream (e.g. write noise)."""

    s = torch.zeros(2, dtype=torch.float64, device=device)
    for k, p in enumerate(params):
        w = p.analog_ctx.tile.tile_weights().to(device=device, dtype=torch.float64)
        s[0] += w.sum() + (k + 1) * w.abs().sum()
        s[1] += (w * w).sum()
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
