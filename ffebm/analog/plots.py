"""Pictures of device models and tiles (matplotlib, Agg backend, PNG).

Command line::

    python -m ffebm.analog.plots --device SoftBounds --out DIR [--pulses N] [--devices N]
                                 [--dw-min X] [--seed S]

writes ``DIR/<device>_response.png`` (weight vs pulse number for a run of up pulses then down
pulses: mean, +-1 std band over devices and a few single devices) and
``DIR/<device>_weights.png`` (histogram of a tile's weights after programming and after random
pulsed updates, with the mean device bounds).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Optional, Sequence

import torch

from .config import InvalidSetting, UpdateConfig
from .device_array import DeviceArray
from .devices import PulsedDevice, device_from_name
from .rng import make_generator

__all__ = ["device_response", "plot_device_response", "plot_weight_histogram", "main"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def device_response(device_cfg: PulsedDevice, n_pulses: Optional[int] = None, n_devices: int = 100,
                    seed: int = 0) -> torch.Tensor:
    """States [2 n_pulses + 1, n_devices] of ``n_devices`` devices (one sample of the spread)
    starting at 0, receiving ``n_pulses`` single up pulses then ``n_pulses`` down pulses."""
    if n_pulses is None:
        span = device_cfg.w_max - device_cfg.w_min
        n_pulses = int(math.ceil(1.2 * span / device_cfg.dw_min)) if math.isfinite(span) else 500
    da = DeviceArray(device_cfg, (1, n_devices), seed=seed, dtype=torch.float64)
    da.set_weights(torch.zeros(1, n_devices, dtype=torch.float64))
    out = [da.w[0].clone()]
    one = torch.ones(1, n_devices, dtype=torch.float64)
    for k in range(2 * n_pulses):
        sign = 1.0 if k < n_pulses else -1.0
        da.w = device_cfg.pulse_once(da.w, sign * one, da.params, da.generator)
        out.append(da.w[0].clone())
    return torch.stack(out)


def plot_device_response(device_cfg: PulsedDevice, path: str, n_pulses: Optional[int] = None,
                         n_devices: int = 100, seed: int = 0, n_traces: int = 5) -> str:
    plt = _plt()
    ws = device_response(device_cfg, n_pulses, n_devices, seed).numpy()
    n = (ws.shape[0] - 1) // 2
    k = range(ws.shape[0])
    mean, std = ws.mean(1), ws.std(1)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i in range(min(n_traces, ws.shape[1])):
        ax.plot(k, ws[:, i], color="0.6", lw=0.6, alpha=0.8, label="single devices" if i == 0 else None)
    ax.fill_between(k, mean - std, mean + std, color="tab:blue", alpha=0.25, label="mean ± 1 std")
    ax.plot(k, mean, color="tab:blue", lw=2, label=f"mean of {ws.shape[1]} devices")
    ax.axvline(n, color="k", ls=":", lw=1)
    if math.isfinite(device_cfg.w_max) and math.isfinite(device_cfg.w_min):
        ax.axhline(device_cfg.w_max, color="tab:red", ls="--", lw=0.8, label="nominal bounds")
        ax.axhline(device_cfg.w_min, color="tab:red", ls="--", lw=0.8)
    ax.text(n * 0.5, ax.get_ylim()[0], "up pulses", ha="center", va="bottom")
    ax.text(n * 1.5, ax.get_ylim()[0], "down pulses", ha="center", va="bottom")
    ax.set_xlabel("pulse number")
    ax.set_ylabel("weight (tile units)")
    name = type(device_cfg).__name__
    ax.set_title(f"{name}: response to {n} up then {n} down pulses "
                 f"(dw_min {device_cfg.dw_min:g}, dw_min_std {device_cfg.dw_min_std:g})", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_weight_histogram(weights: Sequence[Any], labels: Sequence[str], path: str,
                          bounds: Optional[Sequence[float]] = None, title: str = "") -> str:
    """Histogram(s) of weight tensors (e.g. ``tile.get_weights()``), with optional bounds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for w, lab in zip(weights, labels):
        v = torch.as_tensor(w).detach().flatten().float().cpu().numpy()
        ax.hist(v, bins=80, alpha=0.55, label=f"{lab} (std {v.std():.3f})")
    if bounds is not None:
        for b in bounds:
            ax.axvline(b, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("weight (tile units)")
    ax.set_ylabel("devices")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Device response and tile weight histogram (PNG).")
    ap.add_argument("--device", default="SoftBounds", help="device model name")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--pulses", type=int, default=None, help="up pulses (then as many down)")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--dw-min", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    kw = {} if a.dw_min is None else {"dw_min": a.dw_min}
    try:
        cfg = device_from_name(a.device, **kw)
    except InvalidSetting as e:
        ap.error(str(e))
    os.makedirs(a.out, exist_ok=True)
    name = type(cfg).__name__
    p1 = plot_device_response(cfg, os.path.join(a.out, f"{name}_response.png"), a.pulses,
                              a.devices, a.seed)
    # tile: program N(0, 0.15) weights, then 100 random pulsed updates
    g = make_generator(a.seed)
    da = DeviceArray(cfg, (128, 128), seed=a.seed)
    target = (0.15 * torch.randn(128, 128, generator=g))
    da.set_weights(target)
    programmed = da.w.clone()
    for _ in range(100):
        x = torch.rand(16, 128, generator=g)
        d = 0.1 * torch.randn(16, 128, generator=g)
        da.pulsed_update(x, d, 0.01, UpdateConfig())
    b = [cfg.w_min, cfg.w_max] if math.isfinite(cfg.w_max - cfg.w_min) else None
    p2 = plot_weight_histogram([programmed, da.w], ["programmed", "after 100 random pulsed updates"],
                               os.path.join(a.out, f"{name}_weights.png"), b,
                               f"{name} tile 128x128: weights (dashed: nominal bounds)")
    print(p1)
    print(p2)


if __name__ == "__main__":  # pragma: no cover
    main()
