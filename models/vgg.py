"""VGG-style ff-EBMs: a deep Hopfield conv net split into energy blocks.

A flat list of layers (conv layers with their pooling, then dense layers) is cut into blocks of
the given sizes. Each block's first layer is driven by conv -> pool -> batch norm of the
previous block's output (its input map: the feedforward transition folded into the first
coupling); inside a block, layers are coupled by conv + pool (or dense) couplings. The last
block's top layer is linear and gives the logits.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn as nn

import ffebm


def vgg_ffebm(channels: Sequence[int], pools: Sequence[str], dense: Sequence[int], split: Sequence[int],
              num_classes: int = 10, in_channels: int = 3, image_size: int = 32, beta: float = 0.2, t1: int = 60,
              t2: int = 20, tol: Optional[float] = None, gain: float = 1.0, method: str = "ep",
              variant: str = "centered", mode: str = "async", pool_override: Optional[str] = None,
              precision: Optional[str] = None, pool_winners: str = "live") -> nn.Module:
    """Build the ff-EBM.

    channels/pools: one entry per conv layer (pool after that layer's conv: "max", "avg", "soft"
    or "none"); dense: hidden dense sizes before the ``num_classes`` output layer; split: number
    of layers per block (sums to len(channels) + len(dense) + 1). ``pool_override`` replaces
    every "max" (e.g. "avg" for a smooth energy). ``precision="bfloat16"`` relaxes under bf16
    autocast with full-precision polish steps (about twice the conv throughput).
    ``pool_winners="free"``: EP keeps the free phase's max-pool winners (see :class:`ffebm.EP`).
    """
    pools = [pool_override if (pool_override and p == "max") else p for p in pools]
    layers: List[tuple] = [("conv", c, p) for c, p in zip(channels, pools)]
    layers += [("dense", d, None) for d in dense] + [("dense", num_classes, None)]
    if sum(split) != len(layers):
        raise ValueError(f"split {list(split)} must sum to the number of layers ({len(layers)})")
    ffebm.gradients.method_from_name(method, pool_winners=pool_winners)  # an unknown name fails here, before any layer is built

    def grad():
        return ffebm.gradients.method_from_name(method, beta=beta, variant=variant, steps=t2,
                                                pool_winners=pool_winners)
    relax = ffebm.Relaxation(steps=t1, tol=tol, mode=mode, precision=precision)
    nudge = ffebm.Relaxation(steps=t2, tol=None, mode=mode, precision=precision)
    blocks: List[nn.Module] = []
    c_in, size, start = in_channels, image_size, 0
    for k, n in enumerate(split):
        part = layers[start:start + n]
        start += n
        convs = [l for l in part if l[0] == "conv"]
        dens = [l[1] for l in part if l[0] == "dense"]
        last = k == len(split) - 1
        if convs:
            blk = ffebm.ConvHopfield(c_in, size, [l[1] for l in convs], pool=[l[2] for l in convs], dense=dens,
                                     input_bn=True, gain=gain, linear_top=last, relaxation=relax,
                                     nudge_relaxation=nudge, gradient=grad(), name=f"block{k + 1}")
            top = blk.layer_shapes[-1]
            if len(top) == 3:
                c_in, size = top[0], top[1]
        else:  # a block of dense layers only: flatten the previous block's output
            n_in = c_in * size * size if blocks and len(blocks[-1].layer_shapes[-1]) == 3 else c_in
            blk = ffebm.DenseHopfield([n_in, *dens], gain=gain, linear_top=last, relaxation=relax,
                                      nudge_relaxation=nudge, gradient=grad(), name=f"block{k + 1}")
        blocks.append(blk)
    return nn.Sequential(*blocks)
