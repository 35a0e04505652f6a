"""Mutation check: plant one-line defects in a copy of the project and see which tests catch them.

    python -m train.experiments.mutants              # every mutant, a table and a score
    python -m train.experiments.mutants --list       # the planted defects
    python -m train.experiments.mutants --only ep-scale-x2,unrolled-1-step --json mutants.json

A test is worth what it catches. Each mutant below is a realistic defect in a gradient-critical
place (the autograd bridge, the gradient methods, the solver, EP's pulse paths, the trainer's
resume and evaluation); it is applied to a fresh copy of the source tree, and the default-run
tests that guard that code are run against the copy. A mutant is *killed* when at least one of
them fails; the table names the tests that failed. Every mutant here must be killed
(``tests/test_mutants.py`` checks that each planted line still exists in the source, and, under
``-m slow``, that every mutant is killed).

Why a hand-kept list rather than a generic mutation tool: the defects worth guarding against
here are semantic (a sign convention, a batch scale, which state a backward reads), most of
which a generic operator-flipping tool would not plant, and a full generic run over the
gradient code takes hours on two cores; this list runs in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
COPY = ("ffebm", "models", "train", "tests", "pyproject.toml", "README.md")


@dataclass(frozen=True)
class Mutant:
    """One planted defect: in ``path``, the unique text ``old`` becomes ``new``; ``tests`` are the
    pytest arguments (files, ``-k`` expressions) of the tests meant to catch it."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: Sequence[str]


