"""Speed and memory of the trainer's training step: EP vs Implicit vs Unrolled vs a feedforward net.

    python -m train.bench                       # default model + CIFAR-shaped L=6 three-block preset
    python -m train.bench --quick               # smaller settings (a smoke run)
    python -m train.bench --only cifar --rounds 3 --json bench.json
    python -m train.bench --formats             # channels_last vs NCHW, fp32 and bf16 (the memory_format rule)

What is timed is ``Trainer.train_step`` (train/step.py), the function the training command calls
for every batch, on a Trainer set up from the model's recipe and ``key=value`` overrides as a
training run's is (same model preparation: relaxation ``precision``, ``memory_format``; same optimiser):
the recipe ``cifar10_l6_3blocks`` with ``dataset=fake`` (CIFAR-shaped random images, no
augmentation) and ``batch_size=32``, and the default ``digits`` recipe on its own data.  One step
is preprocessing of the batch, forward (free relaxation of every block), loss, backward (the
blocks' gradient method, autograd elsewhere), the failure checks and the optimiser step; data
loading is not timed (the batch is drawn once).  The reference figure (free relaxation +
gradient, no data loading, no optimiser step) excludes the optimiser step, which ours includes:
``opt s`` prints its share.  Figures are medians over repeats after one warm-up step; with
``--rounds R`` each configuration runs in R processes, alternating with the others.

Each configuration runs in its own process, so that its peak memory (max RSS) is its own.  The
feedforward baseline is the same model with each energy block's layers run once bottom-up
(s_i = sigma(f(s_{i-1})), the same parameters), trained by backprop through the same step.

Against the machine's limit: the FLOPs of one trainer step are counted by torch's
``FlopCounterMode`` (convolutions and matrix products; elementwise work and pooling are not
counted) on one extra step; achieved GFLOP/s = FLOPs / median step time, beside the
throughput of a large convolution (the preset's largest coupling, 128 -> 256 channels at 16x16,
batch 32) timed in a loop in the same run, in float32 and bfloat16, the faster memory format.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn

# The reference ff-EBM code's EP step (L=6 three blocks, batch 32, T1 60, T2 20, 2 threads), measured
# side by side with this code on this kind of machine (reference/ANCHORS.md, torch 2.14.1); not in this run
REFERENCE_EP_L6_3BLOCKS_S = 11.2
CIFAR = dict(recipe="cifar10_l6_3blocks", overrides=dict(dataset="fake", image_size=32, in_channels=3, num_classes=10))
DIGITS = dict(recipe="digits", overrides={})


class FeedForwardBlock(nn.Module):
    """The energy block's layers run once bottom-up, sharing its parameters."""

    def __init__(self, blk):
        super().__init__()
        self.blk = blk

    def forward(self, x):
        s = self.blk.activate(0, self.blk.input_map(x))
        for i, c in enumerate(self.blk.couplings):
            s = self.blk.activate(i + 1, c.bottom_up(s)[0])
        return s


def feedforward(model: nn.Module) -> nn.Module:
    import ffebm

    return nn.Sequential(*[FeedForwardBlock(m) if isinstance(m, ffebm.EnergyBlock) else m for m in model])


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (Linux): a forked worker otherwise inherits its parent's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_config(spec: dict, **extra):
    """The TrainConfig of ``spec``: its recipe with the benchmark's overrides (``--list`` keys)."""
    from ..recipes import build_config

    batch = spec["batch"]
    ov = dict(progress="false", tensorboard="false", num_threads=str(spec.get("threads", 0)), batch_size=str(batch),
              fake_train_size=str(batch), fake_test_size=str(batch))
    ov.update({k: str(v) for k, v in {**spec.get("overrides", {}), **extra}.items()})
    return build_config(spec["recipe"], ov)


def bench_trainer(spec: dict, **extra):
    """A set-up :class:`train.trainer.Trainer` (no run folder) for ``spec``; ``spec["wrap"]``:
    ``feedforward`` (the baseline above) or ``bptt`` (full backprop through the free relaxation)."""
    import ffebm

    from ..build import build_model
    from ..trainer import Trainer

    wrap = {None: None, "feedforward": lambda c, i: feedforward(build_model(c, i)),
            "bptt": lambda c, i: ffebm.set_gradient(build_model(c, i), ffebm.Unrolled(from_equilibrium=False))}
    return Trainer(bench_config(spec, **extra), None, model_fn=wrap[spec.get("wrap")], log=lambda m: None).setup()


