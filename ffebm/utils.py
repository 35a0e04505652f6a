"""Helpers for models that contain energy blocks."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import torch
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


def set_precision(model: nn.Module, precision: Optional[torch.dtype]) -> nn.Module:
    """Relax every energy block of ``model`` (free and nudged phases) under autocast to
    ``precision`` (e.g. ``torch.bfloat16``), with the blocks' full-precision polish steps; ``None``:
    in the input's precision.  Each block's :class:`~ffebm.Relaxation` settings are replaced, not
    edited in place (presets share one settings object between blocks)."""
    for _, blk in energy_blocks(model):
        blk.relaxation = dataclasses.replace(blk.relaxation, precision=precision)
        blk.nudge_relaxation = dataclasses.replace(blk.nudge_relaxation, precision=precision)
    return model


def set_acceleration(model: nn.Module, init: str = "zeros", overrelax: float = 1.0, anderson: int = 0) -> nn.Module:
    """Start and accelerate every energy block's *free* relaxation (see :mod:`ffebm.acceleration`):
    ``init`` "zeros" | "feedforward", over-relaxation ``overrelax`` in (0, 2), Anderson mixing over
    ``anderson`` sweeps (0: off). The nudged phases keep their settings: they start from the free
    equilibrium and run EP's fixed T2 schedule, whose trajectory the estimate is read off.
    Settings are replaced, not edited in place (presets share one settings object)."""
    for _, blk in energy_blocks(model):
        blk.relaxation = dataclasses.replace(blk.relaxation, init=init, overrelax=float(overrelax), anderson=int(anderson))
    return model


def block_stats(model: nn.Module) -> dict:
    """{block name: last free-solve SolveStats} for logging."""
    return {name: blk.stats for name, blk in energy_blocks(model) if blk.stats is not None}
