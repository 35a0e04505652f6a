"""Model registry: the default digits ff-EBM, a plain DHN, the same-size MLP baseline (``digits_mlp``) and
the published VGG-style presets.

    import models
    model = models.build("digits")                       # default model
    model = models.build("cifar10_l6_3blocks", t1=30)   # a preset with an override
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, List, Optional, Set

import torch.nn as nn

import ffebm

from .digits import digits_conv, digits_dhn, digits_ffebm, digits_mlp
from .presets import PRESETS, preset
from .published import ALIASES, PUBLISHED, published, published_ffebm
from .vgg import vgg_ffebm

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"digits": digits_ffebm, "dhn_digits": digits_dhn,
                                                  "digits_mlp": digits_mlp, "digits_conv": digits_conv}


#: the models of scikit-learn's 8x8 digits (flat 64-feature inputs); the others take images
DIGITS_MODELS = frozenset(_BUILDERS)


def available() -> List[str]:
    """Every model name: the digits models, the published configurations (and our aliases of
    them), and our own VGG-style presets."""
    return sorted(_BUILDERS) + sorted(PUBLISHED) + sorted(ALIASES) + sorted(PRESETS)


class UnknownModelOption(TypeError, ValueError):
    """An option the model's builder does not take (a TypeError like Python's own for an unexpected
    keyword, and a ValueError as before)."""


def options(name: str) -> Optional[Set[str]]:
    """The keyword options model ``name`` accepts (from its builder's signature, plus ``dtype``)."""
    if name in _BUILDERS:
        fn = _BUILDERS[name]
    elif name in PUBLISHED or name in ALIASES:
        fn = published_ffebm
    elif name in PRESETS:
        fn = vgg_ffebm
    else:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")
    return keyword_options(fn) | {"dtype"}


def keyword_options(fn: Callable[..., nn.Module]) -> Optional[Set[str]]:
    """Named keyword parameters of a builder; None if it takes ``**kwargs`` and names none."""
    params = inspect.signature(fn).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named if named or not any(p.kind is p.VAR_KEYWORD for p in params) else None


def check_options(name: str, overrides) -> None:
    """Refuse options model ``name`` does not take, naming them and listing the valid ones."""
    known = options(name)
    unknown = sorted(set(overrides) - known)
    if unknown:
        named = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            named.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownModelOption(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(named)} "
                                 f"for model {name!r}; its options: {', '.join(sorted(known))}")


def build(name: str, **overrides) -> nn.Module:
    """Build a model by name; keyword overrides replace the preset's values.  An option the model does
    not take raises :class:`UnknownModelOption` naming it and listing the valid ones."""
    check_options(name, overrides)
    kw = {k: v for k, v in overrides.items() if k != "dtype"}
    if name in _BUILDERS:
        model = _BUILDERS[name](**kw)
    elif name in PUBLISHED or name in ALIASES:
        cfg = published(name)
        cfg.update(kw)
        model = published_ffebm(**cfg)
    else:
        cfg = preset(name)
        cfg.update(kw)
        model = vgg_ffebm(**cfg)
    if overrides.get("dtype") is not None:
        model = model.to(overrides["dtype"])
    list(ffebm.energy_blocks(model))  # names every block after its path
    return model


__all__ = ["available", "build", "options", "check_options", "UnknownModelOption", "PRESETS", "preset", "PUBLISHED", "ALIASES", "published", "published_ffebm",
           "digits_ffebm", "digits_conv", "digits_dhn", "digits_mlp", "vgg_ffebm"]
