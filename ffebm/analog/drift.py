"""Inference over time on PCM-like devices: programming noise, conductance drift, 1/f read noise,
global drift compensation (published statistical model, g_max = 25 uS).

A weight matrix is mapped to a conductance pair ``w ~ (g+ - g-) / g_max * scale`` with
``scale = max|W|`` (so the largest weight uses the full conductance ``g_max``);
``g~ = g_T / g_max`` below is the normalised *target* conductance.

* programming noise: ``sigma = c0 + c1 g~ + c2 g~^2`` (uS), ``g_prog = max(g_T + sigma xi, 0)``;
* drift: ``g(t) = g_prog ((t + t0) / t0)^(-nu)``, ``nu = |mu + s xi|`` drawn once at programming,
  ``mu = clip(-0.0155 ln g~ + 0.0244, 0.049, 0.1)``, ``s = clip(-0.0125 ln g~ - 0.0059, 0.008, 0.045)``;
* 1/f read noise: ``Q = min(0.0088 / max(g~^0.65, 1e-3), 0.2)``,
  ``sigma_t = Q sqrt(ln((t + t0 + t_r) / (2 t_r)))``, ``g = max(g(t) + |g(t)| sigma_t xi, 0)``
  (drawn once per evaluation time: the weights seen by every read at that time);
* global drift compensation (GDC), following Le Gallo et al., IEEE Trans. Electron Devices
  (2018) and Joshi et al., Nature Communications 11, 2473 (2020): one scalar per tile,
  obtained by driving the tile with a fixed set of calibration inputs and summing the absolute
  outputs, once right after programming (``reference = mean |W_prog x_k|``) and again at the
  inference time t; the outputs at t are multiplied by ``reference / mean |W(t) x_k|`` (done in
  the tile's digital output scale). The calibration inputs are
  ``PCMDriftModel.compensation_probes`` signed vectors drawn uniformly from ``[-1, 1]`` with a
  fixed seed (:data:`COMPENSATION_PROBE_SEED`) independent of the noise generator, so both reads
  use the same set. A single all-ones input is not used because with signed weights ``W 1`` can
  cancel (rows summing to zero give a zero reference and a useless factor); the absolute value of
  outputs for signed random inputs is zero only for an all-zero row.

:func:`evaluate_over_time` applies this to every analog tile found in a model and calls a user
evaluation function at each time, restoring the trained weights afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import InvalidSetting, Settings, check_range
from .rng import make_generator, randn
from .tile import AnalogTile, find_analog_tiles

__all__ = ["PCMDriftModel", "ProgrammedWeights", "drift_compensation_factor", "evaluate_over_time",
           "COMPENSATION_PROBE_SEED"]

#: Seed of the calibration inputs of the global drift compensation (fixed, independent of the
#: noise generator: the same probes are read right after programming and at every later time).
COMPENSATION_PROBE_SEED = 20200518


@dataclass
class ProgrammedWeights:
    """Conductances after programming (uS) and the per-device drift exponents."""

    g_pos: Tensor
    g_neg: Tensor
    gt_pos: Tensor  # targets (uS)
    gt_neg: Tensor
    nu_pos: Tensor
    nu_neg: Tensor
    scale: Tensor  # network units per g_max
    # what the drift compensation compares against: mean |W_prog x_k| over the calibration probes
    reference: Optional[Tensor] = None
    probes: int = 128  # number of calibration probes ``reference`` was read with


@dataclass
class PCMDriftModel(Settings):
    """Published PCM-like statistical model (settings, validated). ``*_scale`` fields scale the
    corresponding noise (1 = published, 0 = off). ``compensation_probes`` (integer >= 1) is the
    number of fixed random signed calibration inputs of the global drift compensation (see the
    module docstring); more probes give a factor closer to its large-sample value."""

    g_max: float = 25.0
    prog_coeff: Tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    prog_noise_scale: float = 1.0
    t0: float = 20.0
    t_read: float = 250e-9
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    compensation_probes: int = 128

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "g_max", self.g_max, 0, None, lo_open=True)
        if len(tuple(self.prog_coeff)) != 3:
            raise InvalidSetting(o, "prog_coeff", self.prog_coeff, "three numbers (c0, c1, c2)")
        self.prog_coeff = tuple(float(c) for c in self.prog_coeff)
        check_range(o, "prog_noise_scale", self.prog_noise_scale, 0, None)
        check_range(o, "t0", self.t0, 0, None, lo_open=True)
        check_range(o, "t_read", self.t_read, 0, None, lo_open=True)
        check_range(o, "drift_scale", self.drift_scale, 0, None)
        check_range(o, "read_noise_scale", self.read_noise_scale, 0, None)
        check_range(o, "compensation_probes", self.compensation_probes, 1, None, integer=True)
        self.compensation_probes = int(self.compensation_probes)

    # -- pieces -------------------------------------------------------------------------------
    def prog_sigma(self, gt: Tensor) -> Tensor:
        """Programming-noise std (uS) at target conductance ``gt`` (uS)."""
        gn = gt / self.g_max
        c0, c1, c2 = self.prog_coeff
        return (c0 + c1 * gn + c2 * gn * gn).clamp(min=0.0)

    @staticmethod
    def drift_mu_s(gn: Tensor) -> Tuple[Tensor, Tensor]:
        lg = torch.log(gn.clamp(min=1e-12))
        mu = (-0.0155 * lg + 0.0244).clamp(0.049, 0.1)
        s = (-0.0125 * lg - 0.0059).clamp(0.008, 0.045)
        return mu, s

    @staticmethod
    def read_q(gn: Tensor) -> Tensor:
        return (0.0088 / gn.clamp(min=0).pow(0.65).clamp(min=1e-3)).clamp(max=0.2)

    def _program_g(self, gt: Tensor, generator: Optional[torch.Generator]):
        g = gt
        if self.prog_noise_scale > 0:
            g = (gt + self.prog_noise_scale * self.prog_sigma(gt) * randn(gt.shape, generator, gt)).clamp(min=0.0)
        mu, s = self.drift_mu_s(gt / self.g_max)
        nu = (mu + s * randn(gt.shape, generator, gt)).abs() * self.drift_scale
        return g, nu

    def program(self, w: Tensor, generator: Optional[torch.Generator] = None) -> ProgrammedWeights:
        """Map weights to a conductance pair and program it (with programming noise)."""
        w = w.detach()
        scale = w.abs().amax()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        gt_pos = w.clamp(min=0) / scale * self.g_max
        gt_neg = (-w).clamp(min=0) / scale * self.g_max
        g_pos, nu_pos = self._program_g(gt_pos, generator)
        g_neg, nu_neg = self._program_g(gt_neg, generator)
        pw = ProgrammedWeights(g_pos, g_neg, gt_pos, gt_neg, nu_pos, nu_neg, scale,
                               probes=self.compensation_probes)
        pw.reference = _mean_abs_read(self.to_weights(g_pos, g_neg, scale), pw.probes)
        return pw

    def conductance_at(self, g: Tensor, gt: Tensor, nu: Tensor, t: float,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Conductance ``t`` seconds after programming: drift then 1/f read noise."""
        t = float(t)
        gd = g * ((t + self.t0) / self.t0) ** (-nu)
        if self.read_noise_scale > 0:
            q = self.read_q(gt / self.g_max)
            sig_t = q * math.sqrt(max(math.log((t + self.t0 + self.t_read) / (2 * self.t_read)), 0.0))
            gd = (gd + gd.abs() * self.read_noise_scale * sig_t * randn(gd.shape, generator, gd)).clamp(min=0.0)
        return gd

    def to_weights(self, g_pos: Tensor, g_neg: Tensor, scale: Tensor) -> Tensor:
        return (g_pos - g_neg) / self.g_max * scale

    def weights_at(self, pw: ProgrammedWeights, t: float,
                   generator: Optional[torch.Generator] = None) -> Tensor:
        """Weights (network units) ``t`` seconds after programming, uncompensated."""
        gp = self.conductance_at(pw.g_pos, pw.gt_pos, pw.nu_pos, t, generator)
        gn = self.conductance_at(pw.g_neg, pw.gt_neg, pw.nu_neg, t, generator)
        return self.to_weights(gp, gn, pw.scale)


