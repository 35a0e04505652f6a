"""One training step, and the preparation of the model it runs on.

:func:`prepare_model` sets the energy blocks' relaxation precision and the memory format once,
after the model is built; :func:`train_step` is the per-batch work (it *is* the trainer's
``Trainer.train_step``).  The benchmark (:mod:`train.bench.steps`) builds a :class:`Trainer` and
times this same function, so the figure it prints is the step ``python -m train`` runs.

Memory format, ``memory_format=auto`` (:func:`channels_last_wanted`): ``channels_last`` for a
digital model with 2-d convolutions on the CPU, ``contiguous`` (NCHW) otherwise.  Measured side by
side on the project's 2-core CPU, forward + backward of the L=6 three-block preset (batch 32,
interleaved, medians): channels_last was 1.1-1.2x as fast in float32 and 1.2x (1 thread) to
1.7-2.0x (2 threads) in bfloat16, where oneDNN reorders every NCHW operand of its bf16
convolutions; the digits model with a conv first block, 1.08x.  ``python -m train.bench --formats``
repeats the comparison through this step.  Not measured, so left contiguous: CUDA devices and
models on analog tiles.
"""
from __future__ import annotations

import contextlib

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import ffebm
from ffebm import RelaxationDiverged
from ffebm.errors import NonFiniteInput
from ffebm.warm_start import WarmStartTooLarge
from ffebm.couplings import ConvCoupling

from . import checkpoint as ckpt_mod
from . import failures, metrics
from .config import ConfigError, TrainConfig
from .failures import TrainingStopped

__all__ = ["PRECISIONS", "channels_last_wanted", "has_convolutions", "prepare_model", "train_step"]

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, ConvCoupling)) for m in model.modules())


def channels_last_wanted(model: nn.Module, cfg: TrainConfig, device: torch.device) -> bool:
    """The ``memory_format`` key resolved for ``model`` (the rule ``auto`` follows is in the
    module docstring)."""
    if cfg.memory_format != "auto":
        return cfg.memory_format == "channels_last" and has_convolutions(model)
    return device.type == "cpu" and not cfg.analog and has_convolutions(model)


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """Relaxation precision and memory format of a built model (on ``device``); returns the memory
    format its input batches take (see :class:`train.batches.Preprocess`)."""
    from ffebm.difference import check_before_use
    from ffebm.errors import DifferenceFormUnsupported

    for _, blk in ffebm.energy_blocks(model):
        try:
            check_before_use(blk)
        except DifferenceFormUnsupported as e:
            raise ConfigError(" ".join(str(e).split())) from None
    check_cpu_kernels(model)
    ffebm.set_precision(model, PRECISIONS[cfg.precision])
    # relax_start=previous: the trainer's warm starts (ffebm.warm_start); unseen samples start from zeros
    init = "zeros" if cfg.relax_start == "previous" else cfg.relax_start
    if (init, cfg.overrelax, cfg.anderson) != ("zeros", 1.0, 0):
        ffebm.set_acceleration(model, init=init, overrelax=cfg.overrelax, anderson=cfg.anderson)
    if channels_last_wanted(model, cfg, device):
        model.to(memory_format=torch.channels_last)
        return torch.channels_last
    return torch.contiguous_format


def check_cpu_kernels(model: torch.nn.Module) -> None:
    """The analog CPU kernels' setting (``FFEBM_CPU_KERNELS``), checked before the first step: a
    bad value, or ``fused`` where the kernels cannot be built, stops the run in words naming it
    (not as a model that cannot take its batches)."""
    from ffebm.analog import KernelUnavailable, cpu_kernels, find_analog_tiles, inference_modules

    try:
        if find_analog_tiles(model) or inference_modules(model):
            cpu_kernels()
        else:  # digital: only the value itself
            from ffebm.analog.kernels import _env_choice
            _env_choice()
    except (ValueError, KernelUnavailable) as e:
        raise ConfigError(str(e)) from None


