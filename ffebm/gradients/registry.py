"""Gradient methods by name: one mapping, used by the model builders, the trainer's command line
and its gradient check.

    method_from_name("ep", beta=0.5, variant="centered", steps=12)   # EP(...)
    method_from_name("implicit")                                     # Implicit(tol=1e-6, max_iter=200)

A factory takes the model-level settings (``beta``, ``variant``, ``steps`` = T2) and builds the
method with the defaults the builders use; ``register_method`` adds a name. ``pool_winners``
("live" or "free", see :class:`EP`), ``form`` ("ordinary" or "difference") and ``nudge`` ("delta"
or "loss") are set on the EP methods built (other methods differentiate at the free state, i.e.
at the free winners, already, and need no nudge).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

from .base import GradientMethod
from .ep import EP, FORMS, NUDGES, POOL_WINNERS
from .implicit import Implicit
from .unrolled import Unrolled

Factory = Callable[..., GradientMethod]
_METHODS: Dict[str, Factory] = {}


def register_method(name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``@register_method("mine") def make(beta, variant, steps): ...``."""
    def deco(factory: Factory) -> Factory:
        _METHODS[name] = factory
        return factory
    return deco


def method_names() -> List[str]:
    return list(_METHODS)


def method_from_name(name: str, beta: float = 0.5, variant: str = "centered",
                     steps: Optional[int] = None, pool_winners: str = "live", form: str = "ordinary",
                     nudge: str = "delta") -> GradientMethod:
    if name not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {name!r}")
    for what, value, allowed in (("pool_winners", pool_winners, POOL_WINNERS), ("form", form, FORMS),
                                 ("nudge", nudge, NUDGES)):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    method = _METHODS[name](beta=beta, variant=variant, steps=steps)
    if isinstance(method, EP):
        opts = dict(pool_winners=pool_winners, form=form, nudge=nudge)
        if any(getattr(method, k) != v for k, v in opts.items()):
            method = dataclasses.replace(method, **opts)
    return method


@register_method("ep")
def _ep(beta: float, variant: str, steps: Optional[int]) -> GradientMethod:
    return EP(beta=beta, variant=variant, steps=steps)


@register_method("implicit")
def _implicit(beta: float, variant: str, steps: Optional[int]) -> GradientMethod:
    return Implicit(tol=1e-6, max_iter=200)


@register_method("unrolled")
def _unrolled(beta: float, variant: str, steps: Optional[int]) -> GradientMethod:
    return Unrolled(steps=steps)
