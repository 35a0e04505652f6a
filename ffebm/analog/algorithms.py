"""Analog training algorithms: how a gradient (pairs ``(x, d)``) reaches the devices.

Each algorithm is a small validated dataclass (its settings, published or tuned defaults) that
builds a *runtime* for one analog weight (an :class:`~ffebm.analog.tile.AnalogTile`, "C" below,
the array the network reads). The runtime's state lives in a dict of tensors (``.tensors``) that
:class:`~ffebm.analog.optimizer.AnalogOptimizer` keeps in its ``state`` so that
``state_dict()`` / ``load_state_dict()`` round-trip exactly.

Sign convention: the desired update is ``W <- W - lr * sum_b d_b x_b^T`` (gradient descent);
``d`` is the gradient of the loss w.r.t. the layer output (network units).

* :class:`AnalogSGD`: pulse ``lr d x^T`` straight into C.
* :class:`TikiTaka` (TTv1, Gokmen & Haensch 2020): a fast array A receives the SGD pulses;
  every ``transfer_every`` steps ``columns_per_transfer`` columns of A are read with one-hot
  inputs (read model ``transfer_io``), the reference is subtracted, and the read is pulsed
  into C as a stochastic update of size ``transfer_lr * read``. Effective weight
  ``gamma (A - ref) + C``.
* :class:`TTv2` (Gokmen 2021): the reads are accumulated in a digital buffer H; where
  ``|H| >= thresh * dw_min`` whole pulses go to C and H is reduced.
* :class:`ChoppedTTv2` (c-TTv2, Rasch et al. 2023): random sign choppers per input column
  multiply the inputs written into A and the reads of A; offsets of A's reference cancel.
* :class:`AGAD` (Rasch et al. 2023): c-TTv2 whose reference is learned on the fly: the mean of
  A's raw reads over the last chopper period of each column.
* :class:`MixedPrecision` (Nandakumar et al. 2020): the outer product is accumulated in a digital
  matrix chi and transferred to C in whole pulses of ``dw_min``.

Reference offset (TT family): reads of A subtract a reference ``ref`` (the zero point).
``reference="symmetry_point"`` uses A's true symmetry point (SoftBounds-like devices; 0 for
models without one), ``"zero"`` uses 0; ``reference_offset`` adds an error of that fraction of
A's nominal weight range ``w_max - w_min`` (random sign per device, or the same sign for all
with ``reference_offset_sign="constant"``), to study imperfect references.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .config import InvalidSetting, IOConfig, Settings, UpdateConfig, check_choice, check_range
from .device_array import DeviceArray
from .devices import DeviceParams, PulsedDevice, device_from_name
from .state import params_from_state

__all__ = [
    "AnalogAlgorithm", "AnalogSGD", "TikiTaka", "TTv1", "TTv2", "ChoppedTTv2", "AGAD",
    "MixedPrecision", "algorithm_from_name",
]


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidSetting(owner, name, value, "True or False")


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


@dataclass
class AnalogAlgorithm(Settings):
    """Base of the algorithm settings. ``update``: pulsed-update settings of the updates this
    algorithm issues (``None``: the tile's own :class:`UpdateConfig`)."""

    update: Optional[UpdateConfig] = None

    name = "base"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        o = type(self).__name__
        if self.update is not None and not isinstance(self.update, UpdateConfig):
            raise InvalidSetting(o, "update", self.update, "an UpdateConfig or None")

    def build(self, tile: Any, generator: torch.Generator) -> "_Runtime":
        raise NotImplementedError


@dataclass
class AnalogSGD(AnalogAlgorithm):
    """Plain analog SGD: ``lr d x^T`` pulsed into the weight devices (stalls on asymmetric
    devices: Wu et al. 2024's error floor)."""

    name = "sgd"

    def build(self, tile, generator):
        return _SGDRuntime(self, tile, generator)


@dataclass
class MixedPrecision(AnalogAlgorithm):
    """Digital accumulator chi (tile units) of ``-lr d x^T``; where ``|chi| >= thresh * dw_min``
    whole pulses (at most ``max_pulses`` per device and step, 0 = unlimited) go to the devices
    and chi is reduced by what was sent.

    Defaults: ``thresh 1.0`` (one pulse = one nominal ``dw_min``, as published),
    ``max_pulses 0``."""

    thresh: float = 1.0
    max_pulses: int = 0

    name = "mixed_precision"

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "thresh", self.thresh, 0, None, lo_open=True)
        check_range(o, "max_pulses", self.max_pulses, 0, None, integer=True)

    def build(self, tile, generator):
        return _MPRuntime(self, tile, generator)


