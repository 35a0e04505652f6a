"""Settings of the analog substrate: read (IO) model and pulsed-update model.

Small dataclasses holding the published defaults of the reference simulator (IBM AIHWKit), each
validated on construction *and on every later edit of a field* (:class:`Validated`): an invalid
value raises :class:`InvalidSetting`, a ``ValueError`` whose message names the field and the
allowed range, and the object keeps its previous, valid value.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["InvalidSetting", "IOConfig", "UpdateConfig", "Settings", "Validated", "check_range", "check_choice"]


class InvalidSetting(ValueError):
    """An analog setting is outside its allowed range.

    Attributes: ``field`` (name), ``value`` and ``allowed`` (the range, in words).
    """

    def __init__(self, owner: str, field: str, value: Any, allowed: str) -> None:
        self.owner, self.field, self.value, self.allowed = owner, field, value, allowed
        shown = repr(value)
        if len(shown) > 120:  # a whole object's repr would bury the message
            shown = f"{type(value).__name__}(...)"
        super().__init__(f"{owner}.{field} = {shown} is invalid: allowed range is {allowed}")


class Settings:
    """Mixin for settings dataclasses: ``replace(**changes)`` is :func:`dataclasses.replace`
    (a new, validated object; the original is unchanged)."""

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)


class Validated(Settings):
    """Mixin for settings dataclasses whose ``__post_init__`` validates: assigning a field after
    construction validates a copy carrying the new value first (``__post_init__`` on it), so
    ``device.dw_min = -1`` raises :class:`InvalidSetting` instead of surfacing later as NaNs."""

    def __setattr__(self, name: str, value: Any) -> None:
        edit = name in self.__dict__ and not self.__dict__.get("_validating") \
            and name in {f.name for f in fields(self)}  # an edit, not __init__ / normalisation
        if edit:
            trial = copy.copy(self)
            object.__setattr__(trial, "_validating", True)
            object.__setattr__(trial, name, value)
            trial.__post_init__()
        object.__setattr__(self, name, value)


def check_range(owner: str, name: str, value: Any, lo: Optional[float] = None,
                hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False,
                integer: bool = False, allow_inf: bool = False) -> None:
    """Raise :class:`InvalidSetting` unless ``lo <(=) value <(=) hi``. ``None`` = unbounded;
    the value must be finite unless ``allow_inf``."""
    lb = "(" if (lo_open or lo is None) else "["
    rb = ")" if (hi_open or (hi is None and not allow_inf)) else "]"
    kind = "integer" if integer else "number"
    allowed = f"{kind} in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSetting(owner, name, value, allowed)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise InvalidSetting(owner, name, value, allowed)
    if integer and not float(value).is_integer():
        raise InvalidSetting(owner, name, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise InvalidSetting(owner, name, value, allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise InvalidSetting(owner, name, value, allowed)


def check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise InvalidSetting(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidSetting(owner, name, value, "True or False")


@dataclass
class IOConfig(Validated):
    """Read model of one tile pass (forward ``W x`` or backward ``W^T d``).

    Defaults are the published ones. Order of operations per read:
    noise management (divide the input by ``alpha = max|x|`` per sample), DAC (clip to
    ``+-inp_bound``, quantise with step ``inp_res * 2 * inp_bound``, optional Gaussian input
    noise), MVM, weight read noise (``additive``: ``w_noise * |x|_2 * xi``; ``pcm``:
    ``w_noise * sqrt(sum_j |w_ij| x_j^2) * xi``), output noise ``out_noise * xi``, ADC (clip to
    ``+-out_bound``, quantise with step ``out_res * 2 * out_bound``), multiply back by alpha.
    Bound management: samples whose outputs reach the ADC bound are re-read with the input halved,
    up to ``max_bm_factor`` (forward reads only, as published). ``is_perfect`` turns everything off.
    A resolution of 0 means "no quantisation", a bound of ``inf`` means "no clipping".
    """

    inp_bound: float = 1.0
    inp_res: float = 1.0 / 126.0
    inp_noise: float = 0.0
    out_bound: float = 12.0
    out_res: float = 1.0 / 510.0
    out_noise: float = 0.06
    w_noise: float = 0.0
    w_noise_type: str = "additive"
    noise_management: str = "abs_max"
    bound_management: bool = True
    max_bm_factor: float = 1000.0
    is_perfect: bool = False

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "inp_bound", self.inp_bound, 0, None, lo_open=True, allow_inf=True)
        check_range(o, "inp_res", self.inp_res, 0, 1)
        check_range(o, "inp_noise", self.inp_noise, 0, None)
        check_range(o, "out_bound", self.out_bound, 0, None, lo_open=True, allow_inf=True)
        check_range(o, "out_res", self.out_res, 0, 1)
        check_range(o, "out_noise", self.out_noise, 0, None)
        check_range(o, "w_noise", self.w_noise, 0, None)
        check_choice(o, "w_noise_type", self.w_noise_type, ("additive", "pcm"))
        check_choice(o, "noise_management", self.noise_management, ("abs_max", "none"))
        _check_bool(o, "bound_management", self.bound_management)
        check_range(o, "max_bm_factor", self.max_bm_factor, 1, 2.0 ** 60)
        _check_bool(o, "is_perfect", self.is_perfect)

    @classmethod
    def perfect(cls) -> "IOConfig":
        """A read with every non-ideality off (``y = W x`` exactly)."""
        return cls(is_perfect=True)


@dataclass
class UpdateConfig(Validated):
    """Pulsed (stochastic) update of a device array, published defaults.

    ``bl``: bit length of the stochastic pulse trains (``desired_bl`` in the reference).
    ``update_management``: rescale the x and d pulse probabilities by ``sqrt(max|x|/max|d|)``.
    ``bl_management``: shorten BL per sample to ``ceil(lr max|x| max|d| / dw_min)`` (<= bl).
    ``pulse_type``: ``"stochastic"`` (pulse trains) or ``"none"`` (exact floating-point update,
    still clipped to each device's bounds).
    ``dw_min``: step used to compute the pulse probabilities; ``None`` = the device's nominal
    ``dw_min`` (the usual choice).
    ``exact``: default path of :meth:`DeviceArray.pulsed_update` (slot-by-slot reference path when
    True, vectorised coincidence-count path when False).
    """

    bl: int = 31
    update_management: bool = True
    bl_management: bool = True
    pulse_type: str = "stochastic"
    dw_min: Optional[float] = None
    exact: bool = False

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "bl", self.bl, 1, 10_000, integer=True)
        self.bl = int(self.bl)
        _check_bool(o, "update_management", self.update_management)
        _check_bool(o, "bl_management", self.bl_management)
        check_choice(o, "pulse_type", self.pulse_type, ("stochastic", "none"))
        if self.dw_min is not None:
            check_range(o, "dw_min", self.dw_min, 0, None, lo_open=True)
        _check_bool(o, "exact", self.exact)

    @property
    def desired_bl(self) -> int:  # the reference simulator's name
        return self.bl