MUTANTS: List[Mutant] = [
    Mutant("bf16-ignored", "the precision setting has no effect (relaxation always in full precision)",
           "ffebm/solvers.py", "low = cfg.precision is not None and cfg.precision != u.dtype", "low = False",
           ["tests/test_precision.py"]),
    Mutant("drift-at-t0", "drift evaluation reads every time at t = 0",
           "ffebm/analog/drift.py", "w_t = nm.weights_at(pw, t, g)", "w_t = nm.weights_at(pw, 0.0, g)",
           ["tests/train/test_train_cli.py", "-k", "evaluate_over_time"]),
    Mutant("gradcheck-sign", "the trainer's gradient-check cosine has its sign flipped",
           "train/metrics.py", "else float(a @ b / (na * nb)))", "else -float(a @ b / (na * nb)))",
           ["tests/train/test_train_recipes.py", "-k", "gradient_check"]),
    Mutant("gather-skipped", "pulse pairs are not gathered across processes (tiles drift apart)",
           "ffebm/analog/distributed.py", "    for p in params:\n        actx = p.analog_ctx",
           "    return\n    for p in params:\n        actx = p.analog_ctx",
           ["tests/train/test_train_analog.py", "-k", "identical_on_every_process or gathered"]),
    Mutant("no-analog-step", "the trainer never steps the analog optimiser (tiles keep their weights)",
           "train/analog.py", "        self.optimizer.step()\n", "        pass\n",
           ["tests/train/test_train_analog.py", "tests/train/test_device_sweep.py", "-k", "pulses_the_tiles or differ"]),
    Mutant("ep-scale-x2", "every EP gradient is scaled by 2",
           "ffebm/gradients/ep.py", "scale = 1.0 / ((ba - bb) * c)", "scale = 2.0 / ((ba - bb) * c)",
           ["tests/test_gradients.py"]),
    Mutant("negative-nudges-up", "EP's 'negative' variant nudges positively",
           "ffebm/gradients/ep.py", 'if self.variant == "negative":\n            return 0.0, -b',
           'if self.variant == "negative":\n            return 0.0, b',
           ["tests/test_gradients.py", "-k", "variant"]),
    Mutant("random-always-up", "EP's 'random' variant always draws the positive sign",
           "ffebm/gradients/ep.py",
           "sign = 1.0 if torch.randint(0, 2, (1,), generator=self._generator()).item() == 1 else -1.0",
           "sign = 1.0 if torch.randint(0, 2, (1,), generator=self._generator()).item() >= 0 else -1.0",
           ["tests/test_gradients.py", "-k", "random"]),
    Mutant("all-implicit", "every block silently uses Implicit instead of its own method",
           "ffebm/function.py", "result = ctx.method.backward(call, delta.contiguous())",
           "result = __import__('ffebm').Implicit().backward(call, delta.contiguous())",
           ["tests/test_gradients.py", "-k", "mixed"]),
    Mutant("unrolled-1-step", "the default Unrolled() backpropagates through 1 step only",
           "ffebm/gradients/unrolled.py", "steps = call.nudge_relaxation.steps", "steps = 1",
           ["tests/test_gradients.py", "tests/test_errors.py", "-k", "unrolled or saddle"]),
    Mutant("fixed-point-half", "the fixed-point adjoint iteration uses half the Hessian term",
           "ffebm/gradients/implicit.py", "new = [a * m * (bi + h) for m, bi, h in zip(masks, b, hv)]",
           "new = [a * m * (bi + 0.5 * h) for m, bi, h in zip(masks, b, hv)]",
           ["tests/test_gradients.py", "-k", "fixed_point"]),
    Mutant("batch-scale-ignored", "EP ignores scale='batch' (nudges by beta * delta)",
           "ffebm/gradients/ep.py",
           "    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:\n"
           "        c = float(delta.shape[0]) if self.scale == \"batch\" else 1.0",
           "    def backward(self, call: BlockCall, delta: torch.Tensor) -> GradientResult:\n        c = 1.0",
           ["tests/test_gradients.py", "-k", "batch_scaling"]),
    Mutant("sign-stream-not-saved", "EP's random-sign generator is not part of the checkpoint",
           "ffebm/gradients/ep.py", 'return {"sign_generator": self._generator().get_state()}', "return {}",
           ["tests/test_torch_module.py", "tests/train/test_train_resume.py", "-k", "random or stochastic"]),
    Mutant("rng-not-restored", "resume does not restore torch's global random state",
           "train/checkpoint.py", '    torch.set_rng_state(state["torch"])\n', "    pass\n",
           ["tests/train/test_train_resume.py", "-k", "global_random_stream"]),
    Mutant("last-call-stats", "full BPTT unrolls the step count of the block's last call, not of its own",
           "ffebm/gradients/unrolled.py", "steps = call.free_stats.steps", "steps = call.block.stats.steps",
           ["tests/test_torch_module.py", "-k", "two_calls"]),
    Mutant("frozen-ignored", "frozen parameters are differentiated anyway",
           "ffebm/function.py", "wants = tuple(bool(need[3 + i]) and p.requires_grad for i, p in enumerate(params))",
           "wants = tuple(True for p in params)",
           ["tests/test_torch_module.py", "-k", "frozen"]),
    Mutant("double-backward-allowed", "a gradient penalty through a block is silently wrong again",
           "ffebm/function.py", "if torch.is_grad_enabled():  # create_graph=True", "if False:  # create_graph=True",
           ["tests/test_torch_module.py", "-k", "penalty"]),
    Mutant("records-on-input-grad", "analog pulses are recorded by torch.autograd.grad(out, x) too",
           "ffebm/function.py", "        return bool(torch._C._will_engine_execute_node(edge.node))",
           "        return True",
           ["tests/analog/test_context.py"]),
    Mutant("analog-ep-sign", "AnalogEP records its pulse pairs with the wrong sign",
           "ffebm/analog/energy.py", "pairs = [(xa, -scale * ya), (xb, scale * yb)]",
           "pairs = [(xa, scale * ya), (xb, -scale * yb)]",
           ["tests/analog/test_energy_blocks.py", "tests/analog/test_energy_conv.py", "-k", "pulsed"]),
    Mutant("mean-difference-wrong", "the mean/difference rewrite of EP's pairs changes the update",
           "ffebm/analog/energy.py", "(0.5 * (x1 - x2), d1 - d2)", "(0.5 * (x1 - x2), d2 - d1)",
           ["tests/analog/test_energy_blocks.py", "-k", "mean_difference"]),
    Mutant("no-polish", "one-sided EP reads gradients off an unpolished free state",
           "ffebm/gradients/ep.py", "        if r <= target:", "        if True:",
           ["tests/test_torch_module.py", "-k", "one_sided"]),
    Mutant("compare-zero-fill", "compare_gradients fills absent gradients with zeros (fake agreement)",
           "ffebm/compare.py", "out = {n: (None if g is None else g.detach())",
           "out = {n: (torch.zeros_like(p) if g is None else g.detach())",
           ["tests/analog/test_context.py", "-k", "compare"]),
    Mutant("adjoint-mask-ignored", "the implicit adjoint treats saturated units as free",
           "ffebm/gradients/implicit.py",
           "masks = [free_mask(g[i].detach(), a, block.bounded(i)).to(g[i].dtype) for i in range(L)]",
           "masks = [torch.ones_like(g[i]) for i in range(L)]",
           ["tests/test_gradients.py", "-k", "finite_differences"]),
    Mutant("pulse-sign", "the analog optimiser pulses against the recorded update",
           "ffebm/analog/optimizer.py", "rt.step(x, d, lr)", "rt.step(x, -d, lr)",
           ["tests/analog/test_context.py", "tests/analog/test_layers.py"]),
    Mutant("call-params-ignored", "backward evaluates the energy with the module's parameters, not the call's",
           "ffebm/function.py", "            if mod._parameters.get(name) is not p:", "            if False:",
           ["tests/test_torch_module.py", "-k", "functional_call"]),
    Mutant("no-snapshot", "a call's backward reads the block's method as edited after the call",
           "ffebm/function.py", "ctx.method = block.gradient.snapshot()", "ctx.method = block.gradient",
           ["tests/test_torch_module.py", "-k", "editing"]),
    Mutant("no-fold", "pairs of an owned weight that is never stepped pile up without bound",
           "ffebm/analog/context.py", "        elif self._records >= OWNED_LIMIT:", "        elif False:",
           ["tests/analog/test_context.py", "-k", "folded"]),
    Mutant("trust-bypassed", "a stored user model is imported without --trust-code",
           "train/runfolder.py", '    if ":" not in cfg.model or trust_code:', "    if True:",
           ["tests/train/test_train_safety.py", "-k", "not_imported or trust_code"]),
    Mutant("no-lock", "two processes may write one run folder",
           "train/runlock.py", "                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "                    pass",
           ["tests/train/test_train_safety.py", "-k", "busy or killed_process"]),
    Mutant("nonfinite-step", "a non-finite weight after an optimiser step goes unnoticed until later",
           "train/step.py", "    bad = \"\" if problem else ckpt_mod.first_nonfinite(t.core.named_parameters())\n",
           "    bad = \"\"\n",
           ["tests/train/test_train_safety.py", "-k", "last_good"]),
    Mutant("precision-key-ignored", "precision=bfloat16 is accepted but the blocks still relax in float32",
           "train/step.py", "    ffebm.set_precision(model, PRECISIONS[cfg.precision])\n", "    pass\n",
           ["tests/train/test_bench_step.py", "-k", "precision_key or cosine"]),
    Mutant("memory-format-ignored", "memory_format resolves to channels_last but the model stays NCHW",
           "train/step.py", "        model.to(memory_format=torch.channels_last)\n", "        pass\n",
           ["tests/train/test_bench_step.py", "-k", "memory_format_auto"]),
    Mutant("nonfinite-checkpoint", "a non-finite state is written and called the last good checkpoint",
           "train/state.py", "    bad = ckpt_mod.first_nonfinite(list(tr.core.state_dict().items())",
           "    bad = \"\" and ckpt_mod.first_nonfinite(list(tr.core.state_dict().items())",
           ["tests/train/test_train_safety.py", "-k", "never_written"]),
    Mutant("labels-unchecked", "data labels are not range-checked at load",
           "train/formats.py", "    if arr.size and (int(arr.min()) < base or int(arr.max()) >= base + num_classes):",
           "    if False:",
           ["tests/train/test_train_safety.py", "-k", "labels"]),
    Mutant("resume-config-unchecked", "resume continues a checkpoint written with another configuration",
           "train/state.py", "    diff = differing_keys(theirs, tr.cfg)\n", "    diff = []\n",
           ["tests/train/test_train_safety.py", "-k", "edited_configuration"]),
    Mutant("residual-zero", "the relaxation's residual is always 0 (stops at the first check)",
           "ffebm/solvers.py", "    return torch.sqrt(num) / torch.sqrt(den).clamp_min(1e-12)",
           "    return torch.zeros((), device=num.device)",
           ["tests/test_errors.py", "tests/test_gradients.py", "-k", "converge or finite_differences"]),
]


