"""Command line: ``python -m train [RECIPE] [key=value ...] [--out DIR] [--resume RUN_DIR]``.

Also under torchrun: ``torchrun --nproc_per_node 2 -m train [RECIPE] ... --out DIR``.

Exit status: 0 done; 2 user error (bad key/value, bad or missing data, unusable checkpoint,
run folder in use by another process or not writable, a stored user model without
--trust-code), 3 training diverged (NaN/inf or RelaxationDiverged; the last good, finite
checkpoint is kept), 4 a checkpoint or result file could not be written (disk full, I/O error;
the previous checkpoint is kept), 128+N stopped by signal N after saving a checkpoint (130 for
Ctrl-C, 143 for SIGTERM).  A run that fails (or is stopped) before its first checkpoint removes the
run folder it created: no half-made folder is left behind.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

USAGE = """usage: {prog} [RECIPE] [key=value ...] [--out DIR] [--resume RUN_DIR [--trust-code]]
       torchrun --nproc_per_node N -m {module} [RECIPE] [key=value ...] --out DIR
       {prog} --list        (recipes and configuration keys)

RECIPE defaults to 'digits'.  --out defaults to a new folder runs/<time>-<recipe>; an --out
folder that already holds the same run is resumed.  --resume RUN_DIR continues a run from
its checkpoint with its stored configuration (only runtime keys may be changed); a stored
configuration naming a user model (model=module:function) is only imported with --trust-code.

