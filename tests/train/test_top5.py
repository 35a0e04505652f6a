"""Top-5 accuracy for data sets with 100+ classes: computed right, in the logs, metrics.json,
the history and train.evaluate; absent for 10 classes."""
import json

import torch
import torch.nn as nn

from train import distributed as D
from train import metrics
from train.data import ArrayDataset
from train.recipes import build_config
from train.trainer import train


class RankedLogits(nn.Module):
    """Sample i (its index stored in the image) gets its true label at rank i % 10."""

    def __init__(self, labels: torch.Tensor, classes: int):
        super().__init__()
        self.labels, self.classes = labels, classes

    def forward(self, x):
        idx = x.flatten(1)[:, 0].round().long()
        logits = torch.arange(self.classes, 0, -1, dtype=torch.float32).repeat(len(idx), 1)   # rank j -> class j
        for row, i in enumerate(idx.tolist()):
            y, r = int(self.labels[i]), i % 10
            perm = list(range(self.classes))
            perm.remove(y)
            perm.insert(r, y)           # the true class at rank r
            logits[row, perm] = torch.arange(self.classes, 0, -1, dtype=torch.float32)
        return logits


def test_top5_against_known_ranks():
    n, k = 40, 100
    labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    ev = metrics.evaluate(RankedLogits(labels, k), [], ArrayDataset(images, labels), lambda x: x.float(), 7,
                          D.DistContext(), "cpu")
    assert ev["test_accuracy"] == 4 / 40               # rank 0: i % 10 == 0
    assert ev["test_top5_accuracy"] == 20 / 40          # ranks 0-4
    ev10 = metrics.evaluate(nn.Linear(1, 10), [], ArrayDataset(images, labels % 10), lambda x: x.flatten(1).float(), 7,
                            D.DistContext(), "cpu")
    assert "test_top5_accuracy" not in ev10


def test_top5_in_metrics_history_and_log(tmp_path):
    cfg = build_config("digits", {"dataset": "fake", "num_classes": "100", "image_size": "8", "in_channels": "1",
                                  "fake_train_size": "16", "fake_test_size": "50", "batch_size": "8", "epochs": "1",
                                  "progress": "false", "tensorboard": "false", "num_threads": "1"})
    lines = []
    m = train(cfg, tmp_path / "r", log=lines.append)
    assert m["test_accuracy"] <= m["test_top5_accuracy"] <= 1.0
    assert m["history"][-1]["test_top5_accuracy"] == m["test_top5_accuracy"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test_top5_accuracy"] == m["test_top5_accuracy"]
    assert any("top-5" in line for line in lines)
    from train.evaluate import evaluate_run

    out = evaluate_run(tmp_path / "r", log=lambda s: None)
    assert out["test_top5_accuracy"] == m["test_top5_accuracy"]
