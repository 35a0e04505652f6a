"""Building a run: device, seeds, the model (registered name or user builder, its options
checked), optimiser and learning-rate schedule."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import ffebm as _ffebm

from . import distributed as D
from .config import ConfigError, TrainConfig, UserError, parse_model_options
from .data import DataInfo


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_device(cfg: TrainConfig, ctx: D.DistContext) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={cfg.device}: CUDA is not available on this machine")
        if want == "cuda":
            return torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
    return torch.device(want)


def model_kwargs(cfg: TrainConfig, info: DataInfo) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(num_classes=cfg.num_classes or info.num_classes,
                              in_channels=cfg.in_channels or info.in_channels,
                              image_size=cfg.image_size or info.image_size)
    for key in ("beta", "t1", "t2", "method", "variant"):
        v = getattr(cfg, key)
        if v is not None:
            kw[key] = v
    if cfg.model_dtype:
        dt = getattr(torch, cfg.model_dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"model_dtype={cfg.model_dtype!r}: not a torch dtype")
        kw["dtype"] = dt
    extra = parse_model_options(cfg.model_options)
    check_model_options(cfg.model, extra)
    kw.update(extra)
    return kw


#: builder keywords that are keys of the configuration (``precision`` is applied to the built model)
OWN_KEYS = frozenset({"beta", "t1", "t2", "method", "variant", "num_classes", "in_channels", "image_size", "dtype",
                      "precision"})


def check_model_options(model: str, extra: Dict[str, Any]) -> None:
    """Refuse model_options the builder does not take (a typo would otherwise be swallowed), and
    those that have keys of their own."""
    clash = sorted(set(extra) & OWN_KEYS)
    if clash:
        own = "its own key" if len(clash) == 1 else "their own keys"
        raise ConfigError(f"model_options: set {', '.join(clash)} with {own}, not in model_options")
    if not extra:
        return
    if ":" in model:
        return  # a user builder: checked once it is imported (see build_model)
    from ffebm import models

    try:
        known = models.options(model)
    except KeyError:
        return  # unknown model: reported by build_model with the list of names
    _refuse_unknown_options(model, extra, known)


def _refuse_unknown_options(model: str, extra: Dict[str, Any], known) -> None:
    if known is None:
        return
    unknown = sorted(set(extra) - set(known) - {"_"})
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model_options: model {model!r} has no option '{k}'{hint}; "
                          f"its options: {', '.join(sorted(o for o in known if o != '_'))}")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text[:limit] if text else "(no message)"


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "alloc" in str(e).lower() or "memory" in str(e).lower()))


def _memory_error(model: str, e: BaseException) -> ConfigError:
    return ConfigError(f"model {model!r} cannot be built with these options: not enough memory "
                       f"({_first_line(e, 160)})")


#: what a ``module:function`` builder is, in the words of the errors below
BUILDER_CONTRACT = ("a model builder is a function taking num_classes=, in_channels=, image_size= (and the "
                    "model_options) as keywords, or **kwargs, and returning a torch.nn.Module")


@contextlib.contextmanager
def user_module_path(mod_name: str):
    """While importing and calling a ``module:function`` builder: if ``module`` is not on ``sys.path``
    but in the current working directory, that folder is appended to ``sys.path`` (a console script
    such as ``ffebm-train`` does not put it there, ``python -m train`` does).  Appended, it never
    shadows an installed module, and it is taken off again afterwards: only the module the user named
    (and what it imports) comes from there."""
    top = mod_name.split(".")[0]
    cwd = os.getcwd()
    add = False
    if cwd not in sys.path and ((Path(cwd) / f"{top}.py").is_file() or (Path(cwd) / top / "__init__.py").is_file()):
        try:
            add = importlib.util.find_spec(top) is None
        except (ImportError, ValueError):
            add = False
    if add:
        sys.path.append(cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if add and cwd in sys.path:
            sys.path.remove(cwd)


def user_module_origin(mod_name: str) -> str:
    """Where ``mod_name`` would be imported from (sys.path, then the working directory), found without
    importing anything: a path, or '' if not found."""
    top = mod_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return spec.origin or ""
    for cand in (Path.cwd() / f"{top}.py", Path.cwd() / top / "__init__.py"):
        if cand.is_file():
            return str(cand)
    return ""


def user_builder(spec: str) -> Callable[..., Any]:
    """The callable named by ``model=module:function`` (imported, not yet called)."""
    mod_name, _, fn_name = spec.partition(":")
    if not (mod_name and fn_name and all(p.isidentifier() for p in mod_name.split("."))
            and fn_name.isidentifier()):
        raise ConfigError(f"model={spec!r}: expected a registered name or module:function (e.g. mymodel:build)")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model={spec!r}: cannot import module '{mod_name}' ({_first_line(e)}); a module of "
                          "your own must be on PYTHONPATH or in the working directory") from None
    except Exception as e:  # the module itself fails while importing (a syntax error, ...)
        raise ConfigError(f"model={spec!r}: importing module '{mod_name}' raised {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    try:
        fn = getattr(module, fn_name)
    except AttributeError:
        raise ConfigError(f"model={spec!r}: module '{mod_name}' has no attribute '{fn_name}'") from None
    if not callable(fn):
        raise ConfigError(f"model={spec!r}: {mod_name}.{fn_name} is a {type(fn).__name__}, not a function; "
                          f"{BUILDER_CONTRACT}")
    return fn


def call_user_builder(spec: str, fn: Callable[..., Any], kw: Dict[str, Any]) -> nn.Module:
    """``fn(**kw)``: refused before the call if its signature cannot take ``kw`` (``os:system`` is no
    builder); what it raises or returns instead of a module is reported in one line."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the return value is checked
        sig = None
    if sig is not None:
        try:
            sig.bind(**kw)
        except TypeError as e:
            raise ConfigError(f"model={spec!r} is not a model builder: {spec}{sig} cannot take the keywords the "
                              f"trainer passes ({', '.join(sorted(kw))}: {_first_line(e)}); "
                              f"{BUILDER_CONTRACT}") from None
    try:
        model = fn(**kw)
    except Exception as e:
        if _out_of_memory(e):
            raise _memory_error(spec, e) from None
        raise ConfigError(f"model={spec!r}: the builder raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={spec!r}: {spec} did not return a torch.nn.Module (it returned "
                          f"{type(model).__name__}); {BUILDER_CONTRACT}")
    return model


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """``cfg.model`` is a name from ``models.available()`` or ``"package.module:function"``."""
    from ffebm import models

    kw = model_kwargs(cfg, info)
    if ":" in cfg.model:
        with user_module_path(cfg.model.split(":", 1)[0]):
            fn = user_builder(cfg.model)
            try:
                known = models.keyword_options(fn)
            except (TypeError, ValueError):
                known = None
            _refuse_unknown_options(cfg.model, parse_model_options(cfg.model_options), known)
            return call_user_builder(cfg.model, fn, kw)

    names = list(models.available())
    if cfg.model not in names:
        raise ConfigError(f"model={cfg.model!r} is not a known model; available: {', '.join(names)}")
    takes = models.options(cfg.model)
    for key in ("num_classes", "in_channels", "image_size"):
        # the data's shape (these keys also shape dataset=fake): passed where the model takes it; a model
        # that does not (digits reads in_features=64) meets the data at the first batch, which checks the fit
        if takes is not None and key not in takes:
            kw.pop(key, None)
    try:
        return models.build(cfg.model, **kw)
    except Exception as e:
        if _out_of_memory(e):
            raise _memory_error(cfg.model, e) from None
        if isinstance(e, (TypeError, ValueError)):
            raise ConfigError(f"model {cfg.model!r} rejected its options ({str(e).splitlines()[0]})") from None
        raise ConfigError(f"model {cfg.model!r}: its builder raised {type(e).__name__}: {_first_line(e)}") from None


