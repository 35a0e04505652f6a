"""Checkpoints: atomic, complete (model, optimiser, scheduler, analog state, every RNG, the
position within the epoch) and loadable with ``torch.load(weights_only=True)``.

Layout in the run folder::

    checkpoint.pt        latest checkpoint (written to a temp file, fsync'd, os.replace'd)
    checkpoint_prev.pt   the one before it (kept as the last good fallback)
    checkpoint.json      human-readable summary of checkpoint.pt (epoch, step, global step)

Only tensors and plain Python values (dict/list/tuple/str/int/float/bool/None) are stored, so
loading never unpickles arbitrary objects.  Analog/hardware state is collected generically:
any attribute of any sub-module that is not itself a Module/Tensor but has ``state_dict`` and
``load_state_dict`` (e.g. a simulated device array), and any ``torch.Generator`` attribute.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .config import UserError

FORMAT = "ffebm-train-checkpoint"
VERSION = 1
CKPT = "checkpoint.pt"
PREV = "checkpoint_prev.pt"
SUMMARY = "checkpoint.json"


class CheckpointError(UserError):
    pass


class WriteError(Exception):
    """A checkpoint or result file could not be written (disk full, I/O error); the previous
    checkpoint is untouched. ``written``: a checkpoint that *was* completed before the failure
    (its readable summary failed), or None."""

    def __init__(self, message: str, written: Optional[Path] = None) -> None:
        super().__init__(message)
        self.written = written


def _write_failure(path: Path, e: BaseException) -> WriteError:
    if isinstance(e, OSError):
        why = e.strerror or str(e)
    else:  # torch's zip writer reports a full disk as e.g. "unexpected pos ..."
        why = f"write failed ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
    try:
        free = shutil.disk_usage(path.parent).free
        why += f"; {free / 2**20:.0f} MB free on that disk"
    except OSError:
        pass
    return WriteError(f"cannot write {path}: {why}")


# ------------------------------------------------------------------------------------------
# atomic file writes
# ------------------------------------------------------------------------------------------
def _fsync_dir(path: Path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """Permissions a plain ``open()`` would give a new file under the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write_fn, mode="wb", keep_previous: Optional[Path] = None):
    """Write via ``write_fn(fileobj)`` to a temp file in the same folder, then os.replace.
    ``keep_previous``: once the new file is complete, move the existing ``path`` there first."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        raise _write_failure(path, e) from None
    try:
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600 files; give the user's usual permissions
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_failure(path, e) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), mode="w")


def clean_stale_temps(run_dir: Path):
    """Remove temp files left by a process killed while writing."""
    for p in Path(run_dir).glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# random generators
# ------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------
# generic extra (analog) state
# ------------------------------------------------------------------------------------------
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                     "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                     "_state_dict_pre_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"}


def _stateful_attrs(model: nn.Module):
    for mod_name, mod in model.named_modules():
        for attr, val in list(vars(mod).items()):
            if attr in _MODULE_INTERNALS or isinstance(val, (nn.Module, torch.Tensor, type)):
                continue
            key = f"{mod_name}.{attr}" if mod_name else attr
            if isinstance(val, torch.Generator):
                yield key, val, "generator"
            elif callable(getattr(val, "state_dict", None)) and callable(getattr(val, "load_state_dict", None)):
                yield key, val, "stateful"


def collect_extra_state(model: nn.Module) -> Dict[str, Any]:
    out = {}
    for key, val, kind in _stateful_attrs(model):
        out[key] = {"kind": kind, "state": val.get_state() if kind == "generator" else val.state_dict()}
    return out


def restore_extra_state(model: nn.Module, states: Dict[str, Any]):
    found = {key: (val, kind) for key, val, kind in _stateful_attrs(model)}
    missing = sorted(set(states) - set(found))
    if missing:
        raise CheckpointError(f"checkpoint holds state for {', '.join(missing)}, which this model does not have")
    for key, entry in states.items():
        val, kind = found[key]
        if kind == "generator":
            val.set_state(entry["state"])
        else:
            val.load_state_dict(entry["state"])


def _check_plain(obj: Any, where: str):
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: value of type {type(obj).__module__}.{type(obj).__name__} is not a tensor or plain value")


#: device bounds, which an unbounded device model (``IdealDevice``) declares infinite: +-inf is a
#: value there (NaN still is not)
MAY_BE_INFINITE = ("w_min", "w_max")


def _may_be_infinite(name: str) -> bool:
    return any(part in MAY_BE_INFINITE for part in re.split(r"[.\s]", name))


def first_nonfinite(named) -> str:
    """Name of the first floating tensor holding NaN/inf in ``(name, tensor)`` pairs ('' if none);
    device bounds may be infinite."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = torch.isnan(t).any() if _may_be_infinite(name) else not torch.isfinite(t).all()
            if bad:
                return name
    return ""


