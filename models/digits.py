"""Models for scikit-learn's digits (8x8 grey images, 10 classes): the default ff-EBM and a plain DHN."""
from __future__ import annotations

import torch.nn as nn

import ffebm


def _method(method: str, beta: float, variant: str, t2: int):
    return ffebm.gradients.method_from_name(method, beta=beta, variant=variant, steps=t2)


def digits_ffebm(hidden: int = 512, width: int = 256, beta: float = 0.5, t1: int = 40, t2: int = 12,
                 tol: float = 1e-4, method: str = "ep", variant: str = "centered", num_classes: int = 10,
                 in_features: int = 64, gain: float = 0.5, average_last: int = 0, **_: object) -> nn.Module:
    """The default ff-EBM: energy block -> digital layer -> energy block -> digital readout.

        x[64] -> DenseHopfield(64, hidden, width) -> Linear + ReLU -> DenseHopfield(width, width, width/2)
              -> Linear(width/2, classes)

    ``average_last`` > 0: every relaxation (free and nudged) returns the mean state over its last
    ``average_last`` steps (averages the read noise of blocks on analog tiles; 0: the last state).
    """
    grad = _method(method, beta, variant, t2)
    kw = dict(gain=gain, steps=t1, tol=tol, nudge_steps=t2, gradient=grad)
    if average_last:
        kw.update(relaxation=ffebm.Relaxation(steps=t1, tol=tol, average_last=average_last),
                  nudge_relaxation=ffebm.Relaxation(steps=t2, tol=None, average_last=average_last))
    b1 = ffebm.DenseHopfield([in_features, hidden, width], name="block1", **kw)
    b2 = ffebm.DenseHopfield([width, width, width // 2], name="block2", **kw)
    return nn.Sequential(b1, nn.Linear(width, width), nn.ReLU(), b2, nn.Linear(width // 2, num_classes))


def digits_dhn(hidden: int = 256, beta: float = 0.5, t1: int = 60, t2: int = 15, tol: float = 1e-4,
               method: str = "ep", variant: str = "centered", num_classes: int = 10, in_features: int = 64,
               gain: float = 0.5, **_: object) -> nn.Module:
    """A plain Deep Hopfield Network: one energy block whose linear top layer gives the logits."""
    grad = _method(method, beta, variant, t2)
    blk = ffebm.DenseHopfield([in_features, hidden, hidden // 2, num_classes], gain=gain, linear_top=True,
                              steps=t1, tol=tol, nudge_steps=t2, gradient=grad, name="dhn")
    return nn.Sequential(blk)
