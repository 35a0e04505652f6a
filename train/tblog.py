"""TensorBoard scalars (rank 0 only).  Tags written by the trainer:

``train/loss``, ``train/accuracy``, ``train/lr``, ``train/samples_per_s``,
``relax/<block>/steps``, ``relax/<block>/residual`` (free-phase relaxation statistics of each
energy block, averaged over the logging interval), ``epoch/train_loss``,
``epoch/train_accuracy``, ``epoch/test_accuracy``, ``epoch/test_loss``, and with
``grad_check_every=N`` ``gradcheck/<block>/cosine`` (EP vs the reference gradient); analog runs
add ``train/analog_lr`` and, per analog weight, ``analog/<param>/abs_mean``, ``range_used`` and
``at_bound`` (device saturation, from :meth:`ffebm.analog.AnalogTile.weight_stats`).

The event files live in ``RUN_DIR/tb``; view them with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional


class TBLogger:
    def __init__(self, log_dir: Optional[Path], purge_step: Optional[int] = None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int):
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(tag, float(v), step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(log_dir: Path) -> Dict[str, list]:
    """Read back all scalars of a TensorBoard folder: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
