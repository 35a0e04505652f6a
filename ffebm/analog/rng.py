"""Random numbers for the analog simulation: seeded generators and draws on any device.

Every random draw of the analog package (device-to-device spread, cycle-to-cycle pulse noise,
pulse bits, write and read noise, programming noise and drift) goes through :func:`randn` /
:func:`rand` with an explicit ``torch.Generator``, so that the same seed gives the same numbers.
A generator may live on another device than the tensor being drawn for (a CPU generator for a
CUDA tile): the numbers are then drawn where the generator lives and moved, so the stream does
not depend on where the tensors are.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["make_generator", "fork_generator", "randn", "rand"]


def make_generator(seed: Optional[int], device: Any = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU if None), seeded from ``seed``; with ``seed=None``
    the seed is drawn from torch's global RNG (so ``torch.manual_seed`` makes runs repeatable)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=dev)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    g.manual_seed(int(seed))
    return g


def fork_generator(generator: torch.Generator, device: Any) -> torch.Generator:
    """A new generator on ``device`` seeded from one draw of ``generator`` (generator states do
    not carry across device types; this keeps a run reproducible when its tensors move)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    return make_generator(seed, device)


def randn(shape: Sequence[int], generator: Optional[torch.Generator], like: Tensor, std: float = 1.0) -> Tensor:
    """Normal draws ``N(0, std^2)`` of ``shape`` on ``like``'s device and dtype, from ``generator``
    (torch's global RNG if None); scaled in the draw (one pass instead of a draw and a product)."""
    dev = like.device
    if generator is not None and generator.device.type != dev.type:
        return torch.empty(shape, device=generator.device, dtype=like.dtype).normal_(0.0, std, generator=generator).to(dev)
    if std == 1.0:
        return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype)
    return torch.empty(shape, device=dev, dtype=like.dtype).normal_(0.0, std, generator=generator)


def rand(shape: Sequence[int], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Uniform draws ``U[0, 1)`` of ``shape`` on ``like``'s device and dtype, from ``generator``
    (torch's global RNG if None)."""
    dev = like.device
    if generator is not None and generator.device.type != dev.type:
        return torch.rand(shape, generator=generator, device=generator.device,
                          dtype=like.dtype).to(dev)
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype)
