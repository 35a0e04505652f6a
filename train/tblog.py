"""TensorBoard scalars (rank 0 only).  Tags written by the trainer:

``train/loss``, ``train/accuracy``, ``train/lr``, ``train/samples_per_s``,
``relax/<block>/steps``, ``relax/<block>/residual`` (free-phase relaxation statistics of each
energy block, averaged over the logging interval), ``epoch/train_loss``,
``epoch/train_accuracy``, ``epoch/test_accuracy``, ``epoch/test_loss`` (``epoch/test_top5_accuracy`` with 100+
classes), and with
``grad_check_every=N`` ``gradcheck/<block>/cosine`` (EP vs the reference gradient); analog runs
add ``train/analog_lr`` and, per analog weight, ``analog/<param>/abs_mean``, ``range_used`` and
``at_bound`` (device saturation, from :meth:`ffebm.analog.AnalogTile.weight_stats`).

The event files live in ``RUN_DIR/tb``; view them with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional

from .config import UserError


class TBLogger:
    """TensorBoard scalars; an I/O error (full disk) turns logging off with one line on stderr
    instead of stopping the training (TensorBoard is a view of the run, not part of it)."""

    def __init__(self, log_dir: Optional[Path], purge_step: Optional[int] = None):
        self.writer = None
        if log_dir is not None:
            if Path(log_dir).is_symlink():
                raise UserError(f"{log_dir} is a symbolic link; refusing to write TensorBoard files through it")
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
            except OSError as e:
                self._off(e)

    def _off(self, e: BaseException) -> None:
        print(f"warning: TensorBoard logging stopped ({type(e).__name__}: {e}); training goes on",
              file=sys.stderr, flush=True)
        w, self.writer = self.writer, None
        if w is not None:
            try:
                w.close()
            except Exception:  # noqa: BLE001 -- the writer is broken already
                pass

    def scalars(self, values: Dict[str, float], step: int):
        if self.writer is None:
            return
        try:
            for tag, v in values.items():
                if v is None:
                    continue
                self.writer.add_scalar(tag, float(v), step)
        except OSError as e:
            self._off(e)

    def flush(self):
        if self.writer is not None:
            try:
                self.writer.flush()
            except OSError as e:
                self._off(e)

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                print(f"warning: TensorBoard files may be incomplete ({e})", file=sys.stderr, flush=True)
            self.writer = None


def read_scalars(log_dir: Path) -> Dict[str, list]:
    """Read back all scalars of a TensorBoard folder: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
