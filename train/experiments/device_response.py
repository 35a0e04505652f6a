"""What a device model does to a weight: response to pulse trains and a tile's weight histogram (PNG).

    python -m train.experiments.device_response --device soft_bounds --out DIR [--pulses N]
        [--devices N] [--dw-min X] [--seed S]

``--device`` takes the snake-case names of the trainer's ``analog=`` key (soft_bounds, exp_step,
...; the class names, e.g. SoftBounds, work too).  Writes ``DIR/<Device>_response.png`` (named
after the device model's class) (weight vs pulse number for a run of up pulses then down
pulses: mean, +-1 std band over devices and a few single devices) and
``DIR/<device>_weights.png`` (histogram of a tile's weights after programming and after random
pulsed updates, with the mean device bounds).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

import torch

from ffebm.analog import DeviceArray, InvalidSetting, UpdateConfig, device_from_name
from ffebm.analog.plots import plot_device_response, plot_weight_histogram
from ffebm.analog.rng import make_generator


MAX_PULSES = 100_000   # each pulse is one step of a Python loop
MAX_DEVICES = 10_000


def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..analog import canonical_device_name, device_names
    from ..cli import invoked_as, positive_float, positive_int, seed
    from ..config import ConfigError

    ap = argparse.ArgumentParser(prog=invoked_as("train.experiments.device_response"),
                                 description="Device response and tile weight histogram (PNG).")
    ap.add_argument("--device", default="soft_bounds", help=f"device model: {', '.join(device_names())}")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--pulses", type=positive_int, default=None, help=f"up pulses (then as many down; at most {MAX_PULSES})")
    ap.add_argument("--devices", type=positive_int, default=100, help=f"devices whose response is averaged (at most {MAX_DEVICES})")
    ap.add_argument("--dw-min", type=positive_float, default=None, help="step of one pulse (default: the model's)")
    ap.add_argument("--seed", type=seed, default=0)
    a = ap.parse_args(argv)
    try:
        canonical_device_name(a.device)
    except ConfigError as e:
        ap.error(f"argument --device: {e}")
    kw = {} if a.dw_min is None else {"dw_min": a.dw_min}
    try:
        cfg = device_from_name(a.device, **kw)
    except (InvalidSetting, TypeError, ValueError) as e:
        ap.error(f"argument --dw-min: {str(e).splitlines()[0]}")
    span = cfg.w_max - cfg.w_min
    if a.dw_min is not None and math.isfinite(span) and a.dw_min >= span:
        ap.error(f"argument --dw-min: {a.dw_min:g} is not below the device's weight range {span:g} "
                 f"([{cfg.w_min:g}, {cfg.w_max:g}])")
    pulses = a.pulses if a.pulses is not None else (math.ceil(1.2 * span / cfg.dw_min) if math.isfinite(span) else 500)
    if pulses > MAX_PULSES:
        ap.error(f"argument --pulses: {pulses} pulses" + ("" if a.pulses is not None else
                 f" (1.2 x the weight range / dw_min {cfg.dw_min:g})") + f" is more than {MAX_PULSES}; "
                 "pass a smaller --pulses" + ("" if a.pulses is not None else " or a larger --dw-min"))
    if a.devices > MAX_DEVICES:
        ap.error(f"argument --devices: {a.devices} is more than {MAX_DEVICES}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        ap.error(f"argument --out: {a.out} exists and is not a folder")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        ap.error(f"argument --out: cannot create {a.out}: {e.strerror or e}")
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


if __name__ == "__main__":
    main()
