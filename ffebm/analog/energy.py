"""Analog energy blocks: couplings whose weights live on analog tiles, and EP with pulsed updates.

An :class:`AnalogDenseCoupling` is a :class:`~ffebm.couplings.Coupling` whose weight ``W`` is
held on an :class:`~ffebm.analog.tile.AnalogTile` (the bias stays digital). Every relaxation
step reads the tile: the bottom-up drive ``W s_l + b`` is a forward read, the top-down drive
``W^T s_{l+1}`` a transposed (backward) read, both through the tile's read model (noise
management, DAC/ADC quantisation, output noise, bound management). With perfect reads
(``IOConfig.perfect()``) the drives are exactly those of :class:`~ffebm.couplings.DenseCoupling`.

``phi(x, y) = <y, W x + b>`` is evaluated with the tile's effective weight in network units (the
exact values the reads see, plus a Tiki-Taka fast array's contribution while one is in use), so
EP's read-out is consistent with the reads in perfect mode. Convolutional couplings go on tiles as
:class:`~ffebm.analog.conv_coupling.AnalogConvCoupling` (im2col patches read one by one).

Pulsed EP (:class:`AnalogEP`): EP's centered estimate for a dense coupling is
``dW = -(y+ x+^T - y- x-^T) / (2 beta B)``, a difference of two outer products. Instead of
forming it, :class:`AnalogEP` records the pairs ``(x+, -y+/(2 beta B))`` and
``(x-, +y-/(2 beta B))`` in the weight's :class:`~ffebm.analog.context.AnalogContext` (the same
mechanism as :class:`~ffebm.analog.layers.AnalogLinear`, and likewise only when ``backward``
accumulates into the weight), and :class:`~ffebm.analog.optimizer.AnalogOptimizer`
applies ``W -= lr * sum_b d_b x_b^T`` as pulsed outer-product updates with its algorithm (SGD,
Tiki-Taka, c-TTv2...). The analog weights get no ``.grad``; biases and digital layers keep their
ordinary gradients. An analog input map (:class:`AnalogLinear`) records its pairs through its own
backward, which receives EP's ``dL/du``.

    blk = analog_energy_block(ffebm.DenseHopfield([64, 128, 64]), AnalogConfig(device=SoftBounds()))
    opt_a = AnalogOptimizer(analog_parameters(model), ChoppedTTv2(), lr=0.05)
    opt_d = torch.optim.SGD(digital_parameters(model), lr=0.05)
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..couplings import ConvCoupling, Coupling, DenseCoupling, init_weight
from ..gradients.ep import EP
from .config import InvalidSetting
from .conv_coupling import AnalogConvCoupling
from .conv import AnalogConv2d
from .layers import AnalogConfig, AnalogLinear, _AnalogLayer, _post_load_hook
from .tile import count_reads

__all__ = ["AnalogDenseCoupling", "AnalogConvCoupling", "AnalogEP", "analog_energy_block", "to_analog_energy",
           "analog_couplings", "reset_read_counts"]


class AnalogDenseCoupling(_AnalogLayer, Coupling):
    """``f(x) = W flatten(x) + b`` with ``W`` on an analog tile (``out_features x prod(in_shape)``).

    Args: ``in_shape``, ``out_features``, ``bias`` (digital), ``config`` (:class:`AnalogConfig`),
    ``seed`` (device spread, read noise), ``init_gain`` (Gaussian init as DenseCoupling),
    ``device``, ``dtype``. ``n_forward_reads`` / ``n_backward_reads`` count the tile reads.
    """

    def __init__(self, in_shape: Sequence[int], out_features: int, bias: bool = True,
                 config: Optional[AnalogConfig] = None, seed: Optional[int] = None,
                 init_gain: float = 1.0, device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        nn.Module.__init__(self)
        self.in_shape = tuple(int(d) for d in in_shape)
        if not self.in_shape or any(d < 1 for d in self.in_shape):
            raise InvalidSetting("AnalogDenseCoupling", "in_shape", in_shape, "a non-empty shape of positive ints")
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise InvalidSetting("AnalogDenseCoupling", "out_features", out_features, "integer in [1, inf)")
        in_features = math.prod(self.in_shape)
        self.in_features, self.out_features = in_features, int(out_features)
        self._init_analog(self.out_features, in_features, (self.out_features, in_features),
                          config, seed, device, dtype)
        w = torch.empty(self.out_features, in_features, dtype=self.weight.dtype)
        init_weight(w, in_features, init_gain)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=self.weight.device,
                                                 dtype=self.weight.dtype))
        else:
            self.register_parameter("bias", None)
        self.set_weights(w.to(self.weight.device))
        self.n_forward_reads = 0
        self.n_backward_reads = 0
        self.register_load_state_dict_post_hook(_post_load_hook)

    @classmethod
    def from_dense(cls, c: DenseCoupling, config: Optional[AnalogConfig] = None,
                   seed: Optional[int] = None) -> "AnalogDenseCoupling":
        """Program a :class:`DenseCoupling`'s weight onto a tile (the bias is copied)."""
        if not isinstance(c, DenseCoupling):
            raise InvalidSetting("AnalogDenseCoupling.from_dense", "c", type(c).__name__, "a DenseCoupling")
        m = cls(c.in_shape, c.weight.shape[0], c.bias is not None, config, seed,
                device=c.weight.device, dtype=c.weight.dtype)
        return m._copy_from(c.weight, c.bias)

    # -- coupling interface ------------------------------------------------------------------
    def bottom_up(self, x: Tensor):
        count_reads(self, "n_forward_reads", 1)
        y = self._read_forward(x.reshape(x.shape[0], -1))
        if self.bias is not None:
            y = y + self.bias
        return y, None

    def top_down(self, y: Tensor, ctx: Any) -> Tensor:
        count_reads(self, "n_backward_reads", 1)
        return self._read_backward(y).reshape(y.shape[0], *self.in_shape)

    def phi(self, x: Tensor, y: Tensor) -> Tensor:
        self._link()
        self._refresh()
        x2 = x.reshape(x.shape[0], -1)
        out = (y * (x2 @ self.read_weight(x2).t())).sum()
        if self.bias is not None:
            out = out + (y * self.bias).sum()
        return out

    def weight_pairs(self, x: Tensor, y: Tensor):
        """``(X, D)`` with ``d phi / d W = D^T X`` at the states (x, y): ``X = flatten(x)``, ``D = y``."""
        return x.reshape(x.shape[0], -1).detach(), y.detach()

    def out_shape(self, in_shape):
        return (self.out_features,)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_features}, tile={self.tile.extra_repr()}"


