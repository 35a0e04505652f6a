"""Inference layers: ``InferenceLinear``, ``InferenceConv1d`` / ``InferenceConv2d`` (grouped and
depthwise included), and the machinery shared with the inference energy couplings.

The weight is an ordinary ``nn.Parameter`` owned by the user's optimizer. Every forward reads it
(nothing is copied onto a tile and back):

* forward: ``y = read(W_read, x) + b`` through the inference read model
  (:class:`~ffebm.analog.inference.InferenceConfig`: ``io`` with weight scaling and the split over
  physical arrays), where ``W_read`` is, in training mode, the weight with the modifier's noise
  (one draw per forward call, from the layer's own generator), in eval mode the weight itself,
  and after :func:`~ffebm.analog.deploy.program` the programmed (and drifted) weights;
* backward: ideal. ``dL/dx = dL/dy W_read`` (what the read used, as the reference's perfect
  backward) and ``dL/dW = dL/dy^T x``: the dense gradient, applied to the clean weight. What the
  backward needs (the input and ``W_read``) travels in the autograd context of that call.

With perfect reads and no modifier (``InferenceConfig.perfect()``) the layer *is* its digital
layer (``F.linear`` / ``F.conv*``): the same outputs and gradients, bit for bit.

Clipping after each optimiser step: :func:`clip_weights` (an explicit call after
``optimizer.step()``) or :func:`clip_after_step` (registers it as the optimizer's step post-hook).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NotTwiceDifferentiable
from .config import InvalidSetting, check_range
from .drift import ProgrammedWeights
from .inference import InferenceConfig, clip_tensor, modify_weight
from .rng import fork_generator, make_generator
from .bound_management import read_forward_managed
from .tile import read_backward

__all__ = ["InferenceModule", "InferenceLinear", "InferenceConv1d", "InferenceConv2d", "Deployment",
           "inference_modules", "clip_weights", "clip_after_step", "inference_read", "inference_read_transposed"]


# ----------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------


def _col_slices(n: int, max_size: int) -> List[slice]:
    k = max(1, math.ceil(n / max_size))
    base, rem = divmod(n, k)
    out, s = [], 0
    for i in range(k):
        e = s + base + (1 if i < rem else 0)
        out.append(slice(s, e))
        s = e
    return out


def _scale(W: Tensor, cfg: InferenceConfig) -> Optional[Tensor]:
    """Digital output scale of the weight mapping: ``[out, 1]`` (columnwise) or a scalar tensor
    (None: no scaling)."""
    if cfg.weight_scaling_omega is None:
        return None
    if cfg.weight_scaling_columnwise:
        m = W.detach().abs().amax(dim=1, keepdim=True)
    else:  # max |w| in one pass, without a |W| copy
        lo, hi = torch.aminmax(W.detach())
        m = torch.maximum(hi, -lo)
    s = m / cfg.weight_scaling_omega
    return torch.where(s > 0, s, torch.ones_like(s))


def inference_read(W: Tensor, x: Tensor, cfg: InferenceConfig, generator: Optional[torch.Generator]) -> Tensor:
    """``y = W x`` (W ``[out, in]`` in network units, x ``[..., in]``) through the inference read
    model: weight scaling, one read per physical array of at most ``cfg.max_size`` inputs
    (:func:`~ffebm.analog.bound_management.read_forward_managed`: noise management, DAC, output
    noise, ADC, bound management), partial outputs summed and scaled back digitally."""
    if cfg.io.is_perfect:
        return x @ W.to(x.dtype).t()
    s = _scale(W, cfg)
    Wt = W if s is None else W / s
    y = None
    for cs in _col_slices(W.shape[1], cfg.max_size):
        part = read_forward_managed(Wt[:, cs], x[..., cs], cfg.io, generator)
        y = part if y is None else y.add_(part)  # the reads return tensors of their own
    return y if s is None else y.mul_(s.reshape(-1).to(y.dtype))


def inference_read_transposed(W: Tensor, d: Tensor, cfg: InferenceConfig,
                              generator: Optional[torch.Generator]) -> Tensor:
    """``z = W^T d`` (d ``[..., out]``) through the read model in the transposed direction (no
    bound management, as published for that direction): one read per array of at most
    ``cfg.max_size`` rows, with the digital output scale applied to ``d`` first."""
    if cfg.io.is_perfect:
        return d @ W.to(d.dtype)
    s = _scale(W, cfg)
    Wt, ds = (W, d) if s is None else (W / s, d * s.reshape(-1).to(d.dtype))
    z = None
    for rs in _col_slices(W.shape[0], cfg.max_size):
        part = read_backward(Wt[rs], ds[..., rs], cfg.io, generator)
        z = part if z is None else z + part
    return z


class _Reader:
    """One call's read: settings, generator and the drift-compensation factor (None: 1)."""

    __slots__ = ("cfg", "generator", "factor")

    def __init__(self, cfg: InferenceConfig, generator: torch.Generator, factor: Optional[Tensor]) -> None:
        self.cfg, self.generator, self.factor = cfg, generator, factor

    def __call__(self, W: Tensor, x: Tensor) -> Tensor:
        y = inference_read(W, x, self.cfg, self.generator)
        return y if self.factor is None else y * self.factor.to(y.dtype)


