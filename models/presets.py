"""Architectures of the published ff-EBM experiments, by name (plain dicts, copied on use).

CIFAR-10 splitting (Nest & Ernoult 2024): a 6-layer VGG-style DHN (conv 128-256-256-512-512,
max-pool after each of the first four convs, dense output) split as 1, 2 or 3 blocks (T1 60);
a 12-layer one split as 3, 4 or 6 blocks (T1 20). Scaling (CIFAR-100, ImageNet32): 12 and 15
layers in 6 blocks, beta 0.2, T1 15, T2 5. All with hard-sigmoid gain 1, asynchronous
updates, batch norm (affine frozen) in each block's input map, centered EP.

The L=6 widths follow the reference configuration; the L=12 / L=15 widths follow the same
VGG doubling pattern (see README for the table) and can be changed with keyword overrides.
"""
from __future__ import annotations

import copy
from typing import Dict

_L6 = dict(channels=[128, 256, 256, 512, 512], pools=["max", "max", "max", "max", "none"], dense=[])
_L12 = dict(channels=[128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512],
            pools=["none", "max", "none", "max", "none", "max", "none", "max", "none", "none", "none"], dense=[])
_L15 = dict(channels=[128, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512],
            pools=["none", "none", "max", "none", "none", "max", "none", "none", "max", "none", "none", "max",
                   "none", "none"], dense=[])

PRESETS: Dict[str, dict] = {
    "cifar10_l6_1block": dict(_L6, split=[6], beta=0.2, t1=60, t2=20, num_classes=10),
    "cifar10_l6_2blocks": dict(_L6, split=[3, 3], beta=0.2, t1=60, t2=20, num_classes=10),
    "cifar10_l6_3blocks": dict(_L6, split=[2, 2, 2], beta=0.2, t1=60, t2=20, num_classes=10),
    "cifar10_l12_3blocks": dict(_L12, split=[4, 4, 4], beta=0.2, t1=20, t2=20, num_classes=10),
    "cifar10_l12_4blocks": dict(_L12, split=[3, 3, 3, 3], beta=0.2, t1=20, t2=20, num_classes=10),
    "cifar10_l12_6blocks": dict(_L12, split=[2, 2, 2, 2, 2, 2], beta=0.2, t1=20, t2=20, num_classes=10),
    "cifar100_l12_6blocks": dict(_L12, split=[2, 2, 2, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=100),
    "cifar100_l15_6blocks": dict(_L15, split=[3, 3, 3, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=100),
    "imagenet32_l12_6blocks": dict(_L12, split=[2, 2, 2, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=1000),
    "imagenet32_l15_6blocks": dict(_L15, split=[3, 3, 3, 2, 2, 2], beta=0.2, t1=15, t2=5, num_classes=1000),
    # the EP-vs-implicit gradient study: 6 blocks, 15 layers, beta 0.02, T2 20
    "gradient_study_l15_6blocks": dict(_L15, split=[3, 3, 3, 2, 2, 2], beta=0.02, t1=60, t2=20, num_classes=10),
}


def preset(name: str) -> dict:
    """A fresh copy (building a model never mutates the registry)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
