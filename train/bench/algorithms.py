"""Final weight error of the analog training algorithms on the least-squares problem of
Wu et al. 2024 (the Tiki-Taka v2 / AGAD comparison), beside the reference simulator's figures.

    python -m train.bench.algorithms [--steps 3000] [--seeds 1] [--offset 0.0] [--device cpu]

W* 16x32 ~ U(-0.3, 0.3), x ~ N(0, 1), batch 8, lr 0.05, perfect reads, SoftBounds devices with
bounds +-tau; each algorithm with its defaults (ffebm.analog.algorithms). Start error ~0.03.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import torch

from ffebm.analog import AnalogAlgorithm, AnalogTile, IOConfig, PulsedDevice, SoftBounds, algorithm_from_name
from ffebm.analog.rng import make_generator

REFERENCE = {  # AIHWKit 1.2.0 on the same problem: sgd, ttv1, ttv2, cttv2 (its defaults)
    0.4: (6.5e-3, 3.4e-4, 3.8e-4, 2.1e-2),
    0.6: (1.8e-3, 1.2e-4, 1.9e-4, 2.1e-2),
    1.0: (5.7e-5, 1.1e-4, 1.4e-4, 2.0e-2),
}
ALGOS = ("sgd", "ttv1", "ttv2", "cttv2", "agad")


def least_squares_run(algorithm: AnalogAlgorithm, tau: float = 0.4, steps: int = 3000,
                      seed: int = 0, lr: float = 0.05, out_size: int = 16, in_size: int = 32,
                      batch: int = 8, device: Any = None, dtype: torch.dtype = torch.float32,
                      device_cfg: Optional[PulsedDevice] = None) -> float:
    """The least-squares problem of Wu et al. 2024: ``W*`` (out x in)
    ~ U(-0.3, 0.3), ``x ~ N(0, 1)``, batches of ``batch``, loss ``0.5 mean_b |W x - W* x|^2``,
    ``lr`` 0.05, perfect reads, SoftBounds devices with bounds +-tau (no spread of the bounds,
    published spread of the steps and pulse noise), W starting at 0. Returns the final mean
    squared weight error (start: ~0.03)."""
    gen = make_generator(seed)
    w_star = (torch.rand(out_size, in_size, generator=gen, dtype=dtype) * 0.6 - 0.3).to(device)
    dev = device_cfg if device_cfg is not None else SoftBounds(
        w_max=tau, w_min=-tau, w_max_dtod=0.0, w_min_dtod=0.0)
    tile = AnalogTile(out_size, in_size, dev, io=IOConfig.perfect(), seed=seed + 1,
                      device=device, dtype=dtype)
    tile.set_weights(torch.zeros(out_size, in_size, dtype=dtype, device=device))
    g2 = make_generator(seed + 2, tile.device)
    rt = algorithm.build(tile, g2)
    for _ in range(steps):
        x = torch.randn(batch, in_size, generator=gen, dtype=dtype).to(tile.device)
        W = tile.get_weights()
        d = (x @ W.t() - x @ w_star.t()) / batch
        rt.step(x, d, lr)
    return float(((tile.get_weights() - w_star) ** 2).mean().item())


def main(argv=None) -> None:
    from ffebm.analog import InvalidSetting

    from ..cli import finite_float, invoked_as, positive_float, positive_int, torch_device

    ap = argparse.ArgumentParser(prog=invoked_as("train.bench.algorithms"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=3000)
    ap.add_argument("--seeds", type=positive_int, default=1, help="average over this many seeds")
    ap.add_argument("--taus", type=positive_float, nargs="+", default=[0.4, 0.6, 1.0],
                    help="device bounds +-tau (each > 0)")
    ap.add_argument("--offset", type=finite_float, default=0.0,
                    help="reference offset of A (fraction of its weight range) for the TT variants")
    ap.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=positive_int, default=1)
    a = ap.parse_args(argv)
    # settings the devices or algorithms refuse fail here, before any work
    for tau in a.taus:
        try:
            SoftBounds(w_max=tau, w_min=-tau, w_max_dtod=0.0, w_min_dtod=0.0)
        except (InvalidSetting, TypeError, ValueError) as e:
            ap.error(f"argument --taus: {tau:g}: {str(e).splitlines()[0]}")
    for name in ALGOS:
        try:
            algorithm_from_name(name, **({} if (name == "sgd" or a.offset == 0) else {"reference_offset": a.offset}))
        except (InvalidSetting, TypeError, ValueError) as e:
            ap.error(f"argument --offset: {a.offset:g}: {str(e).splitlines()[0]}")
    torch.set_num_threads(a.threads)
    print(f"least squares 16x32, batch 8, lr 0.05, {a.steps} steps, perfect reads, "
          f"SoftBounds +-tau, reference offset {a.offset}, mean over {a.seeds} seed(s)")
    head = "| tau | " + " | ".join(ALGOS) + " | reference: sgd / ttv1 / ttv2 / cttv2 |"
    print(head)
    print("|" + "---|" * (len(ALGOS) + 2))
    t0 = time.time()
    for tau in a.taus:
        row = []
        for name in ALGOS:
            kw = {} if (name == "sgd" or a.offset == 0) else {"reference_offset": a.offset}
            errs = [least_squares_run(algorithm_from_name(name, **kw), tau=tau, steps=a.steps,
                                      seed=s, device=a.device) for s in range(a.seeds)]
            row.append(sum(errs) / len(errs))
        ref = REFERENCE.get(tau)
        refs = " / ".join(f"{v:.1e}" for v in ref) if ref else "-"
        print(f"| {tau} | " + " | ".join(f"{v:.1e}" for v in row) + f" | {refs} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
