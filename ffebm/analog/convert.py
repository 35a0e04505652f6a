"""``convert_to_analog`` / ``convert_to_digital``: move a model's layers onto tiles and back.

``convert_to_analog`` maps ``nn.Linear`` -> :class:`AnalogLinear`, ``nn.Conv1d`` / ``nn.Conv2d``
-> :class:`AnalogConv1d` / :class:`AnalogConv2d` (any padding, padding mode, stride, dilation) and
grouped or depthwise convolutions -> :class:`AnalogGroupedConv` (one tile per group). Layers with
weights it cannot map (``nn.Conv3d``, transposed convolutions, ``nn.Bilinear``, subclasses of
``nn.Linear`` whose weight other code reads directly, such as attention's ``out_proj``) stay
digital with one warning listing them (``skip_unsupported=False``: an error instead).

``convert_to_digital`` is the inverse: every analog layer (and analog energy coupling) becomes its
digital layer holding the weights as programmed on its tile.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Iterable, Optional, Set, Tuple, Type, Union

import torch
from torch import nn

from .config import InvalidSetting
from .conv import AnalogConv1d, AnalogConv2d, AnalogGroupedConv, _AnalogConvNd
from .devices import PulsedDevice
from .inference import InferenceConfig
from .inference_layers import InferenceConv1d, InferenceConv2d, InferenceLinear, InferenceModule, _InferenceConvNd
from .layers import AnalogConfig, AnalogLinear

__all__ = ["convert_to_analog", "convert_to_digital", "SUPPORTED", "UnsupportedLayers"]

#: layer types convert_to_analog maps (exact types: subclasses may use their weight elsewhere)
SUPPORTED: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


class UnsupportedLayers(UserWarning):
    """convert_to_analog left layers with weights digital (it cannot map them)."""


def _check_config(config: Any, owner: str) -> Union[AnalogConfig, InferenceConfig]:
    if config is None:
        return AnalogConfig()
    if isinstance(config, InferenceConfig):
        return config
    if isinstance(config, PulsedDevice):
        raise InvalidSetting(owner, "config", f"{type(config).__name__}(...)",
                             f"an AnalogConfig; a device model goes inside it: "
                             f"AnalogConfig(device={type(config).__name__}())")
    if not isinstance(config, AnalogConfig):
        raise InvalidSetting(owner, "config", f"{type(config).__name__}(...)",
                             "an AnalogConfig, an InferenceConfig or None")
    return config


def _has_weight_layer(mod: nn.Module) -> bool:
    """A layer that holds a weight matrix or kernel a user may expect on a tile."""
    return isinstance(mod, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)) and not isinstance(
        mod, (AnalogLinear, _AnalogConvNd, InferenceModule))


def _parse_selection(model: nn.Module, items: Any, what: str) -> Tuple[Set[str], Set[type]]:
    names: Set[str] = set()
    types: Set[type] = set()
    if items is None:
        return names, types
    if isinstance(items, (str, type)):
        items = [items]
    for item in items:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.add(item)
        else:
            raise InvalidSetting("convert_to_analog", what, item, "module names (str) or module classes")
    known = {n for n, _ in model.named_modules()}
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise InvalidSetting("convert_to_analog", what, missing,
                             "names of sub-modules of the model (see model.named_modules())")
    return names, types


def _under(name: str, names: Set[str]) -> bool:
    return any(name == n or n == "" or name.startswith(n + ".") for n in names)


def convert_to_analog(model: nn.Module, config: Optional[AnalogConfig] = None,
                      layers: Optional[Iterable[Union[str, type]]] = None,
                      exclude: Optional[Iterable[Union[str, type]]] = None,
                      skip_unsupported: bool = True, inplace: bool = False,
                      seed: Optional[int] = None) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` sub-modules (grouped convolutions
    included) by analog layers holding the same weights (programmed onto the tiles, clipped to the
    device bounds unless ``config.weight_scaling_omega`` rescales them); biases stay digital.

    Args:
        model: the model (a deep copy is converted unless ``inplace``).
        config: :class:`AnalogConfig` of every converted layer (default ``AnalogConfig()``), or an
            :class:`~ffebm.analog.inference.InferenceConfig`: inference layers
            (:class:`~ffebm.analog.inference_layers.InferenceLinear`, ``InferenceConv1d/2d``,
            grouped convolutions included) holding the weights as ordinary parameters, read
            through the inference read model, trained by any torch optimizer.
        layers: which layers: None = every supported layer; otherwise module names (as in
            ``model.named_modules()``; a name selects that module and everything below it)
            and/or layer classes (``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``).
        exclude: names and/or classes to keep digital (applied after ``layers``), e.g. the first
            and last layer: ``exclude=["conv1", "fc"]``.
        skip_unsupported: layers with weights that cannot be mapped (``nn.Conv3d``, transposed
            convolutions, ``nn.Bilinear``, subclasses of ``nn.Linear`` / ``nn.Conv*``) stay
            digital with one :class:`UnsupportedLayers` warning listing them; False: raise
            :class:`InvalidSetting` listing them, before anything is converted.
        seed: base seed of the tiles (layer k gets ``seed + k``; a grouped conv one per group);
            None = random.
    Returns the converted model. A model that is itself a supported layer is returned converted.
    """
    config = _check_config(config, "convert_to_analog")
    names, types = _parse_selection(model, layers, "layers")
    ex_names, ex_types = _parse_selection(model, exclude, "exclude")

    def selected(name: str, mod: nn.Module) -> bool:
        if layers is not None and not (type(mod) in types or _under(name, names)):
            return False
        return not (type(mod) in ex_types or _under(name, ex_names))

    chosen, unsupported = [], []
    for name, mod in model.named_modules():
        if not _has_weight_layer(mod) or not selected(name, mod):
            continue
        if type(mod) in SUPPORTED:
            chosen.append(name)
        else:
            unsupported.append(f"{name or '<model>'} ({type(mod).__name__})")
    if unsupported:
        listing = ", ".join(unsupported)
        if not skip_unsupported:
            raise InvalidSetting("convert_to_analog", "model", f"{len(unsupported)} layer(s)",
                                 f"layers convert_to_analog can map (Linear, Conv1d, Conv2d); cannot map: "
                                 f"{listing} (skip_unsupported=True leaves them digital)")
        warnings.warn(f"convert_to_analog: {len(unsupported)} layer(s) left digital (cannot be mapped onto "
                      f"tiles): {listing}", UnsupportedLayers, stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    counter = [0]

    def make(mod: nn.Module) -> nn.Module:
        s = None if seed is None else int(seed) + counter[0]
        if isinstance(config, InferenceConfig):  # inference tiles (grouped convolutions: one module)
            counter[0] += 1
            if isinstance(mod, nn.Linear):
                return InferenceLinear.from_linear(mod, config, seed=s)
            cls = InferenceConv1d if isinstance(mod, nn.Conv1d) else InferenceConv2d
            return cls.from_conv(mod, config, seed=s)
        if isinstance(mod, nn.Linear):
            counter[0] += 1
            return AnalogLinear.from_linear(mod, config, seed=s)
        if mod.groups > 1:
            counter[0] += mod.groups
            return AnalogGroupedConv.from_conv(mod, config, seed=s)
        counter[0] += 1
        cls = AnalogConv1d if isinstance(mod, nn.Conv1d) else AnalogConv2d
        return cls.from_conv(mod, config, seed=s)

    if "" in chosen:
        return make(model)
    wanted = set(chosen)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if full in wanted:
                setattr(mod, cname, make(child))
    return model


# ----------------------------------------------------------------------------------------------
# back to digital
# ----------------------------------------------------------------------------------------------


def _effective(m: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of an analog layer as its reads see them (``effective_weight``)."""
    if isinstance(m, InferenceModule):  # the trained weights (what the optimizer holds)
        return m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()
    if isinstance(m, AnalogGroupedConv):
        parts = [_effective(c) for c in m.groups_]
        return torch.cat([w for w, _ in parts]), (None if parts[0][1] is None else torch.cat([b for _, b in parts]))
    return m.effective_weight(), m.get_weights()[1]


def _digital_conv(m: Any, w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Module:
    n = len(m.kernel_size)
    cls = nn.Conv1d if n == 1 else nn.Conv2d
    groups = m.groups if isinstance(m, (AnalogGroupedConv, _InferenceConvNd)) else 1
    out = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, groups,
              b is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def _is_analog(m: nn.Module) -> bool:
    from .energy import AnalogConvCoupling, AnalogDenseCoupling

    return isinstance(m, (AnalogLinear, _AnalogConvNd, AnalogGroupedConv, AnalogDenseCoupling, AnalogConvCoupling,
                          InferenceModule))


def _to_digital(m: nn.Module, w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Module:
    """The digital twin of one analog module, holding ``(w, b)``."""
    from ..couplings import ConvCoupling, DenseCoupling
    from .energy import AnalogConvCoupling, AnalogDenseCoupling

    from .inference_energy import InferenceConvCoupling, InferenceDenseCoupling

    if isinstance(m, (_AnalogConvNd, AnalogGroupedConv, _InferenceConvNd)):
        return _digital_conv(m, w, b)
    if isinstance(m, InferenceDenseCoupling):
        out = DenseCoupling(m.in_shape, m.out_features, b is not None).to(device=w.device, dtype=w.dtype)
    elif isinstance(m, InferenceConvCoupling):
        out = ConvCoupling(m.in_channels, m.out_channels, m.in_size, m.kernel_size, m.stride, m.padding,
                           m.pool, m.pool_size if m.pool != "none" else 2, m.soft_temperature,
                           b is not None).to(device=w.device, dtype=w.dtype)
    elif isinstance(m, (AnalogLinear, InferenceLinear)):
        out = nn.Linear(m.in_features, m.out_features, b is not None, device=w.device, dtype=w.dtype)
    elif isinstance(m, AnalogDenseCoupling):
        out = DenseCoupling(m.in_shape, m.out_features, b is not None).to(device=w.device, dtype=w.dtype)
    elif isinstance(m, AnalogConvCoupling):
        out = ConvCoupling(m.in_channels, m.out_channels, m.in_size, m.kernel_size, m.stride, m.padding,
                           m.pool, m.pool_size if m.pool != "none" else 2, m.soft_temperature,
                           b is not None).to(device=w.device, dtype=w.dtype)
    else:  # pragma: no cover - guarded by _is_analog
        raise TypeError(type(m).__name__)
    with torch.no_grad():
        out.weight.copy_(w.reshape(out.weight.shape))
        if b is not None:
            out.bias.copy_(b)
    return out


def convert_to_digital(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every analog layer by its digital layer holding its current *effective* weights
    (``effective_weight()``: what the reads see, ``out_scale * (W_tile + extra)`` with a Tiki-Taka
    fast array's contribution ``extra`` while an optimizer uses one; the read noise of single
    reads is not part of it): ``AnalogLinear`` -> ``nn.Linear``, ``AnalogConv1d/2d`` ->
    ``nn.Conv1d/2d``, ``AnalogGroupedConv`` -> a grouped ``nn.Conv*``, analog energy couplings ->
    ``DenseCoupling`` / ``ConvCoupling``, and an energy block's ``AnalogEP`` -> ``EP``. Inference
    layers and couplings become their digital layers holding their *trained* weights (``weight``,
    whatever a deployment reads), ``InferenceEP`` / ``InferenceImplicit`` -> ``EP`` / ``Implicit``.
    The result loads into the digital model the analog one was converted from, strictly:
    ``digital.load_state_dict(convert_to_digital(analog).state_dict())``.
    Returns the converted model (a deep copy unless ``inplace``)."""
    from ..blocks.base import EnergyBlock
    from ..gradients.ep import EP
    from ..gradients.implicit import Implicit
    from .energy import AnalogEP
    from .inference_energy import InferenceEP, InferenceImplicit

    # effective weights from the model itself: a copy has no optimizer runtime (fast array)
    eff = {name: _effective(m) for name, m in model.named_modules() if _is_analog(m)}
    if not inplace:
        model = copy.deepcopy(model)
    if "" in eff:
        return _to_digital(model, *eff[""])
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if full in eff and _is_analog(child):
                setattr(mod, cname, _to_digital(child, *eff[full]))
    for mod in model.modules():
        if isinstance(mod, EnergyBlock) and isinstance(getattr(mod, "gradient", None), (AnalogEP, InferenceEP)):
            g = mod.gradient
            kw = {f.name: getattr(g, f.name) for f in dataclasses.fields(EP) if f.init}
            mod.gradient = EP(**kw)
        elif isinstance(mod, EnergyBlock) and isinstance(getattr(mod, "gradient", None), InferenceImplicit):
            g = mod.gradient
            mod.gradient = Implicit(**{f.name: getattr(g, f.name) for f in dataclasses.fields(Implicit) if f.init})
    return model