ANALOG_COUPLINGS = (AnalogDenseCoupling, AnalogConvCoupling)


def analog_couplings(module: nn.Module) -> List[Coupling]:
    """The couplings of ``module`` whose weights live on tiles (dense and convolutional)."""
    return [m for m in module.modules() if isinstance(m, (AnalogDenseCoupling, AnalogConvCoupling))]


def reset_read_counts(module: nn.Module) -> None:
    """Zero the read counters of the analog couplings and tiles of ``module``."""
    from .stats import reset_read_counts as _reset

    _reset(module)


@dataclasses.dataclass
class AnalogEP(EP):
    """EP whose analog-coupling weight updates are recorded as pulsed outer-product pairs.

    Same settings and estimate as :class:`~ffebm.gradients.ep.EP`; for every analog coupling of
    the block the read-out records ``(s_l, ∓ s_{l+1} / ((beta_a - beta_b) B))`` at each nudged
    state in the weight's :class:`AnalogContext` (for the :class:`AnalogOptimizer`) when the
    backward accumulates into the weight (``loss.backward()``), and then returns no gradient for
    it. Asked for by ``torch.autograd.grad(loss, weight)`` instead, it returns the dense
    equivalent ``sum d x^T`` of those pairs. Biases and the input get their ordinary EP gradients.
    """

    pair_form: str = "mean_difference"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pair_form not in PAIR_FORMS:
            raise InvalidSetting("AnalogEP", "pair_form", self.pair_form, "one of " + ", ".join(map(repr, PAIR_FORMS)))

    def describe(self) -> str:
        return f"AnalogEP(beta={self.beta}, variant={self.variant}, pair_form={self.pair_form})"



    def skip(self, call) -> List[bool]:
        """Per energy parameter: the weight of an analog coupling (pulsed, not asked of autograd)."""
        ids = {id(c.weight) for c in call.block.couplings if isinstance(c, ANALOG_COUPLINGS)}
        return [id(p) in ids for p in call.params]

    def read_out_extra(self, call, sa, sb, scale, grads):
        """Record each analog coupling's EP update as pulsed pairs (when this backward
        accumulates into its weight); no dense gradient unless the config asks for one."""
        grads = list(grads)
        index = {id(p): i for i, p in enumerate(call.params)}
        for k, c in enumerate(call.block.couplings):
            if not isinstance(c, ANALOG_COUPLINGS):
                continue
            i = index.get(id(c.weight))
            if i is None or not call.wants[i]:
                continue
            xa, ya = c.weight_pairs(sa[k], sa[k + 1])
            xb, yb = c.weight_pairs(sb[k], sb[k + 1])
            pairs = [(xa, -scale * ya), (xb, scale * yb)]
            if self.pair_form == "mean_difference":
                pairs = _mean_difference_pairs(pairs)
            if call.records[i]:
                c._link()
                c.analog_ctx.record_pairs(pairs)
            # the dense equivalent of the pulsed update where it was asked for without being
            # recorded (torch.autograd.grad(loss, weight), compare_gradients) or by the config
            if not call.records[i] or c.config.dense_grad:
                grads[i] = sum(d.t() @ x for x, d in pairs).reshape(c.weight.shape).to(c.weight.dtype)
        return tuple(grads)


PAIR_FORMS = ("mean_difference", "raw")


