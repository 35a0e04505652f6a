"""Helpers for models that contain energy blocks."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch.nn as nn

from .blocks.base import EnergyBlock


def energy_blocks(model: nn.Module) -> Iterator[Tuple[str, EnergyBlock]]:
    """Yield (name, block) for every energy block in ``model``; unnamed blocks take their path."""
    for path, mod in model.named_modules():
        if isinstance(mod, EnergyBlock):
            if mod.block_name is None:
                mod.block_name = path or type(mod).__name__
            yield mod.name, mod


def set_gradient(model: nn.Module, method) -> nn.Module:
    """Give every energy block of ``model`` the same gradient method (shared object)."""
    for _, blk in energy_blocks(model):
        blk.gradient = method
    return model


def block_stats(model: nn.Module) -> dict:
    """{block name: last free-solve SolveStats} for logging."""
    return {name: blk.stats for name, blk in energy_blocks(model) if blk.stats is not None}
