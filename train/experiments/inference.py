"""Inference chips: what hardware-aware (HWA) training buys after deployment.

    python -m train.experiments.inference [--seeds 0,1] [--draws 10] [--eval-seed 0]
        [--relax 40:20,40:0,40:5,80:60] [--size HIDDEN,WIDTH] [--out DIR] [--quick] [key=value ...]

Trains, through the trainer (:func:`train.train`, one run folder each: ``OUT/seed<S>/<name>``),
the digits ff-EBM and its same-size MLP (``digits_mlp``, 64-512-256-256-256-128-10, the same
weight matrices) each (a) digitally and (b) hardware-aware:

=================  ===================================================
``ffebm-digital``  ``digits-hwa analog_mode=training`` (the same model, relaxation and optimiser, digital)
``ffebm-hwa``      ``digits-hwa``
``mlp-digital``    ``digits-mlp``
``mlp-hwa``        ``digits-mlp-hwa``
=================  ===================================================

then deploys each on one and the same simulated PCM chip (:func:`train.inference.inference_config`
of the HWA recipe: published read model, PCM programming noise, drift and 1/f read noise, global
drift compensation, weight scaling 1.0; a digitally trained model is converted onto it with
:func:`train.inference.make_inference`, the same conversion its HWA twin was trained in) and
evaluates the test accuracy at t = 0 s, 1 h, 1 day, 1 month and 1 year after programming over
``--draws`` programming draws (draw ``k`` seeded ``--eval-seed + 1000 k``, the same for every
model). The ff-EBM rows relax on noisy reads; ``--relax T:K,...`` re-evaluates the trained
ff-EBMs with the free relaxation set to ``T`` steps returning the mean state over the last ``K``
(0: the last state) at 0 s and 1 day, to show how much relaxation and averaging the noisy reads need.

Prints the tables, writes ``inference.json`` and ``inference.png`` (accuracy against log time,
one line per model x training, shaded +- 1 standard deviation over draws and seeds) into
``--out``. A run folder that exists is resumed (or, finished, reused), so an interrupted
experiment continues where it stopped. ``--quick``: a tiny version (small models, 2 steps,
2 draws) to check the pipeline; ``--size 128,64``: both models narrower (hidden, width). Extra
``key=value`` pairs override every run's configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

TIMES = (0.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0)
TIME_LABELS = ("0 s", "1 h", "1 day", "1 month", "1 year")
#: name -> (recipe, overrides, model, training)
RUNS: Dict[str, Tuple[str, Dict[str, str], str, str]] = {
    "ffebm-digital": ("digits-hwa", {"analog_mode": "training"}, "ff-EBM", "digital"),
    "ffebm-hwa": ("digits-hwa", {}, "ff-EBM", "HWA"),
    "mlp-digital": ("digits-mlp", {}, "MLP", "digital"),
    "mlp-hwa": ("digits-mlp-hwa", {}, "MLP", "HWA"),
}
CHIP_RECIPE = "digits-hwa"   # the chip every model is deployed on: this recipe's inference configuration
RELAX = ((40, 20), (40, 0), (40, 5), (80, 60))
RELAX_TIMES = (0.0, 86400.0)
QUICK = {"train_subset": "96", "test_subset": "48", "batch_size": "32", "epochs": "1", "max_steps": "2"}
QUICK_FFEBM = {"model_options": "hidden=24,width=16,tol=none,average_last=2", "t1": "6", "t2": "4"}
QUICK_MLP = {"model_options": "hidden=24,width=16"}
RESULT_FILES = ("inference.json", "inference.png")


def _label(t: float) -> str:
    return TIME_LABELS[TIMES.index(t)] if t in TIMES else f"{t:g} s"


def run_overrides(name: str, seed: int, quick: bool, extra: Dict[str, str],
                  size: Optional[Tuple[int, int]] = None) -> Dict[str, str]:
    """The trainer overrides of run ``name``; ``size`` (hidden, width): both models narrower or wider
    (the MLP keeps the ff-EBM's weight shapes)."""
    from ..recipes import get

    recipe, over, model, _ = RUNS[name]
    o = dict(over, seed=str(seed), progress="false", tensorboard="false", num_threads="1")
    if quick:
        o.update(QUICK, **(QUICK_FFEBM if model == "ff-EBM" else QUICK_MLP))
    if size is not None:
        opts = o.get("model_options", get(recipe).get("model_options", ""))
        kept = [kv for kv in opts.split(",") if kv and kv.split("=")[0] not in ("hidden", "width")]
        o["model_options"] = ",".join(kept + [f"hidden={size[0]}", f"width={size[1]}"])
    if RUNS[name][3] == "digital":  # the chip's keys shape the deployment (chip()), not digital training
        extra = {k: v for k, v in extra.items() if not k.startswith("inference_")}
    o.update(extra)
    return o


def chip(quick: bool, extra: Dict[str, str]):
    """The inference configuration of the chip every model is deployed on."""
    from ..inference import inference_config
    from ..recipes import build_config

    return inference_config(build_config(CHIP_RECIPE, run_overrides("ffebm-hwa", 0, quick, extra)))


def _deployment_fields(c) -> Dict:
    return {"io": c.io, "noise_model": c.noise_model, "drift_compensation": c.drift_compensation,
            "weight_scaling_omega": c.weight_scaling_omega, "weight_scaling_columnwise": c.weight_scaling_columnwise,
            "max_size": c.max_size}


def train_one(name: str, seed: int, out: Path, quick: bool, extra: Dict[str, str], log,
              size: Optional[Tuple[int, int]] = None) -> Dict:
    """Train (or resume, or reuse) run ``name`` with ``seed``; returns its metrics."""
    import warnings

    import ffebm
    from ..recipes import build_config
    from ..trainer import train

    recipe = RUNS[name][0]
    cfg = build_config(recipe, run_overrides(name, seed, quick, extra, size))
    run_dir = out / f"seed{seed}" / name
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffebm.ConvergenceWarning)
        metrics = train(cfg, run_dir, resume=run_dir.exists(), log=lambda m: None)
    log(f"[{name} seed {seed}] test accuracy after training {100 * metrics['test_accuracy']:.2f}% "
        f"({metrics['steps']} steps, {time.time() - t0:.0f} s; {run_dir})")
    return metrics


