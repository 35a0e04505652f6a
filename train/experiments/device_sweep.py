"""What a device does to training: the analog digits ff-EBM trained by pulsed EP on each device model.

    python -m train.experiments.device_sweep [--devices soft_bounds,constant_step,...]
        [--recipe digits-analog] [--algorithm c-ttv2] [--epochs 40] [--jobs 2] [--out DIR]
        [--reads default|perfect] [key=value ...]

Every run is an ordinary trainer run (:func:`train.train`) of the recipe (default
``digits-analog``: both energy blocks and their input maps on tiles, default read model, state
averaging, seed 0) with only ``analog`` (the device model, with its published default settings:
``dw_min`` 0.001, the model's own nonlinearity, device-to-device spread, cycle-to-cycle noise)
changed, each in its own run folder ``OUT/<device>`` (checkpoints, ``metrics.json``: evaluate
drift later with ``python -m train.evaluate OUT/<device> --times ...``).  The digital reference
is the same recipe with ``analog=`` and beta 0.5.  Extra ``key=value`` pairs override the recipe
for every run.  Prints a table (final and best test accuracy, wall time), writes ``sweep.json``
and ``sweep.png`` (test accuracy per epoch for every device, final accuracies as bars beside the
digital model's) into ``--out``.  Runs go to ``--jobs`` worker processes, one torch thread each.
A run that diverges (NaN/inf) is reported with the trainer's message (block, step) and the
sweep goes on.  Device names are the trainer's ``analog=`` names (any spelling of a device model
is taken, e.g. SoftBounds for soft_bounds; a device named twice is trained once, with a note); an
``--out`` that already holds a sweep's results (or one of the run folders) is refused before any
work, so nothing is overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEVICES = ("ideal", "constant_step", "linear_step", "soft_bounds", "exp_step", "pow_step", "piecewise_step")
DIGITAL = {"analog": "", "beta": "0.5"}   # the digital reference: the same model and EP, all-digital


def run_overrides(device: Optional[str], algorithm: str, epochs: Optional[int], reads: str, seed: int,
                  limit: int, extra: Dict[str, str]) -> Dict[str, str]:
    """The trainer overrides of one run (``device`` None: the digital reference)."""
    over = {"analog_algorithm": algorithm, "analog_reads": reads, "seed": str(seed), "progress": "false",
            "tensorboard": "false", "num_threads": "1"}
    if epochs is not None:
        over["epochs"] = str(epochs)
    if limit:
        over.update(train_subset=str(limit), test_subset=str(limit))
    over.update(extra)
    over.update({"analog": device} if device else DIGITAL)
    return over


def run_one(task: Dict) -> Dict:
    """Train one configuration through the trainer; a diverged run returns its message in ``error``."""
    import warnings

    import ffebm
    from ..failures import TrainingStopped
    from ..recipes import build_config
    from ..trainer import train

    cfg = build_config(task["recipe"], task["overrides"])
    t0 = time.time()
    error, metrics = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffebm.ConvergenceWarning)
        try:
            metrics = train(cfg, Path(task["run_dir"]), log=lambda m: None)
        except TrainingStopped as e:
            error = str(e)
    history = metrics["history"] if metrics else _history_of(Path(task["run_dir"]))
    return {"device": task["device"], "algorithm": cfg.analog_algorithm if task["device"] else "digital",
            "recipe": task["recipe"], "run_dir": task["run_dir"], "overrides": task["overrides"],
            "final_test_accuracy": None if error else metrics["test_accuracy"], "error": error,
            "history": history, "wall_s": time.time() - t0}


def _history_of(run_dir: Path) -> List[Dict]:
    """The epochs a stopped run completed (from its last good checkpoint, if any)."""
    from .. import checkpoint as ckpt_mod

    found = ckpt_mod.find(run_dir)
    return list(ckpt_mod.load(found).get("history", [])) if found else []


RESULT_FILES = ("sweep.json", "sweep.png")


def resolve_devices(devices: Sequence[str]):
    """The snake-case names of ``devices`` (any spelling of a device model), each once, in order, and
    notes on the duplicates dropped; an unknown name raises :class:`train.config.ConfigError` listing
    the names the command takes."""
    from ..analog import canonical_device_name

    out: List[str] = []
    given: Dict[str, List[str]] = {}
    for d in devices:
        c = canonical_device_name(d)
        given.setdefault(c, []).append(d)
        if c not in out:
            out.append(c)
    notes = [f"note: --devices names {c} {len(g)} times ({', '.join(g)}): training it once"
             for c, g in given.items() if len(g) > 1]
    return out, notes


def check_out(out: Path) -> None:
    """Refuse an --out that is a file, or that holds the results of an earlier sweep (they would be
    overwritten)."""
    from ..config import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    for name in RESULT_FILES:
        if (out / name).exists():
            raise UserError(f"{out / name} exists (an earlier sweep): choose another --out; nothing was overwritten")


def sweep(devices: Sequence[str], algorithm: str = "c-ttv2", epochs: Optional[int] = None, jobs: int = 1,
          digital: bool = True, progress: bool = True, out: Path = Path("runs/device_sweep"),
          recipe: str = "digits-analog", reads: str = "default", seed: int = 0, limit: int = 0,
          extra: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Train once per device (plus the digital model if ``digital``); returns the runs' results
    (``device`` None for the digital run), in the order asked; prints a line as each finishes."""
    from ..config import UserError
    from ..recipes import build_config

    devices, notes = resolve_devices(devices)  # unknown names fail here, before any work
    if progress:
        for n in notes:
            print(n, flush=True)
    check_out(Path(out))
    names = list(devices) + ([None] if digital else [])
    taken = [str(Path(out) / (d or "digital")) for d in names if (Path(out) / (d or "digital")).exists()]
    if taken:
        raise UserError(f"{taken[0]} exists (an earlier sweep?): choose another --out or remove it")
    tasks = []
    for d in names:
        over = run_overrides(d, algorithm, epochs, reads, seed, limit, dict(extra or {}))
        build_config(recipe, over)  # a bad override fails here, before any work
        tasks.append({"device": d, "recipe": recipe, "overrides": over, "run_dir": str(Path(out) / (d or "digital"))})

    def report(r: Dict, k: int) -> None:
        if progress:
            what = (f"test accuracy {r['final_test_accuracy']:.4f}" if r["error"] is None
                    else f"stopped: {r['error'][:160]}")
            print(f"[{k}/{len(tasks)}] {r['device'] or 'digital'}: {what} ({r['wall_s']:.0f} s)", flush=True)

    if jobs <= 1:
        res = []
        for t in tasks:
            res.append(run_one(t))
            report(res[-1], len(res))
        return res
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(run_one, t) for t in tasks]
        for k, f in enumerate(as_completed(futs), 1):
            report(f.result(), k)
        return [f.result() for f in futs]


