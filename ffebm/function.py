"""The autograd bridge: free solve in forward, the block's gradient method in backward.

Everything the backward needs (the drive u, the free equilibrium, the free solve's statistics,
the gradient method and relaxation settings in force at call time) is saved in *this call's*
autograd context, never on the block: a block may be called several times before one
``backward()`` and each call is differentiated at its own equilibrium.

Parameter gradients are returned from ``backward`` (not written to ``.grad`` by hand), so
autograd accumulates them like any other: DistributedDataParallel's hooks, gradient clipping,
frozen parameters (``requires_grad=False``: no gradient is formed for them) and ordinary
optimizers work unchanged.

Not supported, and refused with :class:`NotTwiceDifferentiable` / :class:`FunctorchUnsupported`
instead of returning a wrong number:

* differentiating a block's gradient again (gradient penalties, ``create_graph=True`` then
  ``backward``): EP, Implicit and Unrolled produce first-order gradients only;
* ``torch.func`` transforms (``grad``, ``vmap``, ``functional_call`` under them): the
  relaxation's step count depends on the data and the methods call ``torch.autograd``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import List, Optional, Sequence

import torch
from torch.autograd.graph import get_gradient_edge

from .errors import FunctorchUnsupported, NotTwiceDifferentiable
from .gradients.base import BlockCall
from .gradients.loss_nudge import active_cost

States = List[torch.Tensor]


def will_accumulate(edge) -> bool:
    """True if the running backward will accumulate a gradient through ``edge`` into a leaf's
    ``.grad`` (``loss.backward()``), False for ``torch.autograd.grad`` (which never accumulates)
    and for leaves outside ``backward(inputs=...)``."""
    if edge is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(edge.node))
    except RuntimeError:
        # "a leaf node was passed ... while running autograd.grad()": grad() accumulates nothing
        return False


def _edges(params: Sequence[torch.Tensor]) -> list:
    out = []
    for p in params:
        out.append(get_gradient_edge(p) if p.requires_grad and getattr(p, "analog_ctx", None) is not None
                   else None)
    return out


class _Equilibrium(torch.autograd.Function):
    @staticmethod
    def forward(block, u: torch.Tensor, holder: dict, *params: torch.Tensor):  # type: ignore[override]
        states, stats = block.solve(u.detach(), states=holder["init"])
        holder["stats"] = stats
        holder["states"] = states
        return states[-1].clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        block, u, holder = inputs[0], inputs[1], inputs[2]
        params = inputs[3:]
        ctx.block = block
        # snapshots: editing the block's method or settings after this call changes later
        # calls, not this one's backward
        ctx.method = block.gradient.snapshot()
        ctx.relaxation = copy.copy(block.relaxation)
        ctx.nudge_relaxation = copy.copy(block.nudge_relaxation)
        ctx.free_stats = holder["stats"]
        # the loss cost of this call (ffebm.loss_nudge active now, the method nudging by the loss)
        ctx.cost = active_cost(block) if getattr(ctx.method, "nudge", None) == "loss" else None
        ctx.slots = holder["slots"]
        states = holder["states"]
        ctx.num_layers = len(states)
        ctx.edges = _edges(params)
        # u and the parameters are saved so that autograd checks they were not modified in
        # place between forward and backward (an optimizer step in between would be an error);
        # u itself (not detached), so that a refused double backward stays connected to it
        ctx.save_for_backward(u, *states, *params)

    @staticmethod
    def backward(ctx, delta: torch.Tensor):  # type: ignore[override]
        block = ctx.block
        if torch.is_grad_enabled():  # create_graph=True: the result would be differentiated again
            return (None, *_refuse_double_backward(block, ctx.method, ctx, delta))
        saved = ctx.saved_tensors
        L = ctx.num_layers
        u, states, params = saved[0].detach(), list(saved[1:1 + L]), tuple(saved[1 + L:])
        need = ctx.needs_input_grad
        wants = tuple(bool(need[3 + i]) and p.requires_grad for i, p in enumerate(params))
        call = BlockCall(block=block, u=u, states=states, free_stats=ctx.free_stats,
                         relaxation=ctx.relaxation, nudge_relaxation=ctx.nudge_relaxation, params=params,
                         wants_input=bool(need[1]), wants=wants,
                         records=tuple(w and will_accumulate(e) for w, e in zip(wants, ctx.edges)),
                         cost=ctx.cost)
        # the energy is evaluated with this call's parameter tensors (they differ from the
        # module's own after e.g. torch.func.functional_call returned)
        with _parameters_of_call(ctx.slots, params):
            result = ctx.method.backward(call, delta.contiguous())
        block.backward_stats = result.stats  # a record for inspection; nothing reads it back
        grad_u = result.grad_input if need[1] else None
        grads = [g if w else None for g, w in zip(result.grad_params, wants)]
        return (None, grad_u, None, *grads)

    @staticmethod
    def vmap(info, in_dims, block, *args):  # type: ignore[override]
        raise FunctorchUnsupported(block.name, "vmap")


class _Refused(torch.autograd.Function):
    """Passes first-order gradients through; raises if they are differentiated again."""

    @staticmethod
    def forward(ctx, message: str, n_anchors: int, *rest: Optional[torch.Tensor]):  # type: ignore[override]
        ctx.message = message
        return tuple(g.clone() if g is not None else None for g in rest[n_anchors:])

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise NotTwiceDifferentiable(ctx.message)


def _first_order(ctx, delta) -> tuple:
    with torch.no_grad():
        return _Equilibrium.backward(ctx, delta)


def _refuse_double_backward(block, method, ctx, delta) -> tuple:
    """First-order gradients whose graph raises :class:`NotTwiceDifferentiable` when used.

    The refusal node takes the call's input, parameters and incoming gradient as inputs, so any
    differentiation through the returned gradients (``backward``, ``autograd.grad`` w.r.t. any of
    them, ``backward(inputs=...)``) reaches it and raises."""
    saved = ctx.saved_tensors
    L = ctx.num_layers
    grads = _first_order(ctx, delta.detach())[1:]
    message = (f"energy block '{block.name}' is not twice differentiable: its gradient method "
               f"{method.describe()} gives first-order gradients only, so a gradient penalty or any "
               "create_graph=True use that differentiates through it would be silently wrong. "
               "Compute such terms without the energy block, or with create_graph=False")
    anchors = [t for t in (saved[0], delta, *saved[1 + L:]) if t.requires_grad]
    if not anchors:
        anchors = [torch.zeros((), device=delta.device, requires_grad=True)]
    out = _Refused.apply(message, len(anchors), *anchors, *grads)
    return out


def equilibrium(block, u: torch.Tensor, params: Sequence[torch.Tensor], init=None):
    """Top-layer equilibrium state of ``block`` driven by ``u``, differentiable by its method.
    ``init``: the states the free relaxation starts from (None: the block's own start).

    Returns ``(top, states, stats)``: the differentiable top layer, and this call's free
    equilibrium and :class:`SolveStats` (detached, for inspection)."""
    holder: dict = {"slots": parameter_slots(block), "init": init}
    top = _Equilibrium.apply(block, u, holder, *params)
    return top, holder["states"], holder["stats"]


def parameter_slots(block) -> list:
    """``(module, name)`` of each of ``block.energy_parameters()``, in order."""
    slots, seen = [], set()
    for mod in block.couplings.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                slots.append((mod, name))
    return slots


@contextlib.contextmanager
def _parameters_of_call(slots, params):
    """Temporarily put the call's parameter tensors where the module's are (a no-op when they
    are the same tensors, the usual case)."""
    swapped = []
    try:
        for (mod, name), p in zip(slots, params):
            if mod._parameters.get(name) is not p:
                swapped.append((mod, name, mod._parameters[name]))
                mod._parameters[name] = p
        yield
    finally:
        for mod, name, old in reversed(swapped):
            mod._parameters[name] = old


def under_functorch() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jacrev, ...); not while torch.compile
    traces (the block then runs eagerly behind a graph break)."""
    try:
        if torch.compiler.is_compiling():
            return False
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - very old torch
        return False