def first_batch(trainer):
    _, xb, yb = next(iter(trainer.batches.epoch(0)))
    return xb, yb


def time_steps(trainer, xb, yb, repeats: int) -> dict:
    """``trainer.train_step`` on (xb, yb): one warm-up call, then ``repeats`` timed ones."""
    times: List[float] = []
    fwd: List[float] = []
    opt: List[float] = []
    marks: Dict[str, float] = {}
    hooks = [trainer.model.register_forward_pre_hook(lambda *a: marks.update(f0=time.perf_counter())),
             trainer.model.register_forward_hook(lambda *a: marks.update(f1=time.perf_counter(), rss_f=_rss_mb())),
             trainer.opt.register_step_pre_hook(lambda *a: marks.update(o0=time.perf_counter(), rss_b=_rss_mb())),
             trainer.opt.register_step_post_hook(lambda *a: marks.update(o1=time.perf_counter()))]
    losses, rss = [], {}
    try:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            losses.append(trainer.train_step(xb, yb, None)[0])
            t1 = time.perf_counter()
            if r == 0:  # memory is read on the first step: max RSS is a high-water mark
                rss = dict(rss_after_forward_mb=marks["rss_f"], backward_extra_mb=max(marks["rss_b"] - marks["rss_f"], 0.0))
            else:
                times.append(t1 - t0)
                fwd.append(marks["f1"] - marks["f0"])
                opt.append(marks["o1"] - marks["o0"])
    finally:
        for h in hooks:
            h.remove()
    return dict(all_s=times, fwd_all_s=fwd, opt_all_s=opt, losses=losses, **rss)


