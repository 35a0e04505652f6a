"""A trainer's state in a checkpoint: what is saved, and the checks a checkpoint passes before
anything of it is loaded into a run.

Saving: a non-finite model or optimiser state is never written (the run stops as diverged, and the
last good checkpoint stays the last one).  Resuming continues the *same* run: its configuration may
differ in runtime keys only (and ``epochs`` or ``max_steps``, larger or 0, which extend a run), every field has its type, every
number is finite, and the position lies inside the run.  A checkpoint that fails a check raises
:class:`train.checkpoint.CheckpointError` naming the file and the reason.
"""
from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List

from . import checkpoint as ckpt_mod
from . import distributed as D
from .config import RUNTIME_KEYS, TrainConfig, UserError, differing_keys, from_dict, to_dict

# ``tr`` below is the :class:`train.trainer.Trainer` whose state is saved or restored (not imported:
# the loop imports this module, never the reverse)

_NUMBERS = ("epoch", "global_step", "train_loss", "train_accuracy", "train_samples", "seconds", "lr", "analog_lr",
            "test_accuracy", "test_loss", "test_top5_accuracy")


def finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_history(history: List[Dict[str, Any]]) -> None:
    """The per-epoch records a checkpoint carries hold numbers where the trainer sums them."""
    for i, h in enumerate(history):
        for k in _NUMBERS:
            if k in h and (isinstance(h[k], bool) or not isinstance(h[k], (int, float))):
                raise ValueError(f"history[{i}].{k} is {h[k]!r}, not a number")
        for k in ("train_relaxation", "test_relaxation"):
            v = h.get(k, {})
            if not isinstance(v, dict) or not all(isinstance(r, dict) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in r.values()) for r in v.values()):
                raise ValueError(f"history[{i}].{k} is not a record of numbers per block")


def _optimizers(tr: Any):
    return [("optimizer", tr.opt, tr.sched)] + [o for p in tr.plugins for o in p.optimizers()]


# -- saving ------------------------------------------------------------------------------------
def save(tr: Any, reason: str) -> None:
    """Write a checkpoint of ``tr`` (rank 0; every rank must call: it reduces the running sums)."""
    accum = tr.sums.reduced(tr.ctx, tr.device)
    bad = ckpt_mod.first_nonfinite(list(tr.core.state_dict().items())
                                   + [t for _, opt, _ in _optimizers(tr) for t in ckpt_mod.optimizer_tensors(opt)])
    if D.any_flag(1.0 if bad else 0.0, tr.ctx, tr.device):
        tr.stop_diverged(f"non-finite state '{bad}' at checkpoint time" if bad
                         else "another process reported non-finite state")
    if tr.ctx.is_main and tr.run_dir is not None:
        state = {
            "model_name": tr.cfg.model, "signature": tr.signature, "config": to_dict(tr.cfg),
            "model": tr.core.state_dict(), "extra_state": ckpt_mod.collect_extra_state(tr.core),
            "optimizer": tr.opt.state_dict(), "scheduler": tr.sched.state_dict(),
            **{k: v for p in tr.plugins for k, v in p.state_dict().items()},
            "rng": ckpt_mod.rng_state(),
            "position": {"epoch": tr.epoch, "step_in_epoch": tr.step_in_epoch, "global_step": tr.global_step,
                         "steps_per_epoch": tr.steps_per_epoch, "world_size": tr.ctx.world,
                         "sampler_seed": tr.cfg.seed},
            "accum": accum, "history": tr.history,
            "elapsed": tr.elapsed_before + (time.time() - tr.t0), "train_seconds": tr.train_seconds,
            "finished": tr.finished, "final": tr.final,
        }
        summary = {"epoch": tr.epoch, "step_in_epoch": tr.step_in_epoch, "global_step": tr.global_step,
                   "steps_per_epoch": tr.steps_per_epoch, "finished": tr.finished, "reason": reason,
                   "time": datetime.now().isoformat(timespec="seconds")}
        try:
            path = ckpt_mod.save(tr.run_dir, state, summary)
        except ckpt_mod.WriteError as e:
            if e.written is not None:  # the checkpoint itself is complete; its summary is not
                tr.last_ckpt = (e.written, tr.global_step)
            tr.stop_write_failed(e)
        tr.last_ckpt = (path, tr.global_step)
    D.barrier(tr.ctx)