class _InferenceMVM(torch.autograd.Function):
    """``y = read(W_read, x)``; ideal backward: ``dx = f dy W_read``, ``dW = f dy^T x`` (``f``: the
    drift-compensation factor, 1 in training). ``weight`` carries the gradient, ``w_read`` the
    values read (no gradient). First-order only: a backward with ``create_graph=True`` raises
    :class:`~ffebm.errors.NotTwiceDifferentiable`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, w_read: Tensor, reader: _Reader) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w_read)
        ctx.factor = reader.factor
        ctx.weight_dtype = weight.dtype
        return reader(w_read, x)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would be silently wrong
            raise NotTwiceDifferentiable(
                "inference layers give first-order gradients only (the read model is not differentiable): a "
                "gradient penalty or any create_graph=True use through one would be silently wrong. Compute such "
                "terms with the digital layer (convert_to_digital) or with create_graph=False")
        x, w_read = ctx.saved_tensors
        f = ctx.factor
        if f is not None:
            gy = gy * f.to(gy.dtype)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ w_read.to(gy.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)).to(ctx.weight_dtype)
        return gx, gw, None, None


# ----------------------------------------------------------------------------------------------
# deployment state
# ----------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A layer as programmed on a chip (set by :func:`~ffebm.analog.deploy.program`, moved in time
    by :func:`~ffebm.analog.deploy.drift_to`, dropped by :func:`~ffebm.analog.deploy.unprogram`).

    ``programmed``: conductances and drift exponents of the weight matrix ``[out, in]``;
    ``trained``: the weights that were programmed (a later change of ``layer.weight`` is refused
    at the next read); ``w_read``: what the reads see now (network units, ``weight``'s shape);
    ``factor``: the global drift-compensation factor (None: 1); ``t``: seconds after programming
    (None: right after programming, no drift); ``generator``: the 1/f read-noise draws of
    ``drift_to``."""

    programmed: ProgrammedWeights
    trained: Tensor
    w_read: Tensor
    factor: Optional[Tensor]
    t: Optional[float]
    generator: torch.Generator


def _generator_from_state(rng: Tensor, device_type: str, current: torch.Generator) -> torch.Generator:
    """``current`` set to the saved state ``rng`` (saved on another device type: a new generator on
    ``current``'s device, a deterministic stream seeded from ``rng``, not the same numbers)."""
    if device_type == current.device.type:
        current.set_state(rng.cpu())
        return current
    return make_generator(_seed_from_state(rng), current.device)


def _deployment_state(dep: Deployment) -> Dict[str, Any]:
    """``dep`` as plain tensors and numbers (the layer's extra state)."""
    return {"programmed": dict(vars(dep.programmed)), "trained": dep.trained, "w_read": dep.w_read,
            "factor": dep.factor, "t": dep.t, "rng": dep.generator.get_state(), "rng_device": dep.generator.device.type}