def step_flops(trainer, xb, yb) -> float:
    """FLOPs of one ``trainer.train_step`` (convolutions and matrix products, torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        trainer.train_step(xb, yb, None)
    return float(fc.get_total_flops())


def grad_cosines(spec: dict, against: Dict[str, str]) -> Dict[str, float]:
    """Cosine between the gradients of one trainer step of ``spec`` and of the same step with the
    keys ``against`` (same seed, same initial weights, same batch): per energy block, the digital
    layers, and all parameters together."""
    from ffebm.compare import cosine

    from ..failures import param_block

    grads = []
    for extra in ({}, against):
        t = bench_trainer(spec, **extra)
        xb, yb = first_batch(t)
        t.train_step(xb, yb, None)
        grads.append({n: (param_block(t.block_paths, n), p.grad.detach().float().flatten())
                      for n, p in t.core.named_parameters() if p.grad is not None})
        del t
    groups: Dict[str, List[str]] = {}
    for n, (where, _) in grads[0].items():   # "energy block 'block1'" -> block1, "a digital layer" -> digital
        groups.setdefault(where.split("'")[1] if "'" in where else "digital", []).append(n)
    groups["all"] = list(grads[0])
    return {g: float(cosine(torch.cat([grads[0][n][1] for n in names]), torch.cat([grads[1][n][1] for n in names])))
            for g, names in groups.items()}


def conv_rates(batch: int = 32, cin: int = 128, cout: int = 256, size: int = 16, repeats: int = 7) -> dict:
    """GFLOP/s of one 3x3 convolution (padding 1) in float32 and bfloat16, NCHW and channels_last."""
    import torch.nn.functional as F

    flops = 2 * batch * cout * cin * 9 * size * size
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.rand(batch, cin, size, size, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.rand(cout, cin, 3, 3, dtype=dtype).contiguous(memory_format=fmt)
            ts = []
            for r in range(repeats + 2):
                t = time.perf_counter()
                F.conv2d(x, w, None, 1, 1)
                ts.append(time.perf_counter() - t)
            out[f"{str(dtype)[6:]}_{'channels_last' if fmt is torch.channels_last else 'nchw'}"] = \
                flops / statistics.median(ts[2:]) / 1e9
    return out


def worker(spec: dict) -> dict:
    _reset_peak()
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    if spec.get("kind") == "conv":
        return conv_rates()
    if spec.get("kind") == "cosine":
        return {**spec, "cosine": grad_cosines(spec, spec["against"])}
    rss_start = _rss_mb()
    t = bench_trainer(spec)
    xb, yb = first_batch(t)
    res = {**spec, "rss_start_mb": rss_start, **time_steps(t, xb, yb, spec["repeats"]),
           "peak_rss_mb": _rss_mb(), "memory_format": "channels_last" if t.pre.memory_format is torch.channels_last else "nchw",
           "precision": t.cfg.precision}
    res["blocks"] = {name: {"steps": b.stats.steps, "residual": b.stats.residual,
                            "backward": {k: (v if not isinstance(v, list) else [repr(s) for s in v])
                                         for k, v in b.backward_stats.to_dict().items()}}
                     for name, b in t.blocks if b.stats is not None}
    if spec.get("flops"):
        res["step_flops"] = step_flops(t, xb, yb)
    return res


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(runs: List[dict]) -> dict:
    """One result from the rounds of one configuration: every timed step pooled, medians."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    r = dict(ok[0])
    counted = [x["step_flops"] for x in ok if "step_flops" in x]  # counted in one round only
    if counted:
        r["step_flops"] = counted[0]
    r["failed_rounds"] = [x["error"] for x in runs if "error" in x]
    for k in ("all_s", "fwd_all_s", "opt_all_s"):
        r[k] = [v for x in ok for v in x[k]]
    r.update(s_per_step=statistics.median(r["all_s"]), fwd_s=statistics.median(r["fwd_all_s"]),
             opt_s=statistics.median(r["opt_all_s"]), peak_rss_mb=max(x["peak_rss_mb"] for x in ok),
             samples_per_s=r["batch"] / statistics.median(r["all_s"]), processes=len(ok))
    return r


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['label']:<12} error: {r['error']}"
    rel = ", ".join(f"{n}: {b['steps']} steps res {b['residual']:.1e}" for n, b in r.get("blocks", {}).items())
    failed = f"  ({len(r['failed_rounds'])} round(s) failed: {r['failed_rounds'][0]})" if r.get("failed_rounds") else ""
    return (f"{r['label']:<12} {r['precision']:<9} {r['memory_format']:<13} {r['s_per_step']:8.3f} {r['fwd_s']:7.3f} "
            f"{r['opt_s']:6.3f} {r['samples_per_s']:10.1f} {r['peak_rss_mb']:8.0f}  {rel}{failed}")


HEADER = (f"{'step':<12} {'precision':<9} {'format':<13} {'s/step':>8} {'fwd s':>7} {'opt s':>6} {'samples/s':>10} "
          f"{'peak MB':>8}  relaxation")


def run_group(base: dict, variants: Dict[str, dict], rounds: int) -> Dict[str, dict]:
    """Every variant of ``base`` in its own process, ``rounds`` times, alternating; merged per variant."""
    runs: Dict[str, List[dict]] = {k: [] for k in variants}
    for i in range(rounds):
        for label, v in variants.items():
            spec = dict(base, **{k: x for k, x in v.items() if k != "overrides"}, label=label,
                        overrides=dict(base.get("overrides", {}), **v.get("overrides", {})))
            spec["flops"] = spec.get("flops", False) and i == 0   # counted once (merge keeps the first round's)
            runs[label].append(run_worker(spec))
    return {k: merge(v) for k, v in runs.items()}


def conv_limits(samples: List[dict]) -> Dict[str, float]:
    keys = samples[0].keys()
    med = {k: statistics.median(s[k] for s in samples) for k in keys}
    return {**med, "float32": max(med["float32_nchw"], med["float32_channels_last"]),
            "bfloat16": max(med["bfloat16_nchw"], med["bfloat16_channels_last"])}


