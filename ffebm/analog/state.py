"""Loading analog state safely: check everything first, change nothing on a mismatch.

Every load path of the analog substrate (``DeviceArray.load_state_dict``, an
:class:`~ffebm.analog.tile.AnalogTile` or analog layer / coupling inside ``load_state_dict``,
:meth:`AnalogOptimizer.load_state_dict <ffebm.analog.optimizer.AnalogOptimizer.load_state_dict>`)
runs the checks here *before* it touches the object: shapes, the split of a matrix over
physical arrays, the device model (its name and per-device parameters) and the training
algorithm. A mismatch raises one :class:`IncompatibleState` naming the object and what differs,
and leaves the object exactly as it was.

One mismatch is not an error: the same matrix saved with another split (another ``max_size``)
is *remapped*: the saved arrays (states and per-device parameters) are assembled into the full
``out x in`` matrix and cut again along this tile's split, with a :class:`StateRemapped`
warning saying so. Devices keep their own sampled parameters through the remap.
"""
from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .devices import DeviceParams, device_from_name

__all__ = ["IncompatibleState", "StateRemapped", "check_array_state", "check_tile_state",
           "check_module_state"]


class IncompatibleState(RuntimeError):
    """Saved analog state that does not fit the object it is loaded into (that object was not
    changed; in a model, torch may already have loaded the modules before it).

    Attributes: ``owner`` (the object, e.g. ``"AnalogLinear 'fc.tile'"``) and ``problem``.
    """

    def __init__(self, owner: str, problem: str) -> None:
        self.owner, self.problem = owner, problem
        super().__init__(f"cannot load into {owner}: {problem}; it was left unchanged")


class StateRemapped(UserWarning):
    """Saved tile state with another split of the same matrix was remapped onto this split."""


def _device_name(cfg: Any) -> str:
    return type(cfg).__name__


def _tensor_keys(params: Mapping[str, Any]) -> List[str]:
    return sorted(k for k, v in params.items() if isinstance(v, Tensor))


def check_array_state(owner: str, shape: Sequence[int], device_cfg: Any, params_keys: Sequence[str],
                      w: Any, params: Any, device: Optional[str] = None) -> None:
    """Check one device array's saved state: ``w`` a tensor of ``shape``, ``params`` a mapping
    with the same per-device tensors as this model's (each of ``shape`` or one element), and
    ``device`` (when saved) this model's name."""
    shape = tuple(int(s) for s in shape)
    if device is not None and device != _device_name(device_cfg):
        raise IncompatibleState(owner, f"saved on {device} devices, this one holds {_device_name(device_cfg)}")
    if not isinstance(w, Tensor):
        raise IncompatibleState(owner, f"saved states are {type(w).__name__}, expected a tensor")
    if tuple(w.shape) != shape:
        raise IncompatibleState(owner, f"saved states have shape {list(w.shape)}, this array is {list(shape)}")
    if not isinstance(params, Mapping):
        raise IncompatibleState(owner, "saved device parameters are missing or not a mapping")
    saved = _tensor_keys(params)
    if saved != sorted(params_keys):
        raise IncompatibleState(
            owner, f"saved device parameters {saved} do not match those of {_device_name(device_cfg)} "
                   f"{sorted(params_keys)} (another device model?)")
    for k in saved:
        v = params[k]
        if v.numel() != 1 and tuple(v.shape) != shape:
            raise IncompatibleState(owner, f"saved device parameter {k!r} has shape {list(v.shape)}, "
                                           f"this array is {list(shape)}")
        if bool(torch.isnan(v).any()):
            raise IncompatibleState(owner, f"saved device parameter {k!r} holds NaN")
    if "w_min" in saved and "w_max" in saved and bool((params["w_min"] > params["w_max"]).any()):
        raise IncompatibleState(owner, "saved device bounds have w_min > w_max")
    if not bool(torch.isfinite(w).all()):
        raise IncompatibleState(owner, "saved device states are not finite (NaN or inf)")
    draw = params.get("__draw__")
    check_settings(owner, device_cfg, draw.get("settings") if isinstance(draw, Mapping) else None)


