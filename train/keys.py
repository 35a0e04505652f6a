"""The configuration as users read it: ``python -m train --list`` (every key with its type, the
recipe's value, default, allowed values and help) and the configuration printed at the start of a
run.  The help is the comment beside each field of :class:`train.config.TrainConfig`."""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Dict, Optional

from .config import CHOICES, RUNTIME_KEYS, TrainConfig, _hints, _type_name, to_dict


def format_config(cfg: TrainConfig) -> str:
    d = to_dict(cfg)
    width = max(len(k) for k in d)
    return "\n".join(f"  {k:<{width}} = {json.dumps(v)}" for k, v in d.items())


def key_help() -> Dict[str, str]:
    """One line of help per key: the comment beside the field in :class:`TrainConfig` (and the
    comment lines continuing it), read from this file's source, so it cannot drift."""
    import inspect
    import re

    out: Dict[str, str] = {}
    last = None
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if m:
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
            continue
        c = re.match(r"\s+#\s*(.*)$", line)
        if c and last is not None and out.get(last):
            out[last] += " " + c.group(1).strip()
        else:
            last = None
    return out


def describe_keys(cfg: Optional[TrainConfig] = None) -> str:
    """Every key: type, value (the recipe's, when ``cfg`` is given, else the default), default,
    allowed values and one line of help. Runtime keys (changeable on resume) are marked *."""
    hints = _hints()
    default = TrainConfig()
    helps = key_help()
    shown = cfg if cfg is not None else default
    lines = [f"  {'key':<22} {'type':<14} {'value':<22} {'(default)':<14} help"]
    for f in fields(TrainConfig):
        v, d = getattr(shown, f.name), getattr(default, f.name)
        choices = CHOICES.get(f.name)
        extra = f" [{'|'.join('none' if c is None else str(c) for c in choices)}]" if choices else ""
        mark = "*" if f.name in RUNTIME_KEYS else " "
        dflt = "" if v == d else f"({json.dumps(d)})"
        lines.append(f" {mark}{f.name:<22} {_type_name(hints[f.name]):<14} {json.dumps(v):<22} {dflt:<14} "
                     f"{helps.get(f.name, '')}{extra}")
    lines.append("  * runtime keys: may be changed with --resume")
    return "\n".join(lines)