def formats(args, results: list) -> None:
    """channels_last vs NCHW of the trainer's step, float32 and bfloat16, alternating processes."""
    q = args.quick
    models = [("cifar10_l6_3blocks", dict(CIFAR, batch=8 if q else 32, repeats=args.repeats or (1 if q else 2),
                                          overrides=dict(CIFAR["overrides"], **({"t1": 4, "t2": 2} if q else {})))),
              ("digits conv", dict(DIGITS, batch=32, repeats=args.repeats or (3 if q else 10),
                                   overrides={"model_options": "arch=conv"}))]
    print(f"\n== memory format of the trainer's step ({args.threads} threads, {args.rounds} round(s)) ==")
    for name, base in models:
        base = dict(base, threads=args.threads, method="ep")
        variants = {f"{p}/{f}": {"overrides": {"precision": p, "memory_format": f}}
                    for p in ("float32", "bfloat16") for f in ("contiguous", "channels_last")}
        res = run_group(base, variants, args.rounds)
        results += list(res.values())
        for p in ("float32", "bfloat16"):
            a, b = res[f"{p}/contiguous"], res[f"{p}/channels_last"]
            if "error" in a or "error" in b:
                print(f"{name:<20} {p:<9} error: {a.get('error') or b.get('error')}")
                continue
            print(f"{name:<20} {p:<9} NCHW {a['s_per_step']:.3f} s, channels_last {b['s_per_step']:.3f} s: "
                  f"channels_last {a['s_per_step'] / b['s_per_step']:.2f}x as fast", flush=True)


