"""Typed training configuration.

Every setting of a run is one field of :class:`TrainConfig`.  A run is resolved from three
layers, later ones winning: the dataclass defaults, the recipe (``train/recipes.py``) and the
``key=value`` pairs of the command line.  Values given as strings are parsed according to the
field's annotation (``int``, ``float``, ``bool``, ``str`` or ``Optional[...]`` of those, where
``none``/``null`` stands for ``None``); unknown keys and values of the wrong type raise
:class:`ConfigError` with a one-line message (listing the valid keys for an unknown one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

from ffebm.gradients import method_names


class UserError(Exception):
    """An error caused by the user's input (configuration, files, data); reported in one line."""


class ConfigError(UserError):
    pass


@dataclass
class TrainConfig:
    # --- what to train ------------------------------------------------------------------
    recipe: str = "digits"           # the recipe the run started from (the list: ffebm-train --list)
    model: str = "digits"            # a model name (ffebm-train --list; ffebm.models.available()), or "module:function"
    method: Optional[str] = None     # gradient method passed to the model builder: ep | implicit | unrolled
    variant: Optional[str] = None    # EP variant (centered, positive, negative, random, ...)
    beta: Optional[float] = None     # EP nudging strength (None: the model preset's value)
    t1: Optional[int] = None         # free relaxation steps (None: preset)
    t2: Optional[int] = None         # nudged relaxation steps (None: preset)
    num_classes: Optional[int] = None  # None: from the data set
    in_channels: Optional[int] = None  # None: from the data set
    image_size: Optional[int] = None   # None: from the data set
    model_dtype: Optional[str] = None  # passed to the builder as dtype= (e.g. float32, float64)
    precision: str = "float32"       # energy blocks' relaxation: float32, or bfloat16 (free and nudged steps under
                                     # bf16 autocast, full-precision polish steps, read-out and digital layers)
    relax_start: str = "zeros"       # where free relaxations start: zeros | feedforward (one bottom-up pass) | previous (each training sample's last free equilibrium)
    overrelax: float = 1.0           # free relaxations: projected over-relaxation omega in (0, 2) (1: plain steps)
    anderson: int = 0                # free relaxations: Anderson mixing over this many sweeps (0: off; >= 2)
    model_options: str = ""          # extra builder keywords, "k=v,k2=v2" (e.g. "tol=none,hidden=128")
    freeze_bn_affine: bool = False   # freeze batch-norm weight/bias (the reference recipe does)

    # --- analog tiles (ffebm.analog; see train/analog.py and train/inference.py) ------------
    analog_mode: str = "training"    # training: tiles trained by pulsed updates (with analog=DEVICE) | inference:
                                     # hardware-aware training for an inference chip (analog empty; train/inference.py)
    analog: str = ""                 # device model of the energy blocks' couplings on simulated tiles
                                     # (soft_bounds, constant_step, ideal, ...; "": digital run)
    analog_algorithm: str = "c-ttv2"  # pulsed updates: sgd | tiki-taka | ttv2 | c-ttv2 | agad | mixed-precision
    analog_options: str = ""         # algorithm settings "k=v,k2=v2" over our defaults (TT family:
                                     # fast_lr=5, columns_per_transfer=0 = all, scale_transfer_lr=true)
    analog_lr: float = 0.01          # AnalogOptimizer lr (follows the same schedule factor as lr)
    analog_reads: str = "default"    # default (published read model: noise, quantisation) | perfect
    analog_omega: Optional[float] = None  # weight_scaling_omega: max |w| of a row (training tiles) or layer
                                     # (inference) -> this many tile units (0: off; none: 0.5 training, 1.0 inference)
    analog_input: bool = True        # also put the nn.Linear layers of the blocks' input maps on tiles
    analog_layers: Optional[bool] = None  # also put the digital nn.Linear/nn.Conv2d layers outside the blocks on
                                     # tiles (none: false for analog_mode=training, true for inference)
    inference_modifier: Optional[str] = "pcm_prog"  # analog_mode=inference: weight noise of each training-time read:
                                     # pcm_prog (PCM programming noise) | add_gauss | mul_gauss | none
    inference_modifier_std: Optional[float] = None  # its strength (pcm_prog: none = 1, the published noise;
                                     # add_gauss: x max|w| of the layer; mul_gauss: relative; required for both)
    inference_clip: Optional[str] = "sigma"  # analog_mode=inference: weight clipping after each optimiser step:
                                     # sigma (+-k std of the layer's weights) | fixed (+-value) | none
    inference_clip_value: Optional[float] = None  # its bound (sigma: k, none = 2.5; fixed: required)

    # --- data ---------------------------------------------------------------------------
    dataset: str = "digits"          # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagenet32 | fake
    data_root: str = "data"          # folder holding the data sets (MNIST/, cifar-10-batches-py/, imagenet32/)
    download: bool = False           # let torchvision download MNIST/Fashion-MNIST/CIFAR into data_root
    augment: Optional[bool] = None   # None: the data set's default (crop+flip for CIFAR/ImageNet32)
    input_noise: float = 0.0         # >0: training inputs + N(0, s^2) per pixel in [0,1] units, clipped to [0,1] (drawn per process)
    normalize: bool = True           # per-data-set mean/std normalisation
    train_subset: int = 0            # >0: use only the first N training samples
    test_subset: int = 0             # >0: use only the first N test samples
    fake_train_size: int = 512       # sizes of the synthetic "fake" data set
    fake_test_size: int = 128        # (test split of the synthetic data set)

    # --- optimisation -------------------------------------------------------------------
    optimizer: str = "adam"          # adam | adamw | sgd
    lr: float = 1e-3                 # learning rate of the digital parameters (peak of the schedule)
    weight_decay: float = 3e-4       # L2 / decoupled (adamw) weight decay
    momentum: float = 0.9            # sgd only
    grad_clip: float = 0.0           # >0: clip the global gradient norm to this (0: off)
    label_smoothing: float = 0.0     # training loss: cross-entropy against (1-e) one-hot + e uniform (eval: plain)
    schedule: str = "cosine"         # cosine (per step, to min_lr at the end) | constant | exponential
    min_lr: float = 0.0              # the schedules never go below this lr
    lr_decay: float = 0.95           # exponential schedule: lr factor per epoch (not below min_lr)
    epochs: int = 10                 # passes over the training set
    batch_size: int = 64             # global batch (split evenly over the processes)
    eval_batch_size: int = 500       # batch size of the evaluation passes
    drop_last: bool = True           # drop the last incomplete training batch of each epoch
    max_steps: int = 0               # >0: stop after this many optimiser steps (smoke tests)
    seed: int = 0                    # seeds the model, data order, augmentation and every method's stream

    # --- runtime (may be changed when resuming) ------------------------------------------
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    num_threads: int = 0             # >0: torch.set_num_threads
    memory_format: str = "auto"      # of conv models' weights and activations: auto (channels_last where it was
                                     # measured faster: digital conv models on CPU, see train/step.py)
    progress: bool = True            # tqdm progress bar (shown on a terminal only: redirected logs stay clean)
    tensorboard: bool = True         # TensorBoard scalars in RUN/tb
    log_every: int = 10              # steps between TensorBoard scalars
    ckpt_every: int = 0              # steps between checkpoints (0: only at epoch ends)
    eval_every: int = 1              # epochs between evaluations (the last epoch is always evaluated)
    grad_check_every: int = 0        # steps between EP-vs-reference gradient checks (0: never)
    grad_check_batch: int = 8        # samples used by each gradient check
    grad_check_reference: str = "implicit"  # implicit | unrolled


