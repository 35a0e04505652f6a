"""Analog layers: ``AnalogLinear`` (here) and the convolutions of :mod:`ffebm.analog.conv`,
whose weights live on an :class:`~ffebm.analog.tile.AnalogTile`.

Forward: ``y = W x`` through the tile's forward read model (conv: one read per patch, patches
from ``unfold`` / im2col). Backward: ``dL/dx = W^T d`` through the tile's backward read model.
The weight update does *not* use a dense gradient: the backward pass records the pair
``(x, d)`` (batch inputs and output gradients, conv: one pair per patch) in the weight's
:class:`~ffebm.analog.context.AnalogContext` (``layer.weight.analog_ctx``) -- exactly when torch
would accumulate a gradient into ``weight.grad`` -- and
:class:`~ffebm.analog.optimizer.AnalogOptimizer` turns the pending pairs into pulsed
outer-product updates (the way the hardware does it). ``weight.grad`` stays ``None``
unless the layer's config asks for ``dense_grad=True`` (for inspection / digital baselines).

``layer.weight`` is a *mirror* of the tile in network units (``out_scale * W_tile``), refreshed
on every forward and after every optimizer step; write weights with ``layer.set_weights(w)``
(programming, clipped to the device bounds), not through ``weight.data``. The bias is digital
(an ordinary parameter: train it with an ordinary torch optimizer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.autograd.graph import get_gradient_edge

from .config import InvalidSetting, IOConfig, UpdateConfig, Validated, check_range
from .context import AnalogContext
from .devices import PulsedDevice, device_from_name
from .tile import AnalogTile, _check_before_load

__all__ = ["AnalogConfig", "AnalogLinear", "is_analog_parameter", "analog_context",
           "analog_parameters", "digital_parameters"]


@dataclass
class AnalogConfig(Validated):
    """How a layer's weight is held on a tile.

    ``device``: device model (a :class:`PulsedDevice` or its name; None = ``ConstantStep()``,
    the tile default); ``io`` / ``bwd_io``: read models (None = published defaults;
    ``IOConfig.perfect()`` for exact reads); ``update``: pulsed-update settings; ``max_size``:
    largest physical array; ``weight_scaling_omega``: if set, programming maps the largest |w|
    of each output row to this many tile units (digital output scale); ``dense_grad``: also
    give ``weight.grad`` the dense gradient.
    """

    device: Any = None
    io: Optional[IOConfig] = None
    bwd_io: Optional[IOConfig] = None
    update: Optional[UpdateConfig] = None
    max_size: int = 512
    weight_scaling_omega: Optional[float] = None
    dense_grad: bool = False

    def __post_init__(self) -> None:
        o = type(self).__name__
        if isinstance(self.device, str):
            self.device = device_from_name(self.device)
        if self.device is not None and not isinstance(self.device, PulsedDevice):
            raise InvalidSetting(o, "device", self.device, "a PulsedDevice, a device name or None")
        for name, typ in (("io", IOConfig), ("bwd_io", IOConfig), ("update", UpdateConfig)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, typ):
                raise InvalidSetting(o, name, v, f"a {typ.__name__} or None")
        check_range(o, "max_size", self.max_size, 1, None, integer=True)
        if self.weight_scaling_omega is not None:
            check_range(o, "weight_scaling_omega", self.weight_scaling_omega, 0, None, lo_open=True)
        if not isinstance(self.dense_grad, bool):
            raise InvalidSetting(o, "dense_grad", self.dense_grad, "True or False")

    def make_tile(self, out_size: int, in_size: int, seed: Optional[int] = None,
                  device: Any = None, dtype: Optional[torch.dtype] = None) -> AnalogTile:
        return AnalogTile(out_size, in_size, self.device, io=self.io, bwd_io=self.bwd_io,
                          update=self.update, max_size=self.max_size, seed=seed, device=device,
                          dtype=dtype or torch.get_default_dtype(),
                          weight_scaling_omega=self.weight_scaling_omega)


def is_analog_parameter(p: Any) -> bool:
    """True for the weight parameter of an analog layer (held on a tile)."""
    return isinstance(p, Tensor) and isinstance(getattr(p, "analog_ctx", None), AnalogContext)


def analog_context(p: Tensor) -> AnalogContext:
    """The :class:`AnalogContext` of an analog weight (ValueError for any other tensor)."""
    ctx = getattr(p, "analog_ctx", None)
    if not isinstance(ctx, AnalogContext):
        raise ValueError(f"tensor of shape {tuple(p.shape)} is not an analog weight (no AnalogContext)")
    return ctx


def _analog_layers(model: nn.Module) -> List["_AnalogLayer"]:
    return [m for m in model.modules() if isinstance(m, _AnalogLayer)]


def analog_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The analog weights of ``model`` (for :class:`AnalogOptimizer`)."""
    out = []
    for m in _analog_layers(model):
        m._link()
        out.append(m.weight)
    return out


