"""Device arrays: an ``out x in`` array of devices of one model, with its states.

:class:`DeviceArray` draws the device-to-device spread once from a seed (per-device up/down
step, bounds, model extras: :meth:`PulsedDevice.sample`), keeps the device states ``w`` and
applies pulses to them with the pulse machinery: signed counts or up/down counts
(:func:`~ffebm.analog.integrate.apply_pulses`) and pulsed outer-product updates
``W <- W - lr d x^T`` (:func:`~ffebm.analog.pulses.pulsed_update`). Reads see
``w + write_noise_std dw_min xi``, redrawn after every update (:attr:`DeviceArray.w_read`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from .config import InvalidSetting, UpdateConfig
from .devices import DeviceParams, PulsedDevice, device_from_name
from .integrate import apply_pulses
from .pulses import pulsed_update
from .rng import fork_generator, make_generator, randn
from .state import IncompatibleState, _draw_record, _fingerprint, check_array_state, params_from_state

__all__ = ["DeviceArray"]


class DeviceArray:
    """An ``out x in`` array of devices of one model, with its sampled spread and states.

    ``w``: device states (tile units). ``params``: the per-device parameters drawn once.
    ``generator``: torch.Generator used for the spread and, by default, for every pulse and
    write-noise draw (same seed -> identical results). Reads should use :attr:`w_read`
    (``w`` plus write noise when the model has it).
    """

    def __init__(self, device_cfg: Any, shape: Sequence[int],
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(device_cfg, str):
            device_cfg = device_from_name(device_cfg)
        if not isinstance(device_cfg, PulsedDevice):
            raise InvalidSetting("DeviceArray", "device_cfg", device_cfg, "a PulsedDevice or a device name")
        self.device_cfg = device_cfg
        self.shape = tuple(int(s) for s in shape)
        if generator is None:
            generator = make_generator(seed, device)
        if device is None:
            device = generator.device
        self.generator = generator
        # how the spread was drawn: enough to draw it again when loading (compact checkpoints)
        draw = _draw_record(device_cfg, generator, device, dtype)
        self.params = device_cfg.sample(self.shape, generator, device, dtype)
        if draw is not None:
            draw["fingerprint"] = _fingerprint(self.params)
        self._draw = draw
        self.w = torch.zeros(self.shape, device=device, dtype=dtype)
        self.w = device_cfg.clip(self.w, self.params)
        self._w_read: Optional[Tensor] = None
        self._redraw_write_noise()

    # -- basics ------------------------------------------------------------------------------
    @property
    def params(self) -> DeviceParams:
        """The per-device parameters drawn once (assigning new ones forgets how they were drawn)."""
        return self._params

    @params.setter
    def params(self, value: DeviceParams) -> None:
        self._params = value
        self._draw = None

    def param_state(self) -> Dict[str, Any]:
        """The per-device parameters for a checkpoint: how they were drawn (``{"__draw__": ...}``:
        the device model's settings, the generator's state before the draw and a fingerprint;
        a few kB instead of several tensors of the array's size) when that is known, else the
        tensors themselves. :func:`params_from_state` reads either."""
        if self._draw is not None:
            return {"__draw__": self._draw}
        return {k: v for k, v in self.params.items()}

    def set_params(self, params: DeviceParams, draw: Optional[Dict[str, Any]] = None) -> None:
        """Replace the per-device parameters (``draw``: how they were drawn, if known)."""
        self._params = params
        self._draw = draw

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def w_read(self) -> Tensor:
        """What a read sees: ``w`` plus write noise (if the model has any)."""
        return self.w if self._w_read is None else self._w_read

    def _redraw_write_noise(self, generator: Optional[torch.Generator] = None) -> None:
        s = self.device_cfg.write_noise_std
        if s > 0:
            g = generator if generator is not None else self.generator
            self._w_read = self.w + s * self.device_cfg.dw_min * randn(self.w.shape, g, self.w)
        else:
            self._w_read = None

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "DeviceArray":
        """Move states and parameters (in place; returns self). A new generator on the target
        device is seeded from the current one, so runs stay reproducible."""
        device = torch.device(device) if device is not None else self.w.device
        dtype = dtype or self.w.dtype
        if device != self.w.device:
            self.generator = fork_generator(self.generator, device)
        self.w = self.w.to(device=device, dtype=dtype)
        self._params = self.params.to(device=device, dtype=dtype)  # the same draw, moved
        if self._w_read is not None:
            self._w_read = self._w_read.to(device=device, dtype=dtype)
        return self

    def set_weights(self, w: Tensor) -> None:
        """Program the states (clipped to each device's bounds); ``w`` of the array's shape (or
        broadcastable to it, e.g. one value for every device)."""
        w = torch.as_tensor(w, dtype=self.w.dtype, device=self.w.device)
        try:
            torch.broadcast_shapes(w.shape, self.shape)
            ok = w.dim() <= len(self.shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"DeviceArray {list(self.shape)}: cannot program states of shape {list(w.shape)}")
        self.w = self.device_cfg.clip(w.expand(self.shape).clone(), self.params)
        self._redraw_write_noise()

    def get_weights(self) -> Tensor:
        return self.w.clone()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """States, sampled per-device parameters, the device model's name and the generator's
        state (plain tensors and strings: ``torch.load(..., weights_only=True)`` reads it)."""
        return {"w": self.w.clone(), "params": self.param_state(),
                "device": type(self.device_cfg).__name__, "rng": self.generator.get_state(),
                "w_read": None if self._w_read is None else self._w_read.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, checked first (shape, device model, parameters): a mismatch
        raises :class:`~ffebm.analog.state.IncompatibleState` and changes nothing."""
        owner = f"DeviceArray({type(self.device_cfg).__name__}, {list(self.shape)})"
        if not isinstance(state, dict):
            raise IncompatibleState(owner, f"saved state is {type(state).__name__}, expected a dict")
        keys = [k for k, v in self.params.items() if isinstance(v, Tensor)]
        w = state.get("w")
        if not isinstance(w, Tensor) or tuple(w.shape) != self.shape:
            raise IncompatibleState(owner, f"saved states have shape {list(w.shape) if isinstance(w, Tensor) else w!r}, "
                                           f"this array is {list(self.shape)}")
        rng = state.get("rng")
        if rng is not None and (not isinstance(rng, Tensor) or rng.numel() != self.generator.get_state().numel()):
            raise IncompatibleState(owner, "saved generator state is malformed or from another device type")
        w_read = state.get("w_read")
        if w_read is not None and (not isinstance(w_read, Tensor) or tuple(w_read.shape) != self.shape):
            raise IncompatibleState(owner, "saved read states (write noise) have the wrong shape")
        saved = params_from_state(owner, state.get("params"), self.shape, self.w.device, self.w.dtype)
        check_array_state(owner, self.shape, self.device_cfg, keys, state.get("w"), saved,
                          state.get("device"))
        items = {k: (saved[k].to(device=v.device, dtype=v.dtype).expand(self.shape).clone()
                     if isinstance(v, Tensor) else v) for k, v in self.params.items()}
        self.set_params(DeviceParams(**items), saved.get("__draw__"))
        self.w = state["w"].to(device=self.w.device, dtype=self.w.dtype).clone()
        if rng is not None:
            self.generator.set_state(rng.cpu().to(torch.uint8))
        self._redraw_write_noise()
        if w_read is not None and self._w_read is not None:
            self._w_read = w_read.to(device=self.w.device, dtype=self.w.dtype).clone()

    def symmetry_point(self) -> Optional[Tensor]:
        return self.device_cfg.symmetry_point(self.params)

    # -- pulses ------------------------------------------------------------------------------
    def pulse(self, n: Tensor, generator: Optional[torch.Generator] = None,
              exact: bool = False) -> None:
        """Apply signed pulse counts (positive = up) to each device."""
        g = generator if generator is not None else self.generator
        n = torch.as_tensor(n, device=self.w.device)
        self.w = apply_pulses(self.device_cfg, self.w, n, None, self.params, g, exact=exact)
        self._redraw_write_noise(g)

    def pulse_counts(self, n_up: Tensor, n_down: Tensor,
                     generator: Optional[torch.Generator] = None, exact: bool = False) -> None:
        """Apply separate up and down counts (half of the up/down pairs, the excess of one sign,
        the other half of the pairs)."""
        g = generator if generator is not None else self.generator
        self.w = apply_pulses(self.device_cfg, self.w, n_up, n_down, self.params, g, exact=exact)
        self._redraw_write_noise(g)

    def pulsed_update(self, x: Tensor, d: Tensor, lr: float, cfg: Optional[UpdateConfig] = None,
                      generator: Optional[torch.Generator] = None,
                      exact: Optional[bool] = None) -> Dict[str, Tensor]:
        """``W <- W - lr * sum_b d_b x_b^T`` realised as stochastic pulse trains.

        ``x``: [B, in] (or [in]), ``d``: [B, out] (or [out]). ``exact``: None -> ``cfg.exact``.
        Returns pulse statistics (tensors, no host sync): ``n_up``, ``n_down`` (totals),
        ``bl`` (bit length used per sample).
        """
        cfg = cfg if cfg is not None else UpdateConfig()
        g = generator if generator is not None else self.generator
        ex = cfg.exact if exact is None else bool(exact)
        self.w, stats = pulsed_update(self.device_cfg, self.params, self.w, x, d, lr, cfg, g, ex)
        self._redraw_write_noise(g)
        return stats

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"DeviceArray({self.device_cfg!r}, shape={self.shape}, device={self.w.device})"