@dataclass
class TikiTaka(AnalogAlgorithm):
    """Tiki-Taka v1 (two arrays A and C, transfer by pulsed one-hot column reads).

    Fields (defaults in brackets):
      ``gamma`` [0.0]: effective weight ``gamma (A - ref) + C`` (0: C alone, as published).
      ``fast_lr`` [None]: learning rate of the updates written into A; None = the optimizer's lr.
      ``transfer_every`` [1]: optimizer steps between transfers.
      ``columns_per_transfer`` [1]: columns of A read (cyclically) at each transfer.
      ``transfer_lr`` [1.0]: size of the transfer, ``C += transfer_lr * read`` (tile units);
      ``scale_transfer_lr`` [False]: if True, multiply ``transfer_lr`` by the optimizer's lr
      (so a learning-rate schedule also slows the transfer).
      ``device_a`` [None]: device model of A (None = the tile's device model).
      ``transfer_io`` [None]: read model of the column reads (None = the tile's forward read
      model, as in hardware; ``IOConfig.perfect()`` for ideal reads).
      ``transfer_update`` [None]: pulsed-update settings of the transfer into C (TTv1 only).
      ``reference`` ["symmetry_point"], ``reference_offset`` [0.0],
      ``reference_offset_sign`` ["random"]: see the module docstring.
    """

    gamma: float = 0.0
    fast_lr: Optional[float] = None
    transfer_every: int = 1
    columns_per_transfer: int = 1
    transfer_lr: float = 1.0
    scale_transfer_lr: bool = False
    device_a: Optional[PulsedDevice] = None
    transfer_io: Optional[IOConfig] = None
    transfer_update: Optional[UpdateConfig] = None
    reference: str = "symmetry_point"
    reference_offset: float = 0.0
    reference_offset_sign: str = "random"

    name = "ttv1"

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "gamma", self.gamma, 0, None)
        if self.fast_lr is not None:
            check_range(o, "fast_lr", self.fast_lr, 0, None, lo_open=True)
        check_range(o, "transfer_every", self.transfer_every, 1, None, integer=True)
        check_range(o, "columns_per_transfer", self.columns_per_transfer, 1, None, integer=True)
        check_range(o, "transfer_lr", self.transfer_lr, 0, None, lo_open=True)
        _check_bool(o, "scale_transfer_lr", self.scale_transfer_lr)
        if isinstance(self.device_a, str):
            self.device_a = device_from_name(self.device_a)
        if self.device_a is not None and not isinstance(self.device_a, PulsedDevice):
            raise InvalidSetting(o, "device_a", self.device_a, "a PulsedDevice, a device name or None")
        if self.transfer_io is not None and not isinstance(self.transfer_io, IOConfig):
            raise InvalidSetting(o, "transfer_io", self.transfer_io, "an IOConfig or None")
        if self.transfer_update is not None and not isinstance(self.transfer_update, UpdateConfig):
            raise InvalidSetting(o, "transfer_update", self.transfer_update, "an UpdateConfig or None")
        check_choice(o, "reference", self.reference, ("symmetry_point", "zero"))
        check_range(o, "reference_offset", self.reference_offset, -1, 1)
        check_choice(o, "reference_offset_sign", self.reference_offset_sign, ("random", "constant"))

    def build(self, tile, generator):
        return _TTRuntime(self, tile, generator)


TTv1 = TikiTaka


