"""Pictures of device models and tiles (matplotlib, Agg backend, PNG): a device's response to
pulse trains and a tile's weight histogram.  The command line that draws both for a device model
is ``python -m train.experiments.device_response``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .devices import PulsedDevice
from .device_array import DeviceArray

__all__ = ["device_response", "plot_device_response", "plot_weight_histogram"]


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
