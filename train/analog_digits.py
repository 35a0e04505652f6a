"""Digits ff-EBM whose energy blocks settle on analog tiles, trained by EP with pulsed updates.

    python -m train.analog_digits --algorithm c-ttv2 --epochs 20
    python -m train.analog_digits --algorithm all --epochs 20 --json out.json   # c-ttv2, sgd, digital

Model (smaller than ``models.build("digits")`` so that it trains on two CPU cores):

    x[64] -> DenseHopfield(64, H, W) -> Linear(W, W) + ReLU -> DenseHopfield(W, W, W/2) -> Linear(W/2, 10)

Analog runs: both energy blocks' couplings and input maps on tiles (SoftBounds devices, default
read model: every relaxation step's reads are noisy / quantised), EP's update realised as pulsed
outer products (:class:`~ffebm.analog.energy.AnalogEP` + :class:`AnalogOptimizer` with c-TTv2,
Tiki-Taka or plain analog SGD); biases and the digital layers are trained by Adam (lr 5e-3).
``digital``: the same model and EP (beta 0.5), all-digital, Adam 5e-3 on every parameter. Data:
sklearn's load_digits, pixels / 16, split ``train_test_split(test_size=0.2, random_state=0,
stratify=y)``.

Chosen analog settings (defaults; each measured, see the printed ``|upd|/dw_min``, the mean
expected per-batch update of the weight (SGD) or fast (TT) array in units of dw_min):

* ``AnalogEP(pair_form="mean_difference")``: EP's two outer products ``y+ x+^T - y- x-^T`` are
  pulsed as ``(y+ - y-) xbar^T`` and ``ybar (x+ - x-)^T`` (same sum). The raw pairs are each
  ~``|y||x|/(2 beta B)``, cancel only in expectation, and their up/down pulse pairs drive
  SoftBounds devices to their symmetry point (the "analog SGD shrinks weights to 0" symptom).
* ``beta 1.0`` (0.5 digital): the nudged states must differ by more than the read noise of the
  default read model (out_noise 0.06 per read, each relaxation step re-reads the tile).
* ``weight_scaling_omega 0.5``: each row's max |w| is programmed at 0.5 tile units (device
  bounds 0.6 +- 30%), so weights use the device range and the signal stands above out_noise.
* c-TTv2: ``fast_lr 5`` (absolute; |upd|/dw_min ~10 at the start, 60-150 later) so that the
  fast array A holds values well above the 0.06 noise of its one-hot transfer reads;
  ``columns_per_transfer`` = all columns every step (a 64-wide layer sees < 1 batch per column
  per epoch otherwise); analog lr 0.01 (the transfer ``H += lr * read``: larger values pulse
  C with the transfer-read noise and shrink it towards the symmetry point; 0.05 and above do
  not learn at all). Analog SGD: lr 1.0 (|upd|/dw_min ~1-3).

Read noise is what limits learning here (out_noise 0.06 on every relaxation read and on
c-TTv2's transfer reads), so the defaults also average it and let the weights settle:

* ``average 20``: each relaxation returns the mean state over its last 20 steps (``Relaxation(
  average_last=20)``), with T1 40 / T2 30 steps, so EP's two nudged states are compared with
  about 1/sqrt(20) of the per-read noise;
* a wider model (hidden 256, width 128), batch 64, 40 epochs, and a per-epoch lr decay of 0.95
  for both the analog and the digital optimiser (the test accuracy wanders by +-5 % between
  epochs at a constant rate).

Measured (2 shared CPU cores, OMP_NUM_THREADS=1, 40 epochs, default read model, SoftBounds):
c-TTv2 0.922 (seed 0; 0.928 seed 1, ~200 s), Tiki-Taka 0.958 (~160 s), analog SGD 0.589, the same
model digital 0.972. Without averaging and lr decay (64-128-64 model, 20 epochs) c-TTv2 stalled
at ~0.80, with averaging alone 0.84 (30 epochs).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ffebm
from ffebm.analog import (AnalogConfig, AnalogOptimizer, AnalogSGD, ChoppedTTv2, IOConfig, TikiTaka,
                          analog_parameters, device_from_name, digital_parameters)
from ffebm.analog.energy import AnalogEP, to_analog_energy

ALGORITHMS = ("c-ttv2", "tiki-taka", "sgd", "digital")
ARCHS = ("dense", "conv")


def load_digits_split(dtype=torch.float32):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype("float64") / 16.0
    y = d.target
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    t = lambda a: torch.as_tensor(a, dtype=dtype)
    return t(xtr), torch.as_tensor(ytr), t(xte), torch.as_tensor(yte)


def build_model(hidden: int = 128, width: int = 64, beta: float = 0.5, t1: int = 30, t2: int = 12,
                seed: int = 0, gain: float = 0.5, init_gain: float = 1.0, bias_init: float = 0.0,
                average: int = 0, arch: str = "dense") -> nn.Module:
    """``arch`` "dense": two DenseHopfield blocks; "conv": the first block is a ConvHopfield on
    the 8x8 image (input conv 1->16 with batch norm, 2x2 average pooling, conv coupling 16->32 with
    pooling; a digital linear layer to ``width`` after it), so its coupling goes on a tile as an
    AnalogConvCoupling and its input conv as an AnalogConv2d."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    grad = ffebm.EP(beta=beta)
    # with averaging, the returned state is the mean over the last ``average`` steps (read noise)
    relax = ffebm.Relaxation(steps=t1, tol=None if average else 1e-3, average_last=average)
    nudge = ffebm.Relaxation(steps=t2, tol=None, average_last=average)
    kw = dict(relaxation=relax, nudge_relaxation=nudge, gradient=grad, gain=gain, init_gain=init_gain)
    if arch == "conv":
        b1 = nn.Sequential(ffebm.ConvHopfield(1, (8, 8), [16, 32], pool="avg", name="block1", **kw),
                           nn.Flatten(), nn.Linear(128, width), nn.ReLU())
    else:
        b1 = ffebm.DenseHopfield([64, hidden, width], name="block1", **kw)
    b2 = ffebm.DenseHopfield([width, width, width // 2], name="block2", **kw)
    if bias_init:
        with torch.no_grad():
            for b in (b1, b2):
                for mod in list(b.input_map) + list(b.couplings):
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.fill_(bias_init)
    head = [nn.Unflatten(1, (1, 8, 8))] if arch == "conv" else []
    return nn.Sequential(*head, b1, nn.Linear(width, width), nn.ReLU(), b2, nn.Linear(width // 2, 10))


def make_algorithm(name: str, fast_lr: float = 0.2, transfer_every: int = 1, columns: int = 0,
                   in_chop_prob: float = 0.1):
    """``columns``: columns of the fast array read per transfer (0 = every column)."""
    cols = columns if columns > 0 else 10 ** 6  # clipped to the layer width by the algorithm
    if name == "c-ttv2":
        return ChoppedTTv2(fast_lr=fast_lr, transfer_every=transfer_every, columns_per_transfer=cols,
                           in_chop_prob=in_chop_prob)
    if name == "tiki-taka":
        return TikiTaka(fast_lr=fast_lr, transfer_every=transfer_every, columns_per_transfer=cols,
                        transfer_lr=1.0, scale_transfer_lr=True)
    if name == "sgd":
        return AnalogSGD()
    raise ValueError(f"--algorithm must be one of {ALGORITHMS}, got {name!r}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def _expected_update_ratio(params, lr: float) -> float:
    """Mean over analog weights of mean_ij |lr * sum_b d_b x_b^T| (tile units) / dw_min for the
    pending pairs (call before the optimizer step)."""
    r = []
    for p in params:
        pair = p.analog_ctx.pending()
        if pair is None:
            continue
        t = p.analog_ctx.tile
        x = pair[0].reshape(-1, t.in_size)
        d = pair[1].reshape(-1, t.out_size) / t.out_scale
        r.append((lr * (d.t() @ x)).abs().mean().item() / float(t.device_cfg.dw_min))
    return sum(r) / max(len(r), 1)


DEFAULT_EPOCHS = 40
ANALOG_LR = {"c-ttv2": 0.01, "tiki-taka": 0.01, "sgd": 1.0}


def run(algorithm: str, epochs: int = DEFAULT_EPOCHS, batch: int = 64, lr: float = 5e-3,
        analog_lr: Optional[float] = None,
        hidden: int = 256, width: int = 128, seed: int = 0, limit: int = 0, verbose: bool = True,
        beta: Optional[float] = None, omega: float = 0.5, fast_lr: float = 5.0, transfer_every: int = 1,
        columns: int = 0, in_chop_prob: float = 0.1, pair_form: str = "mean_difference",
        reads: str = "default", device: str = "soft_bounds", lr_decay: float = 0.95, gain: float = 0.5,
        init_gain: float = 1.0, bias_init: float = 0.0, average: int = 20, t1: int = 40, t2: int = 30,
        arch: str = "dense") -> Dict:
    """Train one configuration; returns a dict with the per-epoch and final test accuracy
    (``final_test_acc`` None and ``error`` set if a relaxation diverged).
    ``analog_lr`` None: ``ANALOG_LR[algorithm]``; ``beta`` None: 1.0 for analog runs, 0.5 digital."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if analog_lr is None:
        analog_lr = ANALOG_LR.get(algorithm, 0.0)
    if beta is None:
        beta = 0.5 if algorithm == "digital" else 1.0
    xtr, ytr, xte, yte = load_digits_split()
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    model = build_model(hidden, width, beta=beta, seed=seed, gain=gain, init_gain=init_gain, bias_init=bias_init,
                        average=average, t1=t1, t2=t2, arch=arch)
    opts: List[torch.optim.Optimizer] = []
    aparams = []
    if algorithm == "digital":
        opts.append(torch.optim.Adam(model.parameters(), lr=lr))
    else:
        dev = device_from_name(device)
        io = IOConfig.perfect() if reads == "perfect" else None
        cfg = AnalogConfig(device=dev, io=io, bwd_io=io, weight_scaling_omega=omega if omega > 0 else None)
        model = to_analog_energy(model, cfg, seed=seed)
        for m in model.modules():
            if isinstance(getattr(m, "gradient", None), AnalogEP):
                m.gradient.pair_form = pair_form
        aparams = analog_parameters(model)
        opts.append(AnalogOptimizer(aparams, make_algorithm(algorithm, fast_lr, transfer_every, columns,
                                                            in_chop_prob), lr=analog_lr, seed=seed))
        opts.append(torch.optim.Adam(digital_parameters(model), lr=lr))
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, lr_decay) for o in opts] if lr_decay != 1.0 else []
    g = torch.Generator().manual_seed(seed)
    hist = []
    t0 = time.time()
    error = None
    try:
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(len(xtr), generator=g)
            tot, n, ratios = 0.0, 0, []
            for i in range(0, len(xtr), batch):
                idx = perm[i:i + batch]
                for o in opts:
                    o.zero_grad()
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                if aparams:
                    ratios.append(_expected_update_ratio(aparams, opts[0].param_groups[0]["lr"]
                                                         if algorithm == "sgd" else fast_lr))
                for o in opts:
                    o.step()
                tot += loss.item() * len(idx)
                n += len(idx)
            for s in scheds:
                s.step()
            model.eval()
            acc = accuracy(model, xte, yte)
            rec = {"epoch": ep + 1, "train_loss": tot / max(n, 1), "test_acc": acc, "time_s": time.time() - t0}
            if ratios:
                rec["update_over_dw_min"] = sum(ratios) / len(ratios)
                rec["max_abs_w_tile"] = max(p.analog_ctx.tile.tile_weights().abs().max().item() for p in aparams)
                rec["mean_abs_w_tile"] = sum(p.analog_ctx.tile.tile_weights().abs().mean().item()
                                             for p in aparams) / len(aparams)
            hist.append(rec)
            if verbose:
                extra = (f" |upd|/dw_min {rec['update_over_dw_min']:.2f} |w_tile| mean {rec['mean_abs_w_tile']:.3f}"
                         f" max {rec['max_abs_w_tile']:.3f}") if ratios else ""
                print(f"[{algorithm}] epoch {ep + 1}/{epochs} loss {tot / max(n, 1):.4f} test acc {acc:.4f} "
                      f"({time.time() - t0:.0f}s){extra}", flush=True)
    except ffebm.RelaxationDiverged as e:  # a device/setting that blows up: report it, keep the history
        error = f"epoch {len(hist) + 1}: {e}"
        if verbose:
            print(f"[{algorithm}] diverged at {error}", flush=True)
    return {"algorithm": algorithm, "epochs": epochs, "batch": batch, "lr": lr, "analog_lr": analog_lr,
            "hidden": hidden, "width": width, "seed": seed, "beta": beta, "omega": omega,
            "fast_lr": fast_lr, "transfer_every": transfer_every, "columns": columns,
            "in_chop_prob": in_chop_prob, "gain": gain, "init_gain": init_gain, "bias_init": bias_init, "pair_form": pair_form, "reads": reads, "lr_decay": lr_decay,
            "device": device if algorithm != "digital" else None, "arch": arch,
            "final_test_acc": None if error else (hist[-1]["test_acc"] if hist else accuracy(model, xte, yte)),
            "error": error, "history": hist}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algorithm", default="all",
                    help=f"one of {ALGORITHMS}, a comma-separated list, or 'all' (c-ttv2, sgd, digital)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate of the digital parameters")
    ap.add_argument("--analog-lr", type=float, default=None,
                    help=f"AnalogOptimizer learning rate (default per algorithm: {ANALOG_LR})")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=None, help="EP beta (default 1.0 analog, 0.5 digital)")
    ap.add_argument("--omega", type=float, default=0.5, help="weight_scaling_omega (0: off)")
    ap.add_argument("--fast-lr", type=float, default=5.0, help="TT/c-TTv2 fast-array lr (absolute)")
    ap.add_argument("--transfer-every", type=int, default=1)
    ap.add_argument("--columns", type=int, default=0, help="columns per transfer (0: all)")
    ap.add_argument("--chop-prob", type=float, default=0.1)
    ap.add_argument("--pair-form", default="mean_difference", choices=("mean_difference", "raw"))
    ap.add_argument("--reads", default="default", choices=("default", "perfect"))
    ap.add_argument("--device", default="soft_bounds",
                    help="device model name (soft_bounds, constant_step, linear_step, exp_step, pow_step, "
                         "piecewise_step, ideal)")
    ap.add_argument("--gain", type=float, default=0.5, help="DenseHopfield gain a (state = a * drive)")
    ap.add_argument("--init-gain", type=float, default=1.0, help="init std = init_gain / sqrt(fan_in)")
    ap.add_argument("--bias-init", type=float, default=0.0, help="initial bias of the blocks' layers")
    ap.add_argument("--lr-decay", type=float, default=0.95, help="per-epoch lr factor")
    ap.add_argument("--average", type=int, default=20,
                    help="return the mean state over the last N relaxation steps (averages read noise)")
    ap.add_argument("--t1", type=int, default=40, help="free relaxation steps")
    ap.add_argument("--t2", type=int, default=30, help="nudged relaxation steps")
    ap.add_argument("--arch", default="dense", choices=ARCHS,
                    help="dense: two dense blocks; conv: the first block convolutional (conv couplings on tiles)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train/test samples (smoke tests)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args(argv)
    try:
        device_from_name(a.device)
    except ValueError as e:
        ap.error(f"--device: {str(e).splitlines()[0]}")
    if a.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {a.epochs}")
    algs = ["c-ttv2", "sgd", "digital"] if a.algorithm == "all" else a.algorithm.split(",")
    for al in algs:
        if al not in ALGORITHMS:
            ap.error(f"--algorithm must be one of {ALGORITHMS} (or a comma list / 'all'), got {al!r}")
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffebm.ConvergenceWarning) if hasattr(ffebm, "ConvergenceWarning") else None
        for al in algs:
            results[al] = run(al, a.epochs, a.batch, a.lr, a.analog_lr, a.hidden, a.width, a.seed, a.limit,
                              beta=a.beta, omega=a.omega, fast_lr=a.fast_lr, transfer_every=a.transfer_every,
                              columns=a.columns, in_chop_prob=a.chop_prob, pair_form=a.pair_form,
                              reads=a.reads, device=a.device, lr_decay=a.lr_decay,
                              gain=a.gain, init_gain=a.init_gain, bias_init=a.bias_init,
                              average=a.average, t1=a.t1, t2=a.t2, arch=a.arch)
    print("\nfinal test accuracy (digits, %d epochs):" % a.epochs)
    for al, r in results.items():
        label = "digital EP" if al == "digital" else f"analog {al} ({a.device}, {a.reads} reads)"
        print(f"  {label:45s} " + (f"{r['final_test_acc']:.4f}" if r["error"] is None else f"diverged ({r['error']})"))
    summary = {al: r["final_test_acc"] for al, r in results.items()}
    print(json.dumps({"final_test_acc": summary}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
