"""Command-line helpers: how the user started a command (for usage texts and hints: ``ffebm-train``,
``python -m ffebm.train`` once installed, ``python -m train`` in a checkout), and argparse types
that check numeric flags."""
from __future__ import annotations

import os
import sys


def invoked_as(module: str) -> str:
    """The command as the user typed it, for a command living in ``train.<...>`` (``module``, e.g.
    ``"train.evaluate"``); ``python -m <module>`` when it cannot be told (a test calling ``main``)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for suffix in ("-script.py", ".exe"):  # Windows launchers
        if argv0.endswith(suffix):
            argv0 = argv0[: -len(suffix)]
    if argv0.startswith("ffebm-"):
        return argv0
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    if name.endswith(".__main__"):
        name = name[: -len(".__main__")]
    if name in (module, f"ffebm.{module}"):
        return f"python -m {name}"
    return f"python -m {module}"


def module_of(prog: str, module: str) -> str:
    """The ``-m`` module name that fits ``prog`` (``ffebm.train`` once installed, ``train`` in a checkout)."""
    if prog.startswith("python -m "):
        return prog[len("python -m "):]
    return f"ffebm.{module}"


# ------------------------------------------------------------------------------------------
# argparse types of the numeric flags: a bad value is an argparse error naming the flag
# ("argument --seeds: must be >= 1, got 0"), not a traceback or an empty result
# ------------------------------------------------------------------------------------------
def _number(text: str, kind):
    import argparse
    import math

    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_int(text: str) -> int:
    import argparse

    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    import argparse

    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def seed(text: str) -> int:
    import argparse

    v = _number(text, int)
    if not 0 <= v <= 2 ** 63 - 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {v}")
    return v


def positive_float(text: str) -> float:
    import argparse

    v = _number(text, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v:g}")
    return v


def non_negative_float(text: str) -> float:
    import argparse

    v = _number(text, float)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v:g}")
    return v


def finite_float(text: str) -> float:
    return _number(text, float)


def torch_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` of a device this machine has."""
    import argparse

    import torch

    t = text.strip()
    if not (t in ("cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if t.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{t}: CUDA is not available on this machine")
        if ":" in t and int(t[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{t}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return t