@dataclass
class TTv2(TikiTaka):
    """Tiki-Taka v2: column reads of A are accumulated (``H += transfer_lr * read``) in a digital
    buffer H (tile units); where ``|H| >= thresh * dw_min(C)`` whole pulses
    ``n = trunc(H / (thresh dw_min))`` (at most ``max_pulses``, 0 = unlimited) go to C; then
    ``H <- momentum * H`` where pulses were sent if ``forget_buffer`` (published default), else
    ``H <- H - n thresh dw_min`` (the residual is kept).

    Defaults: ``thresh 1.0``, ``momentum 0.0``, ``forget_buffer True``, ``max_pulses 0``
    (AIHWKit's buffered-transfer defaults), ``transfer_lr 1.0``, one column per step."""

    thresh: float = 1.0
    momentum: float = 0.0
    forget_buffer: bool = True
    max_pulses: int = 0

    name = "ttv2"

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "thresh", self.thresh, 0, None, lo_open=True)
        check_range(o, "momentum", self.momentum, 0, 1, hi_open=True)
        _check_bool(o, "forget_buffer", self.forget_buffer)
        check_range(o, "max_pulses", self.max_pulses, 0, None, integer=True)


@dataclass
class ChoppedTTv2(TTv2):
    """Chopped TTv2 (c-TTv2). Adds per-input-column sign choppers ``c_j``: A receives
    ``c * x`` and the read of column j is multiplied by ``c_j``; after each read of column j its
    chopper flips with probability ``in_chop_prob`` (``in_chop_random``) or deterministically
    every ``round(1 / in_chop_prob)`` reads.

    Our defaults (the reference simulator's own barely learn the least-squares problem of
    ``train/bench/algorithms.py``): ``fast_lr 0.2`` (absolute; A is driven hard enough that its
    content follows the sign of the recent gradient within a chopper period while soft-bounds
    devices relax it back towards the reference), ``transfer_lr 1.0`` with
    ``scale_transfer_lr True`` (H grows by ``lr * read``, so the optimizer's lr and its
    schedules set C's speed), ``forget_buffer False`` (H keeps its residual, so the chopped
    offset ``c_j * offset`` cancels in H over a chopper cycle instead of being forgotten after
    half of it), ``in_chop_prob 0.1`` flipping deterministically every 10 reads of a column
    (``in_chop_random False``: the two signs get exactly equal time, which bounds the offset's
    excursion), ``thresh 1.0``, ``momentum 0``, one column read per step. On the benchmark
    (``python -m train.bench.algorithms``) this reaches ~1.6e-4 mean squared weight error in
    3000 steps for tau 0.4, 0.6 and 1.0 (reference simulator's c-TTv2: 2.0-2.1e-2), and
    ~7.5e-4 with a reference offset of 20% of the weight range (TTv2: 1.4e-1)."""

    fast_lr: Optional[float] = 0.2
    transfer_lr: float = 1.0
    scale_transfer_lr: bool = True
    forget_buffer: bool = False
    in_chop_prob: float = 0.1
    in_chop_random: bool = False

    name = "cttv2"

    def _validate(self) -> None:
        super()._validate()
        o = type(self).__name__
        check_range(o, "in_chop_prob", self.in_chop_prob, 0, 1)
        _check_bool(o, "in_chop_random", self.in_chop_random)


@dataclass
class AGAD(ChoppedTTv2):
    """AGAD: c-TTv2 with a reference learned on the fly. For each column, the mean of A's raw
    reads since its chopper last flipped is kept; at a flip it becomes the column's reference
    (the static reference is only used until the first flip). Needs no reference array and is
    invariant to A's offsets. Same defaults as :class:`ChoppedTTv2`."""

    name = "agad"


_REGISTRY: Dict[str, type] = {}


