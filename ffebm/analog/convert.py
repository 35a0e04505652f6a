"""``convert_to_analog``: move chosen ``nn.Linear`` / ``nn.Conv2d`` layers of a model onto tiles."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Sequence, Union

from torch import nn

from .config import InvalidSetting
from .layers import AnalogConfig, AnalogConv2d, AnalogLinear

__all__ = ["convert_to_analog"]


def convert_to_analog(model: nn.Module, config: Optional[AnalogConfig] = None,
                      layers: Optional[Iterable[Union[str, type]]] = None, inplace: bool = False,
                      seed: Optional[int] = None) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` sub-modules by :class:`AnalogLinear` /
    :class:`AnalogConv2d` holding the same weights (programmed onto the tiles, clipped to the
    device bounds unless ``config.weight_scaling_omega`` rescales them); biases stay digital.

    Args:
        model: the model (a deep copy is converted unless ``inplace``).
        config: :class:`AnalogConfig` of every converted layer (default ``AnalogConfig()``).
        layers: which layers: None = every Linear and Conv2d; otherwise an iterable of qualified
            module names (as in ``model.named_modules()``; a name converts that module or every
            Linear/Conv2d below it) and/or the classes ``nn.Linear`` / ``nn.Conv2d``.
        seed: base seed of the tiles (layer k gets ``seed + k``); None = random.
    Returns the converted model. A model that is itself a Linear/Conv2d is returned converted.
    """
    if config is None:
        config = AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise InvalidSetting("convert_to_analog", "config", config, "an AnalogConfig or None")
    names, types = set(), set()
    if layers is not None:
        if isinstance(layers, (str, type)):
            layers = [layers]
        for item in layers:
            if isinstance(item, str):
                names.add(item)
            elif item in (nn.Linear, nn.Conv2d):
                types.add(item)
            else:
                raise InvalidSetting("convert_to_analog", "layers", item,
                                     "module names (str), nn.Linear or nn.Conv2d")
        known = {n for n, _ in model.named_modules()}
        missing = sorted(n for n in names if n not in known)
        if missing:
            raise InvalidSetting("convert_to_analog", "layers", missing,
                                 "names of sub-modules of the model (see model.named_modules())")
    if not inplace:
        model = copy.deepcopy(model)

    def chosen(name: str, mod: nn.Module) -> bool:
        if type(mod) not in (nn.Linear, nn.Conv2d):
            return False
        if layers is None:
            return True
        if type(mod) in types:
            return True
        return any(name == n or n == "" or name.startswith(n + ".") for n in names)

    counter = [0]

    def make(mod: nn.Module) -> nn.Module:
        s = None if seed is None else int(seed) + counter[0]
        counter[0] += 1
        if isinstance(mod, nn.Linear):
            return AnalogLinear.from_linear(mod, config, seed=s)
        return AnalogConv2d.from_conv(mod, config, seed=s)

    if chosen("", model):
        return make(model)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if chosen(full, child):
                setattr(mod, cname, make(child))
    return model
