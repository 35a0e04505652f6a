"""The training loop: data, model, optimiser, schedule, evaluation, checkpoints, logging,
multi-process and failure handling.  Entry points: :func:`prepare_run` + :class:`Trainer`
(used by ``python -m train``) or :func:`train` for programmatic use.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ffebm.analog.distributed import gather_pairs, tiles_in_sync

from . import analog as analog_mod
from . import checkpoint as ckpt_mod
from . import distributed as D
from .config import RUNTIME_KEYS, ConfigError, TrainConfig, UserError, differing_keys, from_dict, to_dict, validate
from .data import DataInfo, Preprocess, TrainBatches, batch_seed, load_datasets, shard_test_set
from .tblog import TBLogger

import ffebm as _ffebm
from ffebm import RelaxationDiverged

from .build import (block_paths, build_model, check_model_options, check_model_took, energy_blocks,  # noqa: F401
                    freeze_bn_affine,
                    gradient_method, make_optimizer, make_scheduler, model_kwargs, resolve_device, schedule_factor,
                    seed_everything)
from .runfolder import (CONFIG_FILE, FAILURE_FILE, METRICS_FILE, RunPlan, check_trusted, plan_run,  # noqa: F401
                        read_config)


class TrainingStopped(Exception):
    """Training ended early on purpose (divergence, signal); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


_NUMBERS = ("epoch", "global_step", "train_loss", "train_accuracy", "train_samples", "seconds", "lr", "analog_lr",
            "test_accuracy", "test_loss")


def _check_history(history: List[Dict[str, Any]]) -> None:
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


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