def register_algorithm(*names: str):
    """Class decorator adding an :class:`AnalogAlgorithm` under ``names`` (lower case, ``_`` for
    ``-``) to :func:`algorithm_from_name`: ``@register_algorithm("mine") @dataclass class Mine(...)``."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, AnalogAlgorithm)):
            raise InvalidSetting("register_algorithm", "cls", cls, "an AnalogAlgorithm subclass")
        for n in names:
            _REGISTRY[n.lower().replace("-", "_")] = cls
        return cls
    return deco


def algorithm_names() -> List[str]:
    """Every registered name (aliases included)."""
    return sorted(_REGISTRY)


register_algorithm("sgd", "analog_sgd")(AnalogSGD)
register_algorithm("mixed_precision", "mp")(MixedPrecision)
register_algorithm("tiki_taka", "ttv1", "tt")(TikiTaka)
register_algorithm("ttv2")(TTv2)
register_algorithm("cttv2", "c_ttv2", "chopped_ttv2")(ChoppedTTv2)
register_algorithm("agad")(AGAD)


def algorithm_from_name(name: str, **kw: Any) -> AnalogAlgorithm:
    """``"sgd"``, ``"ttv1"``/``"tiki_taka"``, ``"ttv2"``, ``"cttv2"``, ``"agad"``, ``"mixed_precision"``."""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise InvalidSetting("algorithm_from_name", "name", name,
                             "one of " + ", ".join(repr(k) for k in sorted(_REGISTRY)))
    return _REGISTRY[key](**kw)


# ----------------------------------------------------------------------------------------------
# runtimes
# ----------------------------------------------------------------------------------------------


class _TileView:
    """The weight tile C as seen by an algorithm (tile units, explicit generator)."""

    def __init__(self, tile: Any) -> None:
        self.tile = tile

    @property
    def dw_min(self) -> float:
        return float(self.tile.device_cfg.dw_min)

    def update(self, x: Tensor, d: Tensor, lr: float, cfg: Optional[UpdateConfig],
               generator: torch.Generator, tile_units: bool = False) -> None:
        """``W_tile -= lr * sum_b dt_b x_b^T`` with ``dt = d / out_scale`` (network units)
        unless ``tile_units``."""
        t = self.tile
        cfg = cfg if cfg is not None else t.update_cfg
        x = x.reshape(-1, t.in_size)
        d = d.reshape(-1, t.out_size)
        if not tile_units:
            d = d / t.out_scale.to(d.dtype)
        for row, rs in zip(t.arrays, t._row_slices()):
            for a, cs in zip(row, t._col_slices()):
                a.pulsed_update(x[:, cs], d[:, rs], lr, cfg, generator=generator)

    def pulse(self, n: Tensor, generator: torch.Generator, cols: Optional[slice] = None) -> None:
        t = self.tile
        for row, rs in zip(t.arrays, t._row_slices()):
            for a, cs in zip(row, t._col_slices()):
                part = n[rs, cs]
                if bool((part != 0).any()):
                    a.pulse(part, generator=generator)

    def weights(self) -> Tensor:
        return self.tile.tile_weights()


def _param_tensors(prefix: str, arr: DeviceArray) -> Dict[str, Any]:
    """A device array's state for the optimizer: its states ``w`` and its per-device parameters
    (``params``: how they were drawn when known, a few kB; else the tensors)."""
    return {prefix + "w": arr.w, prefix + "params": arr.param_state()}


def _load_array(prefix: str, arr: DeviceArray, t: Dict[str, Any]) -> None:
    """Inverse of :func:`_param_tensors` (also reads older states with ``prefix + "p.<name>"``
    tensors)."""
    dev, dt = arr.w.device, arr.w.dtype
    if prefix + "params" in t:
        saved = params_from_state(f"algorithm state {prefix}", t[prefix + "params"], arr.shape, dev, dt)
    else:
        saved = {k[len(prefix) + 2:]: v for k, v in t.items() if k.startswith(prefix + "p.")}
    items = {}
    for k, v in arr.params.items():
        items[k] = saved[k].to(device=dev, dtype=v.dtype) if (isinstance(v, Tensor) and k in saved) else v
    arr.set_params(DeviceParams(**items), saved.get("__draw__") if isinstance(saved, dict) else None)
    arr.w = t[prefix + "w"].to(device=dev, dtype=dt).clone()
    arr._redraw_write_noise(arr.generator) if arr.device_cfg.write_noise_std > 0 else None


class _Runtime:
    """Per-weight state of an algorithm. ``tensors``: everything needed to continue exactly."""

    def __init__(self, cfg: AnalogAlgorithm, tile: Any, generator: torch.Generator) -> None:
        self.cfg = cfg
        self.tile = tile
        self.C = _TileView(tile)
        self.gen = generator
        self.tensors: Dict[str, Tensor] = {}

    def step(self, x: Tensor, d: Tensor, lr: float) -> None:
        raise NotImplementedError

    def export(self) -> Dict[str, Tensor]:
        return dict(self.tensors)

    def load(self, t: Dict[str, Tensor]) -> None:
        for k, v in self.tensors.items():
            if k in t and isinstance(v, Tensor):  # (device arrays' parameter records: _load_array)
                self.tensors[k] = t[k].to(device=v.device, dtype=v.dtype).clone()

    def read_extra(self) -> Optional[Tensor]:
        """Tile-unit matrix to add to C for the network's reads (``gamma (A - ref)``), or None."""
        return None


