"""What a device model does to a weight: response to pulse trains and a tile's weight histogram (PNG).

    python -m train.experiments.device_response --device SoftBounds --out DIR [--pulses N]
        [--devices N] [--dw-min X] [--seed S]

writes ``DIR/<device>_response.png`` (weight vs pulse number for a run of up pulses then down
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


if __name__ == "__main__":
    main()
