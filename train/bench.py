"""Speed and memory of one training step: EP vs Implicit vs Unrolled vs a feedforward net.

    python -m train.bench                       # default model + CIFAR-shaped L=6 three-block preset
    python -m train.bench --quick               # smaller repeats (a smoke run)
    python -m train.bench --json bench.json

Each configuration runs in its own process so that its peak memory (max RSS) is its own. A
training step is forward (free relaxation of every block) + loss + backward (the blocks'
gradient method, autograd elsewhere); no data loading, no optimiser step, as in ANCHORS.md.
Figures are medians over repeats after one warm-up step. The feedforward baseline has the
same layers and parameters, run once bottom-up (s_i = sigma(f(s_{i-1}))), trained by backprop.
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
from typing import List

import torch
import torch.nn as nn

# reference figure (ANCHORS.md section 1): L=6 3-block, EP, batch 32, T1 60, T2 20, 2 threads
REFERENCE_EP_L6_3BLOCKS_S = 19.6


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


def step_flops(model, x) -> float:
    """FLOPs of one relaxation step of every block (summed), counted by torch's flop counter."""
    import ffebm
    from ffebm.solvers import analytic_step
    from torch.utils.flop_counter import FlopCounterMode

    total = {}
    h = x
    with torch.no_grad():
        for m in model:
            if isinstance(m, ffebm.EnergyBlock):
                u = m.input_map(h)
                s = m.initial_state(u)
                with FlopCounterMode(display=False) as fc:
                    analytic_step(m, u, s, None, m.relaxation.mode, {})
                total[m.name] = fc.get_total_flops()
                h = m(h)
            else:
                h = m(h)
    return total