def build_checked(model_fn: Callable[[TrainConfig, DataInfo], nn.Module], cfg: TrainConfig,
                  info: DataInfo) -> nn.Module:
    """``model_fn(cfg, info)``, with a one-line error when it runs out of memory or returns no module."""
    try:
        model = model_fn(cfg, info)
    except (MemoryError, RuntimeError) as e:  # e.g. a size option far too large to allocate
        if not _out_of_memory(e):
            raise
        raise _memory_error(cfg.model, e) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {cfg.model!r} did not build a torch.nn.Module (got {type(model).__name__})")
    return model


def energy_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return list(_ffebm.energy_blocks(model))


def block_paths(model: nn.Module, blocks) -> Dict[str, str]:
    """{module path of each energy block: its block name}."""
    ids = {id(b): n for n, b in blocks}
    return {path: ids[id(m)] for path, m in model.named_modules() if id(m) in ids}


METHOD_TYPES = {"ep": _ffebm.EP, "implicit": _ffebm.Implicit, "unrolled": _ffebm.Unrolled}


def check_model_took(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse method / variant / beta settings that the built model's energy blocks ignored (a user
    builder that trains EP whatever ``method=`` says would otherwise report the wrong method)."""
    blocks = energy_blocks(model)
    if not blocks:
        return
    for name, blk in blocks:
        g = blk.gradient
        want = METHOD_TYPES.get(cfg.method) if cfg.method else None
        if want is not None and not isinstance(g, want):
            raise ConfigError(f"method={cfg.method}: model {cfg.model!r} ignored it (energy block '{name}' uses "
                              f"{g.describe()}); pass the setting its builder takes, or leave method unset")
        if isinstance(g, _ffebm.EP):
            if cfg.variant is not None and g.variant != cfg.variant:
                raise ConfigError(f"variant={cfg.variant}: model {cfg.model!r} ignored it (energy block '{name}' "
                                  f"uses {g.describe()})")
            if cfg.beta is not None and float(g.beta) != float(cfg.beta):
                raise ConfigError(f"beta={cfg.beta}: model {cfg.model!r} ignored it (energy block '{name}' uses "
                                  f"{g.describe()})")


def gradient_method(model: nn.Module, cfg: TrainConfig) -> str:
    blocks = energy_blocks(model)
    descs = []
    for _, blk in blocks:
        g = getattr(blk, "gradient", None)
        if g is not None and repr(g) not in descs:
            descs.append(repr(g))
    if descs:
        return " / ".join(descs)
    if blocks:
        return f"{cfg.method or 'default'}(beta={cfg.beta}, variant={cfg.variant})"
    return "backprop (no energy blocks)"


def freeze_bn_affine(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            for p in (m.weight, m.bias):
                if p is not None and p.requires_grad:
                    p.requires_grad_(False)
                    n += 1
    return n


def make_optimizer(cfg: TrainConfig, model: nn.Module, params: Optional[List[nn.Parameter]] = None
                   ) -> torch.optim.Optimizer:
    """The torch optimiser of ``params`` (default: every trainable parameter; an analog run
    passes its digital parameters, see :func:`train.analog.split_parameters`)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        what = "digital (non-tile) " if cfg.analog else ""
        raise UserError(f"model {cfg.model!r} has no trainable {what}parameters")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def schedule_factor(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """lr(step) / lr of the configured schedule (the factor the analog lr follows too)."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if cfg.schedule == "cosine":
        t_max = max(1, total_steps)
        return lambda s: floor + (1.0 - floor) * (1.0 + math.cos(math.pi * min(s, t_max) / t_max)) / 2.0
    if cfg.schedule == "exponential":
        spe = max(1, steps_per_epoch)
        return lambda s: max(cfg.lr_decay ** (s // spe), floor)
    return lambda s: 1.0


def make_scheduler(cfg: TrainConfig, opt, total_steps: int, steps_per_epoch: int = 1):
    """Stepped once per optimiser step.  ``cosine``: from lr to ``min_lr`` over ``total_steps``;
    ``exponential``: the lr is multiplied by ``lr_decay`` at every epoch end (not below ``min_lr``).
    Closed forms of the step count (:func:`schedule_factor`), so a checkpoint carries only the
    position and a run extended with ``--resume RUN epochs=N`` follows the schedule of its new length."""
    if cfg.schedule in ("cosine", "exponential"):
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg, total_steps, steps_per_epoch))
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
