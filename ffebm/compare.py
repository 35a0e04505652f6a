"""Gradient comparison: how close is each method's gradient to a reference, per parameter.

    res = ffebm.compare_gradients(model, loss_fn, (x, y), reference=Implicit(),
                                  candidates=[EP(0.05), EP(0.05, variant="positive")])
    print(res.table())

For each method every energy block of the model is switched to it, the loss is
back-propagated (autograd through digital parts, the method through the blocks) and the
gradients of all parameters (and of the input) are compared to the reference's: cosine
similarity and relative error |g - g_ref| / |g_ref|. The model's parameters, buffers and
gradient methods are restored afterwards. ``trace=True`` also records, for EP candidates,
the running estimate after each nudged step (the step-by-step convergence towards the
reference).

A parameter with a gradient on one side only is a disagreement (the absent side counts as zero:
cosine 0, relative error 1 or inf); one with no gradient on either side is reported as *not
comparable* (cosine and error NaN, ``comparable=False``), never as agreement. Analog weights
trained by pulses are compared through the dense equivalent of the update they would pulse.
Every method runs from the same random state (dropout draws the same masks).
``candidates=[CURRENT]`` compares each block's own method (mixed-method models) with the
reference.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .gradients import EP, GradientMethod, Implicit
from .utils import energy_blocks

INPUT = "<input>"


class _Current(GradientMethod):
    """Sentinel candidate: every block keeps the method it has."""

    def describe(self) -> str:
        return "as configured"

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    d = (a.double() - ref).norm()
    n = ref.norm()
    return float(d / n) if n > 0 else float(d)


@dataclass
class GradientComparison:
    reference: str
    rows: List[dict]
    grads: Dict[str, Dict[str, torch.Tensor]]
    block_of: Dict[str, str]
    traces: Dict[str, Dict[str, List[Dict[str, float]]]] = field(default_factory=dict)

    def methods(self) -> List[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def _rows(self, method: Optional[str]) -> List[dict]:
        rows = [r for r in self.rows if r["comparable"] and (method is None or r["method"] == method)]
        if not rows:
            raise ValueError(f"no comparable gradient rows for method {method!r} (methods: {self.methods()})")
        return rows

    def min_cosine(self, method: Optional[str] = None) -> float:
        """Smallest cosine over the comparable rows (ValueError if there are none)."""
        return min(r["cosine"] for r in self._rows(method))

    def max_rel_error(self, method: Optional[str] = None) -> float:
        return max(r["rel_error"] for r in self._rows(method))

    def not_comparable(self, method: Optional[str] = None) -> List[str]:
        """Parameters with no gradient on one side or both (no verdict on them)."""
        return [r["param"] for r in self.rows if not r["comparable"] and (method is None or r["method"] == method)]

    def table(self) -> str:
        w = max([len(r["param"]) for r in self.rows] + [9])
        lines = [f"reference: {self.reference}"]
        for m in self.methods():
            lines.append(f"\n{m}")
            lines.append(f"  {'parameter':<{w}}  {'block':<10}  {'cosine':>9}  {'rel.err':>9}  {'|g|':>9}")
            for r in self.rows:
                if r["method"] != m:
                    continue
                if not r["comparable"]:
                    lines.append(f"  {r['param']:<{w}}  {r['block'][:10]:<10}  {'n/a':>9}  {'n/a':>9}  "
                                 f"{'':>9}  not comparable: {r['note']}")
                    continue
                flag = "  <-- poor" if r["cosine"] < 0.9 else ""
                lines.append(f"  {r['param']:<{w}}  {r['block'][:10]:<10}  {r['cosine']:9.5f}  "
                             f"{r['rel_error']:9.2e}  {r['norm']:9.2e}{flag}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "rows": self.rows, "traces": self.traces}


class _TracingEP(GradientMethod):
    """Wraps an EP object: records the running estimate after each nudged step."""

    def __init__(self, ep: EP, store: Dict[str, List]):
        self.ep, self.store = ep, store

    def backward(self, call, delta):
        hist = self.ep.trace(call, delta)
        self.store[call.block.name] = hist
        return hist[-1]

    def describe(self) -> str:
        return self.ep.describe()


def _grads(model, loss_fn, x, y, include_input):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x_ = x.detach().clone().requires_grad_(include_input and x.is_floating_point())
    loss = loss_fn(model(x_), y)
    inputs = [p for _, p in params] + ([x_] if x_.requires_grad else [])
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    out = {n: (None if g is None else g.detach()) for (n, p), g in zip(params, gs)}
    if x_.requires_grad:
        out[INPUT] = gs[-1].detach() if gs[-1] is not None else None
    return out


def _row(label: str, pname: str, block: str, g, ref) -> dict:
    row = {"method": label, "param": pname, "block": block}
    if g is None and ref is None:
        row.update(comparable=False, cosine=math.nan, rel_error=math.nan, norm=math.nan,
                   note="no gradient (both)")
        return row
    note = "no gradient (candidate)" if g is None else ("no gradient (reference)" if ref is None else "")
    if ref is None:
        err = math.inf if float(g.double().norm()) > 0 else 0.0
        row.update(comparable=True, cosine=1.0 if err == 0.0 else 0.0, rel_error=err, norm=0.0, note=note)
        return row
    g = torch.zeros_like(ref) if g is None else g
    row.update(comparable=True, cosine=cosine(g, ref), rel_error=rel_error(g, ref),
               norm=float(ref.double().norm()), note=note)
    return row


def compare_gradients(model: nn.Module, loss_fn: Callable, batch: Sequence[torch.Tensor],
                      reference: GradientMethod = None, candidates: Sequence[GradientMethod] = (),
                      include_input: bool = True, trace: bool = False) -> GradientComparison:
    """Compare ``candidates`` to ``reference`` (default Implicit()) on one batch."""
    reference = reference if reference is not None else Implicit()
    if not candidates:
        candidates = [EP()]
    x, y = batch[0], batch[1]
    blocks = list(energy_blocks(model))
    saved_methods = {name: blk.gradient for name, blk in blocks}
    saved_state = copy.deepcopy(model.state_dict())
    block_of = {}
    for pname, _ in model.named_parameters():
        block_of[pname] = "digital"
    for bname, blk in blocks:
        prefix = [n for n, m in model.named_modules() if m is blk][0]
        for pname, _ in blk.named_parameters():
            block_of[f"{prefix}.{pname}" if prefix else pname] = bname
    block_of[INPUT] = "input"

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run(method):
        model.load_state_dict(saved_state)
        for name, blk in blocks:  # CURRENT: each block its own method
            blk.gradient = saved_methods[name] if method is CURRENT else method
        torch.set_rng_state(rng)  # the same dropout masks (and other draws) for every method
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return _grads(model, loss_fn, x, y, include_input)

    traces: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    try:
        ref = run(reference)
        all_grads = {reference.describe(): ref}
        rows = []
        for i, m in enumerate(candidates):
            label = m.describe()
            if label in all_grads:
                label = f"{label}#{i}"
            store: Dict[str, List] = {}
            if m is CURRENT:
                label = "as configured: " + ", ".join(f"{n}={saved_methods[n].describe()}" for n, _ in blocks)
            g = run(_TracingEP(m, store) if (trace and isinstance(m, EP)) else m)
            all_grads[label] = g
            for pname, gr in g.items():
                rows.append(_row(label, pname, block_of.get(pname, "digital"), gr, ref.get(pname)))
            if store:
                traces[label] = {}
                for bname, blk in blocks:
                    if bname not in store:
                        continue
                    prefix = [n for n, mm in model.named_modules() if mm is blk][0]
                    names = [f"{prefix}.couplings.{n}" if prefix else f"couplings.{n}"
                             for n, _ in blk.couplings.named_parameters()]
                    traces[label][bname] = [
                        {pn: cosine(gp, ref[pn]) for pn, gp in zip(names, gparams) if gp is not None}
                        for (_, gparams) in store[bname]]
    finally:
        for name, blk in blocks:
            blk.gradient = saved_methods[name]
        model.load_state_dict(saved_state)
        torch.set_rng_state(rng)
    return GradientComparison(reference=reference.describe(), rows=rows, grads=all_grads, block_of=block_of,
                              traces=traces)