def check_settings(owner: str, device_cfg: Any, settings: Any) -> None:
    """The device model's settings saved with a state (when they were) must be this model's: the
    sampled spread and every later pulse follow them."""
    if not isinstance(settings, Mapping):
        return
    mine = _settings(device_cfg) or {}
    diff = [f"{k}={settings[k]!r} (here {mine[k]!r})" for k in sorted(set(settings) & set(mine))
            if settings[k] != mine[k] and not (settings[k] != settings[k] and mine[k] != mine[k])]
    if diff:
        raise IncompatibleState(owner, f"saved with other {_device_name(device_cfg)} settings: " + ", ".join(diff))


def _grid(owner: str, state: Mapping[str, Any]) -> Tuple[List[int], List[int]]:
    """Row and column sizes of a saved tile's arrays (checked to form a grid)."""
    w = state.get("w")
    p = state.get("params")
    if not isinstance(w, (list, tuple)) or not w or not all(isinstance(r, (list, tuple)) and r for r in w):
        raise IncompatibleState(owner, "saved tile state has no arrays ('w' is not a list of rows)")
    if not isinstance(p, (list, tuple)) or len(p) != len(w) or any(
            not isinstance(pr, (list, tuple)) or len(pr) != len(wr) for pr, wr in zip(p, w)):
        raise IncompatibleState(owner, "saved tile state: device parameters do not match its arrays")
    ncols = len(w[0])
    if any(len(r) != ncols for r in w) or not all(isinstance(a, Tensor) and a.dim() == 2 for r in w for a in r):
        raise IncompatibleState(owner, "saved tile state: arrays do not form a grid of matrices")
    rows = [int(r[0].shape[0]) for r in w]
    cols = [int(a.shape[1]) for a in w[0]]
    for i, r in enumerate(w):
        for j, a in enumerate(r):
            if tuple(a.shape) != (rows[i], cols[j]):
                raise IncompatibleState(owner, f"saved tile state: array ({i}, {j}) has shape {list(a.shape)}, "
                                               f"its row/column need {[rows[i], cols[j]]}")
    return rows, cols


def _assemble(grid: Sequence[Sequence[Tensor]]) -> Tensor:
    return torch.cat([torch.cat(list(r), dim=1) for r in grid], dim=0)


def _cut(full: Tensor, rows: Sequence[int], cols: Sequence[int]) -> List[List[Tensor]]:
    out, r0 = [], 0
    for r in rows:
        row, c0 = [], 0
        for c in cols:
            row.append(full[r0:r0 + r, c0:c0 + c].clone())
            c0 += c
        out.append(row)
        r0 += r
    return out


