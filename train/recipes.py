"""Named training recipes: the published ff-EBM configurations plus the default ``digits`` run.

A recipe is a set of :class:`train.config.TrainConfig` overrides.  ``python -m train NAME
key=value ...`` starts from the recipe and applies the command line on top.

Published settings (Nest & Ernoult, NeurIPS 2024, arXiv 2409.03306, and its released configuration
files; the configurations are ``models/published.py``):

* CIFAR-10 "splitting" runs ``splitting_{small,large}_*``: L=6 split into 1/2/3 energy blocks
  (T1 60, T2 20) and L=12 into 3/4/6 blocks (T1 20, T2 5); beta 0.2, centered EP, batch 128;
  again with implicit differentiation (``*_implicit``) for the EP-vs-implicit study.
* "scaling" runs: ``scaling_small`` (CIFAR-100, L=12, 6 blocks) and ``scaling_large``
  (ImageNet32, L=15, 8 blocks; 46 % top-1 in the paper), beta 0.2, T1 15, T2 5, batch 256, with
  their published learning rates and cosine floors.
* ``static_gradient_analysis``: the 15-layer, 6-block network on random 32x32 inputs, batch 2,
  beta 0.02, T2 20, EP's gradient compared with the implicit one per block at every step
  (TensorBoard ``gradcheck/...``).

Training recipe of the reference code: Adam, weight decay 3e-4, cosine schedule, random crop
(pad 4) + horizontal flip, batch-norm affine parameters frozen.  The splitting runs' learning
rate (5e-4) and epochs (200) are ours (the reference tunes per-layer rates that are not
published); the scaling runs' are published.
"""

from __future__ import annotations

from typing import Any, Dict

from .config import TrainConfig, apply_overrides
from .recipe_table import DESCRIPTIONS, RECIPES, available, changed_keys, get
from .validate import validate

__all__ = ["RECIPES", "DESCRIPTIONS", "available", "changed_keys", "get", "build_config", "describe"]


def build_config(name: str = "digits", overrides: Dict[str, Any] | None = None) -> TrainConfig:
    """Resolve recipe ``name`` with ``overrides`` (strings parsed by type) into a TrainConfig."""
    cfg = apply_overrides(TrainConfig(), dict(get(name), recipe=name))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return validate(cfg)


def describe() -> str:
    width = max(len(n) for n in RECIPES)
    return "\n".join(f"  {n:<{width}}  {DESCRIPTIONS[n]}" for n in RECIPES)