def worker(spec: dict) -> dict:
    import ffebm
    import models

    _reset_peak()
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    kw = dict(spec.get("overrides", {}))
    model = models.build(spec["model"], **kw)
    shape = spec["input_shape"]
    x = torch.randn(spec["batch"], *shape)
    y = torch.randint(0, spec["classes"], (spec["batch"],))
    if spec.get("channels_last") and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    method = spec["method"]
    if method == "feedforward":
        net = feedforward(model)
    else:
        net = model
        m = {"ep": lambda: ffebm.EP(beta=spec.get("beta", 0.2), variant="centered"),
             "implicit": lambda: ffebm.Implicit(tol=1e-4, max_iter=spec.get("implicit_iters", 100)),
             "unrolled": lambda: ffebm.Unrolled(),
             "bptt": lambda: ffebm.Unrolled(from_equilibrium=False)}[method]()
        ffebm.set_gradient(model, m)
    loss_fn = nn.CrossEntropyLoss()
    times, fwd, bwd = [], [], []
    rss_before = _rss_mb()
    rss_fwd = rss_bwd = 0.0
    for r in range(spec["repeats"] + 1):
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = net(x)
        t1 = time.perf_counter()
        if r == 0:  # memory is read on the first step: max RSS is a high-water mark
            rss_fwd = _rss_mb()
        loss_fn(out, y).backward()
        t2 = time.perf_counter()
        if r == 0:
            rss_bwd = _rss_mb()
        if r > 0:  # first step is warm-up
            times.append(t2 - t0)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    res = {k: v for k, v in spec.items() if k != "overrides"}
    res.update(overrides=spec.get("overrides", {}), s_per_step=statistics.median(times),
               fwd_s=statistics.median(fwd), bwd_s=statistics.median(bwd), all_s=times,
               samples_per_s=spec["batch"] / statistics.median(times),
               peak_rss_mb=_rss_mb(), rss_start_mb=rss_before, rss_after_forward_mb=rss_fwd,
               backward_extra_mb=max(rss_bwd - rss_fwd, 0.0))
    if method != "feedforward":
        res["blocks"] = {name: {"steps": b.stats.steps, "residual": b.stats.residual,
                                "backward": {k: (v if not isinstance(v, list) else [repr(s) for s in v])
                                             for k, v in b.backward_stats.items()}}
                         for name, b in ffebm.energy_blocks(model)}
        if spec.get("flops"):
            fl = step_flops(model, x)
            res["flops_per_relaxation_step"] = fl
    return res


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run([sys.executable, "-m", "train.bench", "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def conv_peak_gflops(threads: int) -> float:
    """Achieved GFLOP/s of a representative 3x3 conv (the machine's practical conv limit)."""
    torch.set_num_threads(threads)
    x = torch.randn(32, 128, 16, 16)
    w = torch.randn(256, 128, 3, 3)
    flops = 2 * 32 * 256 * 16 * 16 * 128 * 9
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        torch.nn.functional.conv2d(x, w, padding=1)
        ts.append(time.perf_counter() - t)
    return flops / statistics.median(ts[1:]) / 1e9


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", choices=["digits", "cifar"], default=None)
    ap.add_argument("--json", default="bench.json", help="where to write the results")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    q = args.quick
    results = []
    groups = []
    if args.only in (None, "digits"):
        groups.append(("digits", dict(model="digits", input_shape=[64], classes=10, batch=32,
                                      repeats=args.repeats or (3 if q else 10), beta=0.5)))
    if args.only in (None, "cifar"):
        ov = {"t1": 4, "t2": 2} if q else {}
        groups.append(("cifar10_l6_3blocks", dict(model="cifar10_l6_3blocks", input_shape=[3, 32, 32], classes=10,
                                                  batch=8 if q else 32, repeats=args.repeats or (1 if q else 3),
                                                  beta=0.2, overrides=ov, channels_last=True, flops=True)))
    for name, base in groups:
        print(f"\n== {name} (batch {base['batch']}, {args.threads} threads) ==", flush=True)
        print(f"{'method':<12} {'s/step':>8} {'fwd s':>7} {'bwd s':>7} {'samples/s':>10} {'peak MB':>8}  relaxation")
        for method in ("ep", "implicit", "unrolled", "feedforward"):
            spec = dict(base, method=method, threads=args.threads)
            r = run_worker(spec)
            results.append(r)
            if "error" in r:
                print(f"{method:<12} error: {r['error']}")
                continue
            rel = ", ".join(f"{n}: {b['steps']} steps res {b['residual']:.1e}" for n, b in r.get("blocks", {}).items())
            print(f"{method:<12} {r['s_per_step']:8.3f} {r['fwd_s']:7.3f} {r['bwd_s']:7.3f} {r['samples_per_s']:10.1f} "
                  f"{r['peak_rss_mb']:8.0f}  {rel}", flush=True)
    # EP's backward memory must not grow with the forward steps; BPTT's does
    mb, hid, t1s = (128, 512, (10, 100)) if q else (512, 2048, (10, 400))
    print(f"\n== backward memory vs forward relaxation steps (digits ff-EBM, hidden {hid}, batch {mb}) ==")
    mem = []
    for method in ("ep", "bptt"):
        for t1 in t1s:
            spec = dict(model="digits", input_shape=[64], classes=10, batch=mb, repeats=1, method=method,
                        threads=args.threads, overrides={"t1": t1, "tol": 1e-30, "hidden": hid, "width": hid // 2})
            r = run_worker(spec)
            mem.append(r)
            if "error" in r:
                print(f"{method:<6} T1={t1:<4} error: {r['error']}")
                continue
            print(f"{method:<6} T1={t1:<4} backward extra peak {r['backward_extra_mb']:8.1f} MB   "
                  f"(steps {list(r['blocks'].values())[0]['steps']})", flush=True)
    summary = {}
    cif = [r for r in results if r.get("model") == "cifar10_l6_3blocks" and "error" not in r]
    if cif and not q:
        ep = next(r for r in cif if r["method"] == "ep")
        fl = sum(ep["flops_per_relaxation_step"].values())
        t1, t2 = 60, 20
        total = fl * (t1 + 2 * t2)
        peak = conv_peak_gflops(args.threads)
        summary = {"ep_s_per_step": ep["s_per_step"], "reference_s_per_step": REFERENCE_EP_L6_3BLOCKS_S,
                   "speedup_vs_reference": REFERENCE_EP_L6_3BLOCKS_S / ep["s_per_step"],
                   "relaxation_tflop_per_step": total / 1e12, "achieved_gflops": total / ep["s_per_step"] / 1e9,
                   "conv_gflops_limit": peak}
        print(f"\nL=6 3-block EP: {ep['s_per_step']:.2f} s/step vs reference {REFERENCE_EP_L6_3BLOCKS_S} s "
              f"-> {summary['speedup_vs_reference']:.2f}x; relaxation work {total / 1e12:.2f} TFLOP/step, "
              f"achieved {summary['achieved_gflops']:.0f} GFLOP/s vs {peak:.0f} GFLOP/s for a plain 3x3 conv "
              f"({100 * summary['achieved_gflops'] / peak:.0f}% of the conv limit)")
    with open(args.json, "w") as f:
        json.dump({"results": results, "memory": mem, "summary": summary,
                   "torch": torch.__version__, "threads": args.threads}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