# ------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Optional[Path], ctx: Optional[D.DistContext] = None,
                 model_fn: Optional[Callable[[TrainConfig, DataInfo], nn.Module]] = None,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ctx = ctx or D.DistContext()
        self.model_fn = model_fn or build_model
        self._log = log
        self.tb = TBLogger(None)
        self._signal = 0
        self._old_handlers: Dict[int, Any] = {}
        self.history: List[Dict[str, Any]] = []
        self.elapsed_before = 0.0
        self.train_seconds = 0.0
        self.finished = False
        self.final: Optional[Dict[str, Any]] = None
        self.last_ckpt: Optional[Tuple[Path, int]] = None

    def log(self, msg: str):
        if self.ctx.is_main:
            self._log(msg)

    # -- setup ------------------------------------------------------------------------------
    def setup(self, resume_from: Optional[Path] = None):
        """Load data, build everything and (optionally) restore a checkpoint.  Writes nothing."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg, ctx)
        self.train_set, self.test_set, self.info = load_datasets(cfg)
        if cfg.dataset != "fake":
            for key, have in (("num_classes", self.info.num_classes), ("in_channels", self.info.in_channels),
                              ("image_size", self.info.image_size)):
                v = getattr(cfg, key)
                if v is not None and v != have:
                    raise ConfigError(f"{key}={v} does not match data set {cfg.dataset} ({key} {have})")
        self.batches = TrainBatches(self.train_set, cfg.batch_size, ctx.world, ctx.rank, cfg.seed, cfg.drop_last)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        in_dtype = getattr(torch, cfg.model_dtype) if cfg.model_dtype else torch.float32
        if not isinstance(in_dtype, torch.dtype):
            raise ConfigError(f"model_dtype={cfg.model_dtype!r}: not a torch dtype")
        self.pre = Preprocess(self.info, self.device, dtype=in_dtype)
        self.test_local = shard_test_set(self.test_set, ctx.world, ctx.rank)

        seed_everything(cfg.seed)
        try:
            core = self.model_fn(cfg, self.info)
        except (MemoryError, RuntimeError) as e:  # e.g. a size option far too large to allocate
            if isinstance(e, RuntimeError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
                raise
            raise ConfigError(f"model {cfg.model!r} cannot be built with these options: not enough memory "
                              f"({' '.join(str(e).split())[:160]})") from None
        if not isinstance(core, nn.Module):
            raise UserError(f"model {cfg.model!r} did not build an nn.Module")
        core = analog_mod.make_analog(core, cfg)   # analog=DEVICE: energy blocks onto tiles (seeded)
        core.to(self.device)
        if cfg.freeze_bn_affine:
            freeze_bn_affine(core)
        self.core = core
        self.blocks = energy_blocks(core)
        self.block_paths = block_paths(core, self.blocks)
        self.signature = ckpt_mod.model_signature(core)
        self.digital_params, self.analog_params = analog_mod.split_parameters(core)
        self.opt = make_optimizer(cfg, core, self.digital_params)
        self.sched = make_scheduler(cfg, self.opt, cfg.epochs * self.steps_per_epoch, self.steps_per_epoch)
        # analog weights: pulsed updates by an AnalogOptimizer whose lr follows the same schedule factor
        self.opt_a = self.sched_a = None
        if self.analog_params:
            self.opt_a = analog_mod.make_analog_optimizer(cfg, self.analog_params)
            self.sched_a = torch.optim.lr_scheduler.LambdaLR(
                self.opt_a, schedule_factor(cfg, cfg.epochs * self.steps_per_epoch, self.steps_per_epoch))
        check_model_took(core, cfg)
        self.method = gradient_method(core, cfg)

        # position
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self._reset_accum()
        if resume_from is not None:
            self._restore(resume_from)

        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            if self.analog_params:  # pulsed, not all-reduced: see ffebm.analog.distributed
                ids = {id(p) for p in self.analog_params}
                DDP._set_params_and_buffers_to_ignore_for_model(
                    core, [n for n, p in core.named_parameters() if id(p) in ids])
            self.model = DDP(core, **kwargs)
        else:
            self.model = core
        return self

    def _reset_accum(self):
        self.acc = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
        self.block_acc = {name: [0.0, 0.0, 0.0] for name, _ in self.blocks}   # steps, residual, n

    def _restore(self, path: Path):
        ck = ckpt_mod.load(path)
        ckpt_mod.check_fields(ck, path)
        ckpt_mod.check_compatible(ck, path, self.cfg.model, self.signature)
        # resume continues the same run: the configuration may differ in runtime keys only
        try:
            theirs = from_dict(ck["config"], source=f"{path} (its configuration)")
        except UserError as e:
            raise ckpt_mod.CheckpointError(str(e)) from None
        diff = differing_keys(theirs, self.cfg)
        extended = "epochs" in diff and self.cfg.epochs > theirs.epochs  # --resume RUN epochs=N
        if extended:
            diff.remove("epochs")
        if diff:
            shown = ", ".join(f"{k}: {getattr(theirs, k)!r} -> {getattr(self.cfg, k)!r}" for k in diff[:6])
            raise ckpt_mod.CheckpointError(
                f"{path} was written by a run with another configuration ({shown}); only runtime keys "
                f"({', '.join(sorted(RUNTIME_KEYS))}) may change on resume; refusing to continue it")
        bad = ckpt_mod.first_nonfinite(ck["model"].items())
        if bad:
            raise ckpt_mod.CheckpointError(f"{path}: '{bad}' holds NaN or inf; a checkpoint of a diverged state is "
                                           "not resumable (use the previous checkpoint)")
        pos = ck["position"]
        if pos["epoch"] > self.cfg.epochs or pos["step_in_epoch"] > self.steps_per_epoch:
            raise ckpt_mod.CheckpointError(f"{path}: position epoch {pos['epoch']}, batch {pos['step_in_epoch']} is "
                                           f"outside this run ({self.cfg.epochs} epochs of {self.steps_per_epoch} "
                                           "batches)")
        try:
            self._load_states(ck)
            self._load_position(ck, extended, theirs)
            ckpt_mod.set_rng_state(ck["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            detail = " ".join(str(e).split())  # torch's message spans several lines: keep it, in one
            raise ckpt_mod.CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {detail[:400]})") \
                from None
        self.last_ckpt = (path, self.global_step)
        self.log(f"resumed from {path} at epoch {self.epoch + 1}, batch {self.step_in_epoch} "
                 f"(global step {self.global_step})")

    def _check_loaded_optimisers(self) -> None:
        """Learning rates and optimiser states loaded from a checkpoint are finite numbers."""
        for opt, sched, what in ((self.opt, self.sched, "optimizer"), (self.opt_a, self.sched_a, "analog optimizer")):
            if opt is None:
                continue
            for i, g in enumerate(opt.param_groups):
                if not _finite_number(g.get("lr")):
                    raise ValueError(f"{what} param_groups[{i}].lr is {g.get('lr')!r}")
            if not all(_finite_number(v) for v in getattr(sched, "base_lrs", [])):
                raise ValueError(f"{what} scheduler base_lrs {sched.base_lrs!r} are not finite numbers")
            bad = ckpt_mod.first_nonfinite(ckpt_mod.optimizer_tensors(opt))
            if bad:
                raise ValueError(f"{what}: {bad} holds NaN or inf")

    def _load_states(self, ck: Dict[str, Any]) -> None:
        self.core.load_state_dict(ck["model"])
        ckpt_mod.restore_extra_state(self.core, ck.get("extra_state", {}))
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.opt_a is not None:
            self.opt_a.load_state_dict(ck["analog_optimizer"])
            self.sched_a.load_state_dict(ck["analog_scheduler"])
        if not isinstance(self.sched.last_epoch, int):
            raise TypeError(f"scheduler.last_epoch is {self.sched.last_epoch!r}")
        self._check_loaded_optimisers()

    def _load_position(self, ck: Dict[str, Any], extended: bool, theirs: TrainConfig) -> None:
        pos = ck["position"]
        self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        if pos.get("steps_per_epoch") != self.steps_per_epoch and self.step_in_epoch:
            self.log(f"note: {pos.get('steps_per_epoch')} steps per epoch in the checkpoint, "
                     f"{self.steps_per_epoch} now (world size {pos.get('world_size')} -> {self.ctx.world})")
        acc = ck.get("accum", {})
        if self.ctx.is_main:  # the stored sums are global: rank 0 carries them
            for k in self.acc:
                self.acc[k] = float(acc.get(k, 0.0))
            for name, v in acc.get("blocks", {}).items():
                if name in self.block_acc:
                    self.block_acc[name] = [float(x) for x in v]
        self.history = [dict(h) for h in ck.get("history", [])]
        _check_history(self.history)
        self.elapsed_before = float(ck.get("elapsed", 0.0))
        self.train_seconds = float(ck.get("train_seconds", 0.0))
        self.finished = bool(ck.get("finished", False))
        self.final = ck.get("final")
        if not isinstance(ck.get("finished", False), bool):
            raise TypeError("'finished' must be true or false")
        if self.finished and not (isinstance(self.final, dict) and _finite_number(self.final.get("test_accuracy"))):
            raise ValueError("a finished run must hold its final metrics ('final' with a finite test_accuracy)")
        if not (_finite_number(self.elapsed_before) and _finite_number(self.train_seconds)):
            raise ValueError("'elapsed' and 'train_seconds' must be finite numbers")
        if extended:  # more epochs: a finished run continues (the schedule spans the new length)
            self.finished, self.final = False, None
            self.log(f"extending the run from {theirs.epochs} to {self.cfg.epochs} epochs")

    # -- run folder ---------------------------------------------------------------------------
    def commit(self, existing: bool):
        """Create the run folder (rank 0), store config.json, open TensorBoard."""
        if self.ctx.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_mod.clean_stale_temps(self.run_dir)  # under the run-folder lock (see train/runlock.py)
            stored = (self.run_dir / CONFIG_FILE).read_text() if (self.run_dir / CONFIG_FILE).exists() else None
            if not existing or stored is None or json.loads(stored) != to_dict(self.cfg):
                try:
                    ckpt_mod.atomic_write_json(self.run_dir / CONFIG_FILE, to_dict(self.cfg))
                except ckpt_mod.WriteError as e:
                    self._stop_write_failed(e)
            if self.cfg.tensorboard:
                purge = self.global_step + 1 if self.global_step else None
                self.tb = TBLogger(self.run_dir / "tb", purge_step=purge)
        D.barrier(self.ctx)

    # -- checkpoints ----------------------------------------------------------------------------
    def _global_accum(self) -> Dict[str, Any]:
        keys = list(self.acc)
        names = list(self.block_acc)
        vals = [self.acc[k] for k in keys] + [x for n in names for x in self.block_acc[n]]
        vals = D.reduce_values(vals, self.ctx, self.device) if self.ctx.enabled else vals
        out: Dict[str, Any] = {k: float(vals[i]) for i, k in enumerate(keys)}
        out["time"] = self.acc["time"]  # wall time is per process, not a sum
        off = len(keys)
        out["blocks"] = {n: [float(v) for v in vals[off + 3 * i: off + 3 * i + 3]] for i, n in enumerate(names)}
        return out

    def save_checkpoint(self, reason: str):
        accum = self._global_accum()   # collective: every rank calls it
        # "last good" means finite: a non-finite model or optimiser state is never written
        bad = ckpt_mod.first_nonfinite(list(self.core.state_dict().items()) + ckpt_mod.optimizer_tensors(self.opt)
                                       + (ckpt_mod.optimizer_tensors(self.opt_a) if self.opt_a is not None else []))
        if D.any_flag(1.0 if bad else 0.0, self.ctx, self.device):
            self._stop_diverged(f"non-finite state '{bad}' at checkpoint time" if bad
                                else "another process reported non-finite state")
        if self.ctx.is_main and self.run_dir is not None:
            state = {
                "model_name": self.cfg.model,
                "signature": self.signature,
                "config": to_dict(self.cfg),
                "model": self.core.state_dict(),
                "extra_state": ckpt_mod.collect_extra_state(self.core),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                **({"analog_optimizer": self.opt_a.state_dict(), "analog_scheduler": self.sched_a.state_dict()}
                   if self.opt_a is not None else {}),
                "rng": ckpt_mod.rng_state(),
                "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                             "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                             "world_size": self.ctx.world, "sampler_seed": self.cfg.seed},
                "accum": accum,
                "history": self.history,
                "elapsed": self.elapsed_before + (time.time() - self.t0),
                "train_seconds": self.train_seconds,
                "finished": self.finished,
                "final": self.final,
            }
            summary = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                       "steps_per_epoch": self.steps_per_epoch, "finished": self.finished, "reason": reason,
                       "time": datetime.now().isoformat(timespec="seconds")}
            try:
                path = ckpt_mod.save(self.run_dir, state, summary)
            except ckpt_mod.WriteError as e:
                if e.written is not None:  # the checkpoint itself is complete; its summary is not
                    self.last_ckpt = (e.written, self.global_step)
                self._stop_write_failed(e)
            self.last_ckpt = (path, self.global_step)
        D.barrier(self.ctx)

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._signal:  # second signal: give up at once
            raise KeyboardInterrupt
        self._signal = signum

    def _install_signals(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self):
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    # -- failures -----------------------------------------------------------------------------
    def _where(self) -> str:
        return f"step {self.global_step + 1} (epoch {self.epoch + 1}, batch {self.step_in_epoch + 1})"

    def _param_block(self, pname: str) -> str:
        for path, bname in self.block_paths.items():
            if pname.startswith(path + ".") or not path:
                return f"energy block '{bname}'"
        return "a digital layer"

    def _last_good(self) -> str:
        if self.last_ckpt is not None:
            return f"last good checkpoint: {self.last_ckpt[0]} (step {self.last_ckpt[1]})"
        return "no checkpoint had been written yet"

    def _stop_diverged(self, what: str, after_step: bool = False):
        msg = f"training stopped: {what} at {self._where()}; {self._last_good()}"
        if self.ctx.is_main and self.run_dir is not None:
            record = {"message": msg, "global_step": self.global_step + 1, "epoch": self.epoch + 1,
                      "batch": self.step_in_epoch + 1, "time": datetime.now().isoformat(timespec="seconds"),
                      "last_good_checkpoint": str(self.last_ckpt[0]) if self.last_ckpt else None,
                      "last_good_step": self.last_ckpt[1] if self.last_ckpt else None}
            try:
                ckpt_mod.atomic_write_json(self.run_dir / FAILURE_FILE, record)
            except ckpt_mod.WriteError:
                pass  # the message below still says everything
        self.tb.flush()
        raise TrainingStopped(msg, 3)

    def _stop_write_failed(self, err: "ckpt_mod.WriteError"):
        self.tb.flush()
        raise TrainingStopped(f"training stopped: {err}; {self._last_good()}", 4)

    def _nonfinite_block(self) -> str:
        for name, blk in self.blocks:
            st = getattr(blk, "stats", None)
            r = getattr(st, "residual", None)
            if r is not None and not math.isfinite(float(r)):
                return f"; energy block '{name}' reports residual {r}"
        return ""

    # -- one step -----------------------------------------------------------------------------
    def _block_stats(self) -> Dict[str, Tuple[float, float]]:
        out = {}
        for name, blk in self.blocks:
            st = getattr(blk, "stats", None)
            if st is None:
                continue
            try:
                out[name] = (float(st.steps), float(st.residual))
            except (AttributeError, TypeError, ValueError):
                continue
        return out

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, gen: Optional[torch.Generator]):
        x = self.pre(xb, gen)
        y = yb.to(self.device)
        self.model.train()
        problem = ""
        loss = logits = None
        try:
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                problem = f"loss is {loss.item()}{self._nonfinite_block()}"
        except RelaxationDiverged as e:
            problem = (f"relaxation diverged in energy block '{getattr(e, 'block', '?')}' "
                       f"(relaxation step {getattr(e, 'step', '?')})")
        except (ValueError, RuntimeError, IndexError) as e:
            if self.global_step or self.last_ckpt is not None:
                raise
            # the very first batch: the model and the data do not fit together (a configuration error)
            raise TrainingStopped(f"error: model {self.cfg.model!r} cannot take the {self.cfg.dataset} batches "
                                  f"(input {list(x.shape)}, {self.info.num_classes} classes): "
                                  f"{' '.join(str(e).split())[:200]}", 2) from None
        if D.any_flag(1.0 if problem else 0.0, self.ctx, self.device):
            self._stop_diverged(problem or "another process reported divergence")
        stats = self._block_stats()
        self.opt.zero_grad(set_to_none=True)
        if self.opt_a is not None:
            self.opt_a.zero_grad(set_to_none=True)   # drops pulsed-update pairs of earlier passes
        try:
            loss.backward()
        except RelaxationDiverged as e:
            problem = (f"relaxation diverged in the nudged phase of energy block '{getattr(e, 'block', '?')}' "
                       f"(relaxation step {getattr(e, 'step', '?')})")
        if not problem:
            for pname, p in self.core.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    problem = f"non-finite gradient of '{pname}' ({self._param_block(pname)})"
                    break
        if not problem and self.opt_a is not None:
            pname = analog_mod.nonfinite_pending(self.core)
            if pname:
                problem = f"non-finite pulsed update of '{pname}' ({self._param_block(pname)})"
        flags = D.any_flag(1.0 if problem else 0.0, self.ctx, self.device)
        if flags:
            self._stop_diverged(problem or "another process reported divergence")
        if self.cfg.grad_clip > 0:
            # exact gradients of an energy block spike where its equilibrium is close to a
            # bifurcation (the adjoint system is nearly singular); clipping keeps one such
            # batch from wrecking Adam's moment estimates
            # (digital parameters only: analog weights are updated by pulses, not gradients)
            torch.nn.utils.clip_grad_norm_(self.digital_params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.opt_a is not None:
            if self.ctx.enabled:
                gather_pairs(self.analog_params, self.ctx.world)
            self.opt_a.step()
            self.sched_a.step()
        # a finite gradient can still make a non-finite weight (a huge lr): stop here, so that no
        # checkpoint of this state is ever called good
        bad = ckpt_mod.first_nonfinite(self.core.named_parameters())
        if D.any_flag(1.0 if bad else 0.0, self.ctx, self.device):
            self._stop_diverged(f"non-finite parameter '{bad}' ({self._param_block(bad)}) after the optimiser step"
                                if bad else "another process reported divergence", after_step=True)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum().item()
        return loss.item(), correct, y.numel(), stats

    # -- gradient check -------------------------------------------------------------------------
    def grad_check(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """Per-block cosine between the run's gradient and the reference, via ffebm.compare_gradients.
        Model buffers and the RNG are restored afterwards, so the check does not perturb training."""
        if not self.blocks:
            return {}
        # the reference is the exact gradient at the equilibrium (or recurrent backprop), at tight settings
        ref = _ffebm.Implicit() if self.cfg.grad_check_reference == "implicit" else _ffebm.Unrolled()
        # each block's own method, compared on copies: running a block's method would advance its
        # random stream (EP's random sign); the block state restore below covers it too
        originals = {name: blk.gradient for name, blk in self.blocks}
        buffers = copy.deepcopy(self.core.state_dict())
        rng = torch.get_rng_state()
        try:
            for _, blk in self.blocks:
                blk.gradient = copy.deepcopy(blk.gradient)
            res = _ffebm.compare_gradients(self.core, F.cross_entropy, (x, y), reference=ref,
                                           candidates=[_ffebm.CURRENT], include_input=False)
            return _per_block_cosine(res)
        finally:
            for name, blk in self.blocks:
                blk.gradient = originals[name]
            self.core.load_state_dict(buffers)
            torch.set_rng_state(rng)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        self.core.eval()
        ds = self.test_local
        loss_sum = correct = count = 0.0
        bacc = {name: [0.0, 0.0, 0.0] for name, _ in self.blocks}
        for i in range(0, len(ds), self.cfg.eval_batch_size):
            x = self.pre(ds.images[i:i + self.cfg.eval_batch_size])
            y = ds.labels[i:i + self.cfg.eval_batch_size].to(self.device)
            logits = self.core(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
            for name, (s, r) in self._block_stats().items():
                bacc[name][0] += s
                bacc[name][1] += r
                bacc[name][2] += 1
        self.core.train()
        names = list(bacc)
        vals = D.reduce_values([loss_sum, correct, count] + [v for n in names for v in bacc[n]], self.ctx, self.device)
        loss_sum, correct, count = vals[:3]
        blocks = {}
        for i, n in enumerate(names):
            s, r, k = vals[3 + 3 * i: 6 + 3 * i]
            if k:
                blocks[n] = {"steps_mean": s / k, "residual_mean": r / k}
        return {"test_accuracy": correct / max(count, 1), "test_loss": loss_sum / max(count, 1),
                "test_samples": int(count), "relaxation": blocks}

    # -- main loop ------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        self.t0 = time.time()
        if self.finished and self.final is not None:
            self.log(f"run already complete: test accuracy {100 * self.final['test_accuracy']:.2f}%")
            return self.final
        self._install_signals()
        try:
            return self._fit()
        finally:
            self._restore_signals()
            self.tb.close()

    def _epoch_done(self) -> Dict[str, Any]:
        g = self._global_accum()
        rec = {"epoch": self.epoch + 1, "global_step": self.global_step,
               "train_loss": g["loss_sum"] / max(g["count"], 1.0),
               "train_accuracy": g["correct"] / max(g["count"], 1.0),
               "train_samples": int(g["count"]),
               "lr": self.opt.param_groups[0]["lr"],
               **({"analog_lr": self.opt_a.param_groups[0]["lr"]} if self.opt_a is not None else {}),
               "train_relaxation": {n: {"steps_mean": v[0] / v[2], "residual_mean": v[1] / v[2]}
                                    for n, v in g["blocks"].items() if v[2]},
               "seconds": g["time"]}
        if self.opt_a is not None and self.ctx.enabled:
            rec["analog_tiles_in_sync"] = tiles_in_sync(self.analog_params, self.device)
            if not rec["analog_tiles_in_sync"]:
                self.log("warning: the analog tiles differ between processes (a process-local random "
                         "stream, e.g. write noise, reached the pulses); the checkpoint holds rank 0's")
        return rec

    def _fit(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        from tqdm import tqdm

        total_epochs = cfg.epochs
        stop_at = cfg.max_steps or None
        last_eval: Optional[Dict[str, Any]] = self.history[-1] if self.history and "test_accuracy" in self.history[-1] else None
        interval = {"loss": 0.0, "correct": 0.0, "count": 0.0, "t": time.time(), "steps": 0,
                    "blocks": {}}
        done = False
        while self.epoch < total_epochs and not done:
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{total_epochs}",
                       disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True, leave=False,
                       file=sys.stderr)
            for step, xb, yb in self.batches.epoch(self.epoch, self.step_in_epoch):
                if cfg.grad_check_every and self.global_step % cfg.grad_check_every == 0 and ctx.is_main:
                    n = min(cfg.grad_check_batch, xb.shape[0])
                    cos = self.grad_check(self.pre(xb[:n]), yb[:n].to(self.device))
                    self.tb.scalars({f"gradcheck/{b}/cosine": c for b, c in cos.items()}, self.global_step + 1)
                gen = None
                if self.info.augment:
                    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, self.epoch, step, ctx.rank))
                t = time.time()
                loss, correct, count, stats = self.train_step(xb, yb, gen)
                dt = time.time() - t
                self.global_step += 1
                self.step_in_epoch = step + 1
                self.acc["loss_sum"] += loss * count
                self.acc["correct"] += correct
                self.acc["count"] += count
                self.acc["time"] += dt
                self.train_seconds += dt
                for name, (s, r) in stats.items():
                    b = self.block_acc.setdefault(name, [0.0, 0.0, 0.0])
                    b[0] += s
                    b[1] += r
                    b[2] += 1
                    ib = interval["blocks"].setdefault(name, [0.0, 0.0, 0.0])
                    ib[0] += s
                    ib[1] += r
                    ib[2] += 1
                interval["loss"] += loss * count
                interval["correct"] += correct
                interval["count"] += count
                interval["steps"] += 1
                if ctx.is_main:
                    sps = self.acc["count"] * ctx.world / max(self.acc["time"], 1e-9)
                    bar.set_postfix(loss=f"{self.acc['loss_sum'] / self.acc['count']:.4f}",
                                    acc=f"{100 * self.acc['correct'] / self.acc['count']:.1f}%",
                                    sps=f"{sps:.0f}", refresh=False)
                    bar.update(1)
                if cfg.log_every and self.global_step % cfg.log_every == 0 and ctx.is_main:
                    now = time.time()
                    vals = {"train/loss": interval["loss"] / interval["count"],
                            "train/accuracy": interval["correct"] / interval["count"],
                            "train/lr": self.opt.param_groups[0]["lr"],
                            **({"train/analog_lr": self.opt_a.param_groups[0]["lr"]} if self.opt_a is not None
                               else {}),
                            "train/samples_per_s": interval["count"] * ctx.world / max(now - interval["t"], 1e-9)}
                    for name, (s, r, k) in interval["blocks"].items():
                        vals[f"relax/{name}/steps"] = s / k
                        vals[f"relax/{name}/residual"] = r / k
                    if self.opt_a is not None:
                        vals.update(analog_mod.tile_scalars(self.core))
                    self.tb.scalars(vals, self.global_step)
                    interval = {"loss": 0.0, "correct": 0.0, "count": 0.0, "t": now, "steps": 0, "blocks": {}}
                if stop_at and self.global_step >= stop_at:
                    done = True
                if cfg.ckpt_every and self.global_step % cfg.ckpt_every == 0 and not done \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint("every")
                _maybe_inject_fault(self.global_step, ctx.rank)
                stop = D.any_flag(float(self._signal), self.ctx, self.device)
                if stop:
                    bar.close()
                    self._interrupted(int(stop))
                if done:
                    break
            bar.close()
            epoch_rec = self._epoch_done()
            partial = self.step_in_epoch < self.steps_per_epoch
            last = done or self.epoch + 1 >= total_epochs
            if last or (self.epoch + 1) % cfg.eval_every == 0:
                ev = self.evaluate()
                epoch_rec.update(test_accuracy=ev["test_accuracy"], test_loss=ev["test_loss"],
                                 test_relaxation=ev["relaxation"])
                last_eval = epoch_rec
            if partial:
                epoch_rec["partial"] = True
            self.history.append(epoch_rec)
            self._report_epoch(epoch_rec)
            self.epoch += 1
            self.step_in_epoch = 0
            self._reset_accum()
            stop = D.any_flag(float(self._signal), self.ctx, self.device)
            if not last:
                self.save_checkpoint("epoch")
            if stop:
                self._interrupted(int(stop))
        return self._finish(last_eval)

    def _report_epoch(self, rec: Dict[str, Any]):
        if not self.ctx.is_main:
            return
        sps = rec["train_samples"] / max(rec["seconds"], 1e-9)
        msg = (f"epoch {rec['epoch']}/{self.cfg.epochs}: train loss {rec['train_loss']:.4f}, "
               f"train acc {100 * rec['train_accuracy']:.2f}%")
        if "test_accuracy" in rec:
            msg += f", test acc {100 * rec['test_accuracy']:.2f}%"
        msg += f" ({_fmt_time(rec['seconds'])}, {sps:.0f} samples/s)"
        self.log(msg)
        vals = {"epoch/train_loss": rec["train_loss"], "epoch/train_accuracy": rec["train_accuracy"]}
        if "test_accuracy" in rec:
            vals.update({"epoch/test_accuracy": rec["test_accuracy"], "epoch/test_loss": rec["test_loss"]})
        self.tb.scalars(vals, self.global_step)
        self.tb.flush()

    def _interrupted(self, signum: int):
        self.save_checkpoint("signal")
        name = signal.Signals(signum).name if signum in (signal.SIGINT, signal.SIGTERM) else str(signum)
        where = self.run_dir if self.run_dir is not None else "(no run folder)"
        raise TrainingStopped(f"{name} received: checkpoint saved at step {self.global_step}; "
                              f"continue with: python -m train --resume {where}", 128 + signum)

    def _finish(self, last_eval: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        if last_eval is None or last_eval.get("global_step") != self.global_step:
            ev = self.evaluate()
            last_eval = {"test_accuracy": ev["test_accuracy"], "test_loss": ev["test_loss"],
                         "test_relaxation": ev["relaxation"]}
        last_train = self.history[-1] if self.history else {}
        wall = self.elapsed_before + (time.time() - self.t0)
        train_rel = {}
        # relaxation statistics: mean over the whole run's training epochs, and the final evaluation
        for rec in self.history:
            for n, v in rec.get("train_relaxation", {}).items():
                a = train_rel.setdefault(n, [0.0, 0.0, 0])
                a[0] += v["steps_mean"]
                a[1] += v["residual_mean"]
                a[2] += 1
        relaxation = {}
        for n, (s, r, k) in train_rel.items():
            relaxation[n] = {"train_steps_mean": s / k, "train_residual_mean": r / k}
        for n, v in last_eval.get("test_relaxation", {}).items():
            relaxation.setdefault(n, {}).update(test_steps_mean=v["steps_mean"], test_residual_mean=v["residual_mean"])
        samples = sum(h.get("train_samples", 0) for h in self.history)
        metrics = {
            "status": "completed",
            "recipe": self.cfg.recipe, "model": self.cfg.model, "dataset": self.cfg.dataset,
            "test_accuracy": last_eval["test_accuracy"],
            "test_loss": last_eval["test_loss"],
            "train_loss": last_train.get("train_loss"),
            "train_accuracy": last_train.get("train_accuracy"),
            "epochs": self.global_step / self.steps_per_epoch,
            "steps": self.global_step,
            "wall_seconds": wall,
            "train_seconds": self.train_seconds,
            "samples_per_second": samples / max(self.train_seconds, 1e-9),
            "gradient_method": self.method,
            "relaxation": relaxation,
            "world_size": self.ctx.world,
            "seed": self.cfg.seed,
            "history": self.history,
        }
        self.finished = True
        self.final = metrics
        self.save_checkpoint("final")
        if self.ctx.is_main and self.run_dir is not None:
            try:
                ckpt_mod.atomic_write_json(self.run_dir / METRICS_FILE, metrics)
            except ckpt_mod.WriteError as e:
                self._stop_write_failed(e)
        self.log(f"final test accuracy: {100 * metrics['test_accuracy']:.2f}% "
                 f"({metrics['steps']} steps, {_fmt_time(wall)}; gradient {self.method})")
        if self.run_dir is not None:
            self.log(f"run folder: {self.run_dir}")
        return metrics


def _maybe_inject_fault(global_step: int, rank: int):
    """Fault injection for the tests: with FFEBM_FAULT_AT_STEP=N this process sends itself
    FFEBM_FAULT_SIGNAL (KILL by default; TERM, INT) right after global step N (and after the
    checkpoint of that step, if one is due), on rank FFEBM_FAULT_RANK (default 0), only in
    the first attempt of a torchrun group (TORCHELASTIC_RESTART_COUNT unset or 0)."""
    at = os.environ.get("FFEBM_FAULT_AT_STEP")
    if not at or int(at) != global_step:
        return
    if int(os.environ.get("FFEBM_FAULT_RANK", "0")) != rank:
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    sig = getattr(signal, "SIG" + os.environ.get("FFEBM_FAULT_SIGNAL", "KILL").upper())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:  # pragma: no cover
        time.sleep(60)


def _per_block_cosine(res) -> Dict[str, float]:
    """{group: cosine} from a GradientComparison: for each energy block (and the digital
    layers together) the cosine between the candidate's and the reference's gradients of all
    its parameters, concatenated."""
    grads = getattr(res, "grads", None)
    if not grads:
        return {}
    ref = grads[res.reference]
    cand = [m for m in grads if m != res.reference][0]
    groups: Dict[str, List[str]] = {}
    for pname, group in res.block_of.items():
        if pname in ref and group != "input":
            groups.setdefault(group, []).append(pname)
    out = {}
    for group, names in groups.items():
        # parameters without a gradient on either side carry no verdict (never a fake 1.0)
        names = [n for n in names if ref.get(n) is not None and grads[cand].get(n) is not None]
        if not names:
            continue
        a = torch.cat([grads[cand][n].double().flatten() for n in names])
        b = torch.cat([ref[n].double().flatten() for n in names])
        na, nb = a.norm(), b.norm()
        out[group] = 1.0 if (na == 0 and nb == 0) else (0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
    return out


# ------------------------------------------------------------------------------------------
# programmatic entry point
# ------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run_dir: Optional[Path] = None, model_fn=None, resume: bool = False,
          log=print) -> Dict[str, Any]:
    """Train ``cfg`` in this process (world size 1 unless a process group is initialised)."""
    from .runlock import ClaimedRunFolder

    ctx = D.DistContext()
    claimed = ClaimedRunFolder(Path(run_dir)).claim() if (run_dir is not None and ctx.is_main) else None
    ok = False
    try:
        trainer = Trainer(validate(cfg), run_dir, ctx, model_fn=model_fn, log=log)
        found = ckpt_mod.find(Path(run_dir)) if (resume and run_dir is not None) else None
        trainer.setup(resume_from=found)
        ok = True
        trainer.commit(existing=resume)
        return trainer.fit()
    finally:
        if claimed is not None:
            claimed.release(failed=not ok)
