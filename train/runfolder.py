"""The run folder: where a run lives, whether it resumes, and what a stored configuration may
name (only registered models, unless ``--trust-code``). Plans only; nothing is written here."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

from . import checkpoint as ckpt_mod
from .config import RUNTIME_KEYS, ConfigError, TrainConfig, UserError, apply_overrides, differing_keys, from_dict
from .validate import validate

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"


# ------------------------------------------------------------------------------------------
# run folder
# ------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    cfg: TrainConfig
    run_dir: Path
    resume_from: Optional[Path]     # checkpoint to load (None: start at step 0)
    existing: bool                  # the run folder already holds this run's config.json
    note: str = ""


def _default_run_dir(cfg: TrainConfig, base: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = base / f"{stamp}-{cfg.recipe}"
    i = 1
    while d.exists():
        d = base / f"{stamp}-{cfg.recipe}-{i}"
        i += 1
    return d


MAX_CONFIG_BYTES = 1 << 20


def read_config(run_dir: Path) -> TrainConfig:
    p = run_dir / CONFIG_FILE
    if p.exists() and (not p.is_file() or p.stat().st_size > MAX_CONFIG_BYTES):
        raise UserError(f"{p} is not a configuration file (a special file, folder or over 1 MB)")
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG_FILE})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} does not hold a configuration object")
    return validate(from_dict(data, source=str(p)))


def check_trusted(cfg: TrainConfig, source: str, trust_code: bool) -> None:
    """A configuration read from a file may name only registered models, unless the user passes
    --trust-code on the command line: importing ``module:function`` runs that module's code."""
    if ":" not in cfg.model or trust_code:
        return
    from .build import user_module_origin

    mod = cfg.model.split(":", 1)[0]
    origin = user_module_origin(mod)  # where it would come from, found without importing anything
    where = f" (from {origin})" if origin else " (not found on the path or in the working directory)"
    raise UserError(f"{source} names a user model {cfg.model!r}: loading it would import and run module "
                    f"'{mod}'{where}. Only do that for a run folder you trust: pass --trust-code")


def plan_run(cfg: Optional[TrainConfig], out: Optional[str], resume: Optional[str],
             overrides: Dict[str, str], trust_code: bool = False) -> RunPlan:
    """Decide the run folder and whether to resume, touching nothing on disk."""
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise UserError(f"--resume {resume}: no such run folder")
        stored = read_config(run_dir)
        check_trusted(stored, str(run_dir / CONFIG_FILE), trust_code)
        fixed = sorted(k for k in overrides if k not in RUNTIME_KEYS and k not in ("epochs", "max_steps"))
        if fixed:
            raise ConfigError(f"--resume keeps the stored configuration; only runtime keys may be changed "
                              f"({', '.join(sorted(RUNTIME_KEYS))}) and epochs or max_steps extended, "
                              f"not {', '.join(fixed)}")
        cfg = validate(apply_overrides(stored, overrides))
        if cfg.epochs < stored.epochs:
            raise ConfigError(f"--resume epochs={cfg.epochs}: a run can be extended, not shortened "
                              f"(it has epochs={stored.epochs})")
        if cfg.max_steps != stored.max_steps and not (
                stored.max_steps and (cfg.max_steps == 0 or cfg.max_steps > stored.max_steps)):
            raise ConfigError(f"--resume max_steps={cfg.max_steps}: a run can be extended (max_steps=0 for no "
                              f"limit, or more than its max_steps={stored.max_steps}), not shortened")
        found = ckpt_mod.find(run_dir)
        note = "" if found else f"no checkpoint in {run_dir} yet: starting from step 0"
        return RunPlan(cfg, run_dir, found, True, note)
    assert cfg is not None
    if out is None:
        return RunPlan(cfg, _default_run_dir(cfg), None, False)
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if run_dir.is_dir() and (run_dir / CONFIG_FILE).exists():
        stored = read_config(run_dir)
        diff = differing_keys(stored, cfg)
        if diff:
            shown = ", ".join(f"{k}: {getattr(stored, k)!r} -> {getattr(cfg, k)!r}" for k in diff[:4])
            raise UserError(f"--out {out} already holds a different run ({shown}); choose another folder, "
                            f"or continue it with --resume {out}")
        found = ckpt_mod.find(run_dir)
        return RunPlan(cfg, run_dir, found, True,
                       f"{run_dir} holds this run already: resuming" + ("" if found else " from step 0"))
    # a lock or temp file left by a trainer killed before it wrote config.json does not count
    leftovers = [q for q in run_dir.iterdir() if not (q.name == ".lock" or (q.name.startswith(".")
                                                                             and q.name.endswith(".tmp")))] \
        if run_dir.is_dir() else []
    if leftovers:
        raise UserError(f"--out {out} is a non-empty folder that is not a run folder; refusing to write into it")
    return RunPlan(cfg, run_dir, None, False)


# ------------------------------------------------------------------------------------------
# the trainer
