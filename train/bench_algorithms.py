"""Final weight error of the analog training algorithms on the least-squares problem of
ANCHORS.md section 2 (Wu et al. 2024 effect), beside the reference simulator's figures.

    python -m train.bench_algorithms [--steps 3000] [--seeds 1] [--offset 0.0] [--device cpu]

W* 16x32 ~ U(-0.3, 0.3), x ~ N(0, 1), batch 8, lr 0.05, perfect reads, SoftBounds devices with
bounds +-tau; each algorithm with its defaults (ffebm.analog.algorithms). Start error ~0.03.
"""
from __future__ import annotations

import argparse
import time

import torch

from ffebm.analog.algorithms import algorithm_from_name, least_squares_run

REFERENCE = {  # AIHWKit 1.2.0 (ANCHORS.md): sgd, ttv1, ttv2, cttv2 (its defaults)
    0.4: (6.5e-3, 3.4e-4, 3.8e-4, 2.1e-2),
    0.6: (1.8e-3, 1.2e-4, 1.9e-4, 2.1e-2),
    1.0: (5.7e-5, 1.1e-4, 1.4e-4, 2.0e-2),
}
ALGOS = ("sgd", "ttv1", "ttv2", "cttv2", "agad")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=1, help="average over this many seeds")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.4, 0.6, 1.0])
    ap.add_argument("--offset", type=float, default=0.0,
                    help="reference offset of A (fraction of its weight range) for the TT variants")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
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
