"""Gradient methods by name: one mapping, used by the model builders, the trainer's command line
and its gradient check.

    method_from_name("ep", beta=0.5, variant="centered", steps=12)   # EP(...)
    method_from_name("implicit")                                     # Implicit(tol=1e-6, max_iter=200)

A factory takes the model-level settings (``beta``, ``variant``, ``steps`` = T2) and builds the
method with the defaults the builders use; ``register_method`` adds a name. ``pool_winners``
("live" or "free", see :class:`EP`) is set on the EP methods built (other methods differentiate
at the free state, i.e. at the free winners, already).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

from .base import GradientMethod
from .ep import EP, POOL_WINNERS
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
                     steps: Optional[int] = None, pool_winners: str = "live") -> GradientMethod:
    if name not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {name!r}")
    if pool_winners not in POOL_WINNERS:
        raise ValueError(f"pool_winners must be one of {POOL_WINNERS}, got {pool_winners!r}")
    method = _METHODS[name](beta=beta, variant=variant, steps=steps)
    if isinstance(method, EP) and method.pool_winners != pool_winners:
        method = dataclasses.replace(method, pool_winners=pool_winners)
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
