"""The comparison and benchmark commands run end to end and write their outputs."""
import json

import pytest

from train import compare
from train.bench import steps as bench


def test_compare_command_writes_table_png_and_json(tmp_path, capsys):
    compare.main(["--model", "digits", "--batch", "4", "--t2", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "cosine" in out and "EP(beta=0.05, variant=centered)" in out
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["traces"] and data["rows"]
    cos = [r["cosine"] for r in data["rows"] if r["method"].endswith("centered)")]
    assert min(cos) > 0.9


def test_compare_rejects_bad_beta(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--beta", "0", "--out", str(tmp_path)])


def test_bench_quick_runs_and_ep_memory_is_flat(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--quick", "--only", "digits", "--json", str(out)])
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["results"] if "error" not in r}
    assert methods == {"ep", "implicit", "unrolled", "feedforward"}
    mem = {(r["method"], r["overrides"]["t1"]): r["backward_extra_mb"] for r in data["memory"]}
    # BPTT stores every step: its backward memory grows with T1; EP's stays (within noise) flat
    assert mem[("bptt", 100)] > mem[("bptt", 10)] + 50
    assert mem[("ep", 100)] < mem[("ep", 10)] + 20


def test_bench_analog_block_rows_small(monkeypatch):
    import ffebm
    from train.bench import analog as bench_analog

    monkeypatch.setattr(bench_analog, "BLOCKS", {
        "dense tiny": (lambda: ffebm.DenseHopfield([6, 5, 4], steps=3, tol=None, nudge_steps=2), (6,), 4),
        "conv tiny": (lambda: ffebm.ConvHopfield(2, (4, 4), [3, 4], pool="avg", steps=3, tol=None, nudge_steps=2),
                      (2, 4, 4), 2),
    })
    pulsed = []
    real_step = bench_analog.AnalogOptimizer.step

    def counting_step(self, *a, **kw):  # what the bench times is a real pulsed training step
        before = [p.analog_ctx.tile.get_weights().clone() for g in self.param_groups for p in g["params"]]
        out = real_step(self, *a, **kw)
        after = [p.analog_ctx.tile.get_weights() for g in self.param_groups for p in g["params"]]
        pulsed.append(any(not __import__("torch").equal(b, c) for b, c in zip(before, after)))
        return out

    monkeypatch.setattr(bench_analog.AnalogOptimizer, "step", counting_step)
    rows = bench_analog.block_rows(3, __import__("torch").device("cpu"))
    assert [r["block"] for r in rows] == ["dense tiny", "conv tiny"]
    for r in rows:
        assert r["digital_s"] > 0 and r["analog_s"] > 0 and r["ideal_reads_s"] > 0 and r["torch_reads_s"] > 0
        assert 0 < r["update_s"] < r["analog_s"]
    # per block: warm-up + 3 timed steps of the analog block, the ideal-read one and the analog
    # block read by the torch path, each with its optimiser's pulsed update, and the published-read
    # tiles moved (c-TTv2 first fills its fast array, then transfers onto the tile)
    assert len(pulsed) == 24, pulsed  # analog, ideal reads, torch reads
    for blk in (pulsed[:12], pulsed[12:]):
        assert any(blk[0::3]), pulsed


def test_compare_beta_sweep_reference_and_one_line_errors(tmp_path, capsys):
    compare.main(["--model", "digits", "--batch", "4", "--beta", "0.5,0.02", "--candidates", "centered,unrolled",
                  "--reference", "implicit", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "by beta" in out and "peak memory" in out
    data = json.loads((tmp_path / "beta_sweep.json").read_text())
    centered = {b: min(v["EP(variant=centered)"].values()) for b, v in data["sweep"].items()}
    assert centered["0.02"] > centered["0.5"] and centered["0.02"] > 0.99   # the error shrinks with beta
    assert min(data["sweep"]["0.02"]["Unrolled(steps=20, from_equilibrium=True)"].values()) > 0.999
    assert (tmp_path / "beta_sweep.png").read_bytes()[:4] == b"\x89PNG"
    cases = ((["--model", "nope"], "digits"), (["--candidates", "bogus"], "bogus"), (["--pool", "avg"], "does not apply"),
             (["--candidates", ","], "at least one"), (["--model", "splitting_small_3block", "--image-size", "7"],
                                                       "image-size"), (["--batch", "0"], "--batch"))
    for args, word in cases:
        with pytest.raises(SystemExit) as e:
            compare.main(["--batch", "2", *args, "--out", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert word in err and "Traceback" not in err


def test_bench_analog_checkpoint_size_and_bad_counts(capsys):
    import pytest

    from train.bench import analog as bench_analog

    r = bench_analog.checkpoint_size(256)  # (small ones are dominated by fixed overheads)
    assert r["model_mb"] < 2.5 * r["weights_mb"] and r["optimizer_mb"] < 3.5 * r["weights_mb"], r
    for bad in (["--repeats", "0"], ["--checkpoint-size", "-1"]):
        with pytest.raises(SystemExit):
            bench_analog.main(bad)
        assert bad[0] in capsys.readouterr().err


def test_bench_analog_inference_rows_small(capsys):
    """The inference rows: every configuration forward + backward and the published read model's
    no_grad forward, each beside nn.Linear timed alternately (tiny sizes: the mechanics only)."""
    from train.bench import analog as bench_analog

    rows = bench_analog.inference_rows(2, __import__("torch").device("cpu"), size=32, batch=4)
    assert [r["pass"] for r in rows] == ["forward + backward"] * 4 + ["forward, no_grad, eval"]
    assert all(r["inference_ms"] > 0 and r["linear_ms"] > 0 and r["ratio"] > 0 for r in rows)
    bench_analog.print_inference(rows)
    out = capsys.readouterr().out
    assert "read model (published defaults)" in out and "no_grad" in out


def test_compare_traces_count_a_tensor_without_reference_gradient_as_zero():
    """Truncated backprop through one asynchronous step gives a 3-layer block's lower coupling no
    gradient; EP's step-by-step trace then compares with zero there, as the rows do, instead of
    failing (``--reference unrolled --t2 1`` on the deeper presets)."""
    import torch
    import torch.nn as nn

    import ffebm

    torch.manual_seed(0)
    blk = ffebm.DenseHopfield([5, 6, 7, 4], steps=200, tol=1e-10, nudge_steps=1, mode="async")
    model = nn.Sequential(blk, nn.Linear(4, 3)).double()
    x, y = torch.rand(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    res = ffebm.compare_gradients(model, nn.CrossEntropyLoss(), (x, y),
                                  reference=ffebm.Unrolled(steps=1, from_equilibrium=True),
                                  candidates=[ffebm.EP(0.01, steps=1)], trace=True)
    (label, per_block), = res.traces.items()
    (hist,) = per_block.values()
    rows = {r["param"]: r for r in res.rows if r["method"] == label}
    assert any(rows[p]["note"] == "no gradient (reference)" for p in hist[-1])
    for p, c in hist[-1].items():   # the trace's last step is the candidate's gradient
        assert c == pytest.approx(rows[p]["cosine"], rel=1e-12, abs=1e-12), p
