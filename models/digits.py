"""Models for scikit-learn's digits (8x8 grey images, 10 classes): the default ff-EBM, a plain DHN and
the ff-EBM's same-size MLP baseline."""
from __future__ import annotations

import inspect

from typing import Optional

import torch.nn as nn

import ffebm


def _method(method: str, beta: float, variant: str, t2: int, pool_winners: str = "live"):
    return ffebm.gradients.method_from_name(method, beta=beta, variant=variant, steps=t2, pool_winners=pool_winners)


ARCHS = ("dense", "conv")


def digits_ffebm(hidden: int = 512, width: int = 256, beta: float = 0.5, t1: int = 40, t2: int = 12,
                 tol: float = 1e-4, method: str = "ep", variant: str = "centered", num_classes: int = 10,
                 in_features: int = 64, gain: float = 0.5, average_last: int = 0, arch: str = "dense",
                 init_gain: float = 1.0, dropout: float = 0.0, pool: str = "avg",
                 pool_winners: str = "live") -> nn.Module:
    """The default ff-EBM: energy block -> digital layer -> energy block -> digital readout.

        arch="dense":  x[64] -> DenseHopfield(64, hidden, width) -> Linear + ReLU
                             -> DenseHopfield(width, width, width/2) -> Linear(width/2, classes)
        arch="conv":   x[1x8x8] -> ConvHopfield(conv 1->16 + batch norm, 2x2 avg pool, coupling 16->32
                             with 2x2 avg pool) -> Flatten -> Linear(128, width) + ReLU -> (the rest as above)

    ``pool`` ("avg", "max" or "soft", conv only): the two pools of the conv block (the coupling's
    lies inside the energy); ``pool_winners="free"``: EP keeps the free phase's max-pool winners
    through the nudged phases (see :class:`ffebm.EP`; no effect without a max pool in an energy).

    (``hidden`` is not used by ``arch="conv"``.)  ``dropout`` > 0: dropout on the digital layer's
    output, the input of block 2 (training only; backprop through it, EP inside the blocks).  Weights start ~ N(0, (init_gain / sqrt(fan_in))^2).  ``average_last`` > 0: every relaxation (free and
    nudged) returns the mean state over its last ``average_last`` steps (averages the read noise of
    blocks on analog tiles; 0: the last state).  On tiles, the conv block's coupling becomes an
    ``AnalogConvCoupling`` and its input conv an ``AnalogConv2d``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    if pool not in ("avg", "max", "soft"):
        raise ValueError(f"pool={pool!r}: expected one of avg, max, soft")
    if arch != "conv" and pool != "avg":
        raise ValueError(f"pool={pool!r} applies to arch='conv' only (the dense blocks do not pool)")
    grad = _method(method, beta, variant, t2, pool_winners)
    kw = dict(gain=gain, steps=t1, tol=tol, nudge_steps=t2, gradient=grad, init_gain=init_gain)
    if average_last:
        kw.update(relaxation=ffebm.Relaxation(steps=t1, tol=tol, average_last=average_last),
                  nudge_relaxation=ffebm.Relaxation(steps=t2, tol=None, average_last=average_last))
    if arch == "conv":
        if in_features != 64:
            raise ValueError(f"arch='conv' takes 8x8 images (in_features=64), got in_features={in_features}")
        head = [nn.Unflatten(1, (1, 8, 8))]   # flat or image input alike
        b1 = nn.Sequential(nn.Flatten(), *head,
                           ffebm.ConvHopfield(1, (8, 8), [16, 32], pool=pool, name="block1", **kw),
                           nn.Flatten(), nn.Linear(128, width), nn.ReLU())
    else:
        b1 = ffebm.DenseHopfield([in_features, hidden, width], name="block1", **kw)
    b2 = ffebm.DenseHopfield([width, width, width // 2], name="block2", **kw)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")
    drop = [nn.Dropout(dropout)] if dropout > 0 else []  # on the digital layer's output (training only)
    return nn.Sequential(b1, nn.Linear(width, width), nn.ReLU(), *drop, b2, nn.Linear(width // 2, num_classes))


def digits_conv(arch: str = "conv", pool: str = "max", **kw) -> nn.Module:
    """The default recipe's model: :func:`digits_ffebm` with a convolutional first block whose
    pools (the input map's and the coupling's, inside the energy) are 2x2 max pools.  Takes every
    option of :func:`digits_ffebm`."""
    if arch != "conv":
        raise ValueError(f"arch={arch!r}: digits_conv is the conv model (for the dense one use model=digits)")
    return digits_ffebm(arch=arch, pool=pool, **kw)


# its options are digits_ffebm's (model_options are checked against the signature)
digits_conv.__signature__ = inspect.signature(digits_ffebm).replace(parameters=[
    p.replace(default={"arch": "conv", "pool": "max"}.get(p.name, p.default))
    for p in inspect.signature(digits_ffebm).parameters.values()])


def digits_dhn(hidden: int = 256, beta: float = 0.5, t1: int = 60, t2: int = 15, tol: float = 1e-4,
               method: str = "ep", variant: str = "centered", num_classes: int = 10, in_features: int = 64,
               gain: float = 0.5) -> nn.Module:
    """A plain Deep Hopfield Network: one energy block whose linear top layer gives the logits."""
    grad = _method(method, beta, variant, t2)
    blk = ffebm.DenseHopfield([in_features, hidden, hidden // 2, num_classes], gain=gain, linear_top=True,
                              steps=t1, tol=tol, nudge_steps=t2, gradient=grad, name="dhn")
    return nn.Sequential(blk)


def digits_mlp(hidden: int = 512, width: int = 256, num_classes: int = 10, in_features: int = 64,
               dropout: float = 0.0, beta: Optional[float] = None, t1: Optional[int] = None,
               t2: Optional[int] = None, method: Optional[str] = None, variant: Optional[str] = None) -> nn.Module:
    """The digital baseline of :func:`digits_ffebm`: a feedforward MLP with the same weight layers,

        x[64] -> Linear(64, hidden) -> Linear(hidden, width) -> Linear(width, width)
              -> Linear(width, width) -> Linear(width, width/2) -> Linear(width/2, classes)

    with a ReLU after each hidden layer (64-512-256-256-256-128-10 by default: the ff-EBM's two
    input maps, two couplings, digital layer and readout, as plain layers; the same number of
    parameters). Trained by backprop. ``beta``, ``t1``, ``t2``, ``method`` and ``variant`` are
    accepted and ignored (an MLP has no energy block), so that ``model=digits_mlp`` runs with the
    digits recipes. ``dropout`` > 0: dropout after each hidden ReLU (training only)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")
    sizes = [in_features, hidden, width, width, width, width // 2]
    layers: list = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)