# Keys that do not change what is computed; they may be overridden with --resume.
RUNTIME_KEYS = frozenset({
    "device", "num_threads", "memory_format", "progress", "tensorboard", "log_every", "ckpt_every",
    "eval_batch_size", "data_root", "download", "grad_check_every", "grad_check_batch",
    "grad_check_reference",
})

CHOICES: Dict[str, tuple] = {
    "method": (*method_names(), None),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "constant", "exponential"),
    "analog_reads": ("default", "perfect"),
    "analog_mode": ("training", "inference"),
    "inference_modifier": ("pcm_prog", "add_gauss", "mul_gauss", None),
    "inference_clip": ("sigma", "fixed", None),
    "dataset": ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet32", "fake"),
    "grad_check_reference": ("implicit", "unrolled"),
    "precision": ("float32", "bfloat16"),
    "relax_start": ("zeros", "feedforward", "previous"),
    "memory_format": ("auto", "channels_last", "contiguous"),
}

POSITIVE = ("epochs", "batch_size", "eval_batch_size", "fake_train_size", "fake_test_size",
            "grad_check_batch", "eval_every")
NON_NEGATIVE = ("train_subset", "test_subset", "max_steps", "num_threads", "log_every",
                "ckpt_every", "grad_check_every", "lr", "weight_decay", "momentum", "min_lr", "grad_clip",
                "analog_lr", "input_noise")


def field_names():
    return [f.name for f in fields(TrainConfig)]


