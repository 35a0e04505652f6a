"""Models for scikit-learn's digits (8x8 grey images, 10 classes): the default ff-EBM and a plain DHN."""
from __future__ import annotations

import torch.nn as nn

import ffebm


def _method(method: str, beta: float, variant: str, t2: int):
    if method == "ep":
        return ffebm.EP(beta=beta, variant=variant, steps=t2)
    if method == "implicit":
        return ffebm.Implicit(tol=1e-6, max_iter=200)
    if method == "unrolled":
        return ffebm.Unrolled(steps=t2)
    raise ValueError(f"method must be one of ('ep', 'implicit', 'unrolled'), got {method!r}")


def digits_ffebm(hidden: int = 512, width: int = 256, beta: float = 0.5, t1: int = 40, t2: int = 12,
                 tol: float = 1e-4, method: str = "ep", variant: str = "centered", num_classes: int = 10,
                 in_features: int = 64, gain: float = 0.5, **_: object) -> nn.Module:
    """The default ff-EBM: energy block -> digital layer -> energy block -> digital readout.

        x[64] -> DenseHopfield(64, hidden, width) -> Linear + ReLU -> DenseHopfield(width, width, width/2)
              -> Linear(width/2, classes)
    """
    grad = _method(method, beta, variant, t2)
    b1 = ffebm.DenseHopfield([in_features, hidden, width], gain=gain, steps=t1, tol=tol, nudge_steps=t2,
                             gradient=grad, name="block1")
    b2 = ffebm.DenseHopfield([width, width, width // 2], gain=gain, steps=t1, tol=tol, nudge_steps=t2,
                             gradient=grad, name="block2")
    return nn.Sequential(b1, nn.Linear(width, width), nn.ReLU(), b2, nn.Linear(width // 2, num_classes))


def digits_dhn(hidden: int = 256, beta: float = 0.5, t1: int = 60, t2: int = 15, tol: float = 1e-4,
               method: str = "ep", variant: str = "centered", num_classes: int = 10, in_features: int = 64,
               gain: float = 0.5, **_: object) -> nn.Module:
    """A plain Deep Hopfield Network: one energy block whose linear top layer gives the logits."""
    grad = _method(method, beta, variant, t2)
    blk = ffebm.DenseHopfield([in_features, hidden, hidden // 2, num_classes], gain=gain, linear_top=True,
                              steps=t1, tol=tol, nudge_steps=t2, gradient=grad, name="dhn")
    return nn.Sequential(blk)