def deployed_trainer(name: str, seed: int, out: Path, quick: bool, extra: Dict[str, str], chip_cfg,
                     size: Optional[Tuple[int, int]] = None):
    """A :class:`train.trainer.Trainer` holding the trained model of run ``name`` on the chip:
    an HWA run as trained (its layers' configuration is checked to be the chip's), a digital run
    converted onto the chip."""
    from .. import checkpoint as ckpt_mod
    from ..config import apply_overrides
    from ..inference import make_inference
    from ..recipes import build_config
    from ..trainer import Trainer
    from ffebm.analog import inference_modules

    cfg = build_config(RUNS[name][0], run_overrides(name, seed, quick, extra, size))
    tr = Trainer(cfg, None, log=lambda m: None)
    tr.setup(resume_from=ckpt_mod.find(out / f"seed{seed}" / name))
    if cfg.analog_mode != "inference":   # digital training: the same conversion as its HWA twin's
        tr.core = make_inference(tr.core, apply_overrides(cfg, {"analog_mode": "inference"}), icfg=chip_cfg)
    mods = inference_modules(tr.core)
    want = _deployment_fields(chip_cfg)
    for m in mods:
        if _deployment_fields(m.config) != want:
            raise RuntimeError(f"{name}: a layer is not on the experiment's chip ({m.config!r})")
    return tr


def set_relaxation(tr, steps: int, average_last: int) -> None:
    for _, blk in tr.blocks:
        blk.relaxation = dataclasses.replace(blk.relaxation, steps=steps, tol=None, average_last=average_last)


def _pooled(curves: List[Dict], key: str) -> Tuple[float, float, List[float]]:
    vals = [v for c in curves for v in c["accuracy_draws"][key]]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), vals


def summarise(results: List[Dict], times: Sequence[float]) -> List[Dict]:
    """Per name: mean and standard deviation of the test accuracy at each time over every draw of
    every seed, and the per-seed means."""
    rows = []
    for name in RUNS:
        rs = [r for r in results if r["name"] == name]
        if not rs:
            continue
        row = {"name": name, "model": RUNS[name][2], "training": RUNS[name][3], "seeds": [r["seed"] for r in rs],
               "trained_accuracy": statistics.fmean(r["trained_accuracy"] for r in rs), "times": {}}
        for t in times:
            key = str(float(t))
            mean, std, _ = _pooled([r["curve"] for r in rs], key)
            row["times"][key] = {"mean": mean, "std": std,
                                 "seed_means": [r["curve"]["accuracy_over_time"][key] for r in rs]}
        rows.append(row)
    return rows