def check_planted(mutants: Sequence[Mutant] = MUTANTS, root: Path = ROOT) -> List[str]:
    """Problems with the list: a planted text that is missing from, or not unique in, its file."""
    problems = []
    for m in mutants:
        text = (root / m.path).read_text()
        n = text.count(m.old)
        if n != 1:
            problems.append(f"{m.name}: the text to mutate occurs {n} times in {m.path} (must be exactly once)")
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        problems.append("mutant names are not unique")
    return problems


def _copy_tree(dest: Path) -> None:
    for item in COPY:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs"))
        elif src.exists():
            shutil.copy2(src, dest / item)


def _env(copy: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests"), str(copy / "tests" / "train")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_mutant(m: Mutant, copy: Path, timeout: float = 900) -> Dict:
    """Apply ``m`` to the copy, run its tests, restore the file. Returns the outcome."""
    target = copy / m.path
    original = target.read_text()
    target.write_text(original.replace(m.old, m.new, 1))
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *m.tests],
                             cwd=str(copy), env=_env(copy), capture_output=True, text=True, timeout=timeout)
        out = res.stdout + res.stderr
        failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)))
        if res.returncode == 5:  # no test selected: the mutant's test list is wrong
            status = "no tests"
        else:
            status = "killed" if res.returncode != 0 else "survived"
    except subprocess.TimeoutExpired:
        status, failed = "killed (timeout)", []
    finally:
        target.write_text(original)
    return {"name": m.name, "what": m.what, "status": status, "killed_by": failed,
            "seconds": round(time.perf_counter() - t0, 1)}