def _deployment_from_state(state: Any, weight: Tensor, owner: str) -> Deployment:
    """The :class:`Deployment` saved by :func:`_deployment_state`, checked against ``weight`` and
    moved to its device."""
    from .state import IncompatibleState

    fields = set(ProgrammedWeights.__dataclass_fields__)
    ok = (isinstance(state, dict) and isinstance(state.get("programmed"), dict)
          and set(state["programmed"]) == fields
          and all(isinstance(state.get(k), Tensor) for k in ("trained", "w_read", "rng"))
          and (state.get("factor") is None or isinstance(state["factor"], Tensor))
          and (state.get("t") is None or isinstance(state["t"], (int, float))))
    if not ok:
        raise IncompatibleState(owner, "its saved chip state (programmed weights) is malformed")
    if state["trained"].shape != weight.shape or state["w_read"].shape != weight.shape:
        raise IncompatibleState(owner, f"its saved chip state holds weights of shape {list(state['trained'].shape)}, "
                                       f"the layer's weight is {list(weight.shape)}")
    dev = weight.device
    pw = ProgrammedWeights(**{k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in state["programmed"].items()})
    gen = _generator_from_state(state["rng"], state.get("rng_device", "cpu"), torch.Generator(device=dev))
    factor = state.get("factor")
    return Deployment(pw, state["trained"].to(dev), state["w_read"].to(dev), None if factor is None else factor.to(dev),
                      None if state.get("t") is None else float(state["t"]), gen)


class ProgrammedWeightChanged(RuntimeError):
    """A programmed (deployed) layer's trained weight was changed after programming."""


# ----------------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------------


def _check_config(config: Any, owner: str) -> InferenceConfig:
    if config is None:
        return InferenceConfig()
    if not isinstance(config, InferenceConfig):
        raise InvalidSetting(owner, "config", f"{type(config).__name__}(...)", "an InferenceConfig or None")
    return config


def _seed_from_state(state: Tensor) -> int:
    return int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:8], "little") >> 2