model=module:function trains a model of your own: function(num_classes=, in_channels=,
image_size=, **model_options) returns a torch.nn.Module; the module is imported from
PYTHONPATH or, failing that, from the working directory (e.g. ./mymodel.py: model=mymodel:build)."""


def usage() -> str:
    """USAGE with the command as the user typed it (ffebm-train, python -m ffebm.train, python -m train)."""
    from .cli import invoked_as, module_of

    prog = invoked_as("train")
    return USAGE.format(prog=prog, module=module_of(prog, "train"))


@dataclass
class CliArgs:
    recipe: Optional[str] = None
    overrides: Dict[str, str] = field(default_factory=dict)
    out: Optional[str] = None
    resume: Optional[str] = None
    help: bool = False
    list: bool = False
    trust_code: bool = False


def parse_args(argv: List[str]) -> CliArgs:
    from .config import ConfigError

    a = CliArgs()
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            a.help = True
        elif tok in ("--list", "--list-recipes"):
            a.list = True
        elif tok == "--trust-code":
            a.trust_code = True
        elif tok in ("--out", "--resume") or tok.startswith(("--out=", "--resume=")):
            name, _, val = tok.partition("=")
            if not val:
                i += 1
                if i >= len(argv) or argv[i].startswith("--"):
                    raise ConfigError(f"{name} needs a folder argument")
                val = argv[i]
            setattr(a, name[2:], val)
        elif tok.startswith("-"):
            raise ConfigError(f"unknown option '{tok}' (options: --out DIR, --resume RUN_DIR, --trust-code, --list, "
                              "--help)")
        elif "=" in tok:
            key, _, val = tok.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise ConfigError(f"'{tok}': expected key=value")
            if key in a.overrides:
                raise ConfigError(f"key '{key}' given twice")
            a.overrides[key] = val
        elif a.recipe is None:
            a.recipe = tok
        else:
            raise ConfigError(f"unexpected argument '{tok}' (one recipe name, then key=value pairs)")
        i += 1
    if a.resume is not None and a.out is not None:
        raise ConfigError("--resume and --out cannot be combined (a resumed run stays in its folder)")
    if a.resume is not None and a.recipe is not None:
        raise ConfigError("--resume uses the configuration stored in the run folder; do not name a recipe")
    return a


def _print_err(msg: str, ctx=None):
    prefix = f"[rank {ctx.rank}] " if ctx is not None and ctx.enabled else ""
    if ctx is None or ctx.is_main or not ctx.enabled:
        print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)


class _Held:
    """What :func:`main` must give back however it ends: the claimed run folder, the process group."""
    claimed = None
    ctx = None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    held = _Held()
    code = 1  # an unexpected exception (a traceback) counts as a failure too
    try:
        from .runlock import TerminateRaises, Terminated

        try:
            with TerminateRaises():  # SIGTERM before the training loop: unwind, release the run folder
                code = _main(argv, held)
        except Terminated as e:
            code = 128 + e.signum
            _print_err(f"{e} before training started: stopped; nothing was trained"
                       + (" (the new run folder is removed)" if held.claimed is not None and held.claimed.fresh
                          else ""), held.ctx)
        return code
    except KeyboardInterrupt:
        code = 130
        print("interrupted", file=sys.stderr, flush=True)
        return code
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stdout = open(os.devnull, "w")
        code = 0
        return code
    finally:
        if held.claimed is not None:
            # a failure before the first checkpoint leaves no half-made run folder (see ClaimedRunFolder)
            held.claimed.release(failed=code != 0)
        if held.ctx is not None and held.ctx.enabled:
            from . import distributed as D

            D.shutdown()


def _main(argv: List[str], held: "_Held") -> int:
    from . import distributed as D
    from .config import UserError, unknown_key_error
    from .keys import describe_keys, format_config
    from .recipes import build_config, describe

    try:
        args = parse_args(argv)
    except UserError as e:
        _print_err(str(e))
        return 2
    if args.help:
        print(usage())
        return 0
    if args.list:
        try:
            cfg = build_config(args.recipe or "digits", args.overrides)
        except UserError as e:
            _print_err(str(e))
            return 2
        print("recipes:\n" + describe() + f"\n\nconfiguration keys (values of recipe '{cfg.recipe}'"
              + (" with your overrides" if args.overrides else "") + "):\n" + describe_keys(cfg))
        return 0
    from .config import field_names

    for k in args.overrides:
        if k not in field_names():
            _print_err(str(unknown_key_error(k)))
            return 2

    import torch  # noqa: F401  (heavy imports after the cheap checks)
    from . import trainer as T
    from .config import from_dict, to_dict
    from .runfolder import METRICS_FILE, plan_run
    from .runlock import ClaimedRunFolder
    from .checkpoint import CheckpointError  # noqa: F401

    try:
        cfg = None if args.resume else build_config(args.recipe or "digits", args.overrides)
        device_kind = cfg.device if cfg is not None else "auto"
    except UserError as e:
        _print_err(str(e))
        return 2
    ctx = held.ctx = D.init(device_kind)

    # rank 0 decides the run folder and whether to resume; the others follow
    decision = None
    if ctx.is_main:
        try:
            plan = plan_run(cfg, args.out, args.resume, args.overrides if args.resume else {},
                              trust_code=args.trust_code)
            # one process per run folder, and a folder we can write, before any work is spent
            held.claimed = ClaimedRunFolder(plan.run_dir).claim()
            decision = ("ok", {"cfg": to_dict(plan.cfg), "run_dir": str(plan.run_dir),
                               "resume_from": str(plan.resume_from) if plan.resume_from else None,
                               "existing": plan.existing, "note": plan.note})
        except UserError as e:
            decision = ("error", str(e))
    decision = D.broadcast_object(decision, ctx)
    if decision[0] == "error":
        _print_err(decision[1], ctx)
        return 2
    d = decision[1]
    cfg = from_dict(d["cfg"])
    run_dir = Path(d["run_dir"])
    if d["note"]:
        if ctx.is_main:
            print(d["note"], flush=True)

    trainer = T.Trainer(cfg, run_dir, ctx)
    try:
        trainer.setup(resume_from=Path(d["resume_from"]) if d["resume_from"] else None)
    except UserError as e:
        _print_err(str(e), ctx)
        return 2
    if trainer.finished and trainer.final is not None:
        metrics = run_dir / METRICS_FILE
        if ctx.is_main and not metrics.exists():  # a run stopped while writing its results
            from .checkpoint import WriteError, atomic_write_json

            try:
                atomic_write_json(metrics, trainer.final)
            except WriteError as e:
                _print_err(str(e))
                return 4
        if ctx.is_main:
            print(f"run already complete: test accuracy {100 * trainer.final['test_accuracy']:.2f}% "
                  f"(metrics in {run_dir / METRICS_FILE})", flush=True)
        return 0
    if ctx.is_main:
        print("configuration:\n" + format_config(cfg), flush=True)
        print(f"run folder: {run_dir}  (world size {ctx.world}, device {trainer.device}, "
              f"{len(trainer.train_set)} training / {len(trainer.test_set)} test samples, "
              f"gradient {trainer.method})", flush=True)
        if ctx.enabled and args.out is None and args.resume is None:
            print("note: pass --out DIR under torchrun so that a restarted worker group finds the run",
                  flush=True)
    try:
        trainer.commit(existing=d["existing"])
        trainer.fit()
    except T.TrainingStopped as e:
        if ctx.is_main or not ctx.enabled:
            # in a redirected log the progress bar's last line has no newline of its own
            lead = "" if sys.stderr.isatty() else "\n"
            print(lead + str(e), file=sys.stderr, flush=True)
        return e.code  # main() removes the run folder if no checkpoint was written
    except RuntimeError as e:
        if not ctx.enabled or not D.is_peer_failure(e):
            raise
        print(f"[rank {ctx.rank}] error: lost contact with another worker at step {trainer.global_step} "
              f"({str(e).splitlines()[0][:160]}); the run folder keeps the last checkpoint "
              f"(torchrun --max-restarts N resumes from it)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