# -- resuming ----------------------------------------------------------------------------------
def restore(tr: Any, path: Path) -> None:
    """Load checkpoint ``path`` into the freshly set-up ``tr``, after checking that it belongs to this run."""
    ck = ckpt_mod.load(path)
    ckpt_mod.check_fields(ck, path)
    ckpt_mod.check_compatible(ck, path, tr.cfg.model, tr.signature)
    try:
        theirs = from_dict(ck["config"], source=f"{path} (its configuration)")
    except UserError as e:
        raise ckpt_mod.CheckpointError(str(e)) from None
    diff = differing_keys(theirs, tr.cfg)
    more_epochs = "epochs" in diff and tr.cfg.epochs > theirs.epochs  # --resume RUN epochs=N
    # --resume RUN max_steps=M (larger) or max_steps=0 (none): a run stopped by max_steps goes on
    more_steps = "max_steps" in diff and bool(theirs.max_steps) and (
        tr.cfg.max_steps == 0 or tr.cfg.max_steps > theirs.max_steps)
    extended = more_epochs or more_steps
    for key, more in (("epochs", more_epochs), ("max_steps", more_steps)):
        if more:
            diff.remove(key)
    if diff:
        shown = ", ".join(f"{k}: {getattr(theirs, k)!r} -> {getattr(tr.cfg, k)!r}" for k in diff[:6])
        raise ckpt_mod.CheckpointError(
            f"{path} was written by a run with another configuration ({shown}); only runtime keys "
            f"({', '.join(sorted(RUNTIME_KEYS))}) may change on resume; refusing to continue it")
    bad = ckpt_mod.first_nonfinite(ck["model"].items())
    if bad:
        raise ckpt_mod.CheckpointError(f"{path}: '{bad}' holds NaN or inf; a checkpoint of a diverged state is "
                                       "not resumable (use the previous checkpoint)")
    pos = ck["position"]
    if extended and tr.cfg.max_steps and pos["global_step"] >= tr.cfg.max_steps:
        raise ckpt_mod.CheckpointError(
            f"{path} stopped at max_steps={tr.cfg.max_steps} (global step {pos['global_step']}): more epochs add "
            f"no step; resume with max_steps=0 (no limit) or a larger max_steps as well")
    if pos["epoch"] > tr.cfg.epochs or pos["step_in_epoch"] > tr.steps_per_epoch:
        raise ckpt_mod.CheckpointError(f"{path}: position epoch {pos['epoch']}, batch {pos['step_in_epoch']} is "
                                       f"outside this run ({tr.cfg.epochs} epochs of {tr.steps_per_epoch} batches)")
    try:
        _load_states(tr, ck)
        _load_position(tr, ck, extended, theirs)
        ckpt_mod.set_rng_state(ck["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = " ".join(str(e).split())  # torch's message spans several lines: keep it, in one
        raise ckpt_mod.CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {detail[:400]})") \
            from None
    tr.last_ckpt = (path, tr.global_step)
    tr.log(f"resumed from {path} at epoch {tr.epoch + 1}, batch {tr.step_in_epoch} "
           f"(global step {tr.global_step})"
           + ("; relax_start=previous: the stored equilibria are not part of a checkpoint, each sample's "
              "first free phase starts from zeros again" if getattr(tr, "warm_starts", None) is not None else ""))


def _check_loaded_optimisers(tr: Any) -> None:
    """Learning rates and optimiser states loaded from a checkpoint are finite numbers."""
    for what, opt, sched in _optimizers(tr):
        for i, g in enumerate(opt.param_groups):
            if not finite_number(g.get("lr")):
                raise ValueError(f"{what} param_groups[{i}].lr is {g.get('lr')!r}")
        if not all(finite_number(v) for v in getattr(sched, "base_lrs", [])):
            raise ValueError(f"{what} scheduler base_lrs {sched.base_lrs!r} are not finite numbers")
        bad = ckpt_mod.first_nonfinite(ckpt_mod.optimizer_tensors(opt))
        if bad:
            raise ValueError(f"{what}: {bad} holds NaN or inf")


def _load_states(tr: Any, ck: Dict[str, Any]) -> None:
    tr.core.load_state_dict(ck["model"])
    ckpt_mod.restore_extra_state(tr.core, ck.get("extra_state", {}))
    tr.opt.load_state_dict(ck["optimizer"])
    tr.sched.load_state_dict(ck["scheduler"])
    for p in tr.plugins:
        p.load_state_dict(ck)
    if not isinstance(tr.sched.last_epoch, int):
        raise TypeError(f"scheduler.last_epoch is {tr.sched.last_epoch!r}")
    _check_loaded_optimisers(tr)


def _load_position(tr: Any, ck: Dict[str, Any], extended: bool, theirs: TrainConfig) -> None:
    pos = ck["position"]
    tr.epoch, tr.step_in_epoch, tr.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
    if pos.get("steps_per_epoch") != tr.steps_per_epoch and tr.step_in_epoch:
        tr.log(f"note: {pos.get('steps_per_epoch')} steps per epoch in the checkpoint, "
               f"{tr.steps_per_epoch} now (world size {pos.get('world_size')} -> {tr.ctx.world})")
    if tr.ctx.is_main:  # the stored sums are global: rank 0 carries them
        tr.sums.load(ck.get("accum", {}))
    tr.history = [dict(h) for h in ck.get("history", [])]
    check_history(tr.history)
    tr.elapsed_before = float(ck.get("elapsed", 0.0))
    tr.train_seconds = float(ck.get("train_seconds", 0.0))
    tr.finished = bool(ck.get("finished", False))
    tr.final = ck.get("final")
    if not isinstance(ck.get("finished", False), bool):
        raise TypeError("'finished' must be true or false")
    if tr.finished and not (isinstance(tr.final, dict) and finite_number(tr.final.get("test_accuracy"))):
        raise ValueError("a finished run must hold its final metrics ('final' with a finite test_accuracy)")
    if not (finite_number(tr.elapsed_before) and finite_number(tr.train_seconds)):
        raise ValueError("'elapsed' and 'train_seconds' must be finite numbers")
    if extended:  # more epochs or steps: a finished run continues (the schedule spans the new length)
        tr.finished, tr.final = False, None
        what = []
        if tr.cfg.epochs != theirs.epochs:
            what.append(f"from {theirs.epochs} to {tr.cfg.epochs} epochs")
        if tr.cfg.max_steps != theirs.max_steps:
            what.append(f"max_steps {theirs.max_steps} -> {tr.cfg.max_steps or 'none'}")
        tr.log(f"extending the run {', '.join(what)}")