def loss_of(t, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy (with the run's label smoothing), in float32."""
    return F.cross_entropy(logits.float(), y, label_smoothing=t.cfg.label_smoothing)


def train_step(t, xb: torch.Tensor, yb: torch.Tensor, gen: Optional[torch.Generator],
               indices: Optional[torch.Tensor] = None) -> Tuple[float, int, int, Dict[str, Tuple[float, float]]]:
    """One optimiser step of trainer ``t`` on the stored batch ``(xb, yb)``: preprocessing
    (augmentation with ``gen``, scaling, memory format), forward (every block's free relaxation),
    loss, backward (the blocks' gradient methods), the checks that stop a run in words (diverged
    relaxation, non-finite loss, gradient or parameter; a first batch the model cannot take),
    gradient clipping, the optimiser, schedule and plug-in steps.  Returns (loss, correct, count,
    {block: (relaxation steps, residual)}).

    Reads from ``t``: cfg, model (DDP-wrapped or not), core, blocks, pre, device, opt, sched,
    plugins, digital_params, ctx, global_step, last_ckpt, info; stops through ``t.stop_if``."""
    x, y = t.pre(xb, gen), yb.to(t.device)
    t.model.train()
    problem = ""
    try:
        # the loss travels with each block call, for a last block nudged by it (EP(nudge="loss")),
        # and with relax_start=previous the samples' last free equilibria (ffebm.warm_start)
        warm = (ffebm.warm_start(t.warm_starts, indices) if getattr(t, "warm_starts", None) is not None
                and indices is not None else contextlib.nullcontext())
        with ffebm.loss_nudge(t.core, lambda out, target: loss_of(t, out, target), y), warm:
            logits = t.model(x)
        loss = loss_of(t, logits, y)
        if not torch.isfinite(loss):
            problem = f"loss is {loss.item()}{failures.nonfinite_block(t.blocks)}"
    except RelaxationDiverged as e:
        problem = f"relaxation diverged in energy block '{e.block}' (relaxation step {e.step})"
    except WarmStartTooLarge as e:
        raise TrainingStopped(f"error: relax_start=previous: {e}; use another relax_start", 2) from None
    except NonFiniteInput as e:
        # the layers before the block overflowed (a diverging run): stop in words, keep the last good checkpoint
        problem = f"non-finite input to energy block '{e.block}'{failures.nonfinite_block(t.blocks)}"
    except (ValueError, RuntimeError, IndexError) as e:
        if t.global_step or t.last_ckpt is not None:
            raise
        # the very first batch: the model and the data do not fit together (a configuration error)
        raise TrainingStopped(f"error: model {t.cfg.model!r} cannot take the {t.cfg.dataset} batches "
                              f"(input {list(x.shape)}, {t.info.num_classes} classes): "
                              f"{' '.join(str(e).split())[:200]}", 2) from None
    t.stop_if(problem)
    stats = metrics.block_stats(t.blocks)
    t.opt.zero_grad(set_to_none=True)
    for p in t.plugins:
        p.zero_grad()
    try:
        loss.backward()
    except RelaxationDiverged as e:
        problem = f"relaxation diverged in the nudged phase of energy block '{e.block}' (relaxation step {e.step})"
    for pname, q in t.core.named_parameters():
        if not problem and q.grad is not None and not torch.isfinite(q.grad).all():
            problem = f"non-finite gradient of '{pname}' ({t.where(pname)})"
    for p in t.plugins:
        problem = problem or p.check_update(t.where)
    t.stop_if(problem)
    if t.cfg.grad_clip > 0:
        # exact gradients of an energy block spike where its equilibrium is close to a
        # bifurcation (the adjoint system is nearly singular); clipping keeps one such
        # batch from wrecking Adam's moment estimates (plug-in parameters are not gradients)
        torch.nn.utils.clip_grad_norm_(t.digital_params, t.cfg.grad_clip)
    try:
        t.opt.step()
        t.sched.step()
        for p in t.plugins:
            p.step(t.ctx)
    except RuntimeError as e:
        # an update too large for the parameters' dtype (e.g. lr=1e300): torch refuses to convert it
        if "overflow" not in str(e).lower():
            raise
        problem = (f"non-finite update: the optimiser step overflowed ({' '.join(str(e).split())[:120]}; "
                   f"lr={t.cfg.lr:g}, weight_decay={t.cfg.weight_decay:g}"
                   + (f", analog_lr={t.cfg.analog_lr:g}" if t.cfg.analog else "") + ")")
    # a finite gradient can still make a non-finite weight (a huge lr): stop here, so that no
    # checkpoint of this state is ever called good
    bad = "" if problem else ckpt_mod.first_nonfinite(t.core.named_parameters())
    if bad:
        problem = f"non-finite parameter '{bad}' ({t.where(bad)}) after the optimiser step"
    t.stop_if(problem)
    with torch.no_grad():
        correct = (logits.argmax(1) == y).sum().item()
    return loss.item(), correct, y.numel(), stats