def digital_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter of ``model`` that is not an analog weight (for an ordinary torch optimizer)."""
    ids = {id(p) for p in analog_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


class _AnalogMVM(torch.autograd.Function):
    """y = read_fwd(x); dx = read_bwd(dy); records (x, dy) in the weight's AnalogContext when
    this backward accumulates into the weight (``loss.backward()``, not ``autograd.grad(y, x)``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, layer: "_AnalogLayer") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.analog_ctx = layer.analog_ctx
        ctx.edge = get_gradient_edge(weight) if weight.requires_grad else None
        ctx.save_for_backward(x)
        return layer._read_forward(x)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        from ..function import will_accumulate

        (x,) = ctx.saved_tensors
        layer = ctx.layer
        gx = layer._read_backward(gy) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            x2 = x.detach().reshape(-1, x.shape[-1])
            d2 = gy.detach().reshape(-1, gy.shape[-1])
            recorded = will_accumulate(ctx.edge)
            if recorded:
                ctx.analog_ctx.record(x2, d2)
            # dense where asked for without being recorded (autograd.grad(loss, weight)) or by config
            if not recorded or layer.config.dense_grad:
                gw = (d2.t() @ x2).reshape(ctx.weight_shape).to(ctx.weight_dtype)
        return gx, gw, None


