"""How a run stops: divergence, failed writes, signals, and the fault injection of the tests.

A stop never loses work: it names the step and the last good checkpoint, records the failure in
``RUN/failure.json`` and leaves the checkpoints as they are (a checkpoint of a non-finite state is
never written, see :mod:`train.state`).  Exit codes: 2 configuration, 3 divergence, 4 a write
failed, 128 + N signal N.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as ckpt_mod
from .runfolder import FAILURE_FILE


class TrainingStopped(Exception):
    """Training ended early on purpose (divergence, signal); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def where(global_step: int, epoch: int, step_in_epoch: int) -> str:
    return f"step {global_step + 1} (epoch {epoch + 1}, batch {step_in_epoch + 1})"


def last_good(last_ckpt: Optional[Tuple[Path, int]]) -> str:
    if last_ckpt is not None:
        return f"last good checkpoint: {last_ckpt[0]} (step {last_ckpt[1]})"
    return "no checkpoint had been written yet"


def param_block(block_paths: Dict[str, str], pname: str) -> str:
    """Which part of the model parameter ``pname`` belongs to, in words."""
    for path, bname in block_paths.items():
        if pname.startswith(path + ".") or not path:
            return f"energy block '{bname}'"
    return "a digital layer"


def nonfinite_block(blocks: List[Tuple[str, Any]]) -> str:
    """'; energy block X reports residual nan' for the first block whose last solve was not finite."""
    for name, blk in blocks:
        r = getattr(getattr(blk, "stats", None), "residual", None)
        if r is not None and not math.isfinite(float(r)):
            return f"; energy block '{name}' reports residual {r}"
    return ""


def record_failure(run_dir: Optional[Path], message: str, global_step: int, epoch: int, batch: int,
                   last_ckpt: Optional[Tuple[Path, int]]) -> None:
    """Write ``RUN/failure.json`` (best effort: the message printed to the user says it all)."""
    if run_dir is None:
        return
    record = {"message": message, "global_step": global_step, "epoch": epoch, "batch": batch,
              "time": datetime.now().isoformat(timespec="seconds"),
              "last_good_checkpoint": str(last_ckpt[0]) if last_ckpt else None,
              "last_good_step": last_ckpt[1] if last_ckpt else None}
    try:
        ckpt_mod.atomic_write_json(run_dir / FAILURE_FILE, record)
    except ckpt_mod.WriteError:
        pass


class SignalCatcher:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (it then checkpoints and stops);
    a second signal interrupts at once.  Used as a context manager around the loop."""

    def __init__(self):
        self.signum = 0
        self._old: Dict[int, Any] = {}

    def _on_signal(self, signum, frame):
        if self.signum:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "SignalCatcher":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def interrupted_message(signum: int, global_step: int, run_dir: Optional[Path]) -> str:
    name = signal.Signals(signum).name if signum in (signal.SIGINT, signal.SIGTERM) else str(signum)
    where_ = run_dir if run_dir is not None else "(no run folder)"
    from .cli import invoked_as

    return (f"{name} received: checkpoint saved at step {global_step}; "
            f"continue with: {invoked_as('train')} --resume {where_}")


def maybe_inject_fault(global_step: int, rank: int) -> None:
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
