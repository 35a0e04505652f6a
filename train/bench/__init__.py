"""Benchmarks that print figures (speed, memory, accuracy of the analog algorithms).

    python -m train.bench              # training step: EP / Implicit / Unrolled / feedforward (steps.py)
    python -m train.bench.analog       # pulsed updates and energy blocks on tiles vs digital
    python -m train.bench.algorithms   # least-squares weight error of the analog training algorithms
    python -m train.bench.ep_form      # EP's nudged phases: ordinary vs difference form, per block
"""
from __future__ import annotations


def main(argv=None):
    """``python -m train.bench`` / ``ffebm-bench``: the training-step benchmark."""
    from .steps import main as steps_main

    return steps_main(argv)
