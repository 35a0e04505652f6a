"""Compare EP (and other methods) to a reference gradient on a named model; table + PNG.

    python -m train.compare                              # digits ff-EBM, Implicit vs EP variants
    python -m train.compare --model cifar10_l6_3blocks --batch 2 --beta 0.02 --t2 20 --image-size 32
    python -m train.compare --pool avg ...               # smooth pooling instead of max

Prints per-parameter cosine similarity and relative error, and writes ``compare.png``: a
per-layer bar chart of the cosine (one bar group per parameter tensor, one colour per method;
poorly aligned layers stand out under the 0.9 line) and the step-by-step convergence of EP's
running estimate towards the reference during the nudged phase, per block.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import torch
import torch.nn as nn


def plot(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = res.methods()
    params = [r["param"] for r in res.rows if r["method"] == methods[0] and r["block"] not in ("input",)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    w = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        cos = {r["param"]: r["cosine"] for r in res.rows if r["method"] == m}
        ax.bar([i + k * w for i in range(len(params))], [cos[p] for p in params], width=w, label=m)
    ax.axhline(0.9, color="red", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(params))])
    ax.set_xticklabels(params, rotation=70, ha="right", fontsize=7)
    lo = min([0.0] + [r["cosine"] for r in res.rows if r["comparable"]])
    ax.set_ylim(lo, 1.02)
    ax.set_ylabel(f"cosine vs {res.reference}")
    ax.set_title("per-layer gradient alignment")
    ax.legend(fontsize=7)
    ax = axes[1]
    if res.traces:
        label, per_block = next(iter(res.traces.items()))
        for bname, hist in per_block.items():
            if not hist:
                continue
            names = list(hist[0])
            for pn in names:
                if pn.endswith("bias"):
                    continue
                ax.plot(range(1, len(hist) + 1), [h[pn] for h in hist], label=pn, lw=1)
        ax.set_xlabel("nudged step")
        ax.set_ylabel("cosine of running EP estimate vs reference")
        ax.set_title(f"convergence during the nudged phase ({label})")
        ax.legend(fontsize=6)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    import ffebm
    from ffebm import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help=f"one of: {', '.join(models.available())}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--t1", type=int, default=None, help="free steps (default: the model's)")
    ap.add_argument("--t2", type=int, default=None, help="nudged steps (default: the model's, 20 for digits)")
    ap.add_argument("--tol", type=float, default=None, help="free-phase tolerance (default: the model's)")
    ap.add_argument("--pool", choices=["max", "avg", "soft"], default=None, help="replace max pooling (presets)")
    ap.add_argument("--image-size", type=int, default=None, help="input size for image presets")
    ap.add_argument("--double", action="store_true", help="compare in float64")
    ap.add_argument("--precision", choices=["bfloat16", "float16"], default=None,
                    help="relax under this autocast dtype (presets), with full-precision polish steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".", help="folder for compare.png and compare.json")
    args = ap.parse_args(argv)
    if args.beta <= 0:
        ap.error(f"--beta must be > 0, got {args.beta}")

    torch.manual_seed(args.seed)
    ov = {}
    if args.t1 is not None:
        ov["t1"] = args.t1
    if args.tol is not None:
        ov["tol"] = args.tol
    image = args.model not in ("digits", "dhn_digits")
    if args.model not in models.available():
        ap.error(f"--model {args.model!r}: not a model; one of {', '.join(models.available())}")
    if image:
        cfg = models.published(args.model) if args.model in models.PUBLISHED or args.model in models.ALIASES \
            else models.preset(args.model)
        size = args.image_size or 32
        ov.update(image_size=size)
        if args.pool:
            ov["pool_override"] = args.pool
        if args.precision:
            ov["precision"] = args.precision
        x = torch.rand(args.batch, 3, size, size)
        classes = cfg["num_classes"]
    else:
        x = torch.rand(args.batch, 64)
        classes = 10
    model = models.build(args.model, **ov)
    if args.double:
        model, x = model.double(), x.double()
    y = torch.randint(0, classes, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    t2 = args.t2 or (cfg["t2"] if image else 20)
    cands = [ffebm.EP(args.beta, variant=v, steps=t2) for v in ("centered", "positive", "negative")]
    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ffebm.Implicit(tol=1e-8, max_iter=1000),
                                  candidates=cands, trace=True)
    print(res.table())
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "compare.png")
    plot(res, png)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(res.to_dict(), f, indent=1)
    print(f"\nwrote {png} and compare.json")


if __name__ == "__main__":
    main()