def _hints():
    return typing.get_type_hints(TrainConfig)


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{inner.__name__} or none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(key: str, value: Any, tp) -> Any:
    """Convert/validate ``value`` (a string from the command line or a JSON value) to ``tp``."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) is typing.Union and type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else tp
    bad = ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if isinstance(value, str):
        s = value.strip()
        if base is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise bad
        if base is int:
            try:
                return int(s)
            except ValueError:
                raise bad from None
        if base is float:
            try:
                return float(s)
            except ValueError:
                raise bad from None
        if base is str:
            return s
        raise bad
    # typed values (from recipes or a stored config.json)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def unknown_key_error(key: str) -> ConfigError:
    names = field_names()
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; valid keys: {', '.join(names)}")


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied (strings are parsed by type)."""
    hints = _hints()
    changes = {}
    for key, value in overrides.items():
        if key not in hints:
            raise unknown_key_error(key)
        changes[key] = _convert(key, value, hints[key])
    return dataclasses.replace(cfg, **changes)


MAX_SEED = 2 ** 63 - 1


def _max_threads() -> int:
    return 4 * max(os.cpu_count() or 1, 1)


def check_values(cfg: TrainConfig) -> TrainConfig:
    """The checks of each key's value on its own (ranges, choices, finiteness); :func:`train.validate.validate`
    adds those that need the model registry and the analog substrate."""
    for f in fields(TrainConfig):  # every number finite: nan/inf are refused here, not met mid-run
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}={v!r}: must be a finite number")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed={cfg.seed!r}: must be in [0, 2**63 - 1]")
    if cfg.num_threads > _max_threads():
        raise ConfigError(f"num_threads={cfg.num_threads}: more than 4x this machine's {os.cpu_count()} CPUs "
                          f"(at most {_max_threads()})")
    for key, choices in CHOICES.items():
        v = getattr(cfg, key)
        if v not in choices:
            shown = ", ".join("none" if c is None else c for c in choices)
            raise ConfigError(f"{key}={v!r}: expected one of {shown}")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: must be > 0")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: must be >= 0")
    if cfg.analog_omega is not None and cfg.analog_omega < 0:
        raise ConfigError(f"analog_omega={cfg.analog_omega!r}: must be >= 0 (0: off; none: the mode's default)")
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError(f"beta={cfg.beta!r}: must be > 0")
    if not 0 < cfg.overrelax < 2:
        raise ConfigError(f"overrelax={cfg.overrelax!r}: must be in (0, 2) (1: plain relaxation steps)")
    if cfg.anderson < 0 or cfg.anderson == 1 or cfg.anderson > 32:
        raise ConfigError(f"anderson={cfg.anderson!r}: must be 0 (off) or a memory from 2 to 32 (3-8 is typical)")
    for key in ("t1", "t2", "num_classes", "in_channels", "image_size"):
        v = getattr(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(f"{key}={v!r}: must be > 0")
    if cfg.model_dtype is not None and cfg.model_dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ConfigError(f"model_dtype={cfg.model_dtype!r}: expected float16, bfloat16, float32, float64 or none")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr={cfg.min_lr!r}: must not exceed lr={cfg.lr!r}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing!r}: must be in [0, 1)")
    if not 0 < cfg.lr_decay <= 1:
        raise ConfigError(f"lr_decay={cfg.lr_decay!r}: must be in (0, 1]")
    parse_model_options(cfg.model_options)
    parse_model_options(cfg.analog_options, field="analog_options")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev!r}: expected auto, cpu, cuda or cuda:N")
    return cfg


def parse_model_options(text: str, field: str = "model_options") -> Dict[str, Any]:
    """``"tol=none,hidden=128,pool_override=avg"`` -> {"tol": None, "hidden": 128, "pool_override": "avg"}."""
    out: Dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ConfigError(f"{field}={text!r}: expected comma-separated name=value pairs")
        v = val.strip()
        low = v.lower()
        if low in ("none", "null"):
            out[key] = None
        elif low in ("true", "false"):
            out[key] = low == "true"
        else:
            out[key] = v
            for conv in (int, float):
                try:
                    num = conv(v)
                except ValueError:
                    continue
                if num == num and abs(num) != float("inf"):  # "nan"/"inf" stay strings
                    out[key] = num
                break
    return out


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping[str, Any], *, source: str = "configuration") -> TrainConfig:
    """Rebuild a config from a stored dict (config.json); unknown keys are refused."""
    hints = _hints()
    for key in d:
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{key}' (written by another version?)")
    return check_values(apply_overrides(TrainConfig(), dict(d)))


def results_equal(a: TrainConfig, b: TrainConfig) -> bool:
    """True when two configs compute the same thing (runtime keys ignored)."""
    da, db = to_dict(a), to_dict(b)
    return all(da[k] == db[k] for k in da if k not in RUNTIME_KEYS)


def differing_keys(a: TrainConfig, b: TrainConfig, *, include_runtime=False):
    da, db = to_dict(a), to_dict(b)
    return [k for k in da if da[k] != db[k] and (include_runtime or k not in RUNTIME_KEYS)]
