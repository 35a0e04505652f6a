"""What a run measures: running sums of loss / accuracy / relaxation statistics, the per-epoch
record, the final ``metrics.json``, the console line of an epoch and the per-block gradient check.

Sums are kept per process and reduced across processes only where a record is made (epoch end,
checkpoint), so a resumed run continues the same sums (they travel in the checkpoint's ``accum``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import ffebm

from . import distributed as D


def block_stats(blocks: List[Tuple[str, nn.Module]]) -> Dict[str, Tuple[float, float]]:
    """{block: (steps, residual)} of each energy block's last free relaxation."""
    out = {}
    for name, blk in blocks:
        st = getattr(blk, "stats", None)
        try:
            out[name] = (float(st.steps), float(st.residual))
        except (AttributeError, TypeError, ValueError):
            continue
    return out


class Sums:
    """Loss, correct, count and time of the training steps, and (steps, residual, n) per block."""

    KEYS = ("loss_sum", "correct", "count", "time")

    def __init__(self, block_names: List[str]):
        self.acc = {k: 0.0 for k in self.KEYS}
        self.blocks = {name: [0.0, 0.0, 0.0] for name in block_names}

    def add(self, loss: float, correct: float, count: float, seconds: float,
            stats: Dict[str, Tuple[float, float]]) -> None:
        self.acc["loss_sum"] += loss * count
        self.acc["correct"] += correct
        self.acc["count"] += count
        self.acc["time"] += seconds
        for name, (s, r) in stats.items():
            b = self.blocks.setdefault(name, [0.0, 0.0, 0.0])
            b[0] += s
            b[1] += r
            b[2] += 1

    def reduced(self, ctx: D.DistContext, device) -> Dict[str, Any]:
        """The sums over every process (a collective: every rank calls it); wall time stays local."""
        names = list(self.blocks)
        vals = [self.acc[k] for k in self.KEYS] + [x for n in names for x in self.blocks[n]]
        vals = D.reduce_values(vals, ctx, device) if ctx.enabled else vals
        out: Dict[str, Any] = {k: float(vals[i]) for i, k in enumerate(self.KEYS)}
        out["time"] = self.acc["time"]
        off = len(self.KEYS)
        out["blocks"] = {n: [float(v) for v in vals[off + 3 * i: off + 3 * i + 3]] for i, n in enumerate(names)}
        return out

    def load(self, stored: Dict[str, Any]) -> None:
        for k in self.acc:
            self.acc[k] = float(stored.get(k, 0.0))
        for name, v in stored.get("blocks", {}).items():
            if name in self.blocks:
                self.blocks[name] = [float(x) for x in v]

    def tensorboard(self, world: int, seconds: float) -> Dict[str, float]:
        count = max(self.acc["count"], 1.0)
        vals = {"train/loss": self.acc["loss_sum"] / count, "train/accuracy": self.acc["correct"] / count,
                "train/samples_per_s": self.acc["count"] * world / max(seconds, 1e-9)}
        for name, (s, r, k) in self.blocks.items():
            if k:
                vals[f"relax/{name}/steps"] = s / k
                vals[f"relax/{name}/residual"] = r / k
        return vals


def epoch_record(g: Dict[str, Any], epoch: int, global_step: int) -> Dict[str, Any]:
    """One entry of the run's history from reduced :class:`Sums`."""
    count = max(g["count"], 1.0)
    return {"epoch": epoch, "global_step": global_step, "train_loss": g["loss_sum"] / count,
            "train_accuracy": g["correct"] / count, "train_samples": int(g["count"]),
            "train_relaxation": {n: {"steps_mean": v[0] / v[2], "residual_mean": v[1] / v[2]}
                                 for n, v in g["blocks"].items() if v[2]},
            "seconds": g["time"]}


def fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def epoch_line(rec: Dict[str, Any], epochs: int) -> str:
    sps = rec["train_samples"] / max(rec["seconds"], 1e-9)
    msg = (f"epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.4f}, "
           f"train acc {100 * rec['train_accuracy']:.2f}%")
    if "test_accuracy" in rec:
        msg += f", test acc {100 * rec['test_accuracy']:.2f}%"
    if "test_top5_accuracy" in rec:
        msg += f" (top-5 {100 * rec['test_top5_accuracy']:.2f}%)"
    return msg + f" ({fmt_time(rec['seconds'])}, {sps:.0f} samples/s)"


def epoch_scalars(rec: Dict[str, Any]) -> Dict[str, float]:
    vals = {"epoch/train_loss": rec["train_loss"], "epoch/train_accuracy": rec["train_accuracy"]}
    if "test_accuracy" in rec:
        vals.update({"epoch/test_accuracy": rec["test_accuracy"], "epoch/test_loss": rec["test_loss"]})
    if "test_top5_accuracy" in rec:
        vals["epoch/test_top5_accuracy"] = rec["test_top5_accuracy"]
    return vals