class _SGDRuntime(_Runtime):
    def step(self, x, d, lr):
        self.C.update(x, d, lr, self.cfg.update, self.gen)


class _MPRuntime(_Runtime):
    def __init__(self, cfg, tile, generator):
        super().__init__(cfg, tile, generator)
        w = tile.tile_weights()
        self.tensors["chi"] = torch.zeros_like(w)

    def step(self, x, d, lr):
        t = self.tile
        x = x.reshape(-1, t.in_size).to(self.tensors["chi"].dtype)
        dt = d.reshape(-1, t.out_size).to(x.dtype) / t.out_scale.to(x.dtype)
        chi = self.tensors["chi"]
        chi.add_(dt.t() @ x, alpha=-float(lr))
        thr = self.cfg.thresh * self.C.dw_min
        n = torch.trunc(chi / thr)
        if self.cfg.max_pulses > 0:
            n = n.clamp(-self.cfg.max_pulses, self.cfg.max_pulses)
        if bool((n != 0).any()):
            self.C.pulse(n, self.gen)
            chi.sub_(n * thr)


class _TTRuntime(_Runtime):
    """TTv1 / TTv2 / c-TTv2 / AGAD (the variant follows the config's class)."""

    def __init__(self, cfg: TikiTaka, tile, generator):
        super().__init__(cfg, tile, generator)
        self.buffered = isinstance(cfg, TTv2)
        self.chopped = isinstance(cfg, ChoppedTTv2)
        self.agad = isinstance(cfg, AGAD)
        wc = tile.tile_weights()
        shape, dev, dt = tuple(wc.shape), wc.device, wc.dtype
        dev_a = cfg.device_a if cfg.device_a is not None else tile.device_cfg
        self.A = DeviceArray(dev_a, shape, generator=generator, device=dev, dtype=dt)
        sp = self.A.symmetry_point()
        sp = torch.zeros(shape, device=dev, dtype=dt) if sp is None else sp.expand(shape).clone()
        sp = torch.where(torch.isfinite(sp), sp, torch.zeros_like(sp))  # no symmetry point: 0
        self.A.set_weights(sp)  # A starts at its symmetry point (programmed there, within its bounds)
        sp = self.A.get_weights()
        ref = sp.clone() if cfg.reference == "symmetry_point" else torch.zeros_like(sp)
        if cfg.reference_offset != 0:
            rng = dev_a.w_max - dev_a.w_min
            if not math.isfinite(rng):
                raise InvalidSetting(type(cfg).__name__, "reference_offset", cfg.reference_offset,
                                     "0 for devices with infinite bounds (no weight range)")
            if cfg.reference_offset_sign == "random":
                s = torch.randint(0, 2, shape, generator=generator, device=dev).to(dt) * 2 - 1
            else:
                s = torch.ones(shape, device=dev, dtype=dt)
            ref = ref + cfg.reference_offset * rng * s
        n_in = shape[1]
        self.tensors.update(_param_tensors("A.", self.A))
        self.tensors["ref"] = ref
        self.tensors["count"] = torch.zeros((), dtype=torch.long, device=dev)
        self.tensors["col"] = torch.zeros((), dtype=torch.long, device=dev)
        if self.buffered:
            self.tensors["H"] = torch.zeros(shape, device=dev, dtype=dt)
        if self.chopped:
            self.tensors["chop"] = torch.ones(n_in, device=dev, dtype=dt)
            self.tensors["chop_reads"] = torch.zeros(n_in, dtype=torch.long, device=dev)
        if self.agad:
            self.tensors["ref_sum"] = torch.zeros(shape, device=dev, dtype=dt)
        # host-side copies of the counters (avoid device syncs on every step)
        self._count = 0
        self._col = 0

    # -- state ----------------------------------------------------------------------------
    def export(self):
        self.tensors.update(_param_tensors("A.", self.A))
        self.tensors["count"] = torch.tensor(self._count, dtype=torch.long, device=self.A.w.device)
        self.tensors["col"] = torch.tensor(self._col, dtype=torch.long, device=self.A.w.device)
        return dict(self.tensors)

    def load(self, t):
        super().load(t)
        _load_array("A.", self.A, t)
        self._count = int(self.tensors["count"].item())
        self._col = int(self.tensors["col"].item())

    def read_extra(self):
        if self.cfg.gamma == 0:
            return None
        return self.cfg.gamma * (self.A.w_read - self.tensors["ref"])

    # -- algorithm ------------------------------------------------------------------------
    def _read_cols(self, cols: Tensor) -> Tensor:
        """Raw reads of columns ``cols`` of A (one-hot inputs): [k, out]."""
        io = self.cfg.transfer_io if self.cfg.transfer_io is not None else self.tile.io
        Aw = self.A.w_read
        if io.is_perfect:
            return Aw[:, cols].t().clone()
        from .tile import read_forward

        e = torch.zeros(cols.numel(), Aw.shape[1], device=Aw.device, dtype=Aw.dtype)
        e[torch.arange(cols.numel(), device=Aw.device), cols] = 1.0
        return read_forward(Aw, e, io, self.gen)

    def step(self, x, d, lr):
        cfg = self.cfg
        t = self.tile
        x = x.reshape(-1, t.in_size)
        d = d.reshape(-1, t.out_size)
        dt = d / t.out_scale.to(d.dtype)
        lr_a = float(lr) if cfg.fast_lr is None else float(cfg.fast_lr)
        if self.chopped:
            x = x * self.tensors["chop"].to(x.dtype)
        cfg_u = cfg.update if cfg.update is not None else t.update_cfg
        self.A.pulsed_update(x, dt, lr_a, cfg_u, generator=self.gen)
        self._count += 1
        if self._count % cfg.transfer_every == 0:
            self._transfer(float(lr))

    def _transfer(self, lr: float) -> None:
        cfg = self.cfg
        n_in = self.A.shape[1]
        k = min(cfg.columns_per_transfer, n_in)
        dev = self.A.w.device
        cols = (torch.arange(k, device=dev) + self._col) % n_in
        self._col = (self._col + k) % n_in
        raw = self._read_cols(cols)  # [k, out]
        ref = self.tensors["ref"][:, cols].t()
        v = raw - ref
        if self.chopped:
            c = self.tensors["chop"][cols]
            v = v * c.unsqueeze(1)
        tlr = cfg.transfer_lr * (lr if cfg.scale_transfer_lr else 1.0)
        if not self.buffered:
            e = torch.zeros(k, n_in, device=dev, dtype=v.dtype)
            e[torch.arange(k, device=dev), cols] = 1.0
            # C += tlr * v  <=>  C -= tlr * (-v) e^T
            self.C.update(e, -v, tlr, cfg.transfer_update, self.gen, tile_units=True)
        else:
            H = self.tensors["H"]
            Hc = H[:, cols] + tlr * v.t()
            thr = cfg.thresh * self.C.dw_min
            n = torch.trunc(Hc / thr)
            if cfg.max_pulses > 0:
                n = n.clamp(-cfg.max_pulses, cfg.max_pulses)
            sent = n != 0
            if cfg.forget_buffer:
                Hc = torch.where(sent, cfg.momentum * Hc, Hc)
            else:
                Hc = Hc - n * thr
            H[:, cols] = Hc
            if bool(sent.any()):
                full = torch.zeros_like(H)
                full[:, cols] = n
                self.C.pulse(full, self.gen)
        if self.chopped:
            self._chop(cols, raw)

    def _chop(self, cols: Tensor, raw: Tensor) -> None:
        cfg = self.cfg
        p = cfg.in_chop_prob
        chop = self.tensors["chop"]
        reads = self.tensors["chop_reads"]
        reads[cols] += 1
        if self.agad:
            self.tensors["ref_sum"][:, cols] += raw.t()
        if p <= 0:
            return
        if cfg.in_chop_random:
            flip = torch.rand(cols.numel(), generator=self.gen, device=chop.device) < p
        else:
            period = max(1, int(round(1.0 / p)))
            flip = reads[cols] >= period
        if not bool(flip.any()):
            return
        fc = cols[flip]
        chop[fc] = -chop[fc]
        if self.agad:
            cnt = reads[fc].to(chop.dtype).clamp(min=1)
            self.tensors["ref"][:, fc] = self.tensors["ref_sum"][:, fc] / cnt
            self.tensors["ref_sum"][:, fc] = 0
        reads[fc] = 0
