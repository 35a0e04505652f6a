"""One recipe over several seeds: mean, range and wall time of the final test accuracy.

    python -m train.experiments.seeds                       # the default recipe, seeds 0-4
    python -m train.experiments.seeds digits --seeds 0-4 num_threads=2 --json seeds.json
    python -m train.experiments.seeds digits method=implicit --seeds 0,1,2

Each seed is one ordinary training run through the trainer (``train.train``), in its own
temporary run folder, one after the other (runs on a shared CPU should not compete for it).
Accuracies are quoted as mean and range over the seeds, never one lucky seed; warnings raised
during a run (a relaxation hitting its budget, ...) are counted and shown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def parse_seeds(text: str) -> List[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5"`` -> [0, 2, 5]."""
    out: List[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected seeds >= 0 like 0-4 or 0,2,5") from None
    if not out or any(s < 0 for s in out):
        raise ValueError(f"--seeds {text!r}: expected seeds >= 0 like 0-4 or 0,2,5")
    return out


def run_seeds(recipe: str, overrides: Dict[str, str], seeds: Sequence[int], log=print) -> Dict:
    from ..recipes import build_config
    from ..trainer import train

    runs = []
    for seed in seeds:
        cfg = build_config(recipe, dict(overrides, seed=str(seed), progress="false", tensorboard="false"))
        with tempfile.TemporaryDirectory(prefix="ffebm-seeds-") as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            m = train(cfg, Path(tmp) / "run", log=lambda msg: None)
            wall = time.perf_counter() - t0
        shown = sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
        steps = {b: r["train_steps_mean"] for b, r in m.get("relaxation", {}).items() if "train_steps_mean" in r}
        runs.append({"seed": seed, "test_accuracy": m["test_accuracy"], "train_seconds": m["train_seconds"],
                     "wall_seconds": wall, "warnings": shown, "free_steps_mean": steps})
        shown_steps = ", ".join(f"{b} {s:.1f}" for b, s in steps.items())
        log(f"seed {seed}: test accuracy {100 * m['test_accuracy']:.2f}% ({m['train_seconds']:.1f} s training, "
            f"{wall:.1f} s wall{', free steps ' + shown_steps if steps else ''}"
            f"{', ' + str(len(shown)) + ' warning(s)' if shown else ''})")
    acc = [r["test_accuracy"] for r in runs]
    secs = [r["train_seconds"] for r in runs]
    summary = {"recipe": recipe, "overrides": overrides, "seeds": list(seeds), "runs": runs,
               "mean": statistics.mean(acc), "min": min(acc), "max": max(acc),
               "train_seconds_median": statistics.median(secs), "train_seconds_max": max(secs),
               "warnings": sum(len(r["warnings"]) for r in runs)}
    log(f"{recipe}: test accuracy {100 * summary['mean']:.2f}% mean, {100 * summary['min']:.2f}-"
        f"{100 * summary['max']:.2f}% range over seeds {parse_label(seeds)}; training {summary['train_seconds_median']:.1f} s "
        f"median ({summary['train_seconds_max']:.1f} s max); {summary['warnings']} warning(s)")
    return summary


def parse_label(seeds: Sequence[int]) -> str:
    s = list(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 1 else ",".join(map(str, s))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experiments.seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", default="digits")
    ap.add_argument("overrides", nargs="*", help="key=value configuration overrides")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--json", default=None)
    args = ap.parse_intermixed_args(argv)   # key=value pairs before or after the options
    if "=" in args.recipe:                  # no recipe named: the default one, and this is an override
        args.overrides.insert(0, args.recipe)
        args.recipe = "digits"
    from ..config import UserError

    try:
        seeds = parse_seeds(args.seeds)
        over = {}
        for kv in args.overrides:
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"'{kv}': expected key=value")
            over[k] = v
        summary = run_seeds(args.recipe, over, seeds)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
