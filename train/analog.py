"""Analog runs of the trainer: energy blocks whose couplings sit on simulated crossbar tiles.

Everything analog reaches the loop through :class:`AnalogPlugin` (see :mod:`train.plugin`):

* build: with ``analog=DEVICE`` (a device model name, e.g. ``soft_bounds``) :func:`make_analog`
  converts the freshly built model with :func:`ffebm.analog.to_analog_energy`: every energy
  block's couplings (and, with ``analog_input``, the ``nn.Linear`` layers of its input map) move
  onto tiles read through the read model of ``analog_reads``, and the blocks' EP becomes
  :class:`~ffebm.analog.AnalogEP`, which records its weight update as pulsed outer-product pairs
  instead of a dense gradient.  With ``analog_layers`` the digital ``nn.Linear`` / ``nn.Conv2d``
  layers outside the blocks go onto tiles too (:func:`ffebm.analog.convert_to_analog`).  The
  conversion is seeded by ``seed``, so a saved run is rebuilt identically and its checkpoint
  (tile states and generators in the model's state_dict) loads.
* attach: the analog weights (converted, or built on tiles by a custom builder) are trained by an
  :class:`~ffebm.analog.AnalogOptimizer` with the ``analog_algorithm`` at ``analog_lr``, whose lr
  follows the run's schedule factor; biases and digital layers by the configured torch optimiser.
* step: under torchrun the pulse pairs are gathered across processes first
  (:func:`ffebm.analog.distributed.gather_pairs`), so every process pulses the same update.
* report / state: ``analog_lr`` and tile statistics; the optimiser and its schedule in the checkpoint.

Settings of the Tiki-Taka family that differ from the algorithm defaults are :data:`TT_DEFAULTS`;
any algorithm setting can be changed with ``analog_options="k=v,..."``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .config import ConfigError, TrainConfig, parse_model_options
from .plugin import TrainerPlugin

# Our choices for the Tiki-Taka family (TTv1, TTv2, c-TTv2, AGAD): an absolute
# fast-array lr of 5 (A's content stands above the read noise of its transfer reads), every
# column transferred at every step, and the transfer scaled by the optimiser's lr (so that
# analog_lr and the schedule set the speed of C).
TT_DEFAULTS: Dict[str, Any] = {"fast_lr": 5.0, "columns_per_transfer": 0, "scale_transfer_lr": True}
ALL_COLUMNS = 10 ** 6  # columns_per_transfer=0: every column (clipped to the width by the algorithm)
TRAINING_OMEGA = 0.5  # the tiles' weight scaling when analog_omega is none
ALGORITHM_NAMES = ("sgd", "mixed-precision", "tiki-taka", "ttv2", "c-ttv2", "agad")


def _snake(class_name: str) -> str:
    n = re.sub(r"Device$", "", class_name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower()


def device_names() -> List[str]:
    """Snake-case names of the registered device models (``soft_bounds``, ``ideal``, ...)."""
    from ffebm.analog import DEVICE_REGISTRY

    return sorted({_snake(cls.__name__) for cls in DEVICE_REGISTRY.values()})


def canonical_device_name(name: str) -> str:
    """The snake-case name of device model ``name`` (any spelling ``device_from_name`` takes:
    ``SoftBounds``, ``soft_bounds``, ``softbound``, ...); an unknown name raises :class:`ConfigError`
    listing the snake-case names."""
    from ffebm.analog import DEVICE_REGISTRY, InvalidSetting, device_from_name

    try:
        cls = type(device_from_name(name))
    except (InvalidSetting, TypeError, ValueError):
        cls = None
    if cls is None or cls not in set(DEVICE_REGISTRY.values()):
        raise ConfigError(f"unknown device model {name!r}; device models: {', '.join(device_names())}")
    return _snake(cls.__name__)


def make_device(cfg: TrainConfig):
    from ffebm.analog import InvalidSetting, device_from_name

    try:
        return device_from_name(cfg.analog)
    except InvalidSetting:
        raise ConfigError(f"analog={cfg.analog!r}: expected '' (digital) or a device model: "
                          f"{', '.join(device_names())}") from None


def make_algorithm(cfg: TrainConfig):
    """The ``analog_algorithm`` with our defaults and ``analog_options`` applied."""
    from ffebm.analog import InvalidSetting, IOConfig, TikiTaka, algorithm_from_name

    try:
        cls = type(algorithm_from_name(cfg.analog_algorithm))
    except InvalidSetting:
        raise ConfigError(f"analog_algorithm={cfg.analog_algorithm!r}: expected one of "
                          f"{', '.join(ALGORITHM_NAMES)}") from None
    opts = parse_model_options(cfg.analog_options, field="analog_options")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(f"analog_options: {unknown[0]!r} is not a setting of {cls.__name__} "
                          f"(settings: {', '.join(known)})")
    kw: Dict[str, Any] = dict(TT_DEFAULTS) if issubclass(cls, TikiTaka) else {}
    kw.update(opts)
    if kw.get("columns_per_transfer") == 0:
        kw["columns_per_transfer"] = ALL_COLUMNS
    for key in ("transfer_io",):
        if isinstance(kw.get(key), str):
            if kw[key].lower() != "perfect":
                raise ConfigError(f"analog_options: {key}={kw[key]!r}: expected perfect or none")
            kw[key] = IOConfig.perfect()
    try:
        return algorithm_from_name(cfg.analog_algorithm, **kw)
    except (InvalidSetting, TypeError, ValueError) as e:
        raise ConfigError(f"analog_options={cfg.analog_options!r}: {str(e).splitlines()[0]}") from None


#: keys only a run on tiles reads (training tiles, or an inference chip for the shared ones)
TILE_KEYS = ("analog_reads", "analog_omega", "analog_input", "analog_layers")
#: keys of the pulsed updates: read by the AnalogOptimizer of a model with training tiles (converted, or
#: built with tiles by a user's builder; checked once the model is built, in AnalogPlugin.attach)
PULSE_KEYS = ("analog_algorithm", "analog_options", "analog_lr")


def check_config(cfg: TrainConfig) -> None:
    """Validation of the analog keys (called by :func:`train.validate.validate`)."""
    if not cfg.analog and cfg.analog_mode != "inference":
        from .recipe_table import changed_keys

        set_keys = changed_keys(cfg, TILE_KEYS)
        if set_keys:  # a digital run would ignore them
            shown = " ".join(f"{k}={getattr(cfg, k)}" for k in set_keys)
            raise ConfigError(f"{shown}: analog keys need a run on tiles (analog=DEVICE, or "
                              f"analog_mode=inference); this run is digital")
    if cfg.analog_mode == "inference":
        from .recipe_table import changed_keys

        set_keys = changed_keys(cfg, PULSE_KEYS)
        if set_keys:  # an inference chip is trained by the torch optimiser, not by pulses
            shown = " ".join(f"{k}={getattr(cfg, k)}" for k in set_keys)
            raise ConfigError(f"{shown}: pulsed-update keys do not apply to analog_mode=inference (the torch "
                              f"optimiser trains the chip's weights)")
    if cfg.analog:
        make_device(cfg)
    make_algorithm(cfg)
    if cfg.analog and cfg.grad_check_every:
        raise ConfigError(f"grad_check_every={cfg.grad_check_every}: not available with analog={cfg.analog!r} "
                          f"(AnalogEP pulses its updates instead of forming a gradient to compare); "
                          f"set grad_check_every=0")


def analog_config(cfg: TrainConfig):
    from ffebm.analog import AnalogConfig, IOConfig

    io = IOConfig.perfect() if cfg.analog_reads == "perfect" else None
    omega = TRAINING_OMEGA if cfg.analog_omega is None else cfg.analog_omega
    return AnalogConfig(device=make_device(cfg), io=io, bwd_io=io,
                        weight_scaling_omega=omega if omega > 0 else None)


def _digital_layer_names(model: nn.Module, block_paths: List[str]) -> List[str]:
    def inside(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in block_paths)

    return [n for n, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Conv2d) and n and not inside(n)]


def put_on_tiles(model: nn.Module, conf, cfg: TrainConfig, layers: bool, what: str, layers_what: str,
                 tiles: str) -> nn.Module:
    """The energy blocks of ``model`` on tiles of ``conf`` (an AnalogConfig or InferenceConfig;
    their input maps too with ``analog_input``), then, with ``layers``, the digital Linear /
    Conv2d layers outside them; seeded by ``cfg.seed`` so a saved run is rebuilt identically.
    A model that cannot be converted is a ConfigError naming ``what`` / ``layers_what``."""
    import ffebm
    from ffebm.analog import InvalidSetting, convert_to_analog, to_analog_energy

    ids = {id(b) for _, b in ffebm.energy_blocks(model)}
    paths = [n for n, m in model.named_modules() if id(m) in ids]
    try:
        model = to_analog_energy(model, conf, input_coupling=cfg.analog_input, seed=cfg.seed, inplace=True)
    except InvalidSetting as e:
        raise ConfigError(f"{what}: model {cfg.model!r} cannot be put on {tiles} "
                          f"({str(e).splitlines()[0]})") from None
    names = _digital_layer_names(model, paths) if layers else []
    if names:
        try:
            model = convert_to_analog(model, conf, layers=names, inplace=True, seed=cfg.seed + 999_000)
        except InvalidSetting as e:
            raise ConfigError(f"{layers_what}: model {cfg.model!r} has a layer that cannot be put on "
                              f"{tiles} ({str(e).splitlines()[0]})") from None
    return model


def make_analog(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Put ``model`` on tiles as ``cfg`` says (in place; returns the converted model).  A digital
    run (``analog=""``) returns ``model`` unchanged."""
    if not cfg.analog:
        return model
    import ffebm
    from ffebm.analog import AnalogEP, analog_parameters

    acfg = analog_config(cfg)
    blocks = list(ffebm.energy_blocks(model))
    model = put_on_tiles(model, acfg, cfg, layers=cfg.analog_layers, what=f"analog={cfg.analog!r}",
                         layers_what="analog_layers=true", tiles="tiles")
    for name, blk in blocks:
        g = getattr(blk, "gradient", None)
        if not isinstance(g, AnalogEP):
            raise ConfigError(f"analog={cfg.analog!r}: energy block '{name}' is trained with {g!r}; analog "
                              f"energy blocks are trained with EP's pulsed updates (method=ep)")
    if not analog_parameters(model):
        hint = "" if cfg.analog_layers else "; analog_layers=true also converts its Linear/Conv2d layers"
        raise ConfigError(f"analog={cfg.analog!r}: model {cfg.model!r} has nothing to put on tiles "
                          f"(no energy blocks{hint})")
    return model


