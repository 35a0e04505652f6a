"""Evaluate a trained run: ``python -m train.evaluate RUN_DIR [--checkpoint FILE] [--times T1,T2,...]
[--draws N] [--seed S] [--device DEV] [--batch-size N] [--json OUT]``.

Prints the test accuracy of the run's latest checkpoint (the final weights once the run has
finished).  With ``--times`` (seconds after programming, e.g. ``0,3600,86400``) analog models
are evaluated after programming and conductance drift:

* runs trained for an inference chip (``analog_mode=inference``): the deployment curve of
  :func:`ffebm.analog.evaluate_over_time` over ``--draws`` programming draws (default 10; seeds
  ``--seed + 1000 k``, default the run's seed): test accuracy and loss at each time, mean and
  standard deviation over the draws (programming noise, drift exponents, 1/f read noise, read
  noise; global drift compensation);
* runs on training tiles (``analog=DEVICE``): the PCM drift evaluation of
  ``ffebm.analog.drift.evaluate_over_time`` (one draw; ``--draws N``: N draws, mean and spread).

The run folder is only read.  The model is rebuilt by :meth:`train.trainer.Trainer.setup` from
the stored configuration, so an analog run goes through the same seeded conversion as in
training (:func:`train.analog.make_analog`, :func:`train.inference.make_inference`), and its
checkpoint (tile states, noise generators, analog optimiser) loads into it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

USAGE = ("usage: {prog} RUN_DIR [--checkpoint FILE] [--times T1,T2,...] [--draws N] [--seed S] "
         "[--device DEV] [--batch-size N] [--json OUT] [--trust-code]")
DEFAULT_DRAWS = 10  # programming draws of an inference run's deployment curve


def usage() -> str:
    """USAGE with the command as the user typed it (ffebm-evaluate, python -m train.evaluate, ...)."""
    from .cli import invoked_as

    return USAGE.format(prog=invoked_as("train.evaluate"))


def _parse(argv: List[str]):
    from .config import ConfigError

    opts = {"run_dir": None, "checkpoint": None, "times": None, "draws": None, "seed": None, "device": None,
            "batch_size": None, "json": None, "trust_code": False}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            return None
        if tok == "--trust-code":
            opts["trust_code"] = True
            i += 1
            continue
        if tok.startswith("--"):
            name, _, val = tok[2:].partition("=")
            name = name.replace("-", "_")
            if name not in opts or name in ("run_dir", "trust_code"):
                raise ConfigError(f"unknown option '{tok}'; {usage()}")
            if not val:
                i += 1
                if i >= len(argv):
                    raise ConfigError(f"--{name} needs a value")
                val = argv[i]
            opts[name] = val
        elif opts["run_dir"] is None:
            opts["run_dir"] = tok
        else:
            raise ConfigError(f"unexpected argument '{tok}'; {usage()}")
        i += 1
    if opts["run_dir"] is None:
        raise ConfigError(usage())
    if opts["times"] is not None:
        try:
            opts["times"] = [float(t) for t in opts["times"].split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--times {opts['times']!r}: expected comma-separated seconds") from None
        if not opts["times"] or any(t < 0 for t in opts["times"]):
            raise ConfigError("--times: expected non-negative seconds")
    for key, lo in (("draws", 1), ("seed", 0)):
        if opts[key] is not None:
            try:
                opts[key] = int(opts[key])
                assert lo <= opts[key] < 2 ** 62
            except (ValueError, AssertionError):
                what = "a positive integer" if lo else "an integer >= 0"
                raise ConfigError(f"--{key} {opts[key]!r}: expected {what}") from None
    if (opts["draws"] is not None or opts["seed"] is not None) and opts["times"] is None:
        raise ConfigError("--draws / --seed: give --times too (they set the deployment curve's programming draws)")
    if opts["batch_size"] is not None:
        try:
            opts["batch_size"] = int(opts["batch_size"])
            assert opts["batch_size"] > 0
        except (ValueError, AssertionError):
            raise ConfigError(f"--batch-size {opts['batch_size']!r}: expected a positive integer") from None
    return opts


def _fmt_t(t: float) -> str:
    return f"{t:.0f}" if float(t).is_integer() else f"{t:g}"


def deployment_curve(tr, times: List[float], draws: int, seed: int) -> Dict:
    """The deployment curve of the inference layers of ``tr.core`` (a set-up :class:`Trainer`):
    ``{"draws", "seed", "accuracy_over_time": {t: mean}, "accuracy_std": {t: std},
    "accuracy_draws": {t: [per draw]}, "loss_over_time", "loss_std", "loss_draws"}`` (keys ``str(float(t))``)
    through :func:`ffebm.analog.evaluate_over_time` (programming draw ``k`` seeded ``seed + 1000 k``)."""
    import statistics

    from ffebm.analog import evaluate_over_time

    def eval_fn(model=None):
        r = tr.evaluate()
        return {"accuracy": float(r["test_accuracy"]), "loss": float(r["test_loss"])}

    raw = evaluate_over_time(tr.core, eval_fn, times, draws=draws, seed=seed)
    out: Dict = {"draws": draws, "seed": seed}
    for what in ("accuracy", "loss"):
        mean, std, per = {}, {}, {}
        for r in raw:
            vals = [d[what] for d in r["results"]]
            key = str(float(r["t"]))
            per[key] = vals
            mean[key] = statistics.fmean(vals)
            std[key] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.update({f"{what}_over_time": mean, f"{what}_std": std, f"{what}_draws": per})
    return out


def evaluate_run(run_dir: Path, checkpoint: Optional[Path] = None, times: Optional[List[float]] = None,
                 device: Optional[str] = None, batch_size: Optional[int] = None, log=print,
                 trust_code: bool = False, draws: Optional[int] = None, seed: Optional[int] = None) -> Dict:
    from . import checkpoint as ckpt_mod
    from .config import UserError, apply_overrides
    from .runfolder import CONFIG_FILE, check_trusted, read_config
    from .trainer import Trainer

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    check_trusted(cfg, str(run_dir / CONFIG_FILE), trust_code)
    over = {"progress": False, "tensorboard": False}
    if device:
        over["device"] = device
    if batch_size:
        over["eval_batch_size"] = batch_size
    cfg = apply_overrides(cfg, over)
    path = Path(checkpoint) if checkpoint else ckpt_mod.find(run_dir)
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint to evaluate")
    tr = Trainer(cfg, None, log=lambda m: None)
    tr.setup(resume_from=path)
    res = tr.evaluate()
    out = {"run_dir": str(run_dir), "checkpoint": str(path), "global_step": tr.global_step,
           "test_accuracy": res["test_accuracy"], "test_loss": res["test_loss"],
           "relaxation": res["relaxation"]}
    top5 = ""
    if "test_top5_accuracy" in res:
        out["test_top5_accuracy"] = res["test_top5_accuracy"]
        top5 = f", top-5 {100 * res['test_top5_accuracy']:.2f}%"
    log(f"{run_dir}: test accuracy {100 * res['test_accuracy']:.2f}%{top5} (loss {res['test_loss']:.4f}, "
        f"{res['test_samples']} samples, step {tr.global_step})")
    if times:
        from ffebm.analog import inference_modules

        if inference_modules(tr.core):   # an inference chip: the deployment curve over programming draws
            n = DEFAULT_DRAWS if draws is None else draws
            s = cfg.seed if seed is None else seed
            out.update(deployment_curve(tr, times, n, s))
            log(f"  deployment over {n} programming draws (seeds {s} + 1000 k), mean +- std:")
            for t in times:
                key = str(float(t))
                log(f"  t = {_fmt_t(t)} s after programming: test accuracy {100 * out['accuracy_over_time'][key]:.2f}% "
                    f"+- {100 * out['accuracy_std'][key]:.2f} (loss {out['loss_over_time'][key]:.4f} "
                    f"+- {out['loss_std'][key]:.4f})")
            return out
        if draws is not None:           # training tiles, several drift draws
            try:
                out.update(deployment_curve(tr, times, draws, cfg.seed if seed is None else seed))
            except ValueError as e:  # e.g. no analog tiles in the model
                raise UserError(f"--times: {e}") from None
            for t in times:
                key = str(float(t))
                log(f"  t = {_fmt_t(t)} s after programming: test accuracy {100 * out['accuracy_over_time'][key]:.2f}% "
                    f"+- {100 * out['accuracy_std'][key]:.2f} over {draws} draws (loss {out['loss_over_time'][key]:.4f})")
            return out
        from ffebm.analog.drift import evaluate_over_time

        def eval_fn(model=None):
            r = tr.evaluate()
            return {"accuracy": r["test_accuracy"], "loss": r["test_loss"]}

        try:
            raw = evaluate_over_time(tr.core, eval_fn, times, seed=cfg.seed if seed is None else seed)
        except ValueError as e:  # e.g. no analog tiles in the model
            raise UserError(f"--times: {e}") from None
        curve, losses = {}, {}
        for t, r in zip(times, raw):
            key = str(float(r.get("t", t)))
            curve[key] = float(r["result"]["accuracy"])
            losses[key] = float(r["result"]["loss"])
        out["accuracy_over_time"] = curve
        out["loss_over_time"] = losses
        for t, a in curve.items():
            log(f"  t = {t} s after programming: test accuracy {100 * a:.2f}% (loss {losses[t]:.4f})")
    return out


RUN_FILES = {"config.json", "metrics.json", "failure.json", "checkpoint.json", ".lock"}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _write_json(path: Path, obj: Dict) -> None:
    from .checkpoint import WriteError, atomic_write_json
    from .config import UserError

    if path.exists() and not path.is_file():
        raise UserError(f"--json {path}: not a regular file (a folder or special file); refusing to replace it")

    try:
        atomic_write_json(path, obj)
    except (OSError, WriteError) as e:
        raise UserError(str(e) if isinstance(e, WriteError) else f"cannot write {path}: {e.strerror or e}") from None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from .config import UserError

        try:
            opts = _parse(argv)
            if opts is None:
                print(usage())
                return 0
            run_dir = Path(opts["run_dir"])
            lock = None
            if opts["json"] and run_dir.is_dir() and _inside(Path(opts["json"]), run_dir):
                from .runlock import RunFolderLock

                target = Path(opts["json"])
                if target.name in RUN_FILES or target.name.startswith("checkpoint") or target.suffix != ".json" \
                        or "tb" in target.resolve().relative_to(run_dir.resolve()).parts:
                    raise UserError(f"--json {opts['json']}: inside the run folder only a new .json file of your own "
                                    "may be written (not the run's files); write elsewhere")
                lock = RunFolderLock(run_dir).acquire()  # writing into a run folder: not while it trains
            try:
                out = evaluate_run(run_dir, opts["checkpoint"], opts["times"], opts["device"], opts["batch_size"],
                                   trust_code=opts["trust_code"], draws=opts["draws"], seed=opts["seed"])
                if opts["json"]:
                    _write_json(Path(opts["json"]), out)
            finally:
                if lock is not None:
                    lock.release()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
