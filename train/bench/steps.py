"""Speed and memory of one training step: EP vs Implicit vs Unrolled vs a feedforward net.

    python -m train.bench                       # default model + CIFAR-shaped L=6 three-block preset
    python -m train.bench --quick               # smaller repeats (a smoke run)
    python -m train.bench --json bench.json

Each configuration runs in its own process so that its peak memory (max RSS) is its own. A
training step is forward (free relaxation of every block) + loss + backward (the blocks'
gradient method, autograd elsewhere); no data loading, no optimiser step, as in the reference figure below.
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

# reference figure (measured on another CPU, see the README's results): L=6 3-block, EP, batch 32, T1 60, T2 20, 2 threads
REFERENCE_EP_L6_3BLOCKS_S = 19.6
# fp32 convolution throughput of the machine that figure was taken on (60-80 GFLOP/s)
REFERENCE_MACHINE_CONV_GFLOPS = 70.0


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
                cache: dict = {}
                s = analytic_step(m, u, m.initial_state(u), None, m.relaxation.mode, cache)
                with FlopCounterMode(display=False) as fc:  # a steady-state step (warm pooling cache)
                    analytic_step(m, u, s, None, m.relaxation.mode, cache)
                total[m.name] = fc.get_total_flops()
                h = m(h)
            else:
                h = m(h)
    return total


def worker(spec: dict) -> dict:
    import ffebm
    from ffebm import models

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
                                             for k, v in b.backward_stats.to_dict().items()}}
                         for name, b in ffebm.energy_blocks(model)}
        if spec.get("flops"):
            fl = step_flops(model, x)
            res["flops_per_relaxation_step"] = fl
    return res


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def conv_limit(model_name: str, batch: int, threads: int, steps: int) -> dict:
    """The machine's conv/matmul limit for this model: the time of one relaxation step's
    convolutions and transposed convolutions (channels-last, as the model runs) measured alone,
    times the number of steps. The ratio to the measured training step says how much time goes
    to anything but convolutions (pooling, activations, residuals, Python)."""
    from ffebm import models
    import torch.nn.functional as F
    from ffebm.couplings import ConvCoupling, DenseCoupling

    torch.set_num_threads(threads)
    model = models.build(model_name)
    per_step = 0.0
    flops = 0.0
    for blk in model:
        for i, c in enumerate(blk.couplings):
            shape = (batch, *blk.layer_shapes[i])
            x = torch.rand(shape).contiguous(memory_format=torch.channels_last) if len(shape) == 4 else torch.rand(shape)
            with torch.no_grad():
                y, ctx = c.bottom_up(x)
                ts = []
                for _ in range(7):
                    t = time.perf_counter()
                    if isinstance(c, ConvCoupling):
                        F.conv2d(x, c.weight, None, c.stride, c.padding)
                        g = c._pool_adjoint(y, ctx) if c.pool == "avg" else torch.rand(batch, c.out_channels, *c.conv_size).contiguous(memory_format=torch.channels_last)
                        F.conv_transpose2d(g, c.weight, None, c.stride, c.padding, c._out_pad)
                    else:
                        c.bottom_up(x)
                        c.top_down(y, None)
                    ts.append(time.perf_counter() - t)
            per_step += statistics.median(ts[2:])
            if isinstance(c, ConvCoupling):
                flops += 2 * 2 * batch * c.out_channels * c.in_channels * c.kernel_size ** 2 * c.conv_size[0] * c.conv_size[1]
    return {"conv_seconds_per_relaxation_step": per_step, "conv_limit_seconds": per_step * steps,
            "conv_gflops": flops / per_step / 1e9}


def main(argv: List[str] = None) -> None:
    from ..cli import invoked_as, positive_int

    prog = invoked_as("train.bench")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.replace("python -m train.bench", prog),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (smoke run)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=None)
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
        methods = ["ep", "implicit", "unrolled", "feedforward"]
        if base["model"] != "digits":
            methods.insert(1, "ep-bf16")
        for method in methods:
            spec = dict(base, method=method, threads=args.threads)
            if method == "ep-bf16":  # relaxation under bf16 autocast, fp32 polish steps and read-out
                spec = dict(spec, method="ep", label="ep-bf16",
                            overrides=dict(base.get("overrides", {}), precision="bfloat16"))
            r = run_worker(spec)
            results.append(r)
            if "error" in r:
                print(f"{method:<12} error: {r['error']}")
                continue
            rel = ", ".join(f"{n}: {b['steps']} steps res {b['residual']:.1e}" for n, b in r.get("blocks", {}).items())
            r["label"] = method
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
        ep = next(r for r in cif if r["label"] == "ep")
        bf = next((r for r in cif if r["label"] == "ep-bf16"), None)
        fl = sum(ep["flops_per_relaxation_step"].values())
        t1, t2 = 60, 20
        total = fl * (t1 + 2 * t2)
        lim = conv_limit("cifar10_l6_3blocks", ep["batch"], args.threads, t1 + 2 * t2)
        summary = {"ep_s_per_step": ep["s_per_step"], "reference_s_per_step": REFERENCE_EP_L6_3BLOCKS_S,
                   "speedup_vs_reference": REFERENCE_EP_L6_3BLOCKS_S / ep["s_per_step"],
                   "relaxation_tflop_per_step": total / 1e12, "achieved_gflops": total / ep["s_per_step"] / 1e9,
                   **lim, "fraction_of_conv_limit": lim["conv_limit_seconds"] / ep["s_per_step"]}
        # the reference figure was taken on a CPU with a different conv throughput: scale it to
        # this machine by the ratio of fp32 conv rates (same shapes, same thread count)
        ref_here = REFERENCE_EP_L6_3BLOCKS_S * REFERENCE_MACHINE_CONV_GFLOPS / lim["conv_gflops"]
        summary["reference_scaled_to_this_machine_s"] = ref_here
        summary["speedup_vs_reference_hw_normalised"] = ref_here / ep["s_per_step"]
        if bf is not None:
            summary["speedup_bf16_vs_reference_hw_normalised"] = ref_here / bf["s_per_step"]
            summary["ep_bf16_s_per_step"] = bf["s_per_step"]
            summary["bf16_speedup_vs_fp32"] = ep["s_per_step"] / bf["s_per_step"]
        print(f"\nL=6 3-block EP: {ep['s_per_step']:.2f} s/step vs reference figure {REFERENCE_EP_L6_3BLOCKS_S} s "
              f"-> {summary['speedup_vs_reference']:.2f}x (different CPU: compare conv rates below)\n"
              f"relaxation work {total / 1e12:.2f} TFLOP/step -> {summary['achieved_gflops']:.0f} GFLOP/s achieved; "
              f"the same convolutions alone run at {lim['conv_gflops']:.0f} GFLOP/s and take "
              f"{lim['conv_limit_seconds']:.2f} s: the step runs at {100 * summary['fraction_of_conv_limit']:.0f}% "
              f"of the conv limit")
        print(f"reference figure scaled to this machine's conv rate ({lim['conv_gflops']:.0f} vs "
              f"{REFERENCE_MACHINE_CONV_GFLOPS:.0f} GFLOP/s): {ref_here:.2f} s -> fp32 EP "
              f"{summary['speedup_vs_reference_hw_normalised']:.2f}x"
              + (f", bf16 EP {summary['speedup_bf16_vs_reference_hw_normalised']:.2f}x" if bf is not None else ""))
        if bf is not None:
            print(f"with bf16 relaxation (fp32 polish and read-out): {bf['s_per_step']:.2f} s/step, "
                  f"{summary['bf16_speedup_vs_fp32']:.2f}x the fp32 step")
    with open(args.json, "w") as f:
        json.dump({"results": results, "memory": mem, "summary": summary,
                   "torch": torch.__version__, "threads": args.threads}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
