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


def block_stats(model: nn.Module) -> dict:
    """{block name: last free-solve SolveStats} for logging."""
    return {name: blk.stats for name, blk in energy_blocks(model) if blk.stats is not None}