def compensation_probes(n: int, in_size: int, like: Tensor) -> Tensor:
    """The ``n x in_size`` calibration inputs of the global drift compensation: uniform in
    ``[-1, 1]``, drawn on the CPU from :data:`COMPENSATION_PROBE_SEED` (the same numbers on every
    call, on any device), returned on ``like``'s device and dtype."""
    g = torch.Generator().manual_seed(COMPENSATION_PROBE_SEED)
    x = torch.rand((int(n), int(in_size)), generator=g, dtype=torch.float64) * 2.0 - 1.0
    return x.to(device=like.device, dtype=like.dtype)


def _mean_abs_read(w: Tensor, probes: int = 128) -> Tensor:
    """mean |W x_k| over the calibration probes (all outputs, all probes): the read of the global
    drift compensation. Zero only if W is zero (signed inputs: no cancellation across a row)."""
    x = compensation_probes(probes, w.shape[1], w)
    return (x @ w.t()).abs().mean()


def drift_compensation_factor(pw: ProgrammedWeights, w_t: Tensor) -> Tensor:
    """Global drift compensation: ``reference / mean |W(t) x_k|`` over the same calibration probes
    as the reference (1 where undefined: an all-zero read at time t)."""
    now = _mean_abs_read(w_t, pw.probes)
    ref = pw.reference if pw.reference is not None else now
    return torch.where(now > 0, ref / now.clamp(min=1e-30), torch.ones_like(now))


