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
from .gradients.loss_nudge import loss_nudge
from .utils import energy_blocks

INPUT = "<input>"


class _Current(GradientMethod):
    """Sentinel candidate: every block keeps the method it has."""

    def describe(self) -> str:
        return "as configured"

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()


class PerBlock(GradientMethod):
    """A candidate that is ``default`` on every block but those named in ``special`` (e.g. the
    published scheme: the last block nudged by the loss, ``EP(nudge="loss")``, the others by
    delta)."""

    def __init__(self, default: GradientMethod, special: Dict[str, GradientMethod]):
        self.default, self.special = default, dict(special)

    def for_block(self, name: str) -> GradientMethod:
        return self.special.get(name, self.default)

    def describe(self) -> str:
        return self.default.describe() + "; " + ", ".join(f"{n}: {m.describe()}" for n, m in self.special.items())

    def backward(self, call, delta):
        return self.for_block(call.block.name).backward(call, delta)


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
        self.nudge = ep.nudge  # a forward records the loss cost when the wrapped EP nudges by it

    def backward(self, call, delta):
        hist = self.ep.trace(call, delta)
        self.store[call.block.name] = hist
        return hist[-1]

    def describe(self) -> str:
        return self.ep.describe()


def _grads(model, loss_fn, x, y, include_input):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x_ = x.detach().clone().requires_grad_(include_input and x.is_floating_point())
    with loss_nudge(model, loss_fn, y):  # blocks with EP(nudge="loss") are nudged by this loss
        out = model(x_)
    loss = loss_fn(out, y)
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
            blk.gradient = saved_methods[name] if method is CURRENT else \
                method.for_block(name) if isinstance(method, PerBlock) else method
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
                    # a tensor the reference gives no gradient counts as zero there, as in the rows
                    traces[label][bname] = [
                        {pn: cosine(gp, torch.zeros_like(gp) if ref.get(pn) is None else ref[pn])
                         for pn, gp in zip(names, gparams) if gp is not None}
                        for (_, gparams) in store[bname]]
    finally:
        for name, blk in blocks:
            blk.gradient = saved_methods[name]
        model.load_state_dict(saved_state)
        torch.set_rng_state(rng)
    return GradientComparison(reference=reference.describe(), rows=rows, grads=all_grads, block_of=block_of,
                              traces=traces)