def main(argv: List[str] = None) -> None:
    from ..cli import invoked_as, positive_int

    prog = invoked_as("train.bench")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.replace("python -m train.bench", prog),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (smoke run)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed steps per process")
    ap.add_argument("--rounds", type=positive_int, default=1, help="processes per configuration, alternating")
    ap.add_argument("--only", choices=["digits", "cifar"], default=None,
                    help="digits: the default model and the memory comparison; cifar: the L=6 preset")
    ap.add_argument("--formats", action="store_true", help="only compare memory formats (channels_last vs NCHW)")
    ap.add_argument("--json", default="bench.json", help="where to write the results")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    q = args.quick
    load = [os.getloadavg()[0]]
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.1f} before")
    results: list = []
    mem: list = []
    summary: dict = {}
    if args.formats:
        formats(args, results)
    if args.only in (None, "digits") and not args.formats:
        base = dict(DIGITS, batch=32, repeats=args.repeats or (3 if q else 10), threads=args.threads)
        print(f"\n== default model (recipe digits, batch 32) ==\n{HEADER}")
        res = run_group(base, {m: {"method": m, "overrides": {"method": m}} for m in ("ep", "implicit", "unrolled")}
                        | {"feedforward": {"method": "feedforward", "wrap": "feedforward"}}, args.rounds)
        for r in res.values():
            results.append(r)
            print(_row(r), flush=True)
    if args.only in (None, "cifar") and not args.formats:
        ov = dict(CIFAR["overrides"], **({"t1": 4, "t2": 2} if q else {}))
        base = dict(CIFAR, overrides=ov, batch=8 if q else 32, repeats=args.repeats or (1 if q else 3),
                    threads=args.threads)
        print(f"\n== L=6 three-block preset (recipe cifar10_l6_3blocks, dataset=fake, batch {base['batch']}) ==\n{HEADER}")
        conv = [run_worker({"kind": "conv", "threads": args.threads})]
        res = run_group(base, {"ep": {"method": "ep", "flops": True},
                               "ep-bf16": {"method": "ep", "flops": True, "overrides": {"precision": "bfloat16"}},
                               "implicit": {"method": "implicit", "overrides": {"method": "implicit"}},
                               "unrolled": {"method": "unrolled", "overrides": {"method": "unrolled"}},
                               "feedforward": {"method": "feedforward", "wrap": "feedforward"}}, args.rounds)
        cos = run_worker(dict(base, kind="cosine", label="cosine", against={"precision": "float32"},
                              overrides=dict(ov, precision="bfloat16")))
        conv.append(run_worker({"kind": "conv", "threads": args.threads}))
        for r in res.values():
            results.append(r)
            print(_row(r), flush=True)
        if "error" not in cos:
            c = cos["cosine"]
            print("bf16 gradient cosine vs the fp32 step (same batch and weights): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in c.items()))
            summary["bf16_grad_cosine"] = c
        else:
            print(f"bf16 gradient cosine: error: {cos['error']}")
        ep, bf = res["ep"], res["ep-bf16"]
        conv = [c for c in conv if "error" not in c]
        if conv and "error" not in ep and "error" not in bf:
            lim = conv_limits(conv)
            summary.update(conv_gflops=lim, reference_s_per_step=REFERENCE_EP_L6_3BLOCKS_S,
                           bf16_speedup_vs_fp32=ep["s_per_step"] / bf["s_per_step"])
            print(f"\nmachine limit: a 3x3 conv 128->256 at 16x16, batch 32: float32 {lim['float32']:.0f} GFLOP/s, "
                  f"bfloat16 {lim['bfloat16']:.0f} GFLOP/s (NCHW / channels_last: {lim['float32_nchw']:.0f} / "
                  f"{lim['float32_channels_last']:.0f}, {lim['bfloat16_nchw']:.0f} / {lim['bfloat16_channels_last']:.0f})")
            for r, prec in ((ep, "float32"), (bf, "bfloat16")):
                if "step_flops" not in r:   # the counting round failed (its error is printed below)
                    print(f"{r['label']:<8} {r['s_per_step']:.2f} s/step, FLOPs not counted: "
                          f"{'; '.join(r.get('failed_rounds', [])) or 'no round counted them'}")
                    continue
                got = r["step_flops"] / r["s_per_step"] / 1e9
                summary[r["label"]] = dict(s_per_step=r["s_per_step"], tflop_per_step=r["step_flops"] / 1e12,
                                           achieved_gflops=got, fraction_of_conv_limit=got / lim[prec])
                if not q:
                    summary[r["label"]]["reference_over_ours"] = REFERENCE_EP_L6_3BLOCKS_S / r["s_per_step"]
                ref = "" if q else (f"; reference {REFERENCE_EP_L6_3BLOCKS_S} s / this = "
                                    f"{REFERENCE_EP_L6_3BLOCKS_S / r['s_per_step']:.2f}x")
                print(f"{r['label']:<8} {r['s_per_step']:.2f} s/step, {r['step_flops'] / 1e12:.2f} TFLOP/step -> "
                      f"{got:.0f} GFLOP/s = {100 * got / lim[prec]:.0f}% of the {prec} conv limit{ref}")
            print(f"bf16 relaxation: {summary['bf16_speedup_vs_fp32']:.2f}x the fp32 step"
                  + ("" if q else " (the reference figure was measured side by side in another run, "
                                  "reference/ANCHORS.md; it is not re-measured here)"))
    if args.only in (None, "digits") and not args.formats:
        # EP's backward memory must not grow with the forward steps; BPTT's does
        mb, hid, t1s = (128, 512, (10, 100)) if q else (512, 2048, (10, 400))
        print(f"\n== backward memory vs forward relaxation steps (digits ff-EBM, hidden {hid}, batch {mb}) ==")
        for method in ("ep", "bptt"):
            for t1 in t1s:
                spec = dict(DIGITS, batch=mb, repeats=1, method=method, label=method, threads=args.threads,
                            wrap="bptt" if method == "bptt" else None,
                            overrides={"t1": t1, "model_options": f"tol=1e-30,hidden={hid},width={hid // 2}",
                                       "method": "none" if method == "bptt" else method})
                r = run_worker(spec)
                mem.append(r)
                if "error" in r:
                    print(f"{method:<6} T1={t1:<4} error: {r['error']}")
                    continue
                print(f"{method:<6} T1={t1:<4} backward extra peak {r['backward_extra_mb']:8.1f} MB   "
                      f"(steps {list(r['blocks'].values())[0]['steps']})", flush=True)
    load.append(os.getloadavg()[0])
    print(f"\nload average {load[1]:.1f} after")
    with open(args.json, "w") as f:
        json.dump({"results": results, "memory": mem, "summary": summary, "load_average": load,
                   "torch": torch.__version__, "threads": args.threads}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
