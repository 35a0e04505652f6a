"""The training loop.  Entry points: :class:`Trainer` (``setup`` -> ``commit`` -> ``fit``, used by
``python -m train``) or :func:`train` for programmatic use.

The jobs around the loop live beside it: the per-batch step and the model preparation
(:mod:`train.step`, also what the benchmark times), building (:mod:`train.build`), the run folder
(:mod:`train.runfolder`, :mod:`train.runlock`), checkpoint state (:mod:`train.state`), what is
measured and reported (:mod:`train.metrics`), how a run stops (:mod:`train.failures`), and the
analog parts behind the plug-in interface (:mod:`train.plugin`, :mod:`train.analog`,
:mod:`train.inference`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import ffebm

from . import checkpoint as ckpt_mod
from . import distributed as D
from . import failures, metrics, state
from .analog import AnalogPlugin
from .inference import InferencePlugin
from .build import (block_paths, build_checked, build_model, check_model_took, energy_blocks, freeze_bn_affine, gradient_method,
                    make_optimizer, make_scheduler, resolve_device, seed_everything)
from .config import ConfigError, TrainConfig, to_dict
from .validate import validate
from .batches import Preprocess, TrainBatches, batch_seed, shard_test_set
from .data import DataInfo, load_datasets
from .failures import TrainingStopped
from .plugin import TrainerPlugin
from .runfolder import CONFIG_FILE, METRICS_FILE
from .step import prepare_model, train_step as step_function
from .tblog import TBLogger

__all__ = ["Trainer", "TrainingStopped", "train"]


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
        self.analog = AnalogPlugin(cfg)
        self.inference = InferencePlugin(cfg)
        self.plugins: List[TrainerPlugin] = [self.analog, self.inference]
        self.history: List[Dict[str, Any]] = []
        self.elapsed_before = self.train_seconds = 0.0
        self.finished = False
        self.final: Optional[Dict[str, Any]] = None
        self.last_ckpt: Optional[Tuple[Path, int]] = None
        self.signals = failures.SignalCatcher()
        self.t0 = time.time()

    def log(self, msg: str):
        if self.ctx.is_main:
            self._log(msg)

    # -- setup ------------------------------------------------------------------------------
    def setup(self, resume_from: Optional[Path] = None) -> "Trainer":
        """Load data, build everything and (optionally) restore a checkpoint.  Writes nothing."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg, ctx)
        self.train_set, self.test_set, self.info = load_datasets(cfg)
        if cfg.dataset != "fake":
            for key in ("num_classes", "in_channels", "image_size"):
                v, have = getattr(cfg, key), getattr(self.info, key)
                if v is not None and v != have:
                    raise ConfigError(f"{key}={v} does not match data set {cfg.dataset} ({key} {have})")
        self.batches = TrainBatches(self.train_set, cfg.batch_size, ctx.world, ctx.rank, cfg.seed, cfg.drop_last)
        self.steps_per_epoch = self.batches.steps_per_epoch
        schedule_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps
        in_dtype = getattr(torch, cfg.model_dtype) if cfg.model_dtype else torch.float32
        if not isinstance(in_dtype, torch.dtype):
            raise ConfigError(f"model_dtype={cfg.model_dtype!r}: not a torch dtype")
        self.test_local = shard_test_set(self.test_set, ctx.world, ctx.rank)

        seed_everything(cfg.seed)
        core = build_checked(self.model_fn, cfg, self.info)
        for p in self.plugins:
            core = p.build(core)
        core.to(self.device)
        self.pre = Preprocess(self.info, self.device, dtype=in_dtype,
                              memory_format=prepare_model(core, cfg, self.device),
                              augment=self.info.augment, input_noise=cfg.input_noise)
        if cfg.freeze_bn_affine:
            freeze_bn_affine(core)
        self.core = core
        self.blocks = energy_blocks(core)
        # relax_start=previous: each training sample's free phases start from its last free
        # equilibrium; a cache of this process, not saved (a resumed run starts its samples anew)
        self.warm_starts = ffebm.WarmStarts(len(self.train_set)) if cfg.relax_start == "previous" else None
        self.block_paths = block_paths(core, self.blocks)
        self.signature = ckpt_mod.model_signature(core)
        for p in self.plugins:
            p.attach(core, schedule_steps, self.steps_per_epoch)
        owned = {id(q) for p in self.plugins for q in p.owned_parameters()}
        self.digital_params = [q for q in core.parameters() if q.requires_grad and id(q) not in owned]
        self.opt = make_optimizer(cfg, core, self.digital_params)
        self.sched = make_scheduler(cfg, self.opt, schedule_steps, self.steps_per_epoch)
        check_model_took(core, cfg)
        self.method = gradient_method(core, cfg)

        self.epoch = self.step_in_epoch = self.global_step = 0
        self.sums = metrics.Sums([name for name, _ in self.blocks])
        if resume_from is not None:
            state.restore(self, resume_from)
        self.model = D.wrap_ddp(core, self.device, owned) if ctx.enabled else core
        return self

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
                    self.stop_write_failed(e)
            if self.cfg.tensorboard:
                self.tb = TBLogger(self.run_dir / "tb", purge_step=self.global_step + 1 if self.global_step else None)
        D.barrier(self.ctx)

    def save_checkpoint(self, reason: str):
        state.save(self, reason)

    # -- stopping -------------------------------------------------------------------------------
    def stop_diverged(self, what: str):
        msg = (f"training stopped: {what} at {failures.where(self.global_step, self.epoch, self.step_in_epoch)}; "
               f"{failures.last_good(self.last_ckpt)}")
        if self.ctx.is_main:
            failures.record_failure(self.run_dir, msg, self.global_step + 1, self.epoch + 1, self.step_in_epoch + 1,
                                    self.last_ckpt)
        self.tb.flush()
        raise TrainingStopped(msg, 3)

    def stop_write_failed(self, err: ckpt_mod.WriteError):
        self.tb.flush()
        raise TrainingStopped(f"training stopped: {err}; {failures.last_good(self.last_ckpt)}", 4)

    def stop_if(self, problem: str):
        """Stop every process if any of them found a problem (a collective: every rank calls it)."""
        if D.any_flag(1.0 if problem else 0.0, self.ctx, self.device):
            self.stop_diverged(problem or "another process reported divergence")

    def where(self, pname: str) -> str:
        return failures.param_block(self.block_paths, pname)

    # -- one step: train/step.py (the benchmark times the same function) ----------------------
    train_step = step_function

    def grad_check(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        return metrics.grad_check(self.core, self.blocks, self.cfg.grad_check_reference, x, y)

    def evaluate(self) -> Dict[str, Any]:
        return metrics.evaluate(self.core, self.blocks, self.test_local, self.pre, self.cfg.eval_batch_size,
                                self.ctx, self.device)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        self.t0 = time.time()
        if self.finished and self.final is not None:
            self.log(f"run already complete: test accuracy {100 * self.final['test_accuracy']:.2f}%")
            return self.final
        try:
            with self.signals:
                return self._fit()
        finally:
            self.tb.close()

    def _fit(self) -> Dict[str, Any]:
        from tqdm import tqdm

        cfg, ctx = self.cfg, self.ctx
        last_eval = self.history[-1] if self.history and "test_accuracy" in self.history[-1] else None
        interval, interval_t0 = metrics.Sums([]), time.time()
        done = False
        while self.epoch < cfg.epochs and not done:
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                       disable=True if not (cfg.progress and ctx.is_main) else None,  # None: off when stderr is no terminal
                       dynamic_ncols=True, leave=False, file=sys.stderr)
            for step, idx, xb, yb in self.batches.indexed_epoch(self.epoch, self.step_in_epoch):
                if cfg.grad_check_every and self.global_step % cfg.grad_check_every == 0 and ctx.is_main:
                    n = min(cfg.grad_check_batch, xb.shape[0])
                    cos = self.grad_check(self.pre(xb[:n]), yb[:n].to(self.device))
                    self.tb.scalars({f"gradcheck/{b}/cosine": c for b, c in cos.items()}, self.global_step + 1)
                gen = (torch.Generator().manual_seed(batch_seed(cfg.seed, self.epoch, step, ctx.rank))
                       if self.info.augment or cfg.input_noise > 0 else None)
                t = time.time()
                loss, correct, count, stats = self.train_step(xb, yb, gen, idx)
                dt = time.time() - t
                self.global_step += 1
                self.step_in_epoch = step + 1
                self.train_seconds += dt
                self.sums.add(loss, correct, count, dt, stats)
                interval.add(loss, correct, count, dt, stats)
                if ctx.is_main:
                    acc = self.sums.acc
                    bar.set_postfix(loss=f"{acc['loss_sum'] / acc['count']:.4f}",
                                    acc=f"{100 * acc['correct'] / acc['count']:.1f}%",
                                    sps=f"{acc['count'] * ctx.world / max(acc['time'], 1e-9):.0f}", refresh=False)
                    bar.update(1)
                if cfg.log_every and self.global_step % cfg.log_every == 0 and ctx.is_main:
                    now = time.time()
                    vals = {**interval.tensorboard(ctx.world, now - interval_t0),
                            "train/lr": self.opt.param_groups[0]["lr"]}
                    for p in self.plugins:
                        vals.update(p.scalars())
                    self.tb.scalars(vals, self.global_step)
                    interval, interval_t0 = metrics.Sums([]), now
                done = bool(cfg.max_steps) and self.global_step >= cfg.max_steps
                if cfg.ckpt_every and self.global_step % cfg.ckpt_every == 0 and not done \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint("every")
                failures.maybe_inject_fault(self.global_step, ctx.rank)
                self._check_signal(bar)
                if done:
                    break
            bar.close()
            rec = self._epoch_record()
            last = done or self.epoch + 1 >= cfg.epochs
            if last or (self.epoch + 1) % cfg.eval_every == 0:
                ev = self.evaluate()
                rec.update(metrics.eval_record(ev))
                last_eval = rec
            if self.step_in_epoch < self.steps_per_epoch:
                rec["partial"] = True
            self.history.append(rec)
            self._report_epoch(rec)
            self.epoch += 1
            self.step_in_epoch = 0
            self.sums = metrics.Sums([name for name, _ in self.blocks])
            signum = D.any_flag(float(self.signals.signum), self.ctx, self.device)
            if not last:
                self.save_checkpoint("epoch")
            if signum:
                self._interrupted(int(signum))
        return self._finish(last_eval)

    def _check_signal(self, bar) -> None:
        signum = D.any_flag(float(self.signals.signum), self.ctx, self.device)
        if signum:
            bar.close()
            self._interrupted(int(signum))

    def _interrupted(self, signum: int):
        self.save_checkpoint("signal")
        raise TrainingStopped(failures.interrupted_message(signum, self.global_step, self.run_dir), 128 + signum)

    def _epoch_record(self) -> Dict[str, Any]:
        rec = metrics.epoch_record(self.sums.reduced(self.ctx, self.device), self.epoch + 1, self.global_step)
        rec["lr"] = self.opt.param_groups[0]["lr"]
        for p in self.plugins:
            rec.update(p.epoch_record(self.ctx, self.device, self.log))
        return rec

    def _report_epoch(self, rec: Dict[str, Any]):
        if self.ctx.is_main:
            self.log(metrics.epoch_line(rec, self.cfg.epochs))
            self.tb.scalars(metrics.epoch_scalars(rec), self.global_step)
            self.tb.flush()

    def _finish(self, last_eval: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        if last_eval is None or last_eval.get("global_step") != self.global_step:
            last_eval = metrics.eval_record(self.evaluate())
        wall = self.elapsed_before + (time.time() - self.t0)
        result = metrics.final_metrics(self.cfg, self.history, last_eval, self.global_step, self.steps_per_epoch,
                                       wall, self.train_seconds, self.method, self.ctx.world)
        self.finished, self.final = True, result
        self.save_checkpoint("final")
        if self.ctx.is_main and self.run_dir is not None:
            try:
                ckpt_mod.atomic_write_json(self.run_dir / METRICS_FILE, result)
            except ckpt_mod.WriteError as e:
                self.stop_write_failed(e)
        top5 = f" (top-5 {100 * result['test_top5_accuracy']:.2f}%)" if "test_top5_accuracy" in result else ""
        self.log(f"final test accuracy: {100 * result['test_accuracy']:.2f}%{top5} "
                 f"({result['steps']} steps, {metrics.fmt_time(wall)}; gradient {self.method})")
        if self.run_dir is not None:
            self.log(f"run folder: {self.run_dir}")
        return result


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
        trainer.commit(existing=resume)
        result = trainer.fit()
        ok = True
        return result
    finally:
        if claimed is not None:  # a failure before the first checkpoint leaves no half-made folder
            claimed.release(failed=not ok)
