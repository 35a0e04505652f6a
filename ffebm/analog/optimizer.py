"""``AnalogOptimizer``: a torch.optim.Optimizer for weights held on analog tiles.

Usage (two optimizers side by side: analog weights pulsed on their tiles, everything else
-- biases, digital layers, norms -- with any ordinary torch optimizer)::

    from ffebm.analog import AnalogOptimizer, ChoppedTTv2, analog_parameters, digital_parameters
    model = convert_to_analog(model, AnalogConfig(device=SoftBounds()))
    opt_a = AnalogOptimizer(analog_parameters(model), ChoppedTTv2(), lr=0.05, seed=0)
    opt_d = torch.optim.SGD(digital_parameters(model), lr=0.05)
    for x, y in data:
        opt_a.zero_grad(); opt_d.zero_grad()
        loss_fn(model(x), y).backward()
        opt_a.step(); opt_d.step()

How an update gets its ``(x, d)``: analog layers record, in their backward pass, the batch
inputs ``x`` (conv: im2col patches) and the output gradients ``d`` in the weight's
:class:`~ffebm.analog.context.AnalogContext` (``p.analog_ctx``), which the optimizer owns from
its construction on (pairs recorded for a weight that no AnalogOptimizer owns are dropped with a
warning); ``step()`` concatenates the pending pairs (several backward passes accumulate, like
gradients) and hands them to the algorithm, which issues pulsed outer-product updates
(``W -= lr * sum_b d_b x_b^T``), so no dense gradient is formed. Fallback: an analog parameter
without pending pairs but with a dense ``.grad`` (``out x in``, e.g. set by hand) is pulsed as
the pairs ``(e_j, G[:, j])`` (one-hot columns), which has the same expectation.

State: each weight's algorithm state (fast array A with its sampled device spread, buffers H,
choppers, references, counters, the pulse generator's state) is kept as tensors in
``self.state[p]``; the weight array C and its device spread live in the layer's tile
(``model.state_dict()``). Both save with ``torch.save`` and load with
``torch.load(..., weights_only=True)``; a run continued from them is bit-identical.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

from .algorithms import AnalogAlgorithm, AnalogSGD, _Runtime
from .config import InvalidSetting, check_range
from .layers import is_analog_parameter
from .rng import make_generator
from .state import IncompatibleState

__all__ = ["AnalogOptimizer"]


class AnalogOptimizer(torch.optim.Optimizer):
    """Pulsed training of analog weights with an :mod:`~ffebm.analog.algorithms` algorithm.

    Args:
        params: analog weights (``analog_parameters(model)`` or ``layer.weight`` of analog
            layers) or param-group dicts of them (each group may set its own ``lr``).
        algorithm: an :class:`AnalogAlgorithm` (default :class:`AnalogSGD`); one per optimizer
            (use two optimizers for two algorithms).
        lr: learning rate (the SGD step ``lr * d x^T``; TT variants: see their ``fast_lr`` /
            ``transfer_lr``).
        seed: seed of the pulse generators (one per weight, ``seed + index``); None draws the
            seeds from torch's global RNG (so ``torch.manual_seed`` makes runs repeatable).
    """

    #: marks optimizers that apply recorded pulse pairs (see ffebm.analog.context)
    pulses_analog_weights = True


    def __init__(self, params: Iterable[Any], algorithm: Optional[AnalogAlgorithm] = None,
                 lr: float = 0.01, seed: Optional[int] = None) -> None:
        check_range("AnalogOptimizer", "lr", lr, 0, None)
        if algorithm is None:
            algorithm = AnalogSGD()
        if not isinstance(algorithm, AnalogAlgorithm):
            raise InvalidSetting("AnalogOptimizer", "algorithm", algorithm,
                                 "an AnalogAlgorithm (AnalogSGD, TikiTaka, TTv2, ChoppedTTv2, AGAD, MixedPrecision)")
        if seed is not None:
            check_range("AnalogOptimizer", "seed", seed, 0, None, integer=True)
        super().__init__(params, dict(lr=lr))
        for gi, g in enumerate(self.param_groups):
            check_range("AnalogOptimizer", f"param_groups[{gi}].lr", g["lr"], 0, None)
            for p in g["params"]:
                if not is_analog_parameter(p):
                    raise InvalidSetting(
                        "AnalogOptimizer", "params", f"tensor of shape {tuple(p.shape)}",
                        "analog weights only (weights of AnalogLinear/AnalogConv2d, see "
                        "analog_parameters(model)); give digital parameters to a torch optimizer")
                p.analog_ctx.attach(self)
        self.algorithm = algorithm
        self.seed = seed
        self._runtimes: Dict[int, _Runtime] = {}
        self._gens: Dict[int, torch.Generator] = {}

    # -- runtimes ---------------------------------------------------------------------------
    def _index(self, p: Tensor) -> int:
        i = 0
        for g in self.param_groups:
            for q in g["params"]:
                if q is p:
                    return i
                i += 1
        raise KeyError("parameter not in this optimizer")

    def _runtime(self, p: Tensor) -> _Runtime:
        tile = p.analog_ctx.tile
        rt = self._runtimes.get(id(p))
        if rt is not None and rt.tile is tile:
            dev = tile.out_scale.device
            if self._gens[id(p)].device != dev:  # the tile moved: move the algorithm state
                st = self._export(p)
                st.pop("rng_state")  # generator states do not carry across device types
                self._build(p, tile)
                self._import(p, st)
            return self._runtimes[id(p)]
        return self._build(p, tile)

    def _build(self, p: Tensor, tile: Any) -> _Runtime:
        dev = tile.out_scale.device
        g = make_generator(None if self.seed is None else int(self.seed) + self._index(p), dev)
        rt = self.algorithm.build(tile, g)
        self._runtimes[id(p)] = rt
        self._gens[id(p)] = g
        p.analog_ctx.runtime = rt  # reads add what the algorithm holds (Tiki-Taka's fast array)
        return rt

    def _export(self, p: Tensor) -> Dict[str, Tensor]:
        rt = self._runtimes[id(p)]
        st = {k: v.detach().clone() for k, v in rt.export().items()}
        st["rng_state"] = self._gens[id(p)].get_state()
        return st

    def _import(self, p: Tensor, st: Dict[str, Tensor]) -> None:
        rt = self._runtimes[id(p)]
        rt.load(st)
        if "rng_state" in st:
            self._gens[id(p)].set_state(st["rng_state"].detach().cpu().to(torch.uint8))

    # -- optimizer API ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            # param_groups can be edited after construction (schedulers do): check what is used
            check_range("AnalogOptimizer", f"param_groups[{gi}].lr", group["lr"], 0, None)
            lr = float(group["lr"])
            for p in group["params"]:
                actx = p.analog_ctx
                if actx.optimizer is not self:
                    actx.attach(self)
                actx.sync(p)  # a write into the weight since the last read is programmed first
                pair = actx.take()
                if pair is not None:
                    x, d = pair
                elif p.grad is not None:
                    tile = actx.tile
                    G = p.grad.reshape(tile.out_size, tile.in_size)
                    x = torch.eye(tile.in_size, device=G.device, dtype=G.dtype)
                    d = G.t()
                else:
                    continue
                rt = self._runtime(p)
                rt.step(x, d, lr)
                actx.sync(p)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear dense gradients and the recorded pulse pairs of this optimizer's weights."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.analog_ctx.clear()

    def state_dict(self) -> Dict[str, Any]:
        """Torch's optimizer state (per weight: the algorithm's tensors and the pulse generator's
        state) plus ``"algorithm"``: the algorithm's class name, checked when loading."""
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._runtimes:
                    self.state[p] = self._export(p)
        sd = super().state_dict()
        sd["algorithm"] = type(self.algorithm).__name__
        return sd

    def _check_state(self, state_dict: Dict[str, Any]) -> None:
        """Everything :meth:`load_state_dict` needs, checked before it changes anything: the
        algorithm, the groups and, per weight, the saved algorithm state's tensors (names and
        shapes) against what this optimizer's algorithm keeps for that weight's tile."""
        me = f"AnalogOptimizer({type(self.algorithm).__name__})"
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise IncompatibleState(me, "not an optimizer state_dict (no 'state' / 'param_groups')")
        saved_alg = state_dict.get("algorithm")
        if saved_alg is not None and saved_alg != type(self.algorithm).__name__:
            raise IncompatibleState(me, f"saved with algorithm {saved_alg}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise IncompatibleState(me, f"saved with {len(groups)} parameter groups, this one has "
                                        f"{len(self.param_groups)}")
        params = []
        for gi, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise IncompatibleState(me, f"group {gi} was saved with {len(sg['params'])} weights, this one "
                                            f"has {len(g['params'])}")
            params.extend(zip(sg["params"], g["params"]))
        for saved_id, p in params:
            st = state_dict["state"].get(saved_id)
            if not st:
                continue
            actx = p.analog_ctx
            rt = self._runtimes.get(id(p))
            if rt is None or rt.tile is not actx.tile:  # a throwaway runtime tells what is kept
                rt = self.algorithm.build(actx.tile, make_generator(0, actx.tile.out_scale.device))
            want = {k: tuple(v.shape) for k, v in rt.export().items()}
            have = {k: tuple(v.shape) for k, v in st.items() if k != "rng_state" and isinstance(v, Tensor)}
            who = f"{me}, weight of {actx.layer} {actx.tile.out_size}x{actx.tile.in_size}"
            if set(have) != set(want):
                raise IncompatibleState(who, f"saved algorithm state {sorted(have)} does not match this "
                                             f"algorithm's {sorted(want)}")
            bad = [f"{k} {list(have[k])} (here {list(want[k])})" for k in want if have[k] != want[k]]
            if bad:
                raise IncompatibleState(who, "saved algorithm state has other shapes: " + ", ".join(bad))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked first (:class:`IncompatibleState`
        naming the weight and the mismatch, nothing changed)."""
        self._check_state(state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k != "algorithm"}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._runtime(p)
                    self._import(p, st)
                    p.analog_ctx.forget_mirror()
                    p.analog_ctx.sync(p)

    def __repr__(self) -> str:
        return f"AnalogOptimizer(algorithm={self.algorithm!r}, lr={self.defaults['lr']})"
