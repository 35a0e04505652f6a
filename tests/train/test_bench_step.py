"""The benchmark times the trainer's own step on a model prepared as the trainer prepares it;
the precision and memory_format keys."""
import pytest
import torch

from train.bench import steps as bench
from train.config import RUNTIME_KEYS, ConfigError
from train.recipes import build_config
from train.step import train_step
from train.trainer import Trainer

QUIET = {"progress": "false", "tensorboard": "false", "num_threads": "1"}
SPEC = dict(bench.DIGITS, batch=8, threads=1, overrides={"train_subset": 64, "test_subset": 8})


def test_the_benchmarks_step_is_the_trainers_step(monkeypatch):
    assert Trainer.train_step is train_step
    calls = []

    def counting(self, *a):
        calls.append(self)
        return train_step(self, *a)

    t = bench.bench_trainer(SPEC)
    xb, yb = bench.first_batch(t)
    monkeypatch.setattr(Trainer, "train_step", counting)
    res = bench.time_steps(t, xb, yb, repeats=2)
    assert calls == [t, t, t]
    assert len(res["all_s"]) == 2 and len(res["fwd_all_s"]) == 2 and len(res["opt_all_s"]) == 2
    assert all(0 < f < s for f, s in zip(res["fwd_all_s"], res["all_s"]))


def test_one_bench_step_equals_one_trainer_step():
    """Same seed, same batch: the bench's step gives the loss and gradients of ``python -m train``'s."""
    t = bench.bench_trainer(SPEC)
    xb, yb = bench.first_batch(t)
    res = bench.time_steps(t, xb, yb, repeats=0)
    ref = Trainer(build_config("digits", {**QUIET, "batch_size": "8", "train_subset": "64", "test_subset": "8",
                                          "fake_train_size": "8", "fake_test_size": "8"}), None,
                  log=lambda m: None).setup()
    xr, yr = bench.first_batch(ref)
    assert torch.equal(xr, xb) and torch.equal(yr, yb)
    loss = ref.train_step(xr, yr, None)[0]
    assert res["losses"] == [loss]
    ours = dict(t.core.named_parameters())
    n = 0
    for name, p in ref.core.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, ours[name].grad), name
            n += 1
    assert n >= 4


def _trainer(**kw):
    over = {**QUIET, "batch_size": "8", "train_subset": "16", "test_subset": "8", **kw}
    return Trainer(build_config("digits", over), None, log=lambda m: None).setup()


def test_memory_format_auto_is_channels_last_for_conv_models_on_cpu():
    conv = _trainer(model_options="arch=conv")
    w = next(p for p in conv.core.parameters() if p.dim() == 4 and p.shape[1] > 1)   # the 16 -> 32 coupling
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert conv.pre.memory_format is torch.channels_last
    _, xb, yb = next(iter(conv.batches.epoch(0)))
    assert conv.pre(xb).dim() == 4
    nchw = _trainer(model_options="arch=conv", memory_format="contiguous")
    assert all(p.is_contiguous() for p in nchw.core.parameters())
    assert nchw.pre.memory_format is torch.contiguous_format
    # the same numbers either way (up to the convolutions' summation order)
    a, b = conv.train_step(xb, yb, None)[0], nchw.train_step(xb, yb, None)[0]
    assert abs(a - b) < 1e-4 * max(1.0, abs(a))
    dense = _trainer(model="digits")
    assert dense.pre.memory_format is torch.contiguous_format   # no convolutions: nothing to gain


def test_precision_key_sets_every_blocks_relaxation():
    bf = _trainer(precision="bfloat16")
    assert bf.blocks and all(b.relaxation.precision is torch.bfloat16 and b.nudge_relaxation.precision is torch.bfloat16
                             for _, b in bf.blocks)
    fp = _trainer()
    assert all(b.relaxation.precision is None and b.nudge_relaxation.precision is None for _, b in fp.blocks)
    loss = bf.train_step(*bench.first_batch(bf), None)[0]
    assert loss == loss and loss > 0


def test_precision_is_a_checked_key_and_not_a_runtime_key():
    assert "precision" not in RUNTIME_KEYS and "memory_format" in RUNTIME_KEYS
    with pytest.raises(ConfigError, match="precision='float16': expected one of float32, bfloat16"):
        build_config("digits", {"precision": "float16"})
    with pytest.raises(ConfigError, match="memory_format='nhwc': expected one of auto, channels_last, contiguous"):
        build_config("digits", {"memory_format": "nhwc"})
    with pytest.raises(ConfigError, match="set precision with its own key"):
        _trainer(model_options="precision=bfloat16")


def test_bf16_gradient_cosine_against_fp32():
    cos = bench.grad_cosines(dict(SPEC, overrides=dict(SPEC["overrides"], precision="bfloat16")),
                             {"precision": "float32"})
    assert {"block1", "block2", "digital", "all"} <= set(cos)
    assert 0.9 < cos["all"] < 1.0   # close, and not the same gradient (the bf16 path was taken)


def test_resume_may_change_the_memory_format_but_not_the_precision(tmp_path, capsys, monkeypatch):
    from conftest import main_inproc

    args = ["digits", "model_options=arch=conv", "progress=false", "tensorboard=false", "num_threads=1",
            "batch_size=8", "train_subset=16", "test_subset=8", "epochs=1", "--out", "run"]
    res = main_inproc(args, tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    res = main_inproc(["--resume", "run", "epochs=2", "memory_format=contiguous"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "final test accuracy" in res.stdout
    res = main_inproc(["--resume", "run", "epochs=3", "precision=bfloat16"], tmp_path, capsys, monkeypatch)
    assert res.returncode != 0 and "precision" in res.stderr + res.stdout


def test_merge_keeps_the_counted_flops_and_names_a_failed_round():
    from train.bench.steps import _row, merge

    def run(flops=None, s=1.0):
        r = {"label": "ep", "batch": 32, "all_s": [s], "fwd_all_s": [s / 2], "opt_all_s": [0.01], "peak_rss_mb": 100.0,
             "precision": "float32", "memory_format": "nchw", "blocks": {}}
        if flops is not None:
            r["step_flops"] = flops
        return r

    merged = merge([run(s=2.0), run(flops=5e12, s=1.0)])      # the count came from the second round
    assert merged["step_flops"] == 5e12 and merged["s_per_step"] == 1.5
    failed = merge([{"label": "ep", "error": "MemoryError"}, run(s=1.0)])
    assert failed["failed_rounds"] == ["MemoryError"] and "1 round(s) failed: MemoryError" in _row(failed)
    assert "step_flops" not in failed
