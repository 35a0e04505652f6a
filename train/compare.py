"""Compare EP (and other methods) to a reference gradient on a named model; table + PNG.

    python -m train.compare                              # digits ff-EBM, Implicit vs EP variants
    python -m train.compare --model cifar10_l6_3blocks --batch 2 --beta 0.02 --t2 20 --image-size 32
    python -m train.compare --pool avg ...               # smooth pooling instead of max
    python -m train.compare --pool-winners free ...      # EP keeps the free phase's max-pool winners
    python -m train.compare --model static_gradient_analysis --batch 2 --beta 0.02 --reference unrolled
    python -m train.compare --beta 0.5,0.2,0.05,0.02     # error vs beta per block (beta_sweep.png)
    python -m train.compare --gdd --beta 0.01 --double   # step by step vs truncated BPTT (gdd.png)

Prints per-parameter cosine similarity and relative error, and writes ``compare.png``: a
per-layer bar chart of 1 - cosine on a log axis (one bar group per parameter tensor, one colour
per method, so 0.95 and 0.999 look different) and the step-by-step convergence of EP's running
estimate towards the reference during the nudged phase, per block.  With several betas it prints
the worst cosine per block for each beta and plots 1 - cosine against beta (``beta_sweep.png``).
The time and peak memory of the comparison are printed (and stored in the JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Dict, List, Optional

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
        ax.bar([i + k * w for i in range(len(params))], [max(1 - cos[p], 1e-8) for p in params], width=w, label=m)
    ax.set_yscale("log")
    ax.axhline(1e-3, color="green", lw=0.8, ls="--")   # cosine 0.999
    ax.axhline(5e-2, color="red", lw=0.8, ls="--")     # cosine 0.95
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(params))])
    ax.set_xticklabels(params, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(f"1 - cosine vs {res.reference} (log; lines: 0.999, 0.95)")
    ax.set_title("per-layer gradient alignment (lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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


def gdd_plot(res, path: str) -> None:
    """Per block: the norm of each tensor's estimate against k (EP dashed, truncated backprop
    solid, one colour per tensor; log axis) above its relative error against k (log axis);
    legends sit below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.blocks)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5), squeeze=False, sharex=True)
    for j, b in enumerate(names):
        top, bot = axes[0][j], axes[1][j]
        for i, t in enumerate(res.tensors(b)):
            rows = res.blocks[b][t]
            ks = [r["k"] for r in rows]
            col = f"C{i % 10}"
            label = res.short(t)
            # a zero estimate (async EP's first step leaves the lower layers alone) is left out, not
            # drawn at a floor that would stretch the log axis
            top.plot(ks, [r["bptt_norm"] if r["bptt_norm"] > 0 else math.nan for r in rows], color=col, lw=1.4)
            top.plot(ks, [r["ep_norm"] if r["ep_norm"] > 0 else math.nan for r in rows], color=col, lw=1.4, ls="--")
            bot.plot(ks, [max(r["rel_error"], 1e-16) for r in rows], color=col, lw=1.2, marker=".", label=label)
        top.set_yscale("log")
        bot.set_yscale("log")
        top.set_title(f"{b}: |estimate| after k steps", fontsize=9)
        bot.set_title("|EP - BPTT| / |BPTT|", fontsize=9)
        bot.set_xlabel("k (nudged steps / backprop steps)")
        top.grid(alpha=0.3, which="both")
        bot.grid(alpha=0.3, which="both")
        bot.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    axes[0][0].set_ylabel("norm (EP dashed, BPTT solid)")
    axes[1][0].set_ylabel("relative error")
    fig.suptitle(f"GDD: {res.method} vs truncated BPTT ({res.mode} dynamics)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


#: the names --candidates takes: EP variants, then the other methods
EP_VARIANTS = ("centered", "positive", "negative", "random")
CANDIDATES = EP_VARIANTS + ("implicit", "unrolled")


def _candidates(names: List[str], beta: float, t2: int, pool_winners: str = "live", form: str = "ordinary",
                nudge: str = "delta", last: Optional[str] = None):
    """The candidates named; EP variants with the given options. With ``nudge="loss"`` the EP
    candidates nudge the block named ``last`` by the loss and the others by delta (the published
    scheme): a per-block choice, so such a candidate is a :class:`ffebm.compare.PerBlock`."""
    import ffebm

    out = []
    for n in names:
        if n in EP_VARIANTS:
            ep = ffebm.EP(beta, variant=n, steps=t2, pool_winners=pool_winners, form=form)
            out.append(ep if nudge == "delta" else ffebm.compare.PerBlock(ep, {last: dataclasses.replace(ep, nudge="loss")}))
        elif n == "implicit":
            out.append(ffebm.Implicit(tol=1e-8, max_iter=1000))
        elif n == "unrolled":
            out.append(ffebm.Unrolled(steps=t2, from_equilibrium=True))
        else:
            raise ValueError(f"--candidates: {n!r} is not one of {', '.join(CANDIDATES)}")
    return out


def beta_sweep_plot(sweep: Dict[float, dict], path: str) -> None:
    """1 - cosine of each EP variant against the reference, per block, as beta shrinks (log-log):
    one-sided EP's error falls like beta, centered EP's like beta^2 until precision or the box's
    kinks take over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    betas = sorted(sweep)
    methods = sorted({m for res in sweep.values() for m in res})
    blocks = sorted({b for res in sweep.values() for per in res.values() for b in per})
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for b in blocks:
            ys = [max(1 - sweep[bt].get(m, {}).get(b, float("nan")), 1e-9) for bt in betas]
            ax.loglog(betas, ys, marker="o", label=b)
        ax.set_xticks(betas)
        ax.set_xticklabels([f"{b:g}" for b in betas])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("beta")
        ax.set_ylabel("1 - cosine (worst tensor of the block)")
        ax.set_title(m)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shape_problem(name: str, overrides: dict, size: int, batch: int) -> Optional[str]:
    """Why model ``name`` (built with ``overrides``) cannot take a batch of ``batch`` 3 x size x size
    images, judged from shapes alone; None if it can. The model is built on the meta device (no
    memory, no arithmetic) and each energy block's input map (conv, pool, batch norm) is run on a
    meta batch of the block's input shape: a map too small for a conv, a pool or a coupling, and a
    batch norm left with one value per channel in training mode, show without a relaxation."""
    import ffebm
    from ffebm import models

    try:
        with torch.device("meta"):
            model = models.build(name, **dict(overrides, image_size=size))
            for bname, blk in ffebm.energy_blocks(model):
                try:
                    blk.input_map(torch.empty(batch, *blk.in_shape))
                except (ValueError, RuntimeError) as e:
                    raise ValueError(f"{bname}'s input map: {e}") from None
    except (ValueError, RuntimeError) as e:
        return " ".join(str(e).split())[:200]
    return None


def size_refusal(name: str, overrides: dict, size: int, batch: int, why: str, limit: int = 256) -> str:
    """The error for an image size model ``name`` cannot take: why, the smallest size it takes at
    this batch (found by trying the sizes from 1 up, ``shape_problem``), the taken sizes nearest
    ``size`` (the sizes a model takes need not be an interval: a pool inside a coupling needs an
    even map) and, at batch 1, the smallest size at batch 2 where that is smaller."""
    def taken(s: int, b: int = batch) -> bool:
        return shape_problem(name, overrides, s, b) is None

    msg = f"--image-size {size}: {name} cannot take {size}x{size} images at --batch {batch} ({why})"
    top = max(limit, 2 * size)
    smallest = next((s for s in range(1, top + 1) if taken(s)), None)
    if smallest is None:
        return msg + f"; it takes no size from 1 to {top}"
    msg += f"; the smallest size it takes at --batch {batch} is {smallest}"
    if size > smallest:
        below = next(s for s in range(size - 1, smallest - 1, -1) if taken(s))
        above = next((s for s in range(size + 1, top + 1) if taken(s)), None)
        msg += f", the nearest to {size}: {below}" + (f" and {above}" if above is not None else "")
    if batch == 1:
        pair = next((s for s in range(1, smallest) if taken(s, 2)), None)
        if pair is not None:
            msg += f" ({pair} at --batch 2 or more)"
    return msg


def _probe(model: nn.Module, x: torch.Tensor) -> None:
    """One forward of ``x`` with every energy block relaxing a single step (it checks that the
    input fits, not the equilibrium); the blocks' relaxations and the model's buffers (batch-norm
    statistics) are restored afterwards."""
    import ffebm

    blocks = [blk for _, blk in ffebm.energy_blocks(model)]
    saved = [blk.relaxation for blk in blocks]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        for blk in blocks:
            blk.relaxation = dataclasses.replace(blk.relaxation, steps=1, tol=None)
        with torch.no_grad():
            model(x)
    finally:
        for blk, r in zip(blocks, saved):
            blk.relaxation = r
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])


def _diverged(beta: float, e: Exception) -> str:
    """The error for a relaxation that went non-finite during the comparison at ``beta``."""
    hint = "; the nudge, or EP's division by beta, overflows at this beta" \
        if str(getattr(e, "phase", "")).startswith("nudged") else ""
    return f"the comparison at --beta {beta!r} failed: {e}{hint}"


def main(argv: Optional[List[str]] = None) -> None:
    import resource
    import time

    import ffebm
    from ffebm import models

    from ffebm.errors import RelaxationDiverged

    from .cli import invoked_as, positive_float, positive_int, seed

    prog = invoked_as("train.compare")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.replace("python -m train.compare", prog),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help=f"one of: {', '.join(models.available())}")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--beta", default="0.05", help="EP's beta, or a comma list for a sweep (e.g. 0.5,0.2,0.05,0.02)")
    ap.add_argument("--t1", type=positive_int, default=None, help="free steps (default: the model's)")
    ap.add_argument("--t2", type=positive_int, default=None, help="nudged steps (default: the model's, 20 for digits)")
    ap.add_argument("--tol", type=positive_float, default=None, help="free-phase tolerance (default: the model's)")
    ap.add_argument("--reference", choices=["implicit", "unrolled"], default="implicit",
                    help="implicit: the exact gradient at the equilibrium; unrolled: backprop through T2 steps "
                         "from the equilibrium")
    ap.add_argument("--candidates", default="centered,positive,negative",
                    help="comma list of: centered, positive, negative, random (EP variants), implicit, unrolled")
    ap.add_argument("--pool", choices=["max", "avg", "soft"], default=None, help="replace max pooling (presets)")
    ap.add_argument("--pool-winners", choices=["live", "free"], default="live",
                    help="EP candidates: max pools inside a block pick their winner at every step (live), or keep "
                         "the free equilibrium's winners through the nudged phases and the read-out (free)")
    ap.add_argument("--form", choices=["ordinary", "difference"], default="ordinary",
                    help="EP candidates: relax the nudged phases in the state (ordinary) or in its difference from "
                         "the free equilibrium (difference: full relative precision in float32; max-pooled blocks "
                         "need --pool-winners free)")
    ap.add_argument("--nudge", choices=["delta", "loss"], default="delta",
                    help="EP candidates (and --gdd): nudge every block by beta <delta, s_top> (delta), or the last block "
                         "by beta * loss(readout(s_top), y) and the others by delta (loss, as published)")
    ap.add_argument("--gdd", action="store_true",
                    help="step by step: EP's running estimate after k nudged steps against backprop through the last "
                         "k free steps from the equilibrium, k = 1..T2, per block and layer (gdd.png, gdd.json); uses "
                         "the first EP variant of --candidates")
    ap.add_argument("--gdd-mode", choices=["sync", "async"], default=None,
                    help="dynamics of the --gdd check (default: the model's; the GDD property is exact for sync)")
    ap.add_argument("--image-size", type=positive_int, default=None, help="input size for image presets")
    ap.add_argument("--double", action="store_true", help="compare in float64")
    ap.add_argument("--precision", choices=["bfloat16", "float16"], default=None,
                    help="relax under this autocast dtype (presets), with full-precision polish steps")
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--out", default=".", help="folder for compare.png and compare.json")
    args = ap.parse_args(argv)
    try:
        betas = [float(b) for b in args.beta.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--beta {args.beta!r}: expected a number or a comma list of numbers")
    if not betas or any(not (math.isfinite(b) and b > 0) for b in betas):
        ap.error(f"argument --beta: must be finite numbers > 0, got {args.beta}")
    if args.model not in models.available():
        ap.error(f"--model {args.model!r}: not a model; one of {', '.join(models.available())}")
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    if not names:
        ap.error(f"--candidates {args.candidates!r}: name at least one method")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"--candidates: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                 f"one of {', '.join(CANDIDATES)}")
    variants = [n for n in names if n in EP_VARIANTS]
    if args.gdd and (len(betas) != 1 or not variants):
        ap.error("--gdd takes one --beta and an EP variant in --candidates")
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.precision and args.double:
        ap.error(f"--precision {args.precision} relaxes in a lower precision and --double compares in float64: "
                 "choose one")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: exists and is not a folder")

    torch.manual_seed(args.seed)
    ov = {}
    if args.t1 is not None:
        ov["t1"] = args.t1
    if args.tol is not None:
        ov["tol"] = args.tol
    image = args.model not in models.DIGITS_MODELS
    if image:
        cfg = models.published(args.model) if args.model in models.PUBLISHED or args.model in models.ALIASES \
            else models.preset(args.model)
        size = args.image_size or 32
        ov.update(image_size=size)
        if args.pool:
            ov["pool_override"] = args.pool
        if args.precision:
            ov["precision"] = args.precision
        why = shape_problem(args.model, ov, size, args.batch)
        if why is not None:
            ap.error(size_refusal(args.model, ov, size, args.batch, why))
        x = torch.rand(args.batch, 3, size, size)
        classes = cfg["num_classes"]
    else:
        for flag in ("precision", "image_size"):
            if getattr(args, flag):
                ap.error(f"--{flag.replace('_', '-')} does not apply to {args.model!r} (a model of 8x8 digits)")
        if args.pool:
            if "pool" not in models.options(args.model) or args.model == "digits":
                ap.error(f"--pool does not apply to {args.model!r} (its energy blocks do not pool; "
                         f"digits_conv takes --pool avg|max|soft)")
            ov["pool"] = args.pool
        x = torch.rand(args.batch, 64)
        classes = 10
    try:
        model = models.build(args.model, **ov)
    except (ValueError, RuntimeError) as e:
        what = f"--image-size {ov['image_size']}: {args.model} cannot take that input size" if image else f"--model {args.model}"
        ap.error(f"{what} ({str(e).splitlines()[0]})")
    if not list(ffebm.energy_blocks(model)):
        ap.error(f"--model {args.model}: has no energy blocks (a digital baseline): nothing to compare")
    if args.double:
        model, x = model.double(), x.double()
    y = torch.randint(0, classes, (args.batch,))
    try:
        _probe(model, x)
    except (ValueError, RuntimeError) as e:
        what = f"--image-size {size}: " if image else ""
        ap.error(f"{what}{args.model} cannot take a batch of {args.batch} {tuple(x.shape[1:])} inputs "
                 f"({' '.join(str(e).split())[:160]})")
    t2 = args.t2 or (cfg["t2"] if image else 20)
    ref = (ffebm.Implicit(tol=1e-8, max_iter=1000) if args.reference == "implicit"
           else ffebm.Unrolled(steps=t2, from_equilibrium=True))
    loss_fn = nn.CrossEntropyLoss()
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {args.out}: cannot create the folder ({e.strerror or e})")
    last = [name for name, _ in ffebm.energy_blocks(model)][-1]
    t0 = time.perf_counter()
    if args.gdd:
        ep = ffebm.EP(betas[0], variant=variants[0], steps=t2, pool_winners=args.pool_winners, form=args.form)
        if args.nudge == "loss":  # its force at s* is the incoming gradient backprop starts from
            ep = ffebm.compare.PerBlock(ep, {last: dataclasses.replace(ep, nudge="loss")})
        try:
            res = ffebm.compare_gdd(model, loss_fn, (x, y), ep=ep, mode=args.gdd_mode)
        except ValueError as e:
            ap.error(str(e).splitlines()[0])
        except RelaxationDiverged as e:
            ap.error(_diverged(betas[0], e))
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(res.table())
        png = os.path.join(args.out, "gdd.png")
        gdd_plot(res, png)
        with open(os.path.join(args.out, "gdd.json"), "w") as f:
            json.dump(dict(res.to_dict(), seconds=seconds, peak_mb=peak_mb, model=args.model, batch=args.batch,
                           beta=betas[0], t2=t2, double=args.double), f, indent=1)
        print(f"\nwrote {png} and gdd.json")
        print(f"{seconds:.1f} s for the comparison, peak memory {peak_mb:.0f} MB")
        return
    sweep: Dict[float, dict] = {}
    beta = betas[0]
    try:
        for beta in betas:
            res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=ref,
                                          candidates=_candidates(names, beta, t2, args.pool_winners, args.form, args.nudge,
                                                                 last), trace=len(betas) == 1)
            per: Dict[str, Dict[str, float]] = {}
            for r in res.rows:
                if r["comparable"] and r["block"] != "input":
                    d = per.setdefault(r["method"].replace(f"beta={beta}, ", ""), {})
                    d[r["block"]] = min(d.get(r["block"], 1.0), r["cosine"])
            sweep[beta] = per
    except ValueError as e:
        ap.error(str(e).splitlines()[0])
    except RelaxationDiverged as e:
        ap.error(_diverged(beta, e))
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the free relaxation of the last method's forward (every method relaxes the same free state)
    residuals = {name: blk.stats.residual for name, blk in ffebm.energy_blocks(model) if blk.stats is not None}
    if len(betas) == 1:
        print(res.table())
        png = os.path.join(args.out, "compare.png")
        plot(res, png)
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(dict(res.to_dict(), seconds=seconds, peak_mb=peak_mb, free_residual=residuals), f, indent=1)
        print(f"\nwrote {png} and compare.json")
    else:
        blocks = sorted({b for per in sweep.values() for m in per.values() for b in m})
        print(f"worst cosine per block against {res.reference}, by beta:")
        for m in sorted({m for per in sweep.values() for m in per}):
            print(f"\n{m}\n  beta      " + " ".join(f"{b:>9s}" for b in blocks))
            for beta in betas:
                print(f"  {beta:<9g} " + " ".join(f"{sweep[beta].get(m, {}).get(b, float('nan')):9.5f}" for b in blocks))
        png = os.path.join(args.out, "beta_sweep.png")
        beta_sweep_plot(sweep, png)
        with open(os.path.join(args.out, "beta_sweep.json"), "w") as f:
            json.dump({"reference": res.reference, "sweep": {str(k): v for k, v in sweep.items()},
                       "seconds": seconds, "peak_mb": peak_mb, "free_residual": residuals}, f, indent=1)
        print(f"\nwrote {png} and beta_sweep.json")
    print("free residual per block (relative change in the last checked step): "
          + ", ".join(f"{k} {v:.1e}" for k, v in residuals.items()))
    print(f"{seconds:.1f} s for the comparison, peak memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