def optimizer_tensors(opt) -> list:
    """``(name, tensor)`` of an optimiser's per-parameter state (Adam moments, momentum, ...)."""
    out = []
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out.append((f"optimizer state {k} #{i}", v))
    return out


# ------------------------------------------------------------------------------------------
# signatures
# ------------------------------------------------------------------------------------------
def model_signature(model: nn.Module) -> Dict[str, list]:
    return {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def check_compatible(ckpt: Dict[str, Any], path: Path, model_name: str, signature: Dict[str, list]):
    if ckpt.get("model_name") != model_name:
        raise CheckpointError(f"{path} was written for model '{ckpt.get('model_name')}', not '{model_name}'; "
                              f"refusing to load it")
    theirs = ckpt.get("signature", {})
    if theirs != signature:
        only_theirs = sorted(set(theirs) - set(signature))
        only_ours = sorted(set(signature) - set(theirs))
        shape = sorted(k for k in set(theirs) & set(signature) if theirs[k] != signature[k])
        detail = []
        if shape:
            detail.append(f"shape of {shape[0]}: {theirs[shape[0]]} vs {signature[shape[0]]}")
        if only_theirs:
            detail.append(f"unexpected {only_theirs[0]}")
        if only_ours:
            detail.append(f"missing {only_ours[0]}")
        raise CheckpointError(f"{path} does not match this model '{model_name}' ({'; '.join(detail)}); "
                              f"refusing to load it")


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------
def save(run_dir: Path, state: Dict[str, Any], summary: Optional[Dict[str, Any]] = None) -> Path:
    """Atomically write ``state`` as run_dir/checkpoint.pt, keeping the previous one as _prev."""
    run_dir = Path(run_dir)
    state = dict(state, format=FORMAT, version=VERSION, saved_at=time.time())
    try:
        _check_plain(state, "checkpoint")
    except TypeError as e:
        raise RuntimeError(f"cannot checkpoint a non-plain value ({e}); only tensors and plain values can be "
                           f"stored for torch.load(weights_only=True)") from None
    ckpt = run_dir / CKPT
    atomic_write(ckpt, lambda f: torch.save(state, f), keep_previous=run_dir / PREV)
    if summary is not None:
        try:
            atomic_write_json(run_dir / SUMMARY, summary)
        except WriteError as e:
            raise WriteError(str(e), written=ckpt) from None
    return ckpt


def find(run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: checkpoint.pt, or checkpoint_prev.pt if a crash hit the
    moment between the two renames of :func:`save`."""
    run_dir = Path(run_dir)
    for name in (CKPT, PREV):
        p = run_dir / name
        if p.exists() and not p.is_file():
            raise CheckpointError(f"{p} is not a file (a {'folder' if p.is_dir() else 'special file'}); "
                                  "move it away to resume from the other checkpoint or from step 0")
        if p.is_file():
            return p
    return None


def load(path: Path, map_location="cpu") -> Dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|global '([\w.]+)'|GLOBAL ([\w.]+)", text)
        if found:  # a pickled object of some class: never in a checkpoint this trainer writes
            what = next(g for g in found.groups() if g)
            raise CheckpointError(f"{path} contains a non-tensor object ({what}), which a checkpoint written by this "
                                  "trainer never holds: it may be malicious; refusing to load it") from None
        raise _unreadable(path, e) from None
    except Exception as e:  # noqa: BLE001 -- torch raises many types for damaged files
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint written by train/ (no '{FORMAT}' marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('version')}, expected {VERSION}")
    return ckpt


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ""
    prev = path.parent / PREV
    if path.name == CKPT and prev.is_file():
        hint = f"; the previous checkpoint {prev} may be intact (rename it to {CKPT} to resume from it)"
    return CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated: {msg[:200]}){hint}")


_FIELDS = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "position": dict, "history": list,
           "config": dict}
_POSITION = ("epoch", "step_in_epoch", "global_step")


def check_fields(ckpt: Dict[str, Any], path: Path) -> None:
    """Every field the trainer reads, present and of the right type (one-line refusal otherwise)."""
    for key, typ in _FIELDS.items():
        if not isinstance(ckpt.get(key), typ):
            got = "missing" if key not in ckpt else f"a {type(ckpt[key]).__name__}"
            raise CheckpointError(f"{path}: field '{key}' is {got}, expected a {typ.__name__}; refusing to load it")
    pos = ckpt["position"]
    for key in _POSITION:
        v = pos.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{path}: position.{key} is {v!r}, expected an integer >= 0; refusing to load it")
    rng = ckpt["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("numpy"), dict) \
            or not isinstance(rng.get("python"), (list, tuple)):
        raise CheckpointError(f"{path}: field 'rng' lacks the torch/numpy/python generator states; refusing to load it")
    if not all(isinstance(h, dict) for h in ckpt["history"]):
        raise CheckpointError(f"{path}: field 'history' must be a list of records; refusing to load it")