def table(results: List[Dict]) -> str:
    rows = ["| device | algorithm | final test acc | best test acc | wall s |", "|---|---|---|---|---|"]
    for r in results:
        best = max((h["test_accuracy"] for h in r["history"] if "test_accuracy" in h), default=None)
        final = f"{r['final_test_accuracy']:.4f}" if r["error"] is None else f"diverged ({r['error'][:80]})"
        rows.append(f"| {r['device'] or '(digital)'} | {r['algorithm']} | {final} | "
                    f"{'-' if best is None else f'{best:.4f}'} | {r['wall_s']:.0f} |")
    return "\n".join(rows)


def plot(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        label = r["device"] or "digital"
        hist = [h for h in r["history"] if "test_accuracy" in h]
        ax.plot([h["epoch"] for h in hist], [h["test_accuracy"] for h in hist], label=label,
                linestyle="--" if r["device"] is None else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits ff-EBM on tiles, {results[0]['algorithm']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = [r["device"] or "digital" for r in results]
    accs = [r["final_test_accuracy"] or 0.0 for r in results]  # a diverged run shows as 0
    bars = bx.bar(range(len(names)), accs, color=["tab:gray" if r["device"] is None else "tab:blue" for r in results])
    for b, a, r in zip(bars, accs, results):
        bx.text(b.get_x() + b.get_width() / 2, a + 0.01, f"{a:.2f}" if r["error"] is None else "diverged",
                ha="center", fontsize=8)
    bx.set_xticks(range(len(names)))
    bx.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    bx.set_ylim(0, 1.05)
    bx.set_ylabel("final test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> List[Dict]:
    from ..analog import device_names
    from ..cli import invoked_as, non_negative_int, positive_int, seed

    ap = argparse.ArgumentParser(prog=invoked_as("train.experiments.device_sweep"),
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default=",".join(DEVICES),
                    help=f"comma-separated device models: {', '.join(device_names())}")
    ap.add_argument("--recipe", default="digits-analog", help="the trainer recipe every run starts from")
    ap.add_argument("--algorithm", default="c-ttv2", help="analog_algorithm of the runs (c-ttv2, tiki-taka, sgd, ...)")
    ap.add_argument("--epochs", type=positive_int, default=None, help="default: the recipe's")
    ap.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--reads", default="default", choices=("default", "perfect"))
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--limit", type=non_negative_int, default=0,
                    help="first N train/test samples only (smoke runs; 0: all)")
    ap.add_argument("--no-digital", action="store_true", help="skip the digital reference run")
    ap.add_argument("--out", default="runs/device_sweep", help="folder for the run folders, sweep.json and sweep.png")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="trainer settings for every run")
    a = ap.parse_args(argv)
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    if not devices:
        ap.error("argument --devices: give at least one device model name")
    extra = {}
    for kv in a.overrides:
        k, eq, v = kv.partition("=")
        if not eq:
            ap.error(f"{kv!r}: expected key=value")
        extra[k] = v
    from ..config import UserError

    try:
        devices, notes = resolve_devices(devices)
    except UserError as e:
        ap.error(f"argument --devices: {e}")
    for n in notes:
        print(n, file=sys.stderr, flush=True)
    out = Path(a.out)
    try:
        check_out(out)
    except UserError as e:
        ap.error(str(e))
    print(f"training {len(devices) + (not a.no_digital)} runs on {a.jobs} worker(s) into {out}/...", flush=True)
    try:
        res = sweep(devices, a.algorithm, a.epochs, a.jobs, digital=not a.no_digital, out=out, recipe=a.recipe,
                    reads=a.reads, seed=a.seed, limit=a.limit, extra=extra)
    except UserError as e:
        ap.error(str(e))
    print(table(res))
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / "sweep.json", "x") as f:  # never over the results of another sweep
            f.write(json.dumps(res, indent=2))
    except FileExistsError:
        ap.error(f"{out / 'sweep.json'} appeared while the sweep ran (another sweep into {out}?); "
                 "the run folders hold every result")
    plot(res, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return res


if __name__ == "__main__":
    main()