def run(mutants: Sequence[Mutant], log=print) -> List[Dict]:
    problems = check_planted(mutants)
    if problems:
        raise SystemExit("mutant list out of date:\n  " + "\n  ".join(problems))
    results = []
    with tempfile.TemporaryDirectory(prefix="ffebm-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        where = subprocess.run([sys.executable, "-c", "import ffebm; print(ffebm.__file__)"], cwd=str(copy),
                               env=_env(copy), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):
            raise SystemExit(f"the copy's ffebm is not the one imported ({where}); cannot run mutants")
        for k, m in enumerate(mutants, 1):
            r = run_mutant(m, copy)
            results.append(r)
            tests = ", ".join(t.split("::")[-1] for t in r["killed_by"][:3])
            more = f" (+{len(r['killed_by']) - 3})" if len(r["killed_by"]) > 3 else ""
            log(f"[{k}/{len(mutants)}] {m.name:<24} {r['status']:<9} {r['seconds']:>6.1f} s  {tests}{more}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experiments.mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the planted defects and exit")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    chosen = list(MUTANTS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {m.name for m in MUTANTS})
        if unknown:
            print(f"unknown mutant(s) {unknown}; known: {', '.join(m.name for m in MUTANTS)}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:<24} {m.path:<30} {m.what}")
        return 0
    results = run(chosen)
    killed = sum(r["status"].startswith("killed") for r in results)
    print(f"\nmutation score: {killed}/{len(results)} killed")
    for r in results:
        if not r["status"].startswith("killed"):
            print(f"  {r['status']}: {r['name']} ({r['what']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "killed": killed, "total": len(results),
                                               "mutants": [asdict(m) for m in chosen]}, indent=2))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