class _AnalogLayer(nn.Module):
    """Shared machinery: a tile, a mirror weight parameter, reads, state."""

    tile: AnalogTile
    weight: nn.Parameter

    def _init_analog(self, out_size: int, in_size: int, weight_shape: Tuple[int, ...],
                     config: Optional[AnalogConfig], seed: Optional[int], device: Any,
                     dtype: Optional[torch.dtype]) -> None:
        if config is None:
            config = AnalogConfig()
        if not isinstance(config, AnalogConfig):
            hint = (f"; a device model goes inside it: AnalogConfig(device={getattr(config, '__name__', type(config).__name__)}())"
                    if isinstance(config, PulsedDevice) or (isinstance(config, type) and issubclass(config, PulsedDevice))
                    else "")
            raise InvalidSetting(type(self).__name__, "config", f"{getattr(config, '__name__', type(config).__name__)}(...)",
                                 "an AnalogConfig or None" + hint)
        self.config = config
        dtype = dtype or torch.get_default_dtype()
        self.tile = config.make_tile(out_size, in_size, seed=seed, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.zeros(weight_shape, device=self.tile.device, dtype=dtype))
        self.analog_ctx = AnalogContext(self.tile, type(self).__name__)
        self._link()
        self.register_load_state_dict_pre_hook(_check_before_load)
        self.register_state_dict_pre_hook(_sync_before_save)

    def _link(self) -> None:
        """Point the weight at this layer's AnalogContext (a copied or moved Parameter loses
        its Python attributes, so this is repeated before every use)."""
        if self.analog_ctx.tile is not self.tile:  # tile replaced (e.g. by load_state_dict remap)
            self.analog_ctx = AnalogContext(self.tile, type(self).__name__)
        if getattr(self.weight, "analog_ctx", None) is not self.analog_ctx:
            self.weight.analog_ctx = self.analog_ctx

    # -- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def _refresh(self) -> None:
        """Sync the mirror ``weight`` with the tile (every read and optimizer step does). A value
        written into ``weight`` since the last sync (``weight.data``, ``weight.copy_`` under
        ``no_grad``, ``nn.init``, a torch optimizer's step) is *programmed* onto the tile first
        (clipped to the device bounds, as :meth:`set_weights`), never silently overwritten."""
        self._link()
        self.analog_ctx.sync(self.weight)

    @torch.no_grad()
    def set_weights(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Program ``weight`` (network units, the shape of ``layer.weight``; clipped to the device
        bounds) onto the tile and, if given, copy ``bias`` into the digital bias."""
        w = torch.as_tensor(weight)
        if tuple(w.shape) not in (tuple(self.weight.shape), (self.tile.out_size, self.tile.in_size)):
            raise ValueError(f"{type(self).__name__}.set_weights: weight of shape {list(w.shape)}, expected "
                             f"{list(self.weight.shape)}")
        if bias is not None:
            b = torch.as_tensor(bias)
            if getattr(self, "bias", None) is None:
                raise ValueError(f"{type(self).__name__}.set_weights: got a bias, but the layer has none")
            if b.shape != self.bias.shape:
                raise ValueError(f"{type(self).__name__}.set_weights: bias of shape {list(b.shape)}, expected "
                                 f"{list(self.bias.shape)}")
        self._link()
        self.tile.set_weights(w.reshape(self.tile.out_size, self.tile.in_size).to(self.tile.out_scale))
        self.analog_ctx.forget_mirror()
        self._refresh()
        if bias is not None:
            self.bias.copy_(b.to(self.bias))

    def get_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)``: the weight as programmed on the tile (network units, the shape of
        ``layer.weight``) and a copy of the digital bias (None without one)."""
        self._refresh()
        bias = getattr(self, "bias", None)
        return (self.tile.get_weights().reshape(self.weight.shape),
                None if bias is None else bias.detach().clone())

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """Network-unit weight the reads see, ``out_scale * (W_tile_read + extra)`` (``extra``: a
        Tiki-Taka fast array's contribution while one is in use), in ``weight``'s shape."""
        self._refresh()  # a write into ``weight`` reaches the tile first
        W = self.tile.tile_weights(read=True)
        extra = self._extra()
        if extra is not None:
            W = W + extra.to(W)
        return (self.tile.out_scale.unsqueeze(1) * W).reshape(self.weight.shape)

    def read_weight(self, like: Tensor) -> Tensor:
        """The effective weight as a differentiable function of ``weight``: its *values* are what
        the reads see (:meth:`effective_weight`), its *gradient* flows to ``weight`` unchanged
        (``weight + (W_eff - weight).detach()``), so energy terms built on it (``phi``) are
        differentiable to any order in the states and the weight (Implicit's adjoint needs the
        mixed second derivative)."""
        w = self.weight.to(dtype=like.dtype, device=like.device)
        return w + (self.effective_weight().to(w) - w).detach()

    @torch.no_grad()
    def _copy_from(self, weight: Tensor, bias: Optional[Tensor]) -> "_AnalogLayer":
        """Program a digital layer's weight onto the tile and copy its bias."""
        self.set_weights(weight.detach(), None if bias is None else bias.detach())
        return self

    def _init_like_torch(self, fan_in: int, bias: bool) -> None:
        """Weight and bias initialised as ``nn.Linear`` / ``nn.Conv*`` do (Kaiming-uniform weight,
        uniform bias in +-1/sqrt(fan_in), from the global RNG); the weight is programmed onto the tile."""
        w = torch.empty(self.weight.shape, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1 / math.sqrt(fan_in)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.weight.shape[0], device=self.weight.device,
                                                 dtype=self.weight.dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.set_weights(w.to(self.weight.device))
        self.register_load_state_dict_post_hook(_post_load_hook)

    # -- reads ----------------------------------------------------------------------------
    def _extra(self) -> Optional[Tensor]:
        return self.analog_ctx.read_extra()

    def _read_forward(self, x: Tensor, columns: bool = False) -> Tensor:
        """Forward read of the tile (plus the algorithm's extra matrix); ``columns``: x is
        [B, in, L], one input vector per column (see :meth:`AnalogTile.forward`)."""
        y = self.tile.forward(x, columns)
        extra = self._extra()
        if extra is not None:
            from .tile import read_forward
            y = y + read_forward(extra, x, self.tile.io, self.tile.generator, columns) * self.tile._scale_for(y, columns)
        return y

    def _read_backward(self, d: Tensor, columns: bool = False) -> Tensor:
        """Transposed read of the tile (plus the algorithm's extra matrix); ``columns``: d is
        [B, out, L]."""
        z = self.tile.backward(d, columns)
        extra = self._extra()
        if extra is not None:
            from .tile import read_backward
            z = z + read_backward(extra, d * self.tile._scale_for(d, columns), self.tile.bwd_io,
                                  self.tile.generator, columns)
        return z

    def _mvm(self, x: Tensor) -> Tensor:
        self._link()
        self._refresh()
        if not torch.is_grad_enabled():  # no_grad / inference_mode: a plain read, no graph
            return self._read_forward(x)
        return _AnalogMVM.apply(x, self.weight, self)

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"rng": self.tile.generator.get_state()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._pending_rng = state.get("rng")
        # applied after the tile's own state (see _post_load)

    def _post_load(self) -> None:
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            if rng.numel() == self.tile.generator.get_state().numel():  # (not across device types)
                self.tile.generator.set_state(rng.cpu().to(torch.uint8))
            self._pending_rng = None
        self._link()
        if not self.__dict__.pop("_program_loaded_weight", False):
            self.analog_ctx.forget_mirror()  # the loaded tile is the truth, not the loaded mirror
        self._refresh()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # copy.deepcopy / pickle rebuild the weight Parameter without its Python attributes:
        # link it again at once, so that model.parameters() of a copy still tells analog weights
        super().__setstate__(state)
        if "analog_ctx" in self.__dict__ and "tile" in self._modules:
            self._link()

    def _apply(self, fn, recurse: bool = True):
        if "analog_ctx" in self.__dict__:
            self._refresh()  # a write into ``weight`` made before the move reaches the tile
        out = super()._apply(fn, recurse)
        self._link()
        self.analog_ctx.forget_mirror()
        self._refresh()
        return out


def _sync_before_save(module, prefix, keep_vars) -> None:
    """``state_dict`` pre-hook: a write into ``weight`` reaches the tile before both are saved."""
    module._refresh()


def _post_load_hook(module, incompatible_keys):
    for m in module.modules():
        if isinstance(m, _AnalogLayer):
            m._post_load()


class AnalogLinear(_AnalogLayer):
    """``nn.Linear`` with its weight on an analog tile (bias digital).

    Args: ``in_features``, ``out_features``, ``bias``, ``config`` (:class:`AnalogConfig`),
    ``seed`` (device spread, read noise), ``device``, ``dtype``. The weight is initialised as
    ``nn.Linear`` does (Kaiming-uniform from the global RNG) and programmed onto the tile.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Optional[AnalogConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_range("AnalogLinear", "in_features", in_features, 1, None, integer=True)
        check_range("AnalogLinear", "out_features", out_features, 1, None, integer=True)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_analog(self.out_features, self.in_features, (self.out_features, self.in_features),
                          config, seed, device, dtype)
        self._init_like_torch(self.in_features, bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear, config: Optional[AnalogConfig] = None,
                    seed: Optional[int] = None) -> "AnalogLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, config, seed,
                device=lin.weight.device, dtype=lin.weight.dtype)
        return m._copy_from(lin.weight, lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"AnalogLinear({self.in_features}, {self.out_features}): expected input [..., "
                             f"{self.in_features}], got {list(x.shape)}")
        y = self._mvm(x)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
