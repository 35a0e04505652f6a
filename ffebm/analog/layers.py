"""Analog layers: ``AnalogLinear`` and ``AnalogConv2d`` whose weights live on an
:class:`~ffebm.analog.tile.AnalogTile`.

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
from .tile import AnalogTile

__all__ = ["AnalogConfig", "AnalogLinear", "AnalogConv2d", "is_analog_parameter", "analog_context",
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
            raise InvalidSetting(type(self).__name__, "config", config, "an AnalogConfig or None")
        self.config = config
        dtype = dtype or torch.get_default_dtype()
        self.tile = config.make_tile(out_size, in_size, seed=seed, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.zeros(weight_shape, device=self.tile.device, dtype=dtype))
        self.analog_ctx = AnalogContext(self.tile, type(self).__name__)
        self._link()

    def _link(self) -> None:
        """Point the weight at this layer's AnalogContext (a copied or moved Parameter loses
        its Python attributes, so this is repeated before every use)."""
        if self.analog_ctx.tile is not self.tile:  # tile replaced (e.g. by load_state_dict remap)
            self.analog_ctx = AnalogContext(self.tile, type(self).__name__)
        if getattr(self.weight, "analog_ctx", None) is not self.analog_ctx:
            self.weight.analog_ctx = self.analog_ctx

    # -- weights --------------------------------------------------------------------------
    @torch.no_grad()
    def _refresh(self) -> None:
        w = self.tile.get_weights()
        if self.weight.device != w.device:
            self.weight.data = self.weight.data.to(w.device)
        self.weight.data.copy_(w.reshape(self.weight.shape))

    @torch.no_grad()
    def set_weights(self, w: Tensor) -> None:
        """Program weights (network units, the shape of ``weight``); clipped to device bounds."""
        w = torch.as_tensor(w)
        self.tile.set_weights(w.reshape(self.tile.out_size, self.tile.in_size).to(self.tile.out_scale))
        self._refresh()

    def get_weights(self) -> Tensor:
        return self.tile.get_weights().reshape(self.weight.shape)

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """Network-unit weight the reads see, ``out_scale * (W_tile_read + extra)`` (``extra``: a
        Tiki-Taka fast array's contribution while one is in use), in ``weight``'s shape."""
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
        self.set_weights(weight.detach())
        if bias is not None:
            self.bias.copy_(bias)
        return self

    # -- reads ----------------------------------------------------------------------------
    def _extra(self) -> Optional[Tensor]:
        return self.analog_ctx.read_extra()

    def _read_forward(self, x: Tensor) -> Tensor:
        y = self.tile.forward(x)
        extra = self._extra()
        if extra is not None:
            from .tile import read_forward
            y = y + read_forward(extra, x, self.tile.io, self.tile.generator) * self.tile.out_scale.to(y.dtype)
        return y

    def _read_backward(self, d: Tensor) -> Tensor:
        z = self.tile.backward(d)
        extra = self._extra()
        if extra is not None:
            from .tile import read_backward
            z = z + read_backward(extra, d * self.tile.out_scale.to(d.dtype), self.tile.bwd_io,
                                  self.tile.generator)
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
            self.tile.generator.set_state(rng.cpu())
            self._pending_rng = None
        self._refresh()

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._link()
        return out


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
        w = torch.empty(self.out_features, self.in_features, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=self.weight.device,
                                                 dtype=self.weight.dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.set_weights(w.to(self.weight.device))
        self.register_load_state_dict_post_hook(_post_load_hook)

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


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class AnalogConv2d(_AnalogLayer):
    """``nn.Conv2d`` (groups 1, zero padding) with its weight on a tile of shape
    ``out_channels x (in_channels * kh * kw)``: im2col (``unfold``) patches are read one by
    one (forward), the backward read is the transposed tile read folded back, and the update
    pulses one ``(patch, output gradient)`` pair per output position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True,
                 config: Optional[AnalogConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        o = "AnalogConv2d"
        check_range(o, "in_channels", in_channels, 1, None, integer=True)
        check_range(o, "out_channels", out_channels, 1, None, integer=True)
        if groups != 1:
            raise InvalidSetting(o, "groups", groups, "1 (grouped convolutions are not supported)")
        if isinstance(padding, str):
            raise InvalidSetting(o, "padding", padding, "an int or a pair of ints")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        for name in ("kernel_size", "stride", "dilation"):
            for v in getattr(self, name):
                check_range(o, name, v, 1, None, integer=True)
        for v in self.padding:
            check_range(o, "padding", v, 0, None, integer=True)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        self._init_analog(self.out_channels, fan_in, (self.out_channels, self.in_channels, kh, kw),
                          config, seed, device, dtype)
        w = torch.empty(self.out_channels, self.in_channels, kh, kw, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1 / math.sqrt(fan_in)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=self.weight.device,
                                                 dtype=self.weight.dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.set_weights(w.to(self.weight.device))
        self.register_load_state_dict_post_hook(_post_load_hook)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: Optional[AnalogConfig] = None,
                  seed: Optional[int] = None) -> "AnalogConv2d":
        if conv.padding_mode != "zeros":
            raise InvalidSetting("AnalogConv2d", "padding_mode", conv.padding_mode, "'zeros'")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, config, seed,
                device=conv.weight.device, dtype=conv.weight.dtype)
        return m._copy_from(conv.weight, conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"AnalogConv2d({self.in_channels}, {self.out_channels}): expected input [N, "
                             f"{self.in_channels}, H, W] or [{self.in_channels}, H, W], got {list(x.shape)}")
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # [N, C*kh*kw, L]
        y = self._mvm(cols.transpose(1, 2))  # [N, L, out]
        y = y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")
