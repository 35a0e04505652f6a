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


def _ranged(kind, name: str, lo=None, hi=None, lo_open: bool = False, hi_text: str = ""):
    """An argparse type: a finite number of ``kind`` in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str):
        import argparse

        v = _number(text, kind)
        shown = f"{v:g}" if kind is float else str(v)
        below = lo is not None and (v <= lo if lo_open else v < lo)
        if hi is not None and (below or v > hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi_text or hi}], got {shown}")
        if below:
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {shown}")
        return v

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _ranged(int, "positive_int", lo=1)
non_negative_int = _ranged(int, "non_negative_int", lo=0)
seed = _ranged(int, "seed", lo=0, hi=2 ** 63 - 1, hi_text="2**63 - 1")
positive_float = _ranged(float, "positive_float", lo=0, lo_open=True)
non_negative_float = _ranged(float, "non_negative_float", lo=0)


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