class InferenceModule(nn.Module):
    """Base of the modules whose weight is read through an inference tile (layers and energy
    couplings): ``config`` (:class:`InferenceConfig`), ``generator`` (modifier and read noise; its
    state is part of ``state_dict()`` so a resumed run draws the same noise), ``deployment``
    (:class:`Deployment` or None). Subclasses hold ``weight`` (first dimension: outputs)."""

    weight: nn.Parameter

    def _init_inference(self, config: Any, seed: Optional[int], device: Any) -> None:
        self.config = _check_config(config, type(self).__name__)
        self.generator = make_generator(seed, device)
        self.deployment: Optional[Deployment] = None

    # -- what a read sees -------------------------------------------------------------------
    def weight_matrix(self) -> Tensor:
        """``weight`` as the ``[out, in]`` matrix held on the tile (a view: differentiable)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def _read_state(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(W_read, factor)`` for one call: the programmed weights if deployed, else the weight
        with the modifier's noise in training mode, else the weight itself."""
        dep = self.deployment
        if dep is not None:
            w = self.weight.detach()
            if w.shape != dep.trained.shape or not torch.equal(w, dep.trained.to(w.device)):
                raise ProgrammedWeightChanged(
                    f"{type(self).__name__}: its weight changed after program(); the chip still holds the "
                    "programmed weights. Call ffebm.analog.unprogram(model) to train on, or program(model) "
                    "again to deploy the new weights")
            return dep.w_read.to(w.device), dep.factor
        if self.training and self.config.modifier.active:
            return modify_weight(self.weight, self.config.modifier, self.generator, self.config.noise_model), None
        return self.weight, None

    def _uses_digital_path(self) -> bool:
        return self.deployment is None and self.config.is_digital

    def _mvm(self, x: Tensor, w_mat: Tensor, w_read_mat: Tensor, factor: Optional[Tensor]) -> Tensor:
        """One read of ``x`` [..., in] by the matrix ``w_read_mat`` (values) standing for ``w_mat``
        (gradient)."""
        reader = _Reader(self.config, self.generator, factor)
        if not torch.is_grad_enabled() or not (x.requires_grad or w_mat.requires_grad):
            return reader(w_read_mat.detach(), x)
        return _InferenceMVM.apply(x, w_mat, w_read_mat.detach(), reader)

    @torch.no_grad()
    def clip_weights(self) -> None:
        """Apply ``config.clip`` to the weight (in place)."""
        clip_tensor(self.weight.data, self.config.clip)

    # -- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """The noise generator's state and, when programmed, the chip state (:class:`Deployment`:
        conductances, drift exponents, programmed and read weights, compensation factor, time and
        the 1/f read-noise generator), as plain tensors and numbers (``torch.load(...,
        weights_only=True)`` reads them)."""
        state: Dict[str, Any] = {"rng": self.generator.get_state(), "rng_device": self.generator.device.type}
        if self.deployment is not None:
            state["deployment"] = _deployment_state(self.deployment)
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        from .state import IncompatibleState

        rng = state.get("rng") if isinstance(state, dict) else None
        if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
            raise IncompatibleState(type(self).__name__, "its saved extra state (the noise generator) is malformed")
        dep = state.get("deployment")
        deployment = None if dep is None else _deployment_from_state(dep, self.weight, type(self).__name__)
        self.generator = _generator_from_state(rng, state.get("rng_device", "cpu"), self.generator)
        self.deployment = deployment  # the saved module's chip state: none if it was not programmed

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a digital layer's state: the generator keeps its own

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if "generator" not in self.__dict__:  # moved while being built
            return out
        dev = self.weight.device
        if self.generator.device.type != dev.type:
            self.generator = fork_generator(self.generator, dev)
        dep = self.deployment
        if dep is not None:
            self.deployment = Deployment(
                ProgrammedWeights(**{k: (fn(v) if isinstance(v, Tensor) else v)
                                     for k, v in vars(dep.programmed).items()}),
                fn(dep.trained), fn(dep.w_read), None if dep.factor is None else fn(dep.factor), dep.t,
                dep.generator if dep.generator.device.type == dev.type else fork_generator(dep.generator, dev))
        return out

    def _state_repr(self) -> str:
        c = self.config
        s = "perfect reads" if c.io.is_perfect else "read model"
        if c.modifier.active:
            s += f", modifier={c.modifier.kind}({c.modifier.strength:g})"
        if c.clip.kind != "none":
            s += f", clip={c.clip.kind}({c.clip.bound:g})"
        if self.deployment is not None:
            t = self.deployment.t
            s += ", programmed" + ("" if t is None else f", t={t:g}s")
        return s


def inference_modules(model: nn.Module) -> List[InferenceModule]:
    """The inference layers and couplings of ``model`` (in ``model.modules()`` order)."""
    return [m for m in model.modules() if isinstance(m, InferenceModule)]


@torch.no_grad()
def clip_weights(model: nn.Module) -> int:
    """Apply each inference layer's ``config.clip`` to its weight, in place (call it after every
    ``optimizer.step()``, or register it with :func:`clip_after_step`). Returns the number of
    layers clipped (``clip.kind != "none"``)."""
    n = 0
    for m in inference_modules(model):
        if m.config.clip.kind != "none":
            m.clip_weights()
            n += 1
    return n


def clip_after_step(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register :func:`clip_weights` ``(model)`` as a step post-hook of ``optimizer``: the weights
    are clipped after every ``optimizer.step()``. Returns the hook's handle (``.remove()``)."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: clip_weights(model))


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------


class InferenceLinear(InferenceModule):
    """``nn.Linear`` read through an inference tile (bias digital).

    Args: ``in_features``, ``out_features``, ``bias``, ``config`` (:class:`InferenceConfig`),
    ``seed`` (modifier and read noise; None: from torch's global RNG), ``device``, ``dtype``.
    The weight and bias are initialised as ``nn.Linear`` does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Optional[InferenceConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_range("InferenceLinear", "in_features", in_features, 1, None, integer=True)
        check_range("InferenceLinear", "out_features", out_features, 1, None, integer=True)
        ref = nn.Linear(int(in_features), int(out_features), bias, device=device, dtype=dtype)
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.weight, self.bias = ref.weight, ref.bias
        self._init_inference(config, seed, device)

    @classmethod
    def from_linear(cls, lin: nn.Linear, config: Optional[InferenceConfig] = None,
                    seed: Optional[int] = None) -> "InferenceLinear":
        """An inference layer holding a copy of ``lin``'s weight and bias."""
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, config, seed,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"InferenceLinear({self.in_features}, {self.out_features}): expected input [..., "
                             f"{self.in_features}], got {list(x.shape)}")
        if self._uses_digital_path():
            return F.linear(x, self.weight, self.bias)
        w_read, factor = self._read_state()
        y = self._mvm(x, self.weight, w_read, factor)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._state_repr()}")