def check_tile_state(tile: Any, state: Any, owner: str) -> Dict[str, Any]:
    """Check a tile's saved extra state against ``tile``.

    Returns the state with every array's device parameters as tensors (compact entries drawn
    again), remapped onto this tile's split if it was saved with another one (same matrix, other
    ``max_size``; a :class:`StateRemapped` warning is issued). Raises :class:`IncompatibleState`
    for anything else (other matrix shape, device model, parameters).
    """
    if not isinstance(state, Mapping):
        raise IncompatibleState(owner, f"saved tile state is {type(state).__name__}, expected a mapping")
    saved_dev = state.get("device")
    if saved_dev is not None and saved_dev != _device_name(tile.device_cfg):
        raise IncompatibleState(owner, f"saved on {saved_dev} devices, this tile holds "
                                       f"{_device_name(tile.device_cfg)}")
    check_settings(owner, tile.device_cfg, state.get("settings"))
    rows, cols = _grid(owner, state)
    shape = (sum(rows), sum(cols))
    if shape != (tile.out_size, tile.in_size):
        raise IncompatibleState(owner, f"saved matrix is {shape[0]} x {shape[1]}, this tile is "
                                       f"{tile.out_size} x {tile.in_size}")
    state = dict(state, params=[[params_from_state(f"{owner} array ({i}, {j})", p, (rows[i], cols[j]), w.device,
                                                   w.dtype) for j, (w, p) in enumerate(zip(wr, pr))]
                                for i, (wr, pr) in enumerate(zip(state["w"], state["params"]))])
    keys = _tensor_keys(tile.arrays[0][0].params)
    for i, (wr, pr) in enumerate(zip(state["w"], state["params"])):
        for j, (w, p) in enumerate(zip(wr, pr)):
            check_array_state(f"{owner} array ({i}, {j})", (rows[i], cols[j]), tile.device_cfg, keys, w, p)
    if rows == list(tile.row_sizes) and cols == list(tile.col_sizes):
        return state
    # the same matrix cut differently: assemble it (states and parameters) and cut it again
    new_w = _cut(_assemble(state["w"]), tile.row_sizes, tile.col_sizes)
    full_p = {k: _assemble([[p[k].expand(w.shape) for w, p in zip(wr, pr)]
                            for wr, pr in zip(state["w"], state["params"])]) for k in keys}
    extras = {k: v for k, v in state["params"][0][0].items() if not isinstance(v, Tensor) and k != "__draw__"}
    cut_p = {k: _cut(v, tile.row_sizes, tile.col_sizes) for k, v in full_p.items()}
    new_p = [[dict(extras, **{k: cut_p[k][i][j] for k in keys}) for j in range(len(tile.col_sizes))]
             for i in range(len(tile.row_sizes))]
    warnings.warn(f"{owner}: saved with its {shape[0]} x {shape[1]} matrix split over {len(rows)} x {len(cols)} "
                  f"arrays, this tile uses {len(tile.row_sizes)} x {len(tile.col_sizes)} (max_size="
                  f"{tile.max_size}); device states and parameters were remapped onto this split",
                  StateRemapped, stacklevel=4)
    return dict(state, w=new_w, params=new_p)


def check_module_state(module: Any, state_dict: Dict[str, Any], prefix: str, strict: bool) -> None:
    """Check every analog tile and analog-layer tensor under ``module`` against ``state_dict``
    before anything is loaded (a ``load_state_dict`` pre-hook). Shapes of the module's own
    parameters and buffers must match; with ``strict``, none of its keys may be missing or
    unexpected. A tile
    saved with another split has its entry in ``state_dict`` replaced by the remapped state."""
    name = f"{type(module).__name__} '{prefix[:-1]}'" if prefix else type(module).__name__
    own = module.state_dict(prefix=prefix, keep_vars=True)
    # (missing and unexpected keys: torch reports them after loading, honouring strict=False)
    for k, v in own.items():
        if k.endswith("_extra_state") or k not in state_dict:
            continue
        s = state_dict[k]
        if isinstance(v, Tensor) and not isinstance(s, Tensor):
            raise IncompatibleState(name, f"{k[len(prefix):]} is {type(s).__name__} in the saved state, expected a tensor")
        if isinstance(v, Tensor) and tuple(s.shape) != tuple(v.shape):
            raise IncompatibleState(name, f"{k[len(prefix):]} has shape {list(s.shape)} in the saved state, "
                                          f"{list(v.shape)} here")
        if k.endswith("out_scale") and not bool(torch.isfinite(s).all()):
            raise IncompatibleState(name, f"{k[len(prefix):]} is not finite in the saved state")
    layer_extra = prefix + "_extra_state"
    tile = getattr(module, "tile", None)
    if layer_extra in state_dict and tile is not None and hasattr(tile, "generator"):
        ex = state_dict[layer_extra]
        rng = ex.get("rng") if isinstance(ex, Mapping) else None
        if not isinstance(ex, Mapping) or (rng is not None and not isinstance(rng, Tensor)):
            raise IncompatibleState(name, "its saved extra state (the read-noise generator) is malformed")
    for sub, m in module.named_modules(prefix=prefix[:-1] if prefix else ""):
        if getattr(type(m), "is_analog_tile", False) is True and hasattr(m, "arrays"):  # an AnalogTile
            key = (sub + "." if sub else "") + "_extra_state"
            if key in state_dict:
                state_dict[key] = check_tile_state(m, state_dict[key], f"{name} tile '{sub}'")


