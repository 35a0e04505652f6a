"""How many free-phase steps a relaxation needs, with and without acceleration.

    python -m train.experiments.relaxation                          # the digits model, untrained
    python -m train.experiments.relaxation --run runs/DIGITS_RUN    # a trained run's checkpoint
    python -m train.experiments.relaxation --model splitting_large_3block --batch 8
    python -m train.experiments.relaxation --variants plain,ff,sor1.4,ff+sor1.4,anderson5

For each energy block (its input taken from one forward pass of the model on a test batch) and
each variant (``plain``; ``ff``: feedforward start; ``sorW``: over-relaxation omega = W;
``andersonM``: Anderson mixing over M sweeps; joined with ``+``; ``preset``: the block's own
settings, e.g. the published fixed T1 schedule): the free steps to residual
``--tol`` (checked every step), the true residual of the result (one plain step from it), its
distance to the equilibrium solved to 1e-9, and the median solve time. Then, for the whole model
with every block's free phase set to the variant: the worst per-tensor cosine of the model's own
gradient method (EP) against the exact gradient (``Implicit`` at the tight equilibrium), and the
median wall time of forward + backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import ffebm
from ffebm.solvers import _residual, analytic_step
from ffebm.utils import energy_blocks


def _number(text: str, kind) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def parse_variant(text: str) -> Dict[str, object]:
    """``"ff+sor1.4"`` -> {"init": "feedforward", "overrelax": 1.4}; ``"plain"`` -> {}."""
    out: Dict[str, object] = {}
    for tok in filter(None, text.split("+")):
        if tok in ("plain", "preset"):
            continue
        if tok == "ff":
            out["init"] = "feedforward"
        elif tok.startswith("sor") and _number(tok[3:], float):
            out["overrelax"] = float(tok[3:])
        elif tok.startswith("anderson") and _number(tok[8:], int):
            out["anderson"] = int(tok[8:])
        else:
            raise ValueError(f"variant {text!r}: unknown part {tok!r} (plain, preset, ff, sorW, andersonM joined by +)")
    ffebm.Relaxation(**out)  # omega in (0, 2), memory >= 2: the settings' own checks
    return out


def _model_and_batch(args):
    if args.run:
        from train.config import apply_overrides
        from train.runfolder import read_config
        from train import checkpoint as ckpt_mod
        from train.trainer import Trainer
        from pathlib import Path

        cfg = apply_overrides(read_config(Path(args.run)), {"progress": False, "tensorboard": False})
        tr = Trainer(cfg, None, log=lambda m: None)
        tr.setup(resume_from=ckpt_mod.find(Path(args.run)))
        model = tr.core
        x = tr.pre(tr.test_set.images[:args.batch])
        y = tr.test_set.labels[:args.batch]
        return model, x, y, args.run
    import models

    torch.manual_seed(args.seed)
    model = models.build(args.model)
    if args.model in models.DIGITS_MODELS:
        from train.config import TrainConfig
        from train.data import load_datasets

        test = load_datasets(TrainConfig(recipe="digits"))[1]
        x = test.images[:args.batch].float().div(16.0)
        y = test.labels[:args.batch]
    else:
        x = torch.rand(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
    return model, x, y, args.model


def block_inputs(model, x) -> Dict[str, torch.Tensor]:
    """Each energy block's input drive u = input_map(x) from one plain forward pass."""
    us: Dict[str, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, n=name: us.__setitem__(n, m.input_map(a[0]).detach()))
             for name, blk in energy_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return us


def _median_s(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _config(base: ffebm.Relaxation, variant: str, args) -> ffebm.Relaxation:
    """``preset``: the block's own free-phase settings (e.g. the published fixed T1 schedule);
    otherwise the variant's settings with tolerance ``--tol`` checked every step."""
    if variant == "preset":
        return base
    return dataclasses.replace(base, steps=args.budget, tol=args.tol, check_every=1, strict=False, **parse_variant(variant))


def _tight(cfg: ffebm.Relaxation, budget: int) -> ffebm.Relaxation:
    """The reference equilibrium: plain steps to 3e-7 (near float32's floor for the residual)."""
    return dataclasses.replace(cfg, steps=budget, tol=3e-7, check_every=10, precision=None)


def _grads(model, x, y) -> Dict[str, torch.Tensor]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: g for (n, _), g in zip(params, gs) if g is not None}


