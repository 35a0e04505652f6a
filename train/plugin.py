"""The fixed points at which the training loop hands control to a plug-in.

A plug-in changes how some parameters are trained without touching the loop: analog runs
(:class:`train.analog.AnalogPlugin`) put the model on tiles at build time, train the tile weights
with pulsed updates by their own optimiser, gather those updates across processes and add tile
statistics to the reports.  The loop calls, in this order::

    model = plugin.build(model)                  # after the model is built, before .to(device)
    plugin.attach(model, total_steps, steps_per_epoch)  # own parameters, optimiser, schedule
    ...                                          # the torch optimiser gets every other parameter
    for each batch:
        plugin.zero_grad()                       # with the torch optimiser's zero_grad
        loss.backward()
        problem = plugin.check_update(where)     # after backward: '' or what is wrong, in words
        plugin.step(ctx)                         # after the torch optimiser's step
        plugin.scalars()                         # every log_every steps: TensorBoard scalars
    plugin.epoch_record(ctx, device, log)        # entries of the epoch's history record
    plugin.state_dict() / load_state_dict(ck)    # top-level entries of the checkpoint

Every method has a do-nothing default, so a plug-in implements only what it needs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn


class TrainerPlugin:
    def build(self, model: nn.Module) -> nn.Module:
        """Convert the freshly built model (seeded, on the CPU); return the model to train."""
        return model

    def attach(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        """Take the parameters this plug-in trains; build its optimiser and schedule."""

    def owned_parameters(self) -> List[nn.Parameter]:
        """Parameters trained by this plug-in: the torch optimiser, gradient clipping and DDP's
        all-reduce leave them alone."""
        return []

    def zero_grad(self) -> None:
        """Drop what the previous backward left for this plug-in's optimiser."""

    def check_update(self, where: Callable[[str], str]) -> str:
        """After backward: a non-finite update, in words naming the parameter and ``where(name)``
        (the part of the model it belongs to); '' if all is well."""
        return ""

    def step(self, ctx: Any) -> None:
        """Apply this step's update (after the torch optimiser's step)."""

    def scalars(self) -> Dict[str, float]:
        """TensorBoard scalars, written every ``log_every`` steps."""
        return {}

    def epoch_record(self, ctx: Any, device: Any, log: Callable[[str], None]) -> Dict[str, Any]:
        """Entries added to the epoch's history record."""
        return {}

    def optimizers(self) -> List[Tuple[str, Any, Any]]:
        """(name, optimiser, scheduler) triples whose states a checkpoint must hold finite."""
        return []

    def state_dict(self) -> Dict[str, Any]:
        """Top-level checkpoint entries."""
        return {}

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        """Restore from the checkpoint's top-level entries (the whole checkpoint is passed)."""