# ---------------------------------------------------------------------------------------------
# step by step: EP's running estimate against truncated backprop (the "GDD" check)
# ---------------------------------------------------------------------------------------------
@dataclass
class GDDComparison:
    """EP's running estimate after k nudged steps against backprop through the last k steps of
    the free dynamics run from the equilibrium (truncated BPTT), k = 1..T2, per block and tensor.

    ``blocks[block][tensor]`` is a list over k of ``{"k", "ep_norm", "bptt_norm", "cosine",
    "rel_error"}`` (relative error of EP against BPTT). Tensors: the coupling parameters (their
    model names), ``"u"`` (the block's input drive) and ``"s0"``, ``"s1"``, ... (the neuron
    layers: EP's ``-(s_a - s_b) / ((beta_a - beta_b) c)`` against BPTT's gradient with respect to the
    layer's pre-activation summed over the last k steps, ``sum_t sigma' * dL/ds_{T-t}``). For
    synchronous dynamics at a small beta the two agree at every k (Ernoult et al. 2019's
    gradient-descending-updates property); both tend to the implicit gradient as k grows.
    """

    method: str
    mode: str
    blocks: Dict[str, Dict[str, List[Dict[str, float]]]]

    @staticmethod
    def short(name: str) -> str:
        return _short(name)

    def tensors(self, block: str, biases: bool = False) -> List[str]:
        return [t for t in self.blocks[block] if biases or not t.endswith("bias")]

    def table(self, biases: bool = False, every: int = 1) -> str:
        """Per block: one row per k, one ``cosine / rel.err`` column per tensor."""
        lines = [f"EP's running estimate ({self.method}) vs backprop through the last k free steps from the "
                 f"equilibrium ({self.mode} dynamics): cosine / relative error"]
        for bname, per in self.blocks.items():
            names = self.tensors(bname, biases)
            short = [_short(n) for n in names]
            w = max([15] + [len(s) for s in short])
            lines.append(f"\n{bname}   " + "  ".join(f"{s:>{w}}" for s in short))
            n = len(per[names[0]]) if names else 0
            for k in range(n):
                if (k + 1) % every and k not in (0, n - 1):
                    continue
                cells = [f"{per[t][k]['cosine']:7.4f}/{per[t][k]['rel_error']:7.1e}" for t in names]
                lines.append(f"  k={k + 1:<4d} " + "  ".join(f"{c:>{w}}" for c in cells))
        lines.append("\nW<i> / b<i>: the weight / bias of the block's coupling i (couplings.<i-1>); u: the block's "
                     "input drive; s<i>: neuron layer i. A zero reference (BPTT) shows the absolute error.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"method": self.method, "mode": self.mode, "blocks": self.blocks}


def _short(name: str) -> str:
    """``"3.couplings.1.weight"`` -> ``"W2"`` (coupling index from 1); ``u`` and ``s<i>`` stay."""
    parts = name.split(".")
    if "couplings" in parts:
        i = parts.index("couplings")
        if i + 2 < len(parts):
            return ("W" if parts[i + 2] == "weight" else "b") + str(int(parts[i + 1]) + 1)
    return name


class _GDDProbe(GradientMethod):
    """Runs EP step by step and truncated backprop on one block call; returns EP's estimate."""

    def __init__(self, ep: EP, mode: Optional[str], names: Dict[int, str], store: Dict[str, dict]):
        self.ep, self.mode, self.names, self.store = ep, mode, names, store
        self.nudge = ep.nudge  # a forward records the loss cost when the EP nudges by it

    def describe(self) -> str:
        return self.ep.describe()

    def backward(self, call, delta):
        import dataclasses

        from .solvers import analytic_step

        if self.mode is not None:
            call = dataclasses.replace(call, relaxation=dataclasses.replace(call.relaxation, mode=self.mode),
                                       nudge_relaxation=dataclasses.replace(call.nudge_relaxation, mode=self.mode))
        mode = call.nudge_relaxation.mode
        tr = self.ep.trajectories(call, delta)
        call, free, block = tr.call, tr.free, tr.call.block
        steps = max(len(tr.a), len(tr.b))
        params = list(call.params)
        names = [self.names.get(id(p), f"param{i}") for i, p in enumerate(params)]
        a = block.gain
        # sigma' at the equilibrium: a on units inside the box (all units of an unbounded layer)
        slope = [a * (((t > 0) & (t < 1)) if block.bounded(i) else torch.ones_like(t, dtype=torch.bool)).to(t.dtype)
                 for i, t in enumerate(free)]
        # the free dynamics from the equilibrium, T2 steps (they stay at s* up to its residual)
        run = [[t.detach() for t in free]]
        with torch.no_grad():
            for _ in range(steps):
                run.append(analytic_step(block, call.u, run[-1], None, mode, {}))
        lam = [torch.zeros_like(t) for t in free]
        lam[-1] = delta.to(free[-1].dtype)
        cum_p = [None] * len(params)
        cum_u = None
        cum_s = [torch.zeros_like(t) for t in free]
        rows: Dict[str, List[Dict[str, float]]] = {}

        def add(name, ep_g, bp_g):
            if ep_g is None and bp_g is None:
                return
            ep_g = torch.zeros_like(bp_g) if ep_g is None else ep_g
            bp_g = torch.zeros_like(ep_g) if bp_g is None else bp_g
            rows.setdefault(name, []).append(dict(
                k=len(rows.get(name, [])) + 1, ep_norm=float(ep_g.double().norm()),
                bptt_norm=float(bp_g.double().norm()), cosine=cosine(ep_g, bp_g), rel_error=rel_error(ep_g, bp_g)))

        for k in range(1, steps + 1):
            # backprop through step T-k+1 (the k-th from the end): dL/ds_{T-k}, that step's
            # contributions to dL/dθ and dL/du, and the gradient with respect to each layer's
            # new value inside the step (async: the odd layers read the even ones' new values),
            # which times sigma' is the gradient with respect to that update's pre-activation
            with torch.enable_grad():
                u_ = call.u.detach().requires_grad_(call.wants_input)
                prev = [t.detach().requires_grad_(True) for t in run[steps - k]]
                out = analytic_step(block, u_, prev, None, mode, {})
                wanted = [p for p, w in zip(params, call.wants) if w]
                inputs = prev + list(out) + ([u_] if call.wants_input else []) + wanted
                gs = torch.autograd.grad(out, inputs, grad_outputs=lam, allow_unused=True)
            L = len(prev)
            for i in range(L):
                g_new = gs[L + i] if gs[L + i] is not None else lam[i]
                cum_s[i] = cum_s[i] + slope[i] * g_new
            lam = [torch.zeros_like(t) if g is None else g for g, t in zip(gs[:L], prev)]
            rest = list(gs[2 * L:])
            if call.wants_input:
                g_u = rest.pop(0)
                if g_u is not None:
                    cum_u = g_u if cum_u is None else cum_u + g_u
            for i, w in enumerate(call.wants):
                if w:
                    g = rest.pop(0)
                    if g is not None:
                        cum_p[i] = g if cum_p[i] is None else cum_p[i] + g
            e_u, e_p = tr.estimate(k - 1)
            diffs = tr.layer_difference(k - 1)
            for i, n in enumerate(names):
                if call.wants[i]:
                    add(n, e_p[i], cum_p[i])
            if call.wants_input:
                add("u", e_u, cum_u)
            for i in range(len(free)):
                add(f"s{i}", -diffs[i] * tr.scale, cum_s[i])
        self.store[call.block.name] = rows
        g_u, g_p = tr.estimate(steps - 1)
        from .gradients.base import BackwardStats, GradientResult

        return GradientResult(g_u, g_p, BackwardStats(method=self.describe(), polish=tr.polish))


def compare_gdd(model: nn.Module, loss_fn: Callable, batch: Sequence[torch.Tensor], ep: Optional[EP] = None,
                mode: Optional[str] = None) -> GDDComparison:
    """The step-by-step check of EP against truncated backprop on every energy block of ``model``
    (see :class:`GDDComparison`) on one batch. ``ep``: the EP settings (default ``EP()``; its
    ``steps`` or each block's nudged step count give T2), or a :class:`PerBlock` of EPs (e.g. the
    last block nudged by the loss, ``EP(nudge="loss")``: its force at s* is the incoming gradient
    that backprop starts from, so the two still agree as beta -> 0); ``mode``: run both with "sync" or
    "async" dynamics (default: each block's own). Each block's incoming gradient is the one the
    EP backward of the blocks above it produces (what training sees); EP and backprop get the same
    one. The model's parameters, buffers and gradient methods are restored afterwards."""
    ep = ep if ep is not None else EP()
    eps = [ep.default, *ep.special.values()] if isinstance(ep, PerBlock) else [ep]
    if not all(isinstance(e, EP) for e in eps):
        raise TypeError(f"compare_gdd takes an EP method (or a PerBlock of EP methods), got "
                        f"{', '.join(type(e).__name__ for e in eps)}")
    if mode is not None and mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync', 'async' or None, got {mode!r}")
    x, y = batch[0], batch[1]
    blocks = list(energy_blocks(model))
    if not blocks:
        raise ValueError("compare_gdd: the model has no energy block")
    saved_methods = {name: blk.gradient for name, blk in blocks}
    saved_state = copy.deepcopy(model.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    store: Dict[str, dict] = {}
    rng = torch.get_rng_state()
    try:
        for bname, blk in blocks:
            blk.gradient = _GDDProbe(ep.for_block(bname) if isinstance(ep, PerBlock) else ep, mode, names, store)
        _grads(model, loss_fn, x, y, include_input=False)
    finally:
        for name, blk in blocks:
            blk.gradient = saved_methods[name]
        model.load_state_dict(saved_state)
        torch.set_rng_state(rng)
    modes = {mode or blk.nudge_relaxation.mode for _, blk in blocks}
    ordered = {name: store[name] for name, _ in blocks if name in store}
    return GDDComparison(method=ep.describe(), mode="/".join(sorted(modes)), blocks=ordered)