def run(args) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    model, x, y, label = _model_and_batch(args)
    if not list(energy_blocks(model)):
        raise ValueError(f"{label}: has no energy blocks (a digital baseline): nothing relaxes")
    # training mode by default: batch norm normalises the block inputs with the batch's own
    # statistics, the drives the training steps relax under (eval mode at initialisation sees
    # much weaker drives and settles in a few steps)
    model.train(not args.eval)
    blocks = dict(energy_blocks(model))
    base = {n: b.relaxation for n, b in blocks.items()}
    us = block_inputs(model, x)
    variants = [v for v in args.variants.split(",") if v]
    rows: List[Dict[str, object]] = []
    for name, blk in blocks.items():
        u = us[name]
        s_ref, _ = blk.solve(u, config=_tight(base[name], args.reference_budget))
        for v in variants:
            cfg = _config(base[name], v, args)
            s, st = blk.solve(u, config=cfg)
            with torch.no_grad():
                true = float(_residual(analytic_step(blk, u, s, None, cfg.mode, {}), s))
            err = float(_residual(s, s_ref))
            t = _median_s(lambda: blk.solve(u, config=cfg), args.repeats)
            rows.append({"block": name, "variant": v, "steps": st.steps, "converged": st.converged,
                         "true_residual": true, "error_vs_equilibrium": err, "solve_ms": 1e3 * t})
    # gradients: exact reference at the tight equilibrium, then the block's own method per variant
    methods = {n: b.gradient for n, b in blocks.items()}
    for n, b in blocks.items():
        b.relaxation = _tight(base[n], args.reference_budget)
        b.gradient = ffebm.Implicit()
    ref = _grads(model, x, y)
    for n, b in blocks.items():
        b.gradient = methods[n]
    energy_ids = {id(p) for b in blocks.values() for p in b.energy_parameters()}
    energy = {n for n, p in model.named_parameters() if id(p) in energy_ids}
    grad_rows: List[Dict[str, object]] = []
    for v in variants:
        for n, b in blocks.items():
            b.relaxation = _config(base[n], v, args)
        g = _grads(model, x, y)
        cos = {k: ffebm.compare.cosine(g[k], ref[k]) for k in ref if k in g and k in energy}
        t = _median_s(lambda: _grads(model, x, y), args.repeats)
        grad_rows.append({"variant": v, "worst_cosine": min(cos.values()) if cos else float("nan"),
                          "step_ms": 1e3 * t})
    for n, b in blocks.items():
        b.relaxation = base[n]
    return {"model": label, "batch": int(x.shape[0]), "tol": args.tol, "threads": args.threads,
            "blocks": rows, "gradients": grad_rows}


def print_report(res: Dict[str, object]) -> None:
    print(f"{res['model']}: batch {res['batch']}, tol {res['tol']:.0e}, {res['threads']} thread(s)")
    print(f"{'block':10} {'variant':16} {'steps':>6} {'true res':>9} {'err vs s*':>9} {'solve ms':>9}")
    for r in res["blocks"]:
        mark = "" if r["converged"] else "  (budget hit)"
        print(f"{r['block']:10} {r['variant']:16} {r['steps']:6d} {r['true_residual']:9.1e} "
              f"{r['error_vs_equilibrium']:9.1e} {r['solve_ms']:9.1f}{mark}")
    print(f"\n{'variant':16} {'worst EP cosine vs exact':>25} {'fwd+bwd ms':>11}")
    for r in res["gradients"]:
        print(f"{r['variant']:16} {r['worst_cosine']:25.5f} {r['step_ms']:11.1f}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.experiments.relaxation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits_conv")
    p.add_argument("--run", default=None, help="a run folder: its model and checkpoint, its test batch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default="plain,ff,sor1.2,sor1.4,sor1.6,anderson3,anderson5,ff+sor1.4")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--reference-budget", type=int, default=20000, help="step budget of the tight reference solve")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="batch norm in evaluation mode (inference drives)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        p.error("--variants: name at least one (plain, preset, ff, sorW, andersonM, joined by +)")
    for key in ("batch", "budget", "repeats", "threads", "reference_budget"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not args.tol > 0:
        p.error(f"--tol must be > 0, got {args.tol}")
    import models
    from train.config import UserError

    if args.run is None and args.model not in models.available():
        p.error(f"--model {args.model!r}: not a model; one of {', '.join(models.available())}")
    try:
        for v in variants:
            parse_variant(v)
        res = run(args)
    except (ValueError, UserError) as e:
        p.error(" ".join(str(e).split()))
    print_report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
