"""Small models and references shared by the engine tests."""
from __future__ import annotations

import torch
import torch.nn as nn

import ffebm


def tight(steps: int = 3000, tol: float = 1e-13, mode: str = "async") -> ffebm.Relaxation:
    return ffebm.Relaxation(steps=steps, tol=tol, mode=mode, strict=True)


def hybrid_dense(seed: int = 0, gradient=None, linear_top: bool = True) -> nn.Module:
    """digital -> energy block -> digital -> energy block -> digital readout, float64."""
    torch.manual_seed(seed)
    nudge = ffebm.Relaxation(steps=3000, tol=1e-13, strict=True)
    b1 = ffebm.DenseHopfield([6, 10, 7], gain=0.5, init_gain=1.5, relaxation=tight(), nudge_relaxation=nudge,
                             gradient=gradient or ffebm.Implicit(tol=1e-12))
    b2 = ffebm.DenseHopfield([7, 9, 5], gain=0.5, init_gain=0.8, linear_top=linear_top, relaxation=tight(),
                             nudge_relaxation=nudge, gradient=gradient or ffebm.Implicit(tol=1e-12))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), b1, nn.Linear(7, 7), nn.Tanh(), b2, nn.Linear(5, 3))
    with torch.no_grad():  # biases so that some units saturate and some are free
        for blk in (b1, b2):
            for c in blk.couplings:
                c.bias.add_(0.5)
    model.double()
    list(ffebm.energy_blocks(model))
    return model


def hybrid_conv(seed: int = 0, pool: str = "avg", gradient=None) -> nn.Module:
    """conv energy block -> digital conv -> conv energy block with a dense top -> readout."""
    torch.manual_seed(seed)
    nudge = ffebm.Relaxation(steps=3000, tol=1e-13, strict=True)
    b1 = ffebm.ConvHopfield(2, 8, [3, 4], pool=[pool, pool], input_bn=False, init_gain=1.5, relaxation=tight(),
                            nudge_relaxation=nudge, gradient=gradient or ffebm.Implicit(tol=1e-12))
    b2 = ffebm.ConvHopfield(4, 2, [4, 3], pool="none", dense=[4], input_bn=False, init_gain=1.5,
                            linear_top=True, relaxation=tight(), nudge_relaxation=nudge,
                            gradient=gradient or ffebm.Implicit(tol=1e-12))
    model = nn.Sequential(b1, nn.Conv2d(4, 4, 1), nn.Tanh(), b2, nn.Linear(4, 3))
    model.double()
    list(ffebm.energy_blocks(model))
    return model


def batch(n: int = 4, shape=(5,), classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def finite_difference(model, x, y, name: str, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the loss w.r.t. one parameter (or the input if name == '<input>')."""
    target = x if name == ffebm.compare.INPUT else dict(model.named_parameters())[name]
    grad = torch.zeros_like(target)
    flat = target.data.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            lp = loss_fn(model(x), y).item()
            flat[i] = old - eps
            lm = loss_fn(model(x), y).item()
            flat[i] = old
            grad.view(-1)[i] = (lp - lm) / (2 * eps)
    return grad