def _snapshot(tile: Any) -> Dict[str, Any]:
    if isinstance(tile, AnalogTile):
        return {"w": [[(a.w.clone(), None if a._w_read is None else a._w_read.clone()) for a in row]
                      for row in tile.arrays],
                "scale": tile.out_scale.clone()}
    return {"weights": tile.get_weights().detach().clone()}


def _restore(tile: Any, snap: Dict[str, Any]) -> None:
    if isinstance(tile, AnalogTile):
        for row, srow in zip(tile.arrays, snap["w"]):
            for a, (w, wr) in zip(row, srow):
                a.w, a._w_read = w, wr
        tile.out_scale.copy_(snap["scale"])
    else:
        tile.set_weights(snap["weights"])


def _write_inference(tile: Any, w: Tensor, factor: Tensor) -> None:
    """Put the drifted weights on the tile (no device clipping: these are read-out conductances);
    compensation goes to the digital output scale."""
    if isinstance(tile, AnalogTile):
        base = tile.out_scale.clone()
        wt = w / base.unsqueeze(1)
        for row, rs in zip(tile.arrays, tile._row_slices()):
            for a, cs in zip(row, tile._col_slices()):
                a.w = wt[rs, cs].to(a.w.dtype).clone()
                a._w_read = None
        tile.out_scale.copy_(base * factor)
    else:
        tile.set_weights(w * factor)


@torch.no_grad()
def evaluate_over_time(model: Any, eval_fn: Callable[[Any], Any], times: Sequence[float],
                       noise_model: Optional[PCMDriftModel] = None, compensation: bool = True,
                       seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> List[Dict[str, Any]]:
    """Evaluate ``eval_fn(model)`` at each time (seconds after programming) on PCM-like devices.

    Every analog tile reachable from ``model`` (see :func:`~ffebm.analog.tile.find_analog_tiles`:
    modules and plain attributes exposing the tile API) is programmed once (programming noise and
    drift exponents drawn once), then for each time its weights are replaced by the drifted,
    read-noisy ones (with global drift compensation if ``compensation``) and ``eval_fn`` is
    called. The trained weights are restored at the end (also on error).

    Returns ``[{"t": t, "result": eval_fn(model), "compensation": [factor per tile]}, ...]``.
    """
    nm = noise_model if noise_model is not None else PCMDriftModel()
    tiles = find_analog_tiles(model)
    if not tiles:
        raise ValueError("evaluate_over_time: no analog tiles found in the model")
    for t in times:
        check_range("evaluate_over_time", "times", float(t), 0, None)
    snaps = [_snapshot(t) for t in tiles]
    out: List[Dict[str, Any]] = []
    try:
        progs = []
        gens = []
        for tile in tiles:
            w = tile.get_weights().detach()
            g = generator
            if g is None:
                g = make_generator(seed if seed is not None else None, w.device)
                seed = None if seed is None else seed + 1
            gens.append(g)
            progs.append(nm.program(w, g))
        for t in times:
            factors = []
            for tile, pw, g, snap in zip(tiles, progs, gens, snaps):
                _restore(tile, snap)
                w_t = nm.weights_at(pw, t, g)
                f = drift_compensation_factor(pw, w_t) if compensation else torch.ones((), dtype=w_t.dtype, device=w_t.device)
                _write_inference(tile, w_t, f)
                factors.append(float(f))
            out.append({"t": float(t), "result": eval_fn(model), "compensation": factors})
    finally:
        for tile, snap in zip(tiles, snaps):
            _restore(tile, snap)
    return out
