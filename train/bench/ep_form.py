"""EP's nudged phases: ordinary form (relax s) against difference form (relax d = s - s*),
time of one block backward, side by side.

    python -m train.bench.ep_form                      # splitting_small_3block, batch 8, 32x32
    python -m train.bench.ep_form --model static_gradient_analysis --batch 2 --repeats 5

For every energy block of the model: the free state of one forward, then ``EP.backward`` with
``form="ordinary"`` and ``form="difference"`` alternately (``pool_winners="free"``, centered,
the model's beta and T2), ``--repeats`` times each; prints the median seconds of each and their
ratio (difference / ordinary).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional

import torch


def main(argv: Optional[List[str]] = None) -> None:
    import ffebm
    from ffebm import models

    ap = argparse.ArgumentParser(prog="python -m train.bench.ep_form", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="splitting_small_3block", help="a published configuration")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = models.published(args.model)
    model = models.build(args.model, image_size=args.image_size).eval()
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    print(f"{args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, float32, beta {cfg['beta']}, "
          f"T2 {cfg['t2']}, {args.threads} thread(s); median of {args.repeats} alternating runs")
    print(f"  {'block':<8} {'ordinary s':>11} {'difference s':>13} {'ratio':>7}")
    h = x
    for mod in model:
        if not isinstance(mod, ffebm.EnergyBlock):
            with torch.no_grad():
                h = mod(h)
            continue
        with torch.no_grad():
            u = mod.input_map(h)
            states, _ = mod.solve(u)
        call = ffebm.BlockCall.at(mod, u, states)
        delta = torch.randn_like(states[-1]) * 1e-3
        times = {"ordinary": [], "difference": []}
        for _ in range(args.repeats):
            for form in times:
                ep = ffebm.EP(cfg["beta"], steps=cfg["t2"], pool_winners="free", form=form)
                t0 = time.perf_counter()
                ep.backward(call, delta)
                times[form].append(time.perf_counter() - t0)
        o, d = statistics.median(times["ordinary"]), statistics.median(times["difference"])
        print(f"  {mod.name:<8} {o:11.3f} {d:13.3f} {d / o:7.2f}")
        h = states[-1]


if __name__ == "__main__":
    main()