def _mean_difference_pairs(pairs: list) -> list:
    """Rewrite EP's two pairs ``(x1, d1), (x2, d2)`` as ``((x1 + x2) / 2, d1 + d2)`` and
    ``((x1 - x2) / 2, d1 - d2)``: the same sum of outer products (``d1 x1^T + d2 x2^T``), but
    each pair now carries a *small* factor (EP's ``d1 ~ -d2`` and ``x1 ~ x2``), so the pulse
    count, and with it the pulse noise and the soft-bounds drift of up/down pulse pairs, scales
    with the update itself instead of with ``|y| |x| / (2 beta B)``."""
    (x1, d1), (x2, d2) = pairs
    if x1.shape != x2.shape or d1.shape != d2.shape:
        return pairs
    return [(0.5 * (x1 + x2), d1 + d2), (0.5 * (x1 - x2), d1 - d2)]


def _analog_ep_from(g: Any) -> Any:
    if isinstance(g, AnalogEP):
        return g
    if type(g) is EP:
        kw = {f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.init}
        return AnalogEP(**kw)
    return g


def analog_energy_block(block: nn.Module, config: Optional[AnalogConfig] = None, input_coupling: bool = True,
                        seed: Optional[int] = None, inplace: bool = False,
                        analog_gradient: bool = True) -> nn.Module:
    """Move an energy block's couplings (dense: :class:`AnalogDenseCoupling`, convolutional:
    :class:`AnalogConvCoupling`) and, with ``input_coupling``, the ``nn.Linear`` / ``nn.Conv2d``
    layers of its input map onto analog tiles, keeping the weights.

    Returns a converted deep copy (or ``block`` itself if ``inplace``). With ``analog_gradient``
    an :class:`EP` method is replaced by the equivalent :class:`AnalogEP` (pulsed updates).
    ``seed``: tile seeds are ``seed, seed + 1, ...`` in conversion order (None: random).
    """
    from ..blocks.base import EnergyBlock
    from .inference import InferenceConfig

    if isinstance(config, InferenceConfig):  # inference tiles: reads through the read model, dense gradients
        from .inference_energy import inference_energy_block

        return inference_energy_block(block, config, input_coupling, seed, inplace)
    if not isinstance(block, EnergyBlock):
        raise InvalidSetting("analog_energy_block", "block", type(block).__name__, "an EnergyBlock")
    if config is None:
        config = AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise InvalidSetting("analog_energy_block", "config", config, "an AnalogConfig or None")
    if not inplace:
        block = copy.deepcopy(block)
    k = [0]

    def next_seed():
        s = None if seed is None else seed + k[0]
        k[0] += 1
        return s

    for i, c in enumerate(block.couplings):
        if isinstance(c, (AnalogDenseCoupling, AnalogConvCoupling)):
            continue
        if isinstance(c, DenseCoupling):
            block.couplings[i] = AnalogDenseCoupling.from_dense(c, config, next_seed())
        elif isinstance(c, ConvCoupling):
            block.couplings[i] = AnalogConvCoupling.from_conv(c, config, next_seed())
        else:
            raise InvalidSetting("analog_energy_block", f"couplings[{i}]", type(c).__name__,
                                 "a DenseCoupling or ConvCoupling")
    if input_coupling:
        _convert_input_map(block.input_map, config, next_seed)
    if analog_gradient:
        block.gradient = _analog_ep_from(block.gradient)
    if not getattr(block, "_analog_sync_hooked", False):
        block.register_forward_pre_hook(_sync_analog_couplings)
        block._analog_sync_hooked = True
    return block


def _sync_analog_couplings(block: nn.Module, args: Any) -> None:
    """Forward pre-hook of an energy block on tiles: a value written into a coupling's weight
    reaches its tile before the relaxation reads it (once per call, not once per read)."""
    for c in block.couplings:
        if isinstance(c, (AnalogDenseCoupling, AnalogConvCoupling)):
            c._refresh()


def _convert_input_map(mod: nn.Module, config: AnalogConfig, next_seed) -> None:
    """Put the ``nn.Linear`` / ``nn.Conv2d`` layers of an input map on tiles (pooling and
    normalisation stay digital)."""
    for name, child in mod.named_children():
        if isinstance(child, nn.Linear):
            setattr(mod, name, AnalogLinear.from_linear(child, config, next_seed()))
        elif isinstance(child, nn.Conv2d):
            setattr(mod, name, AnalogConv2d.from_conv(child, config, next_seed()))
        else:
            _convert_input_map(child, config, next_seed)


def to_analog_energy(model: nn.Module, config: Optional[AnalogConfig] = None, input_coupling: bool = True,
                     seed: Optional[int] = None, inplace: bool = False) -> nn.Module:
    """Convert every energy block of ``model`` with :func:`analog_energy_block` (digital layers
    between blocks stay digital). With an :class:`~ffebm.analog.inference.InferenceConfig` the
    blocks go on inference tiles instead (:func:`~ffebm.analog.inference_energy.inference_energy_block`:
    reads through the inference read model, EP / Implicit gradients dense and digital)."""
    from ..blocks.base import EnergyBlock

    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, EnergyBlock):
        return analog_energy_block(model, config, input_coupling, seed, inplace=True)
    k = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, EnergyBlock):
            s = None if seed is None else seed + 1000 * k
            k += 1
            analog_energy_block(mod, config, input_coupling, s, inplace=True)
    return model
