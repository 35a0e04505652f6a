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
from .state import IncompatibleState, check_array_state, params_from_state

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
                 lr: float = 0.01, seed: Optional[int] = None, digital: Any = None,
                 digital_options: Optional[Dict[str, Any]] = None) -> None:
        check_range("AnalogOptimizer", "lr", lr, 0, None)
        if algorithm is None:
            algorithm = AnalogSGD()
        if not isinstance(algorithm, AnalogAlgorithm):
            raise InvalidSetting("AnalogOptimizer", "algorithm", algorithm,
                                 "an AnalogAlgorithm (AnalogSGD, TikiTaka, TTv2, ChoppedTTv2, AGAD, MixedPrecision)")
        if seed is not None:
            check_range("AnalogOptimizer", "seed", seed, 0, None, integer=True)
        analog_groups, digital_groups = _split_groups(params, mixed=digital is not None)
        super().__init__(analog_groups, dict(lr=lr))
        for gi, g in enumerate(self.param_groups):
            check_range("AnalogOptimizer", f"param_groups[{gi}].lr", g["lr"], 0, None)
            for p in g["params"]:
                p.analog_ctx.attach(self)
        self._n_analog = len(self.param_groups)
        self.digital: Optional[torch.optim.Optimizer] = None
        if digital is not None and digital_groups:
            self.digital = _make_digital(digital, digital_groups, lr, digital_options)
            # the same group dicts: schedulers and users editing ``param_groups`` reach both
            self.param_groups.extend(self.digital.param_groups)
        self.algorithm = algorithm
        self.seed = seed
        self._runtimes: Dict[int, _Runtime] = {}
        self._gens: Dict[int, torch.Generator] = {}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group: its analog weights join the pulsed groups, the rest the digital
        optimizer's (an error naming them when there is none)."""
        if "_n_analog" not in self.__dict__:  # torch's constructor adding the first groups
            return super().add_param_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        analog = [p for p in params if is_analog_parameter(p)]
        digital = [p for p in params if not is_analog_parameter(p)]
        if digital and self.digital is None:
            raise InvalidSetting("AnalogOptimizer.add_param_group", "params",
                                 f"{len(digital)} digital parameter(s) (first of shape {list(digital[0].shape)})",
                                 "analog weights only (no digital= optimizer was given)")
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        if analog:
            groups = self.param_groups
            self.param_groups = groups[:self._n_analog]
            try:
                super().add_param_group(dict(rest, params=analog))
            finally:
                self.param_groups = self.param_groups + groups[self._n_analog:]
            self._n_analog += 1
            check_range("AnalogOptimizer", f"param_groups[{self._n_analog - 1}].lr", self.param_groups[self._n_analog - 1]["lr"], 0, None)
            for p in analog:
                p.analog_ctx.attach(self)
        if digital:
            self.digital.add_param_group(dict(rest, params=digital))
            self.param_groups[self._n_analog:] = self.digital.param_groups

    @property
    def analog_groups(self) -> list:
        """The parameter groups of analog weights (``param_groups`` also lists the digital
        optimizer's groups after them)."""
        return self.param_groups[:self._n_analog]

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
        st = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in rt.export().items()}
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
        for gi, group in enumerate(self.analog_groups):
            # param_groups can be edited after construction (schedulers do): check what is used
            check_range("AnalogOptimizer", f"param_groups[{gi}].lr", group["lr"], 0, None)
            lr = float(group["lr"])
            for p in group["params"]:
                actx = p.analog_ctx
                if actx.optimizer is not self:
                    actx.attach(self)
                actx.sync(p, refresh=False)  # a write into the weight since the last read is programmed first
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
        if self.digital is not None:
            self.digital.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear dense gradients and the recorded pulse pairs of this optimizer's weights."""
        super().zero_grad(set_to_none=set_to_none)  # every group: digital ones too
        for group in self.analog_groups:
            for p in group["params"]:
                p.analog_ctx.clear()

    def state_dict(self) -> Dict[str, Any]:
        """Torch's optimizer state (per weight: the algorithm's tensors and the pulse generator's
        state) plus ``"algorithm"``: the algorithm's class name, checked when loading."""
        for group in self.analog_groups:
            for p in group["params"]:
                if id(p) in self._runtimes:
                    self.state[p] = self._export(p)
        groups = self.param_groups
        self.param_groups = self.analog_groups
        try:
            sd = super().state_dict()
        finally:
            self.param_groups = groups
        sd["algorithm"] = type(self.algorithm).__name__
        if self.digital is not None:
            sd["digital"] = self.digital.state_dict()
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
        if len(groups) != self._n_analog:
            raise IncompatibleState(me, f"saved with {len(groups)} analog parameter groups, this one has "
                                        f"{self._n_analog}")
        saved_digital = state_dict.get("digital")
        if (saved_digital is None) != (self.digital is None):
            raise IncompatibleState(me, "saved with a digital optimizer, this one has none" if self.digital is None
                                    else "saved without a digital optimizer, this one has one")
        if self.digital is not None:
            dg = saved_digital.get("param_groups", []) if isinstance(saved_digital, dict) else []
            sizes = [len(g["params"]) for g in dg]
            here = [len(g["params"]) for g in self.digital.param_groups]
            if sizes != here:
                raise IncompatibleState(me, f"saved with digital parameter groups of sizes {sizes}, this one has {here}")
        params = []
        for gi, (sg, g) in enumerate(zip(groups, self.analog_groups)):
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
            want = {k: tuple(v.shape) for k, v in rt.export().items() if isinstance(v, Tensor)}
            # (older files keep a device array's parameters as "A.p.<name>" tensors: read as well)
            have = {k: tuple(v.shape) for k, v in st.items()
                    if k != "rng_state" and isinstance(v, Tensor) and not k.startswith("A.p.")}
            who = f"{me}, weight of {actx.layer} {actx.tile.out_size}x{actx.tile.in_size}"
            if set(have) != set(want):
                raise IncompatibleState(who, f"saved algorithm state {sorted(have)} does not match this "
                                             f"algorithm's {sorted(want)}")
            bad = [f"{k} {list(have[k])} (here {list(want[k])})" for k in want if have[k] != want[k]]
            if bad:
                raise IncompatibleState(who, "saved algorithm state has other shapes: " + ", ".join(bad))
            rng = st.get("rng_state")
            if rng is not None and (not isinstance(rng, Tensor)
                                    or rng.numel() != make_generator(0, actx.tile.out_scale.device).get_state().numel()):
                raise IncompatibleState(who, "saved pulse-generator state is malformed or from another device type")
            A = getattr(rt, "A", None)  # a fast array: its device model, settings and parameters
            if A is not None:
                if "A.params" in st:
                    ps = params_from_state(f"{who}, fast array A", st["A.params"], A.shape, A.w.device, A.w.dtype)
                else:  # older files: "A.p.<name>" tensors
                    ps = {k[4:]: v for k, v in st.items() if k.startswith("A.p.")}
                draw = ps.get("__draw__") if isinstance(ps, dict) else None
                keys = [k for k, v in A.params.items() if isinstance(v, Tensor)]
                check_array_state(f"{who}, fast array A", A.shape, A.device_cfg, keys, st.get("A.w"), ps,
                                  draw.get("model") if isinstance(draw, dict) else None)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked first (:class:`IncompatibleState`
        naming the weight and the mismatch, nothing changed)."""
        self._check_state(state_dict)
        # the algorithm states as saved: torch casts every tensor of an optimizer state to its
        # parameter's dtype (generator states, counters, fingerprints would not survive that)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ours = [p for g in self.analog_groups for p in g["params"]]
        raw = {id(p): state_dict["state"].get(i) for i, p in zip(saved_ids, ours)}
        digital_sd = state_dict.get("digital")
        state_dict = {k: v for k, v in state_dict.items() if k not in ("algorithm", "digital")}
        if self.digital is not None:  # first: torch checks it before changing it
            self.digital.load_state_dict(digital_sd)
        groups = self.param_groups
        self.param_groups = self.analog_groups
        try:
            super().load_state_dict(state_dict)
        finally:
            # torch rebuilt the analog group dicts; the digital optimizer's follow them again
            self.param_groups = self.param_groups + groups[self._n_analog:]
        if self.digital is not None:
            self.param_groups[self._n_analog:] = self.digital.param_groups
        for group in self.analog_groups:
            for p in group["params"]:
                st = raw.get(id(p))
                if st:
                    self._runtime(p)
                    self._import(p, st)
                    p.analog_ctx.forget_mirror()
                    p.analog_ctx.sync(p)

    def __repr__(self) -> str:
        dig = f", digital={type(self.digital).__name__}" if self.digital is not None else ""
        return f"AnalogOptimizer(algorithm={self.algorithm!r}, lr={self.defaults['lr']}{dig})"


def _split_groups(params: Iterable[Any], mixed: bool):
    """Parameter groups of analog weights and of everything else (``mixed``; otherwise a
    parameter that is not an analog weight is an error naming it). Accepts tensors,
    ``(name, tensor)`` pairs (``model.named_parameters()``) or group dicts of either."""
    items = list(params)
    if not items:
        raise ValueError("AnalogOptimizer got an empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    analog, digital = [], []
    for gi, g in enumerate(groups):
        ps = g["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        a, d = [], []
        for i, item in enumerate(ps):
            name, p = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if not isinstance(p, Tensor):
                raise InvalidSetting("AnalogOptimizer", "params", type(p).__name__, "tensors (parameters)")
            if is_analog_parameter(p):
                a.append(p)
            elif mixed:
                d.append(p)
            else:
                who = f"parameter {name!r}" if name else f"parameter #{i} of group {gi} (pass model.named_parameters() to see its name)"
                raise InvalidSetting(
                    "AnalogOptimizer", "params", f"{who} of shape {list(p.shape)}",
                    "analog weights only (weights of analog layers, see analog_parameters(model)); for a mixed "
                    "model pass digital=torch.optim.Adam (or another torch optimizer) to step the others too")
        rest = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        if a:
            analog.append(dict(rest, params=a))
        if d:
            digital.append(dict(rest, params=d))
    if not analog:
        raise InvalidSetting("AnalogOptimizer", "params", "no analog weights",
                             "at least one analog weight (convert_to_analog / to_analog_energy first)")
    return analog, digital


def _make_digital(digital: Any, groups: list, lr: float, options: Optional[Dict[str, Any]]) -> torch.optim.Optimizer:
    """The torch optimizer of the digital parameters: a class (built with ``lr`` unless
    ``options`` sets one) or a callable taking the parameter groups."""
    opts = dict(options or {})
    if isinstance(digital, type) and issubclass(digital, torch.optim.Optimizer):
        opts.setdefault("lr", lr)
        return digital(groups, **opts)
    if isinstance(digital, torch.optim.Optimizer) or not callable(digital):
        raise InvalidSetting("AnalogOptimizer", "digital", type(digital).__name__,
                             "a torch optimizer class (torch.optim.Adam) or a callable params -> optimizer")
    if opts:
        raise InvalidSetting("AnalogOptimizer", "digital_options", opts, "empty when digital is a callable")
    out = digital(groups)
    if not isinstance(out, torch.optim.Optimizer):
        raise InvalidSetting("AnalogOptimizer", "digital", type(out).__name__, "a callable returning a torch optimizer")
    return out
