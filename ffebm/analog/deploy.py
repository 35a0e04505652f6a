"""Deployment of inference layers: program the trained weights onto a (simulated) PCM chip once,
let them drift, read them with global drift compensation, and evaluate over time.

    program(model, seed=0)      # programming noise and drift exponents drawn once per layer
    drift_to(model, 86400.0)    # one day later: drift, 1/f read noise, drift compensation
    ...evaluate...              # every read now sees the drifted weights (train or eval mode)
    unprogram(model)            # back to the trained weights (they were never changed)

or ``with deployed(model, seed=0): ...``, and :func:`evaluate_over_time` on top of them (mean and
spread over several programming draws). The statistical model is
:class:`~ffebm.analog.drift.PCMDriftModel` (each layer's ``config.noise_model``; published
defaults, Nandakumar et al. 2019, Joshi et al. 2020), the compensation that of
:func:`~ffebm.analog.drift.drift_compensation_factor` (one factor per layer, applied digitally
to its outputs after the ADC; Le Gallo et al. 2018). The trained weights stay in ``layer.weight``
throughout: a layer holds its chip state in ``layer.deployment``, and refuses to read if its
weight is changed while programmed (train on after :func:`unprogram`). The chip state is part of
each layer's ``state_dict()`` (its extra state, plain tensors and numbers): a programmed model saved
with ``torch.save(model.state_dict(), path)`` and loaded into a fresh model
(``torch.load(path, weights_only=True)``) reads the same weights, and :func:`drift_to` goes on
with the same 1/f read-noise stream; a state saved unprogrammed loads as unprogrammed.
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import check_range
from .drift import drift_compensation_factor
from .inference_layers import Deployment, InferenceModule, inference_modules
from .rng import make_generator
from .tile import find_analog_tiles

__all__ = ["program", "drift_to", "unprogram", "deployed", "evaluate_over_time"]


def _modules(model: nn.Module, what: str) -> List[InferenceModule]:
    mods = inference_modules(model) if isinstance(model, nn.Module) else []
    if not mods:
        raise ValueError(f"{what}: no inference layers in the model (convert it with "
                         "convert_to_analog(model, InferenceConfig(...)) or to_analog_energy(model, InferenceConfig(...)))")
    return mods


@torch.no_grad()
def program(model: nn.Module, seed: Optional[int] = None) -> List[InferenceModule]:
    """Program every inference layer of ``model``: its weight matrix is mapped to a conductance pair
    (``max |W|`` at ``g_max``) and programmed with the noise model's programming noise, drift
    exponents drawn once (``config.noise_model.program``). From now on its reads see the
    programmed weights (no modifier, in train and eval mode), until :func:`drift_to` or
    :func:`unprogram`. Programming again replaces the previous draw.

    ``seed``: layer k draws from ``seed + k`` (None: from each layer's own generator, which
    advances). Returns the programmed layers."""
    mods = _modules(model, "program")
    for k, m in enumerate(mods):
        w = m.weight.detach()
        gen = make_generator(seed + k, w.device) if seed is not None else m.generator
        nm = m.config.noise_model
        pw = nm.program(m.weight_matrix().detach(), gen)
        w_prog = nm.to_weights(pw.g_pos, pw.g_neg, pw.scale).reshape(w.shape).to(w.dtype)
        # the 1/f read noise of later drift_to calls: a stream of its own, forked from this draw
        read_gen = make_generator(int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device).item()),
                                  w.device)
        m.deployment = Deployment(programmed=pw, trained=w.clone(), w_read=w_prog, factor=None, t=None,
                                  generator=read_gen)
    return mods


@torch.no_grad()
def drift_to(model: nn.Module, t: float, compensation: Optional[bool] = None) -> List[float]:
    """Move every programmed inference layer of ``model`` to ``t`` seconds after programming:
    conductance drift ``g(t) = g_prog ((t + t0) / t0)^(-nu)`` and 1/f read noise (drawn anew at
    each call) of ``config.noise_model``, and, with ``compensation`` (default: each layer's
    ``config.drift_compensation``), global drift compensation: the layer's outputs are multiplied
    by ``mean |W_prog x_k| / mean |W(t) x_k|`` over the fixed calibration inputs ``x_k``.
    Returns the compensation factor of each layer (1.0 without compensation)."""
    check_range("drift_to", "t", float(t), 0, None)
    mods = _modules(model, "drift_to")
    missing = [type(m).__name__ for m in mods if m.deployment is None]
    if missing:
        raise RuntimeError(f"drift_to: {len(missing)} inference layer(s) are not programmed ({', '.join(missing)}); "
                           "call ffebm.analog.program(model) first")
    factors = []
    for m in mods:
        dep = m.deployment
        nm = m.config.noise_model
        w_t = nm.weights_at(dep.programmed, float(t), dep.generator)
        comp = m.config.drift_compensation if compensation is None else bool(compensation)
        f = drift_compensation_factor(dep.programmed, w_t) if comp else None
        dep.w_read = w_t.reshape(dep.trained.shape).to(dep.trained.dtype)
        dep.factor = None if f is None else f.to(dep.trained.dtype)
        dep.t = float(t)
        factors.append(1.0 if f is None else float(f))
    return factors


def unprogram(model: nn.Module) -> int:
    """Drop the chip state of every inference layer of ``model``: its reads see the trained weights
    again (training-mode reads with the modifier). Returns the number of layers that were
    programmed."""
    n = 0
    for m in inference_modules(model):
        if m.deployment is not None:
            m.deployment = None
            n += 1
    return n


@contextlib.contextmanager
def deployed(model: nn.Module, seed: Optional[int] = None) -> Iterator[nn.Module]:
    """``with deployed(model, seed): ...``: :func:`program` on entry, :func:`unprogram` on exit
    (also on error)."""
    program(model, seed)
    try:
        yield model
    finally:
        unprogram(model)


def _number(r: Any) -> Optional[float]:
    if isinstance(r, bool):
        return None
    if isinstance(r, (int, float)):
        return float(r)
    if isinstance(r, Tensor) and r.numel() == 1:
        return float(r)
    return None


def _summarise(t: float, results: List[Any], comps: List[List[float]]) -> Dict[str, Any]:
    nums = [_number(r) for r in results]
    ok = all(v is not None for v in nums)
    return {"t": float(t), "results": results, "compensation": comps,
            "mean": statistics.fmean(nums) if ok else None,
            "std": (statistics.stdev(nums) if len(nums) > 1 else 0.0) if ok else None}


@torch.no_grad()
def evaluate_over_time(model: Any, eval_fn: Callable[[Any], Any], times: Sequence[float],
                       noise_model: Any = None, compensation: Optional[bool] = None,
                       seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                       draws: Optional[int] = None) -> List[Dict[str, Any]]:
    """Evaluate ``eval_fn(model)`` at each time (seconds after programming).

    *Inference layers* (:class:`~ffebm.analog.inference_layers.InferenceModule`): for each of
    ``draws`` (default 1) programming draws, :func:`program` (``seed + 1000 * draw`` when ``seed``
    is given), then :func:`drift_to` each time and call ``eval_fn``; the trained weights are
    restored at the end (also on error; a layer programmed before the call gets its chip state
    back). Each layer's ``config.noise_model`` is used (``noise_model`` must be
    None); ``compensation`` None = each layer's ``config.drift_compensation``. Returns, per time,
    ``{"t", "results": [one per draw], "mean", "std" (over the draws; None unless eval_fn returns
    numbers or one-element tensors), "compensation": [[factor per layer] per draw]}``.

    *Training tiles* (no inference layer in the model): the PCM drift evaluation of
    :func:`ffebm.analog.drift.evaluate_over_time` (its arguments; ``compensation`` None = True);
    with ``draws`` given the result has the per-time format above, one draw per seed
    ``seed + 1000 * draw``. A model holding both kinds is refused.
    """
    from .drift import evaluate_over_time as tiles_over_time

    mods = inference_modules(model) if isinstance(model, nn.Module) else []
    if draws is not None:
        check_range("evaluate_over_time", "draws", draws, 1, None, integer=True)
    for t in times:
        check_range("evaluate_over_time", "times", float(t), 0, None)
    if not mods:
        comp = True if compensation is None else bool(compensation)
        if draws is None:
            return tiles_over_time(model, eval_fn, times, noise_model, comp, seed, generator)
        runs = [tiles_over_time(model, eval_fn, times, noise_model, comp,
                                None if seed is None else seed + 1000 * k, generator) for k in range(int(draws))]
        return [_summarise(t, [r[i]["result"] for r in runs], [r[i]["compensation"] for r in runs])
                for i, t in enumerate(times)]
    if find_analog_tiles(model):
        raise ValueError("evaluate_over_time: the model holds both inference layers and analog training tiles; "
                         "evaluate them separately")
    if noise_model is not None or generator is not None:
        raise ValueError("evaluate_over_time: inference layers use their own config.noise_model and generators; "
                         "pass seed= (and set InferenceConfig(noise_model=...) at conversion)")
    before = [m.deployment for m in mods]
    results: List[List[Any]] = [[] for _ in times]
    comps: List[List[List[float]]] = [[] for _ in times]
    try:
        for k in range(int(draws or 1)):
            program(model, None if seed is None else seed + 1000 * k)
            for i, t in enumerate(times):
                comps[i].append(drift_to(model, t, compensation))
                results[i].append(eval_fn(model))
    finally:
        for m, dep in zip(mods, before):  # as before the call: trained weights, or the same chip state
            m.deployment = dep
    return [_summarise(t, results[i], comps[i]) for i, t in enumerate(times)]
