"""Our own VGG-style ff-EBMs (plain dicts, copied on use): variants the published work has no
configuration for (CIFAR-100 at L=15, ImageNet32 at L=12 / L=15 in 6 blocks), built by
:func:`models.vgg.vgg_ffebm` (the class layer is the last block's linear top).  The published
configurations are in :mod:`models.published`.  Beta 0.2, T1 15, T2 5, hard-sigmoid gain 1,
asynchronous updates, batch norm in each block's input map, centered EP; the widths follow the
VGG doubling pattern and can be changed with keyword overrides.
"""
from __future__ import annotations

import copy
from typing import Dict

_L12 = dict(channels=[128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512],
            pools=["none", "max", "none", "max", "none", "max", "none", "max", "none", "none", "none"], dense=[])
_L15 = dict(channels=[128, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512],
            pools=["none", "none", "max", "none", "none", "max", "none", "none", "max", "none", "none", "max",
                   "none", "none"], dense=[])

PRESETS: Dict[str, dict] = {
    "cifar100_l15_6blocks": dict(_L15, split=[3, 3, 3, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=100),
    "imagenet32_l12_6blocks": dict(_L12, split=[2, 2, 2, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=1000),
    "imagenet32_l15_6blocks": dict(_L15, split=[3, 3, 3, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=1000),
}


def preset(name: str) -> dict:
    """A fresh copy (building a model never mutates the registry)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
