"""What a device does to training: the analog digits ff-EBM trained by pulsed EP on each device model.

    python -m train.device_sweep [--devices soft_bounds,constant_step,...] [--algorithm c-ttv2]
                                 [--epochs 40] [--jobs 2] [--out DIR] [--reads default|perfect]

Every run is :func:`train.analog_digits.run` with its defaults (both energy blocks and their
input maps on tiles, default read model, state averaging, the same seed) and only the device
model changed, each with its published default settings (``dw_min`` 0.001, the model's own
nonlinearity, device-to-device spread and cycle-to-cycle noise). Prints a table (final and best
test accuracy, wall time), writes ``sweep.json`` and ``sweep.png`` (test accuracy per epoch for
every device, and the final accuracies as bars beside the digital model's) into ``--out``.
Runs go to ``--jobs`` worker processes, one torch thread each. A run whose relaxation diverges
(NaN/inf) is reported as such, with the block, phase, step and epoch, and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEVICES = ("ideal", "constant_step", "linear_step", "soft_bounds", "exp_step", "pow_step", "piecewise_step")


def _one(args: Dict) -> Dict:
    import warnings

    import torch

    import ffebm
    from .analog_digits import run

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffebm.ConvergenceWarning)
        t0 = time.time()
        res = run(verbose=False, **args)
    res["wall_s"] = time.time() - t0
    return res


def sweep(devices: Sequence[str], algorithm: str = "c-ttv2", epochs: Optional[int] = None, jobs: int = 1,
          digital: bool = True, progress: bool = True, **run_kw) -> List[Dict]:
    """Train once per device (plus the digital model if ``digital``); returns the runs' results
    (``device`` None for the digital run), in the order asked; prints a line as each finishes."""
    from ffebm.analog import device_from_name
    from .analog_digits import DEFAULT_EPOCHS

    for d in devices:
        device_from_name(d)  # unknown names fail here, before any work
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    tasks = [dict(algorithm=algorithm, epochs=epochs, device=d, **run_kw) for d in devices]
    if digital:
        tasks.append(dict(algorithm="digital", epochs=epochs, **run_kw))
    def report(r: Dict, k: int) -> None:
        if progress:
            what = f"test accuracy {r['final_test_acc']:.4f}" if r["error"] is None else f"diverged, {r['error']}"
            print(f"[{k}/{len(tasks)}] {r['device'] or 'digital'}: {what} ({r['wall_s']:.0f} s)", flush=True)

    if jobs <= 1:
        out = []
        for t in tasks:
            out.append(_one(t))
            report(out[-1], len(out))
        return out
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(_one, t) for t in tasks]
        for k, f in enumerate(as_completed(futs), 1):
            report(f.result(), k)
        return [f.result() for f in futs]


def table(results: List[Dict]) -> str:
    rows = ["| device | algorithm | final test acc | best test acc | wall s |", "|---|---|---|---|---|"]
    for r in results:
        best = max((h["test_acc"] for h in r["history"]), default=None)
        final = f"{r['final_test_acc']:.4f}" if r["error"] is None else f"diverged ({r['error'][:80]})"
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
        ep = [h["epoch"] for h in r["history"]]
        ax.plot(ep, [h["test_acc"] for h in r["history"]], label=label,
                linestyle="--" if r["device"] is None else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits ff-EBM on tiles, {results[0]['algorithm']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = [r["device"] or "digital" for r in results]
    accs = [r["final_test_acc"] or 0.0 for r in results]  # a diverged run shows as 0
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default=",".join(DEVICES), help="comma-separated device model names")
    ap.add_argument("--algorithm", default="c-ttv2", choices=("c-ttv2", "tiki-taka", "sgd"))
    ap.add_argument("--epochs", type=int, default=None, help="default: analog_digits' default")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--reads", default="default", choices=("default", "perfect"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N train/test samples only (smoke runs)")
    ap.add_argument("--no-digital", action="store_true", help="skip the digital reference run")
    ap.add_argument("--out", default="runs/device_sweep", help="folder for sweep.json and sweep.png")
    a = ap.parse_args(argv)
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    if not devices:
        ap.error("--devices: give at least one device model name")
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    from ffebm.analog import device_from_name

    for d in devices:
        try:
            device_from_name(d)
        except ValueError as e:
            ap.error(f"--devices: {str(e).splitlines()[0]}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"training {len(devices) + (not a.no_digital)} runs on {a.jobs} worker(s)...", flush=True)
    res = sweep(devices, a.algorithm, a.epochs, a.jobs, digital=not a.no_digital, reads=a.reads, seed=a.seed,
                limit=a.limit)
    print(table(res))
    (out / "sweep.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return res


if __name__ == "__main__":
    main()
