"""Benchmark of the analog substrate's pulsed update (compared with the published CPU
figures of the reference simulator, AIHWKit 1.2.0, 2 threads).

    python -m train.bench.analog [--json PATH] [--repeats N] [--threads T] [--device cpu|cuda] [--inference-only]

Pulsed update of one 512x512 tile, batch 64, BL 31 with update and BL management, lr 0.01,
x ~ U(0,1), d ~ N(0, s) for s in {0.01, 0.1}, ConstantStep, SoftBounds and LinearStep defaults
(the affine-step models; each also as a multiple of ConstantStep's time): median ms over repeats, beside a plain dense outer product of the same shape (``d^T x``, the digital
update's own work: each pulsed update is printed as a multiple of its time) and a plain torch
Linear step (forward + backward + SGD) measured in the same run. Also: the exact
(slot-by-slot) path at the same size (the reference simulator's figures), and a full analog layer step (forward read +
backward read + pulsed update) at 512x512.

Energy blocks on tiles (what simulating the hardware costs): one EP training step (free
relaxation, two nudged relaxations, pulsed c-TTv2 update) of a dense block and of a
convolutional block whose couplings settle on tiles with the default read model, beside the
same digital block trained by EP and Adam, and the same tiles with ideal reads (what the tiles
cost without the read model: the im2col products, the pulsed update, the bookkeeping), timed in
turn round by round (median seconds, medians of the per-round ratios, and the pulsed update's
time inside the analog step).

Inference tiles (hardware-aware training): forward + backward of an ``InferenceLinear`` 512x512
at batch 64 (x ~ U(0, 1)) beside ``nn.Linear`` of the same shape, median ms timed alternately call
by call (and the median of the per-pair ratios), with perfect reads, the published read model, the
read model with an additive Gaussian weight modifier, and the PCM preset (read model + PCM-like
programming-noise modifier); and the published read model's forward alone (``no_grad``, eval mode).

Checkpoint size (``--checkpoint-size N``, default 2048): the saved ``state_dict`` of an N x N
``AnalogLinear`` on SoftBounds devices and of its c-TTv2 ``AnalogOptimizer`` after one step, in MB
and as a multiple of the weights' own size (float32).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

import ffebm
from ffebm.analog import (AnalogConfig, AnalogOptimizer, AnalogTile, ChoppedTTv2, ConstantStep, DeviceArray,
                          IOConfig, LinearStep, SoftBounds, UpdateConfig, analog_parameters, digital_parameters,
                          cpu_kernels, set_cpu_kernels, to_analog_energy)

REF_MS = {  # AIHWKit 1.2.0 C++ core, CPU build, 2 threads (published)
    ("ConstantStep", 0.01): 18.5, ("ConstantStep", 0.1): 191.0,
    ("SoftBounds", 0.01): 21.8, ("SoftBounds", 0.1): 199.0,
    ("layer", 0.01): 29.0, ("layer", 0.1): 195.0,
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int, dev: torch.device, warmup: int = 3) -> float:
    """Median wall time (ms) over ``repeats`` calls after ``warmup``; the minimum of the same
    calls is left in ``median_ms.last_min`` (robust to other processes on a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    median_ms.last_min = min(ts)  # type: ignore[attr-defined]
    return statistics.median(ts)


def paired_ms(fn: Callable[[], object], base: Callable[[], object], repeats: int, dev: torch.device,
              warmup: int = 3):
    """Median wall times (ms) of ``fn`` and ``base`` timed alternately, call by call, so that both
    see the same machine load; also the median of the per-pair ratios fn/base."""
    for _ in range(warmup):
        fn()
        base()
    a: List[float] = []
    b: List[float] = []
    for _ in range(repeats):
        for f, out in ((fn, a), (base, b)):
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), min(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def _warm_up(dev: torch.device, seconds: float = 2.0) -> None:
    """Spin the thread pool (and clocks) up before timing: the first milliseconds of a process
    on these shared machines run several times slower."""
    a = torch.rand(512, 512, device=dev)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        (a @ a).exp_()
    _sync(dev)


FAST_DEVICES = (("ConstantStep", ConstantStep()), ("SoftBounds", SoftBounds()), ("LinearStep", LinearStep()))


def run(repeats: int = 9, device: str = "cpu", size: int = 512, batch: int = 64,
        exact_size: int = 512) -> Dict[str, object]:
    dev = torch.device(device)
    _warm_up(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    x = torch.rand(batch, size, generator=g, device=dev)
    for s in (0.01, 0.1):
        d = torch.randn(batch, size, generator=g, device=dev) * s
        for name, cfg in FAST_DEVICES:
            da = DeviceArray(cfg, (size, size), seed=1, device=dev)
            ucfg = UpdateConfig()
            stats = {}

            def step():
                stats.update(da.pulsed_update(x, d, 0.01, ucfg))

            # the dense outer product d^T x (the digital update's own work), timed alternately with it
            ms, ms_min, dense, ratio = paired_ms(step, lambda: d.t() @ x, repeats, dev)
            pulses = float(stats["n_up"] + stats["n_down"])
            ref = REF_MS.get((name, s))
            rows.append({"what": f"fast pulsed update {size}x{size}", "device": name, "s": s,
                         "ms": ms, "min_ms": ms_min, "dense_outer_ms": dense,
                         "ratio_vs_dense": ratio,
                         "ref_ms": ref, "speedup_vs_ref": None if ref is None else ref / ms,
                         "pulses_per_update": pulses})
        # exact (slot-by-slot) path; the reference simulator's figures are for its exact path
        xs, ds = x[:, :exact_size], d[:, :exact_size]
        for name, cfg in FAST_DEVICES[:2]:
            da = DeviceArray(cfg, (exact_size, exact_size), seed=1, device=dev)
            msx = median_ms(lambda: da.pulsed_update(xs, ds, 0.01, UpdateConfig(), exact=True),
                            max(3, repeats // 3), dev, warmup=1)
            msx_min = median_ms.last_min
            msf = median_ms(lambda: da.pulsed_update(xs, ds, 0.01, UpdateConfig()), repeats, dev)
            row = {"what": f"exact pulsed update {exact_size}x{exact_size}", "device": name,
                   "s": s, "ms": msx, "min_ms": msx_min, "fast_ms_same_size": msf}
            if exact_size == size:
                row.update(ref_ms=REF_MS[(name, s)], speedup_vs_ref=REF_MS[(name, s)] / msx)
            rows.append(row)
        # full layer step: forward read + backward read + pulsed update
        for name, cfg in (("ConstantStep", ConstantStep()), ("SoftBounds", SoftBounds())):
            tile = AnalogTile(size, size, cfg, seed=2, device=dev)
            tile.set_weights(0.05 * torch.randn(size, size, generator=g, device=dev))

            def layer_step():
                y = tile(x)
                z = tile.backward(d)
                tile.update(x, d, 0.01)
                return y, z

            ms = median_ms(layer_step, repeats, dev)
            ms_min = median_ms.last_min
            lin = torch.nn.Linear(size, size, bias=False).to(dev)
            opt = torch.optim.SGD(lin.parameters(), lr=0.01)
            xr = x.clone().requires_grad_(False)

            def torch_step():
                opt.zero_grad(set_to_none=True)
                out = lin(xr)
                out.backward(d)
                opt.step()

            ms_lin = median_ms(torch_step, repeats, dev)
            rows.append({"what": f"analog layer step {size}x{size} (fwd+bwd+update)", "device": name,
                         "s": s, "ms": ms, "min_ms": ms_min, "torch_linear_step_ms": ms_lin,
                         "ref_ms": REF_MS[("layer", s)], "speedup_vs_ref": REF_MS[("layer", s)] / ms})
    return {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "batch": batch,
            "bl": 31, "lr": 0.01, "repeats": repeats, "rows": rows}


BLOCKS = {  # name: (builder, input shape without batch, batch)
    "dense [64, 256, 128], T1 40, T2 30": (
        lambda: ffebm.DenseHopfield([64, 256, 128], steps=40, tol=None, nudge_steps=30), (64,), 64),
    "conv 16x16x16 -> [32, 64] avg pool, T1 20, T2 10": (
        lambda: ffebm.ConvHopfield(16, (16, 16), [32, 64], pool="avg", steps=20, tol=None, nudge_steps=10),
        (16, 16, 16), 32),
}


def block_rows(repeats: int, dev: torch.device) -> List[Dict[str, object]]:
    """EP training step of each block in BLOCKS: digital (EP + Adam) vs on tiles (AnalogEP +
    pulsed c-TTv2, SoftBounds), with the published read model and with ideal reads
    (``IOConfig.perfect()`` both ways: what tiles cost without the read model's noise draws and
    element-wise passes, i.e. the im2col products, the pulsed update and the bookkeeping). The
    three steps are timed in turn, round by round, so that all see the same machine load:
    median seconds, medians of the per-round ratios to the digital step, and the median time
    of the analog optimiser's step (the pulsed update) inside the analog step."""
    rows = []
    for name, (make, shape, batch) in BLOCKS.items():
        torch.manual_seed(0)
        digital = make().to(dev)
        x = torch.rand(batch, *shape, device=dev)
        t = torch.rand_like(digital(x))
        blocks = {"digital": digital,
                  "analog": to_analog_energy(digital, AnalogConfig(device=SoftBounds()), seed=0),
                  "ideal": to_analog_energy(digital, AnalogConfig(device=SoftBounds(), io=IOConfig.perfect(),
                                                                  bwd_io=IOConfig.perfect()), seed=0)}
        blocks["torch reads"] = blocks["analog"]  # the same tiles, read by the torch path
        update_ms: Dict[str, List[float]] = {k: [] for k in blocks if k != "digital"}
        steps = {}
        for kind, blk in blocks.items():
            opts = [torch.optim.Adam(digital_parameters(blk), lr=1e-3)]
            if kind != "digital":
                opts.append(AnalogOptimizer(analog_parameters(blk), ChoppedTTv2(), lr=0.01, seed=0))

            def step(blk=blk, opts=opts, kind=kind):
                set_cpu_kernels("torch" if kind == "torch reads" else None)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                ((blk(x) - t) ** 2).mean().backward()
                opts[0].step()
                if len(opts) > 1:
                    _sync(dev)
                    t0 = time.perf_counter()
                    opts[1].step()
                    _sync(dev)
                    update_ms[kind].append((time.perf_counter() - t0) * 1e3)
                set_cpu_kernels(None)

            steps[kind] = step
        ms = interleaved_ms(steps, repeats, dev, warmup=1)
        d = ms["digital"]
        ratio = {k: statistics.median(a / b for a, b in zip(ms[k], d)) for k in ("analog", "torch reads", "ideal")}
        rows.append({"block": name, "batch": batch, "digital_s": statistics.median(d) / 1e3,
                     "cpu_kernels": cpu_kernels(),
                     "analog_s": statistics.median(ms["analog"]) / 1e3, "analog_over_digital": ratio["analog"],
                     "torch_reads_s": statistics.median(ms["torch reads"]) / 1e3,
                     "torch_reads_over_digital": ratio["torch reads"],
                     "ideal_reads_s": statistics.median(ms["ideal"]) / 1e3,
                     "ideal_over_digital": ratio["ideal"],
                     "update_s": statistics.median(update_ms["analog"][-repeats:]) / 1e3})
    return rows


def interleaved_ms(fns: Dict[str, Callable[[], object]], repeats: int, dev: torch.device,
                   warmup: int = 1) -> Dict[str, List[float]]:
    """Wall times (ms) of each function, called in turn round by round (``repeats`` rounds after
    ``warmup``), so that all see the same machine load."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            out[k].append((time.perf_counter() - t0) * 1e3)
    return out


def print_blocks(rows: List[Dict[str, object]]) -> None:
    print("\n# EP training step of an energy block: digital vs on tiles (SoftBounds, c-TTv2) with the published "
          "reads and with ideal reads, timed in turn; ratios: medians of the per-round ratios; update: the pulsed "
          "update's share of the analog step")
    print(f"| {'block':<48} | {'batch':>5} | {'digital s':>9} | {'analog s':>8} | {'ratio':>6} | "
          f"{'torch reads s':>13} | {'ratio':>6} | {'ideal reads s':>13} | {'ratio':>6} | {'update s':>8} |")
    print("|" + "|".join("-" * (w + 2) for w in (48, 5, 9, 8, 6, 13, 6, 13, 6, 8)) + "|")
    for r in rows:
        print(f"| {r['block']:<48} | {r['batch']:>5} | {r['digital_s']:>9.3f} | {r['analog_s']:>8.3f} | "
              f"{r['analog_over_digital']:>5.1f}x | {r['torch_reads_s']:>13.3f} | {r['torch_reads_over_digital']:>5.1f}x | "
              f"{r['ideal_reads_s']:>13.3f} | {r['ideal_over_digital']:>5.1f}x | {r['update_s']:>8.3f} |")
    print(f"(analog: reads through the {rows[0]['cpu_kernels'] if rows else '?'} path; torch reads: the same tiles "
          f"read by the torch path, set_cpu_kernels('torch'))")


def print_table(res: Dict[str, object]) -> None:
    print(f"# analog bench: torch {res['torch']}, {res['device']}, {res['threads']} threads, "
          f"batch {res['batch']}, BL {res['bl']}, lr {res['lr']}, median of {res['repeats']}")
    print(f"| {'what':<44} | {'device':<12} | {'s':>5} | {'median ms':>9} | {'min ms':>8} | "
          f"{'baseline ms':>11} | {'x baseline':>10} | {'ref ms':>7} | {'speedup vs ref':>14} |")
    print("|" + "|".join("-" * (w + 2) for w in (44, 12, 5, 9, 8, 11, 10, 7, 14)) + "|")
    for r in res["rows"]:
        base = r.get("dense_outer_ms", r.get("torch_linear_step_ms", r.get("fast_ms_same_size")))
        ref = r.get("ref_ms")
        sp = r.get("speedup_vs_ref")
        print(f"| {r['what']:<44} | {r['device']:<12} | {r['s']:>5} | {r['ms']:>9.2f} | "
              f"{r['min_ms']:>8.2f} | {base:>11.3f} | {r.get('ratio_vs_dense', r['ms'] / base):>9.1f}x | {'' if ref is None else f'{ref:.1f}':>7} | "
              f"{'' if sp is None else f'{sp:.1f}x':>14} |")
    print("speedup vs ref and x baseline use the medians. baseline, measured in this run: dense outer product d^T x "
          "of the same shape (fast update rows: timed alternately with the pulsed update; x baseline is the median of the per-pair ratios), torch Linear "
          "fwd+bwd+SGD step (layer rows), fast path at the same size (exact rows); ref: AIHWKit 1.2.0 CPU, 2 threads")
    fast = [r for r in res["rows"] if "dense_outer_ms" in r]
    if fast:
        print("pulsed update / dense outer product: " + ", ".join(
            f"{r['device']} s={r['s']}: {r['ratio_vs_dense']:.1f}x" for r in fast))
        base = {r["s"]: r["ratio_vs_dense"] for r in fast if r["device"] == "ConstantStep"}
        print("fast pulsed update / ConstantStep's (ratios of the multiples of the dense outer product): " + ", ".join(
            f"{r['device']} s={r['s']}: {r['ratio_vs_dense'] / base[r['s']]:.2f}x" for r in fast
            if r["device"] != "ConstantStep" and r["s"] in base))


def inference_rows(repeats: int, dev: torch.device, size: int = 512, batch: int = 64) -> List[Dict[str, object]]:
    """Forward + backward of an InferenceLinear vs nn.Linear (same weights, same input and output
    gradient), median ms each, for several inference configurations."""
    from ffebm.analog import InferenceConfig, InferenceLinear, WeightModifier

    torch.manual_seed(0)
    lin = torch.nn.Linear(size, size).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(batch, size, generator=g, device=dev)
    d = torch.randn(batch, size, generator=g, device=dev)
    configs = {"perfect reads, no modifier": InferenceConfig.perfect(),
               "read model (published defaults)": InferenceConfig(),
               "read model + add_gauss 0.05 modifier": InferenceConfig(modifier=WeightModifier("add_gauss", 0.05)),
               "read model + pcm_prog modifier (pcm preset)": InferenceConfig.pcm()}

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).backward(d)
        return run

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    rows = []
    for name, cfg in configs.items():
        m = InferenceLinear.from_linear(lin, cfg, seed=0).train()
        ms_inf, _, ms_lin, ratio = paired_ms(step(m), step(lin), repeats, dev)
        rows.append({"config": name, "pass": "forward + backward", "size": size, "batch": batch,
                     "inference_ms": ms_inf, "linear_ms": ms_lin, "ratio": ratio})
    m = InferenceLinear.from_linear(lin, configs["read model (published defaults)"], seed=0).eval()
    ms_inf, _, ms_lin, ratio = paired_ms(forward(m), forward(lin), repeats, dev)
    rows.append({"config": "read model (published defaults)", "pass": "forward, no_grad, eval", "size": size,
                 "batch": batch, "inference_ms": ms_inf, "linear_ms": ms_lin, "ratio": ratio})
    return rows


def print_inference(rows: List[Dict[str, object]]) -> None:
    r0 = rows[0]
    print(f"\n# inference tile: InferenceLinear {r0['size']}x{r0['size']}, batch {r0['batch']}, x ~ U(0, 1), vs "
          "nn.Linear (median ms, timed alternately call by call; ratio: median of the per-pair ratios)")
    print(f"| {'config':<44} | {'pass':<22} | {'inference ms':>12} | {'nn.Linear ms':>12} | {'ratio':>6} |")
    print("|" + "|".join("-" * (w + 2) for w in (44, 22, 12, 12, 6)) + "|")
    for r in rows:
        print(f"| {r['config']:<44} | {r['pass']:<22} | {r['inference_ms']:>12.3f} | {r['linear_ms']:>12.3f} | "
              f"{r['ratio']:>5.2f}x |")


def checkpoint_size(n: int = 2048) -> Dict[str, float]:
    """MB of an n x n AnalogLinear's and its c-TTv2 optimizer's state_dict (after one step)."""
    import io

    from ffebm.analog import AnalogLinear

    torch.manual_seed(0)
    m = AnalogLinear(n, n, config=AnalogConfig(device=SoftBounds()), seed=0)
    o = AnalogOptimizer(analog_parameters(m), ChoppedTTv2(), lr=0.01, seed=0)
    o.zero_grad()
    (m(torch.rand(4, n)) ** 2).sum().backward()
    o.step()

    def mb(obj) -> float:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell() / 2 ** 20

    w = 4 * n * n / 2 ** 20
    return {"size": n, "weights_mb": w, "model_mb": mb(m.state_dict()), "optimizer_mb": mb(o.state_dict())}


def print_checkpoint(r: Dict[str, float]) -> None:
    n, w = r["size"], r["weights_mb"]
    print(f"\ncheckpoint of a {n}x{n} AnalogLinear (SoftBounds) with c-TTv2: weights {w:.1f} MB, "
          f"model {r['model_mb']:.1f} MB ({r['model_mb'] / w:.1f}x), optimizer {r['optimizer_mb']:.1f} MB "
          f"({r['optimizer_mb'] / w:.1f}x)")


def main(argv=None) -> None:
    from ..cli import invoked_as, non_negative_int, positive_int, torch_device

    ap = argparse.ArgumentParser(prog=invoked_as("train.bench.analog"), description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--repeats", type=positive_int, default=9)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--no-blocks", action="store_true", help="skip the energy-block step comparison")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference-tile forward/backward rows")
    ap.add_argument("--inference-only", action="store_true", help="only the inference-tile rows")
    ap.add_argument("--checkpoint-size", type=non_negative_int, default=2048, metavar="N",
                    help="size of the checkpoint-size example (0: skip it)")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats {a.repeats}: expected at least 1")
    if a.inference_only and a.no_inference:
        ap.error("--inference-only and --no-inference contradict each other: name one")
    if a.checkpoint_size < 0:
        ap.error(f"--checkpoint-size {a.checkpoint_size}: expected 0 (skip) or a size >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.inference_only:
        _warm_up(torch.device(a.device))
        res = {"device": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "inference": inference_rows(max(9, a.repeats), torch.device(a.device))}
        print_inference(res["inference"])
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        return
    res = run(a.repeats, a.device)
    print_table(res)
    if not a.no_blocks:
        res["blocks"] = block_rows(max(3, a.repeats // 3), torch.device(a.device))
        print_blocks(res["blocks"])
    if not a.no_inference:
        res["inference"] = inference_rows(max(9, a.repeats), torch.device(a.device))
        print_inference(res["inference"])
    if a.checkpoint_size:
        res["checkpoint"] = checkpoint_size(a.checkpoint_size)
        print_checkpoint(res["checkpoint"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