def table(rows: List[Dict], times: Sequence[float]) -> str:
    head = "| model | training | after training | " + " | ".join(_label(t) for t in times) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(times)]
    for r in rows:
        cells = [f"{100 * r['times'][str(float(t))]['mean']:.1f} ± {100 * r['times'][str(float(t))]['std']:.1f}"
                 for t in times]
        lines.append(f"| {r['model']} | {r['training']} | {100 * r['trained_accuracy']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relax_table(relax: List[Dict]) -> str:
    if not relax:
        return ""
    times = [float(t) for t in relax[0]["times"]]
    lines = ["| ff-EBM | T1 | average last | " + " | ".join(_label(t) for t in times) + " |",
             "|---|---|---|" + "---|" * len(times)]
    for r in relax:
        cells = [f"{100 * r['times'][str(t)]['mean']:.1f} ± {100 * r['times'][str(t)]['std']:.1f}" for t in times]
        lines.append(f"| {r['training']} | {r['steps']} | {r['average_last'] or '- (last state)'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], times: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [max(t, 1.0) for t in times]   # t = 0 drawn at 1 s on the log axis, labelled 0
    colors = {"ff-EBM": "tab:blue", "MLP": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for r in rows:
        m = [r["times"][str(float(t))]["mean"] for t in times]
        s = [r["times"][str(float(t))]["std"] for t in times]
        style = "-" if r["training"] == "HWA" else "--"
        marker = "o" if r["training"] == "HWA" else "s"
        ax.plot(x, m, style, marker=marker, color=colors.get(r["model"]), label=f"{r['model']}, {r['training']} training")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colors.get(r["model"]),
                        alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_label(t) for t in times])
    ax.minorticks_off()
    ax.set_xlabel("time after programming (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_recipe(name: str) -> Dict:
    from ..recipes import get

    return get(name)


def model_size(overrides: Dict[str, str], recipe_options: str = "") -> Tuple[int, int]:
    """(hidden, width) that a run's ``model_options`` give the digits models (512, 256 by default)."""
    opts = dict(kv.split("=", 1) for kv in (overrides.get("model_options", recipe_options) or "").split(",") if "=" in kv)
    return int(opts.get("hidden", 512)), int(opts.get("width", 256))


def plot_title(res: Dict) -> str:
    size = res.get("size") or (512, 256)
    return (f"digits, hidden {size[0]} / width {size[1]}, on a simulated PCM chip: {res['draws']} programming "
            f"draws x {len(res['seeds'])} seed(s)" + (" (quick)" if res.get("quick") else ""))


def check_out(out: Path) -> None:
    from ..config import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    for name in RESULT_FILES:
        if (out / name).exists():
            raise UserError(f"{out / name} exists (an earlier experiment): choose another --out or remove it; "
                            "nothing was overwritten")


def experiment(seeds: Sequence[int] = (0,), draws: int = 10, eval_seed: int = 0, out: Path = Path("runs/inference"),
               quick: bool = False, relax: Sequence[Tuple[int, int]] = RELAX, extra: Optional[Dict[str, str]] = None,
               times: Sequence[float] = TIMES, size: Optional[Tuple[int, int]] = None, log=print) -> Dict:
    """Train, deploy and evaluate (see the module docstring); returns what ``inference.json`` holds."""
    from ..evaluate import deployment_curve
    from ..recipes import build_config

    extra = dict(extra or {})
    for name in RUNS:   # a bad override fails here, before any work
        build_config(RUNS[name][0], run_overrides(name, seeds[0], quick, extra, size))
    chip_cfg = chip(quick, extra)
    t_start = time.time()
    results, relax_rows = [], []
    for seed in seeds:
        for name in RUNS:
            metrics = train_one(name, seed, out, quick, extra, log, size)
            tr = deployed_trainer(name, seed, out, quick, extra, chip_cfg, size)
            t0 = time.time()
            curve = deployment_curve(tr, list(times), draws, eval_seed)
            log(f"[{name} seed {seed}] deployed: " + ", ".join(
                f"{_label(t)} {100 * curve['accuracy_over_time'][str(float(t))]:.1f}%" for t in times)
                + f" ({draws} draws, {time.time() - t0:.0f} s)")
            results.append({"name": name, "seed": seed, "run_dir": str(out / f"seed{seed}" / name),
                            "trained_accuracy": metrics["test_accuracy"], "curve": curve})
            if RUNS[name][2] == "ff-EBM" and relax:
                for steps, k in relax:
                    set_relaxation(tr, steps, k)
                    c = deployment_curve(tr, list(RELAX_TIMES), draws, eval_seed)
                    relax_rows.append({"name": name, "training": RUNS[name][3], "seed": seed, "steps": steps,
                                       "average_last": k, "curve": c})
                    log(f"[{name} seed {seed}] relaxation T1 {steps}, average last {k}: " + ", ".join(
                        f"{_label(t)} {100 * c['accuracy_over_time'][str(float(t))]:.1f}%" for t in RELAX_TIMES))
    rows = summarise(results, times)
    relax_summary = []
    for name in RUNS:
        for steps, k in relax:
            rs = [r for r in relax_rows if r["name"] == name and r["steps"] == steps and r["average_last"] == k]
            if rs:
                tt = {str(float(t)): dict(zip(("mean", "std"), _pooled([r["curve"] for r in rs], str(float(t)))[:2]))
                      for t in RELAX_TIMES}
                relax_summary.append({"name": name, "training": rs[0]["training"], "steps": steps, "average_last": k,
                                      "times": tt})
    return {"times": list(times), "draws": draws, "eval_seed": eval_seed, "seeds": list(seeds), "quick": quick,
            "extra": extra, "size": list(model_size(run_overrides("ffebm-hwa", seeds[0], quick, extra, size),
                                     get_recipe("digits-hwa").get("model_options") or "")), "chip": repr(chip_cfg), "summary": rows, "relaxation": relax_summary,
            "runs": results, "relaxation_runs": relax_rows, "wall_s": time.time() - t_start}


def _relax_arg(text: str) -> List[Tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        steps, colon, k = item.partition(":")
        try:
            st, kk = int(steps), int(k) if colon else 0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected T1:K (e.g. 40:20)") from None
        if st < 1 or not 0 <= kk <= st:
            raise argparse.ArgumentTypeError(f"{item!r}: expected T1 >= 1 and 0 <= K <= T1")
        out.append((st, kk))
    return out


def _size_arg(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
        assert h >= 1 and w >= 2
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HIDDEN,WIDTH (e.g. 128,64)") from None
    return h, w


def _seeds_arg(text: str) -> List[int]:
    from ..cli import seed as seed_type

    out: List[int] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        a, dash, b = item.partition("-")
        lo = seed_type(a)
        hi = seed_type(b) if dash else lo
        if hi < lo:
            raise argparse.ArgumentTypeError(f"{item!r}: empty range")
        out.extend(range(lo, hi + 1))
    if not out:
        raise argparse.ArgumentTypeError("give at least one seed")
    return list(dict.fromkeys(out))


def main(argv=None) -> Dict:
    from ..cli import invoked_as, positive_int, seed
    from ..config import UserError

    ap = argparse.ArgumentParser(prog=invoked_as("train.experiments.inference"), description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=_seeds_arg, default=[0], help="training seeds, e.g. 0,1 or 0-2 (default 0)")
    ap.add_argument("--draws", type=positive_int, default=None, help="programming draws per time (default 10; --quick 2)")
    ap.add_argument("--eval-seed", type=seed, default=0, help="seed of the programming draws (draw k: seed + 1000 k)")
    ap.add_argument("--relax", type=_relax_arg, default=None,
                    help="ff-EBM deployment relaxations T1:K (K: states averaged; 0: last), default "
                         + ",".join(f"{a}:{b}" for a, b in RELAX) + " (--quick: 6:2,6:0)")
    ap.add_argument("--size", type=_size_arg, default=None,
                    help="HIDDEN,WIDTH of both models (default: the recipes', 512,256; e.g. 128,64)")
    ap.add_argument("--out", default="runs/inference", help="folder for the run folders, inference.json and .png")
    ap.add_argument("--quick", action="store_true", help="a tiny run of the whole pipeline (seconds)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="trainer settings for every run")
    a = ap.parse_args(argv)
    extra = {}
    for kv in a.overrides:
        k, eq, v = kv.partition("=")
        if not eq:
            ap.error(f"{kv!r}: expected key=value")
        extra[k] = v
    draws = a.draws if a.draws is not None else (2 if a.quick else 10)
    relax = a.relax if a.relax is not None else ([(6, 2), (6, 0)] if a.quick else list(RELAX))
    out = Path(a.out)
    try:
        check_out(out)
        res = experiment(a.seeds, draws, a.eval_seed, out, a.quick, relax, extra, size=a.size)
    except UserError as e:
        ap.error(str(e))
    print(f"\ntest accuracy after programming, mean ± std over {draws} draws x {len(a.seeds)} training seed(s) (%):")
    print(table(res["summary"], res["times"]))
    if res["relaxation"]:
        print(f"\nff-EBM on noisy reads: free relaxation T1 steps, state averaged over the last K (%):")
        print(relax_table(res["relaxation"]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "inference.json", "w") as f:
        f.write(json.dumps(res, indent=1))
    title = plot_title(res)
    plot(res["summary"], res["times"], out / "inference.png", title)
    print(f"wrote {out / 'inference.json'} and {out / 'inference.png'} ({res['wall_s'] / 60:.1f} min)")
    return res


if __name__ == "__main__":
    main()