# ----------------------------------------------------------------------------------------------
# compact parameter state: draw the device-to-device spread again instead of storing it
# ----------------------------------------------------------------------------------------------


def _settings(cfg: Any) -> Optional[Dict[str, Any]]:
    """The device model's settings as plain values (None if one is not a plain value: such a
    model's parameters are stored as tensors)."""
    out: Dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or isinstance(v, (bool, int, float, str)):
            out[f.name] = v
        elif isinstance(v, tuple) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
            out[f.name] = tuple(v)
        else:
            return None
    return out


def _draw_record(cfg: Any, generator: torch.Generator, device: Any, dtype: torch.dtype) -> Optional[Dict[str, Any]]:
    settings = _settings(cfg)
    if settings is None:
        return None
    at = torch.device(device) if device is not None else generator.device
    return {"model": type(cfg).__name__, "settings": settings, "rng": generator.get_state(),
            "generator": generator.device.type, "at": at.type, "dtype": str(dtype).replace("torch.", "")}


def _fingerprint(params: DeviceParams) -> Tensor:
    """Sums and a few leading values of every parameter tensor (float64, CPU)."""
    parts = []
    for k in sorted(k for k, v in params.items() if isinstance(v, Tensor)):
        v = params[k].detach().double().cpu().reshape(-1)
        parts += [v.sum().reshape(1), v[:4]]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def params_from_state(owner: str, state: Any, shape: Sequence[int], device: Any,
                      dtype: torch.dtype) -> Dict[str, Any]:
    """Per-device parameters from a checkpoint entry: the tensors themselves, or (``__draw__``)
    drawn again exactly as they were drawn, checked against their fingerprint. Returns a dict of
    tensors (and the draw record under ``__draw__``); raises
    :class:`~ffebm.analog.state.IncompatibleState` when they cannot be drawn again."""
    if not isinstance(state, dict) or "__draw__" not in state or any(isinstance(v, Tensor) for v in state.values()):
        return state  # tensors (older files, or already drawn again)
    d = state["__draw__"]
    try:
        cfg = device_from_name(d["model"], **d["settings"])
        gen_dev = d["generator"]
        if (gen_dev == "cuda" or d["at"] == "cuda") and not torch.cuda.is_available():
            raise IncompatibleState(owner, "its device parameters were drawn on CUDA and can only be drawn again "
                                           "there; load this checkpoint on a machine with a GPU")
        g = torch.Generator(device=gen_dev)
        g.set_state(d["rng"].detach().cpu().to(torch.uint8))
        p = cfg.sample(tuple(int(s) for s in shape), g, d["at"], getattr(torch, d["dtype"]))
    except IncompatibleState:
        raise
    except Exception as e:  # a malformed record
        raise IncompatibleState(owner, f"its device parameters cannot be drawn again ({type(e).__name__}: {e})") from None
    fp = _fingerprint(p)
    want = d["fingerprint"].detach().double().cpu()
    if fp.shape != want.shape or not torch.allclose(fp, want, rtol=1e-6, atol=1e-12):
        raise IncompatibleState(owner, "its device parameters, drawn again from the saved generator state, differ "
                                       "from the saved fingerprint (another torch version or random-number "
                                       "implementation?)")
    out: Dict[str, Any] = {k: (v.to(device=device, dtype=dtype) if isinstance(v, Tensor) else v)
                           for k, v in p.items()}
    out["__draw__"] = d
    return out