def relaxation_summary(history: List[Dict[str, Any]], last_eval: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Mean relaxation steps / residual per block over the training epochs, and at the last evaluation."""
    sums: Dict[str, List[float]] = {}
    for rec in history:
        for n, v in rec.get("train_relaxation", {}).items():
            a = sums.setdefault(n, [0.0, 0.0, 0])
            a[0] += v["steps_mean"]
            a[1] += v["residual_mean"]
            a[2] += 1
    out = {n: {"train_steps_mean": s / k, "train_residual_mean": r / k} for n, (s, r, k) in sums.items()}
    for n, v in last_eval.get("test_relaxation", {}).items():
        out.setdefault(n, {}).update(test_steps_mean=v["steps_mean"], test_residual_mean=v["residual_mean"])
    return out


TOP5_MIN_CLASSES = 100   # top-5 accuracy is reported for data sets with at least this many classes


@torch.no_grad()
def evaluate(model: nn.Module, blocks, test_set, pre, eval_batch: int, ctx: D.DistContext, device) -> Dict[str, Any]:
    """Test loss, accuracy (and top-5 accuracy with 100+ classes) and per-block relaxation
    statistics over this process's share of the test set, reduced over the processes."""
    model.eval()
    loss_sum = correct = count = correct5 = 0.0
    top5 = False
    bacc = {name: [0.0, 0.0, 0.0] for name, _ in blocks}
    for i in range(0, len(test_set), eval_batch):
        x = pre(test_set.images[i:i + eval_batch])
        y = test_set.labels[i:i + eval_batch].to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
        top5 = logits.shape[1] >= TOP5_MIN_CLASSES
        if top5:
            correct5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum().item()
        for name, (s, r) in block_stats(blocks).items():
            bacc[name][0] += s
            bacc[name][1] += r
            bacc[name][2] += 1
    model.train()
    names = list(bacc)
    vals = D.reduce_values([loss_sum, correct, count, correct5] + [v for n in names for v in bacc[n]], ctx, device)
    loss_sum, correct, count, correct5 = vals[:4]
    relax = {}
    for i, n in enumerate(names):
        s, r, k = vals[4 + 3 * i: 7 + 3 * i]
        if k:
            relax[n] = {"steps_mean": s / k, "residual_mean": r / k}
    out = {"test_accuracy": correct / max(count, 1), "test_loss": loss_sum / max(count, 1),
           "test_samples": int(count), "relaxation": relax}
    if top5:
        out["test_top5_accuracy"] = correct5 / max(count, 1)
    return out


def eval_record(ev: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of an evaluation kept in the history and the final metrics."""
    rec = {"test_accuracy": ev["test_accuracy"], "test_loss": ev["test_loss"], "test_relaxation": ev["relaxation"]}
    if "test_top5_accuracy" in ev:
        rec["test_top5_accuracy"] = ev["test_top5_accuracy"]
    return rec


def grad_check(model: nn.Module, blocks, reference: str, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Per-block cosine between each block's own gradient method and ``reference`` (implicit or
    unrolled) on (x, y), via :func:`ffebm.compare_gradients`.  The model's state and the RNG are
    restored afterwards, so a check does not perturb training."""
    if not blocks:
        return {}
    ref = ffebm.Implicit() if reference == "implicit" else ffebm.Unrolled()
    # each block's own method, compared on copies: running a block's method would advance its
    # random stream (EP's random sign); the state restore below covers the block buffers
    originals = {name: blk.gradient for name, blk in blocks}
    buffers = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    try:
        for _, blk in blocks:
            blk.gradient = copy.deepcopy(blk.gradient)
        res = ffebm.compare_gradients(model, F.cross_entropy, (x, y), reference=ref,
                                      candidates=[ffebm.CURRENT], include_input=False)
        return per_block_cosine(res)
    finally:
        for name, blk in blocks:
            blk.gradient = originals[name]
        model.load_state_dict(buffers)
        torch.set_rng_state(rng)


def per_block_cosine(res) -> Dict[str, float]:
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


def final_metrics(cfg, history: List[Dict[str, Any]], last_eval: Dict[str, Any], global_step: int,
                  steps_per_epoch: int, wall: float, train_seconds: float, method: str,
                  world: int) -> Dict[str, Any]:
    """The content of ``metrics.json``."""
    last_train = history[-1] if history else {}
    samples = sum(h.get("train_samples", 0) for h in history)
    return {
        "status": "completed", "recipe": cfg.recipe, "model": cfg.model, "dataset": cfg.dataset,
        "test_accuracy": last_eval["test_accuracy"], "test_loss": last_eval["test_loss"],
        **({"test_top5_accuracy": last_eval["test_top5_accuracy"]} if "test_top5_accuracy" in last_eval else {}),
        "train_loss": last_train.get("train_loss"), "train_accuracy": last_train.get("train_accuracy"),
        "epochs": global_step / steps_per_epoch, "steps": global_step,
        "wall_seconds": wall, "train_seconds": train_seconds,
        "samples_per_second": samples / max(train_seconds, 1e-9),
        "gradient_method": method, "relaxation": relaxation_summary(history, last_eval),
        "world_size": world, "seed": cfg.seed, "history": history,
    }