def split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(digital trainable parameters, analog weights).  Analog weights go to the
    :class:`~ffebm.analog.AnalogOptimizer` whether ``analog`` converted them or the model was
    built with tiles (e.g. a custom builder using ``AnalogLinear``): their backward records
    pulsed-update pairs that only that optimiser consumes (and clears)."""
    from ffebm.analog import analog_parameters, digital_parameters

    return ([p for p in digital_parameters(model) if p.requires_grad],
            [p for p in analog_parameters(model) if p.requires_grad])


def make_analog_optimizer(cfg: TrainConfig, params: List[nn.Parameter]):
    from ffebm.analog import AnalogOptimizer

    return AnalogOptimizer(params, make_algorithm(cfg), lr=cfg.analog_lr, seed=cfg.seed)


def nonfinite_pending(model: nn.Module) -> str:
    """The name of an analog weight whose pending pulsed-update pairs hold NaN/inf ('' if none)."""
    import torch

    from ffebm.analog import is_analog_parameter

    for name, p in model.named_parameters():
        pair = p.analog_ctx.pending() if is_analog_parameter(p) else None
        if pair is not None and not (torch.isfinite(pair[0]).all() and torch.isfinite(pair[1]).all()):
            return name
    return ""


def tile_scalars(model: nn.Module) -> Dict[str, float]:
    """TensorBoard scalars of every tile: ``analog/<param>/abs_mean``, ``range_used``,
    ``at_bound`` and the read counts, plus ``analog/total/...`` (:func:`ffebm.analog.analog_stats`)."""
    from ffebm.analog import analog_stats

    return analog_stats(model).scalars("analog")


class AnalogPlugin(TrainerPlugin):
    """The analog parts of a run, at the loop's fixed points (see :mod:`train.plugin`).  Inert
    (every hook a no-op) when the model has no analog weights."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.params: List[nn.Parameter] = []
        self.optimizer = None
        self.scheduler = None
        self.model: Optional[nn.Module] = None

    def build(self, model: nn.Module) -> nn.Module:
        return make_analog(model, self.cfg)   # analog="": unchanged

    def attach(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        import torch

        from .build import schedule_factor

        self.model = model
        self.params = split_parameters(model)[1]
        if not self.params and self.cfg.analog_mode != "inference":
            from .recipe_table import changed_keys

            set_keys = changed_keys(self.cfg, PULSE_KEYS)
            if set_keys:  # no tile to pulse: they would be ignored
                shown = " ".join(f"{k}={getattr(self.cfg, k)}" for k in set_keys)
                raise ConfigError(f"{shown}: the model has no training tiles to pulse (set analog=DEVICE, or "
                                  f"build the model with analog layers)")
        if self.params:
            self.optimizer = make_analog_optimizer(self.cfg, self.params)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, schedule_factor(self.cfg, total_steps, steps_per_epoch))

    def owned_parameters(self) -> List[nn.Parameter]:
        return list(self.params)

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)   # drops pulsed-update pairs of earlier passes

    def check_update(self, where) -> str:
        name = nonfinite_pending(self.model) if self.optimizer is not None else ""
        return f"non-finite pulsed update of '{name}' ({where(name)})" if name else ""

    def step(self, ctx: Any) -> None:
        if self.optimizer is None:
            return
        if ctx.enabled:  # pulsed, not all-reduced: every process applies the gathered pairs
            from ffebm.analog.distributed import gather_pairs

            gather_pairs(self.params, ctx.world)
        self.optimizer.step()
        self.scheduler.step()

    def lr(self) -> Dict[str, float]:
        return {"analog_lr": self.optimizer.param_groups[0]["lr"]} if self.optimizer is not None else {}

    def scalars(self) -> Dict[str, float]:
        if self.optimizer is None:
            return {}
        return {"train/analog_lr": self.optimizer.param_groups[0]["lr"], **tile_scalars(self.model)}

    def epoch_record(self, ctx: Any, device: Any, log) -> Dict[str, Any]:
        rec = self.lr()
        if self.optimizer is not None:  # mean |w| of the devices, in tile units (saturation at a glance)
            from ffebm.analog import analog_stats

            total = analog_stats(self.model).total
            rec["tile_abs_mean"] = total.abs_mean
            rec["tile_at_bound"] = total.at_bound
        if self.optimizer is not None and ctx.enabled:
            from ffebm.analog.distributed import tiles_in_sync

            rec["analog_tiles_in_sync"] = tiles_in_sync(self.params, device)
            if not rec["analog_tiles_in_sync"]:
                log("warning: the analog tiles differ between processes (a process-local random "
                    "stream, e.g. write noise, reached the pulses); the checkpoint holds rank 0's")
        return rec

    def optimizers(self) -> List[Tuple[str, Any, Any]]:
        return [("analog optimizer", self.optimizer, self.scheduler)] if self.optimizer is not None else []

    def state_dict(self) -> Dict[str, Any]:
        if self.optimizer is None:
            return {}
        return {"analog_optimizer": self.optimizer.state_dict(), "analog_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint["analog_optimizer"])
            self.scheduler.load_state_dict(checkpoint["analog_scheduler"])
