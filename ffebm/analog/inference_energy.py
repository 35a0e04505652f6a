"""Energy blocks on inference tiles: couplings read through the inference read model, gradients
computed digitally.

:class:`InferenceDenseCoupling` / :class:`InferenceConvCoupling` are a
:class:`~ffebm.couplings.DenseCoupling` / :class:`~ffebm.couplings.ConvCoupling` whose every
relaxation read goes through the inference read model (:class:`InferenceConfig`): the bottom-up
drive ``W s + b`` a forward read, the top-down drive ``W^T s`` a transposed read (conv: one read
per im2col patch, pooling digital), in the free and the nudged phases. The weight is an ordinary
``nn.Parameter``; EP's and Implicit's gradients are the ordinary dense ones (read off ``phi``,
which is evaluated with the weights the reads saw: values ``W_read``, gradient to ``weight``),
applied by a digital optimizer.

The modifier (training-time weight noise) is drawn **once per forward call of the block**, not
per relaxation step: the weights of a chip do not change between the steps of one settling, and
EP compares the free and nudged equilibria *of the same network*, so both phases must read the
same weights (redrawing at every step would average the noise away within a relaxation and make
the nudged phases settle a different energy than the free one). The draw is made by a forward
pre-hook of the block, lives only for that call (a context variable, reset by a forward hook
that also runs on error), and travels to the backward in the call's snapshot of the gradient
method (:class:`InferenceEP` / :class:`InferenceImplicit`, which :func:`inference_energy_block`
puts in place of ``EP`` / ``Implicit``); a coupling read in training mode outside such a call
with the modifier on raises instead of reading weights of another call. ``Unrolled`` cannot
differentiate through the read model and is refused.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..couplings import ConvCoupling, DenseCoupling
from ..errors import UnsupportedGradient
from ..gradients.ep import EP
from ..gradients.implicit import Implicit
from ..gradients.unrolled import Unrolled
from .config import InvalidSetting
from .inference import InferenceConfig, modify_weight
from .inference_layers import (InferenceConv2d, InferenceLinear, InferenceModule, inference_read,
                               inference_read_transposed)

__all__ = ["InferenceDenseCoupling", "InferenceConvCoupling", "InferenceEP", "InferenceImplicit",
           "inference_energy_block", "ModifierOutsideCall"]

#: the modifier draws of the block call in progress: {coupling: weights its reads see}
_ACTIVE: contextvars.ContextVar[Optional[Dict[Any, Tensor]]] = contextvars.ContextVar("ffebm_inference_draw",
                                                                                      default=None)


class ModifierOutsideCall(RuntimeError):
    """An inference coupling with an active modifier was read in training mode outside a call of
    its block (or by a gradient method that does not carry the call's draw)."""


class _InferenceCoupling(InferenceModule):
    """Reads of an inference coupling for the current block call."""

    def _call_weight(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(W_read, factor)`` of this call (weight's shape)."""
        if self.deployment is not None or not (self.training and self.config.modifier.active):
            return self._read_state()
        drawn = _ACTIVE.get()
        w = None if drawn is None else drawn.get(self)
        if w is None:
            raise ModifierOutsideCall(
                f"{type(self).__name__}: read in training mode with the weight modifier on, outside a call of its "
                "energy block (the modifier is drawn once per block call and carried to the backward by "
                "InferenceEP / InferenceImplicit, which to_analog_energy(model, InferenceConfig(...)) puts in "
                "place of EP / Implicit). Use one of them, call the block itself, or block.eval()")
        return w, None

    def _check_grad(self) -> None:
        if torch.is_grad_enabled() and not self._uses_digital_path():
            raise UnsupportedGradient(
                f"{type(self).__name__}: its relaxation reads go through the inference read model, which is not "
                "differentiable (Unrolled backpropagation through the steps); use InferenceEP or InferenceImplicit")

    def _eff(self, like: Tensor) -> Tensor:
        """The weight as ``phi`` sees it: the values this call's reads see, the gradient to ``weight``."""
        w_read, f = self._call_weight()
        w = self.weight.to(dtype=like.dtype, device=like.device)
        if w_read is self.weight and f is None:
            return w
        vals = w_read if f is None else w_read * f
        return w + (vals.to(w) - w).detach()


class InferenceDenseCoupling(_InferenceCoupling, DenseCoupling):
    """``f(x) = W flatten(x) + b`` read through an inference tile (bias digital).

    Args as :class:`~ffebm.couplings.DenseCoupling` plus ``config`` (:class:`InferenceConfig`),
    ``seed``, ``device``, ``dtype``."""

    def __init__(self, in_shape: Sequence[int], out_features: int, bias: bool = True,
                 config: Optional[InferenceConfig] = None, seed: Optional[int] = None, init_gain: float = 1.0,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        DenseCoupling.__init__(self, in_shape, out_features, bias, init_gain)
        self.to(device=device, dtype=dtype)
        self.out_features = int(out_features)
        self._init_inference(config, seed, device)

    @classmethod
    def from_dense(cls, c: DenseCoupling, config: Optional[InferenceConfig] = None,
                   seed: Optional[int] = None) -> "InferenceDenseCoupling":
        m = cls(c.in_shape, c.weight.shape[0], c.bias is not None, config, seed,
                device=c.weight.device, dtype=c.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(c.weight)
            if c.bias is not None:
                m.bias.copy_(c.bias)
        return m

    def bottom_up(self, x: Tensor):
        if self._uses_digital_path():
            return DenseCoupling.bottom_up(self, x)
        self._check_grad()
        w, f = self._call_weight()
        y = inference_read(w, x.reshape(x.shape[0], -1), self.config, self.generator)
        if f is not None:
            y = y * f.to(y.dtype)
        return (y + self.bias if self.bias is not None else y), None

    def top_down(self, y: Tensor, ctx: Any) -> Tensor:
        if self._uses_digital_path():
            return DenseCoupling.top_down(self, y, ctx)
        self._check_grad()
        w, f = self._call_weight()
        z = inference_read_transposed(w, y, self.config, self.generator)
        if f is not None:
            z = z * f.to(z.dtype)
        return z.reshape(y.shape[0], *self.in_shape)

    def phi(self, x: Tensor, y: Tensor) -> Tensor:
        if self._uses_digital_path():
            return DenseCoupling.phi(self, x, y)
        x2 = x.reshape(x.shape[0], -1)
        out = (y * (x2 @ self._eff(x2).t())).sum()
        return out + (y * self.bias).sum() if self.bias is not None else out

    def out_shape(self, in_shape):
        return (self.out_features,)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_features}, {self._state_repr()}"


class InferenceConvCoupling(_InferenceCoupling, ConvCoupling):
    """``f(x) = P(conv(x, W)) + b`` read through an inference tile ``C_out x C_in k k`` (one read
    per im2col patch; pooling and bias digital). Args as :class:`~ffebm.couplings.ConvCoupling`
    plus ``config``, ``seed``, ``device``, ``dtype``."""

    def __init__(self, in_channels: int, out_channels: int, in_size: Sequence[int], kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, pool: str = "max", pool_size: int = 2,
                 soft_temperature: float = 0.1, bias: bool = True, init_gain: float = 1.0,
                 config: Optional[InferenceConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        ConvCoupling.__init__(self, in_channels, out_channels, in_size, kernel_size, stride, padding, pool,
                              pool_size, soft_temperature, bias, init_gain)
        self.to(device=device, dtype=dtype)
        self._init_inference(config, seed, device)

    @classmethod
    def from_conv(cls, c: ConvCoupling, config: Optional[InferenceConfig] = None,
                  seed: Optional[int] = None) -> "InferenceConvCoupling":
        m = cls(c.in_channels, c.out_channels, c.in_size, c.kernel_size, c.stride, c.padding, c.pool,
                c.pool_size if c.pool != "none" else 2, c.soft_temperature, c.bias is not None,
                config=config, seed=seed, device=c.weight.device, dtype=c.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(c.weight)
            if c.bias is not None:
                m.bias.copy_(c.bias)
        return m

    def _patches(self, x: Tensor) -> Tensor:
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # [B, Ckk, L]
        return rearrange(cols, "b ckk l -> (b l) ckk")

    def bottom_up(self, x: Tensor):
        if self._uses_digital_path():
            return ConvCoupling.bottom_up(self, x)
        self._check_grad()
        w, f = self._call_weight()
        c = inference_read(w.reshape(w.shape[0], -1), self._patches(x), self.config, self.generator)
        if f is not None:
            c = c * f.to(c.dtype)
        c = rearrange(c, "(b h w) c -> b c h w", b=x.shape[0], h=self.conv_size[0], w=self.conv_size[1])
        y, ctx = self._pool(c)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y, ctx

    def top_down(self, y: Tensor, ctx: Any) -> Tensor:
        if self._uses_digital_path():
            return ConvCoupling.top_down(self, y, ctx)
        self._check_grad()
        w, f = self._call_weight()
        g = self._pool_adjoint(y, ctx)
        b = g.shape[0]
        z = inference_read_transposed(w.reshape(w.shape[0], -1), rearrange(g, "b c h w -> (b h w) c"),
                                      self.config, self.generator)
        if f is not None:
            z = z * f.to(z.dtype)
        z = rearrange(z, "(b l) ckk -> b ckk l", b=b)
        return F.fold(z, self.in_size, self.kernel_size, padding=self.padding, stride=self.stride)

    def phi(self, x: Tensor, y: Tensor) -> Tensor:
        if self._uses_digital_path():
            return ConvCoupling.phi(self, x, y)
        c = F.conv2d(x, self._eff(x), None, self.stride, self.padding)
        p, _ = self._pool(c)
        if self.bias is not None:
            p = p + self.bias.view(1, -1, 1, 1)
        return (y * p).sum()

    def out_shape(self, in_shape):
        k = self.pool_size
        return (self.out_channels, self.conv_size[0] // k, self.conv_size[1] // k)

    def extra_repr(self) -> str:
        return ConvCoupling.extra_repr(self) + f", {self._state_repr()}"


# ----------------------------------------------------------------------------------------------
# gradient methods carrying the call's modifier draw
# ----------------------------------------------------------------------------------------------


class _CarriesDraw:
    """Mixin: ``snapshot()`` (taken by the block call's autograd context right after the free
    solve) keeps that call's modifier draw; ``backward`` reads the couplings with it."""

    def snapshot(self):
        s = super().snapshot()  # type: ignore[misc]
        s._draw = _ACTIVE.get()
        return s

    def backward(self, call, delta):
        token = _ACTIVE.set(getattr(self, "_draw", None))
        try:
            return super().backward(call, delta)  # type: ignore[misc]
        finally:
            _ACTIVE.reset(token)


@dataclasses.dataclass
class InferenceEP(_CarriesDraw, EP):
    """:class:`~ffebm.gradients.ep.EP` (same settings and estimate) whose nudged relaxations read
    the couplings with the same modifier draw as the free relaxation of the call."""

    def trace(self, call, delta):
        token = _ACTIVE.set(getattr(self, "_draw", None))
        try:
            return super().trace(call, delta)
        finally:
            _ACTIVE.reset(token)


@dataclasses.dataclass
class InferenceImplicit(_CarriesDraw, Implicit):
    """:class:`~ffebm.gradients.implicit.Implicit` (same settings) whose adjoint is taken at the
    weights the call's relaxation read (its modifier draw)."""


def _inference_method(g: Any, owner: str) -> Any:
    if isinstance(g, (InferenceEP, InferenceImplicit)):
        return g
    for plain, carrying in ((EP, InferenceEP), (Implicit, InferenceImplicit)):
        if type(g) is plain:
            return carrying(**{f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.init})
    if isinstance(g, Unrolled):
        raise InvalidSetting(owner, "block.gradient", g.describe(),
                             "EP or Implicit (Unrolled backpropagates through the relaxation steps, and the inference "
                             "read model is not differentiable)")
    return g  # another method: reads with an active modifier outside the call raise ModifierOutsideCall


def _draw_for_call(block: nn.Module, args: Any) -> None:
    """Forward pre-hook: one modifier draw per coupling for this call (training mode only)."""
    drawn: Dict[Any, Tensor] = {}
    for c in block.couplings:
        if isinstance(c, _InferenceCoupling) and c.deployment is None and c.training and c.config.modifier.active:
            drawn[c] = modify_weight(c.weight, c.config.modifier, c.generator, c.config.noise_model)
    _ACTIVE.set(drawn)


def _end_call(block: nn.Module, args: Any, output: Any) -> None:
    _ACTIVE.set(None)


def inference_energy_block(block: nn.Module, config: Optional[InferenceConfig] = None, input_coupling: bool = True,
                           seed: Optional[int] = None, inplace: bool = False) -> nn.Module:
    """Put an energy block's couplings (dense: :class:`InferenceDenseCoupling`, convolutional:
    :class:`InferenceConvCoupling`) and, with ``input_coupling``, the ``nn.Linear`` / ``nn.Conv2d``
    of its input map (:class:`InferenceLinear` / :class:`InferenceConv2d`) on inference tiles,
    keeping the weights; ``EP`` / ``Implicit`` become :class:`InferenceEP` /
    :class:`InferenceImplicit` (``Unrolled`` is refused). ``seed``: tile seeds ``seed, seed + 1,
    ...`` in conversion order. Returns a converted deep copy (``block`` itself if ``inplace``)."""
    from ..blocks.base import EnergyBlock

    if not isinstance(block, EnergyBlock):
        raise InvalidSetting("to_analog_energy", "block", type(block).__name__, "an EnergyBlock")
    if config is None:
        config = InferenceConfig()
    if not isinstance(config, InferenceConfig):
        raise InvalidSetting("to_analog_energy", "config", config, "an InferenceConfig")
    _inference_method(block.gradient, "to_analog_energy")  # refuses Unrolled before anything changes
    if not inplace:
        block = copy.deepcopy(block)
    k = [0]

    def next_seed():
        s = None if seed is None else seed + k[0]
        k[0] += 1
        return s

    for i, c in enumerate(block.couplings):
        if isinstance(c, _InferenceCoupling):
            continue
        if type(c) is DenseCoupling:
            block.couplings[i] = InferenceDenseCoupling.from_dense(c, config, next_seed())
        elif type(c) is ConvCoupling:
            block.couplings[i] = InferenceConvCoupling.from_conv(c, config, next_seed())
        else:
            raise InvalidSetting("to_analog_energy", f"couplings[{i}]", type(c).__name__,
                                 "a DenseCoupling or ConvCoupling (digital)")
    if input_coupling:
        _convert_input_map(block.input_map, config, next_seed)
    block.gradient = _inference_method(block.gradient, "to_analog_energy")
    if not getattr(block, "_inference_draw_hooked", False):
        block.register_forward_pre_hook(_draw_for_call)
        block.register_forward_hook(_end_call, always_call=True)
        block._inference_draw_hooked = True
    return block


def _convert_input_map(mod: nn.Module, config: InferenceConfig, next_seed) -> None:
    for name, child in mod.named_children():
        if type(child) is nn.Linear:
            setattr(mod, name, InferenceLinear.from_linear(child, config, next_seed()))
        elif type(child) is nn.Conv2d:
            setattr(mod, name, InferenceConv2d.from_conv(child, config, next_seed()))
        else:
            _convert_input_map(child, config, next_seed)
