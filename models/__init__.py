"""Model registry: the default digits ff-EBM, a plain DHN and the published VGG-style presets.

    import models
    model = models.build("digits")                       # default model
    model = models.build("cifar10_l6_3blocks", t1=30)   # a preset with an override
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Set

import torch.nn as nn

import ffebm

from .digits import digits_dhn, digits_ffebm
from .presets import PRESETS, preset
from .published import ALIASES, PUBLISHED, published, published_ffebm
from .published import OPTIONS as PUBLISHED_OPTIONS
from .vgg import vgg_ffebm

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"digits": digits_ffebm, "dhn_digits": digits_dhn}


def available() -> List[str]:
    """Every model name: the digits models, the published configurations (and our aliases of
    them), and our own VGG-style presets."""
    return sorted(_BUILDERS) + sorted(PUBLISHED) + sorted(ALIASES) + sorted(PRESETS)


PRESET_OPTIONS = {"in_channels", "image_size", "tol", "gain", "method", "variant", "mode", "pool_override", "dtype",
                  "precision"}


def options(name: str) -> Optional[Set[str]]:
    """The keyword options model ``name`` accepts (None: it takes any, nothing to check)."""
    if name in _BUILDERS:
        return keyword_options(_BUILDERS[name]) | {"dtype"}
    if name in PUBLISHED or name in ALIASES:
        return set(PUBLISHED_OPTIONS)
    if name in PRESETS:
        return set(preset(name)) | PRESET_OPTIONS
    raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")


def keyword_options(fn: Callable[..., nn.Module]) -> Optional[Set[str]]:
    """Named keyword parameters of a builder; None if it takes ``**kwargs`` and names none."""
    params = inspect.signature(fn).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named if named or not any(p.kind is p.VAR_KEYWORD for p in params) else None


def build(name: str, **overrides) -> nn.Module:
    """Build a model by name; keyword overrides replace the preset's values."""
    if name in _BUILDERS:
        model = _BUILDERS[name](**overrides)
    elif name in PUBLISHED or name in ALIASES:
        cfg = published(name)
        unknown = set(overrides) - PUBLISHED_OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for model {name!r} "
                             f"(options: {', '.join(sorted(PUBLISHED_OPTIONS))})")
        cfg.update({k: v for k, v in overrides.items() if k != "dtype"})
        model = published_ffebm(**cfg)
    elif name in PRESETS:
        cfg = preset(name)
        unknown = set(overrides) - set(cfg) - PRESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for preset {name!r}")
        cfg.update({k: v for k, v in overrides.items() if k != "dtype"})
        model = vgg_ffebm(**cfg)
    else:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")
    if overrides.get("dtype") is not None:
        model = model.to(overrides["dtype"])
    list(ffebm.energy_blocks(model))  # names every block after its path
    return model


__all__ = ["available", "build", "options", "PRESETS", "preset", "PUBLISHED", "ALIASES", "published", "published_ffebm",
           "digits_ffebm", "digits_dhn", "vgg_ffebm"]