class _InferenceConvNd(InferenceModule):
    """A convolution read through an inference tile ``C_out x (C_in/groups prod(k))``: every
    im2col patch is one read (one tile per group of a grouped convolution, read with that group's
    rows and input channels)."""

    n_dims = 2
    _torch_cls: type = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 config: Optional[InferenceConfig] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        o = type(self).__name__
        check_range(o, "in_channels", in_channels, 1, None, integer=True)
        check_range(o, "out_channels", out_channels, 1, None, integer=True)
        check_range(o, "groups", groups, 1, None, integer=True)
        try:  # torch's own checks and initialisation
            ref = self._torch_cls(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                  padding_mode, device=device, dtype=dtype)
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidSetting(o, "arguments", (in_channels, out_channels, kernel_size, stride, padding, dilation,
                                                  groups, padding_mode), str(e)) from None
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(ref, name))
        self.weight, self.bias = ref.weight, ref.bias
        self._init_inference(config, seed, device)

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Optional[InferenceConfig] = None,
                  seed: Optional[int] = None) -> "_InferenceConvNd":
        """An inference convolution holding a copy of ``conv``'s kernel and bias (same geometry)."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, config, seed,
                device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        return m

    def _digital(self, x: Tensor) -> Tensor:
        conv = F.conv1d if self.n_dims == 1 else F.conv2d
        if self.padding_mode != "zeros":
            return conv(F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), self.weight,
                        self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        n = self.n_dims
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}({self.in_channels}, {self.out_channels}): expected input "
                             f"[N, {self.in_channels}, ...] with {n} spatial dimension(s), got {list(x.shape)}")
        if x.dim() == n + 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self._uses_digital_path():
            return self._digital(x)
        w_read, factor = self._read_state()
        if any(self._reversed_padding_repeated_twice):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        x2 = x.unsqueeze(2) if n == 1 else x
        k2 = (1, *self.kernel_size) if n == 1 else self.kernel_size
        s2 = (1, *self.stride) if n == 1 else self.stride
        d2 = (1, *self.dilation) if n == 1 else self.dilation
        out_hw = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(x2.shape[2:], k2, s2, d2)]
        if min(out_hw) < 1:
            raise ValueError(f"{type(self).__name__}: input {list(x.shape)} (padded) is smaller than the kernel "
                             f"{list(self.kernel_size)} with dilation {list(self.dilation)}")
        cols = F.unfold(x2, k2, dilation=d2, stride=s2).transpose(1, 2)  # [N, L, C_in prod(k)]
        W, Wr = self.weight_matrix(), w_read.reshape(w_read.shape[0], -1)
        G = self.groups
        if G == 1:
            y = self._mvm(cols, W, Wr, factor)
        else:
            co, ck = self.out_channels // G, W.shape[1]
            y = torch.cat([self._mvm(cols[..., g * ck:(g + 1) * ck], W[g * co:(g + 1) * co], Wr[g * co:(g + 1) * co],
                                     factor) for g in range(G)], dim=-1)
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *(out_hw[1:] if n == 1 else out_hw))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * n))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, {self._state_repr()}")


class InferenceConv2d(_InferenceConvNd):
    """``nn.Conv2d`` (any padding, padding mode, stride, dilation, groups) read through an inference
    tile; same arguments plus ``config`` and ``seed``."""

    n_dims = 2
    _torch_cls = nn.Conv2d


class InferenceConv1d(_InferenceConvNd):
    """``nn.Conv1d`` read through an inference tile (the 2-d machinery on a ``1 x L`` image)."""

    n_dims = 1
    _torch_cls = nn.Conv1d
