"""Killed, signalled and resumed runs end exactly like uninterrupted ones (tiny MLP on digits, CPU).

The interrupted runs are real subprocesses that SIGKILL/SIGTERM themselves at a chosen step
(fault injection through FFEBM_FAULT_AT_STEP, see train/trainer.py); the resumptions run
in-process through the same ``main()`` to keep the file fast.
"""

import json
import signal

import pytest
import torch

from conftest import TINY, main_inproc, run_train
from train import checkpoint as C

# 22 steps per epoch (1437 samples, batch 64); checkpoints every 5 steps and at epoch ends
ARGS = TINY + ["epochs=3", "ckpt_every=5", "seed=3", "augment=true"]


def _final_state(run):
    ck = C.load(run / C.CKPT)
    m = json.loads((run / "metrics.json").read_text())
    drop = ("wall_seconds", "train_seconds", "samples_per_second", "history")
    hist = [{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]]
    return ck["model"], ck["optimizer"]["state"], {k: v for k, v in m.items() if k not in drop}, hist


def assert_same_run(a, b):
    wa, oa, ma, ha = _final_state(a)
    wb, ob, mb, hb = _final_state(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert ma == mb
    assert ha == hb


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    res = run_train(ARGS + ["--out", "ref"], d)
    assert res.returncode == 0, res.stderr
    return d / "ref"


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, reference_run, capsys, monkeypatch):
    # step 30 is mid-epoch 2; the process dies right after the checkpoint of step 30
    res = run_train(ARGS + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=30)
    assert res.returncode == -signal.SIGKILL
    summary = json.loads((tmp_path / "run" / C.SUMMARY).read_text())
    assert summary["global_step"] == 30 and summary["epoch"] == 1 and 0 < summary["step_in_epoch"] < 22
    assert not (tmp_path / "run" / "metrics.json").exists()
    res = main_inproc(["--resume", "run", "--trust-code"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "epoch 2, batch 8" in res.stdout
    assert_same_run(reference_run, tmp_path / "run")


def test_sigkill_between_checkpoints_redoes_lost_steps(tmp_path, reference_run, capsys, monkeypatch):
    # killed at step 33: steps 31-33 are lost and recomputed from the checkpoint of step 30
    res = run_train(ARGS + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=33)
    assert res.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "run" / C.SUMMARY).read_text())["global_step"] == 30
    # the same command again finds its run folder and resumes
    res = main_inproc(ARGS + ["--out", "run"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0 and "resuming" in res.stdout, res.stderr
    assert_same_run(reference_run, tmp_path / "run")


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_saves_checkpoint_and_exits_cleanly(tmp_path, reference_run, sig, capsys, monkeypatch):
    signum = getattr(signal, "SIG" + sig)
    if sig == "TERM":
        res = run_train(ARGS + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=12, FFEBM_FAULT_SIGNAL=sig)
    else:  # in-process: our handler catches the SIGINT this process sends itself
        monkeypatch.setenv("FFEBM_FAULT_AT_STEP", "12")
        monkeypatch.setenv("FFEBM_FAULT_SIGNAL", sig)
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
        before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup/&
        res = main_inproc(ARGS + ["--out", "run"], tmp_path, capsys, monkeypatch)
        monkeypatch.delenv("FFEBM_FAULT_AT_STEP")
        assert signal.getsignal(signal.SIGINT) is before  # the trainer put the previous handler back
    assert res.returncode == 128 + signum, res.stderr
    assert "Traceback" not in res.stderr and f"SIG{sig} received: checkpoint saved at step 12" in res.stderr
    assert json.loads((tmp_path / "run" / C.SUMMARY).read_text())["global_step"] == 12
    res = main_inproc(["--resume", "run", "--trust-code"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert_same_run(reference_run, tmp_path / "run")


def test_uninterrupted_runs_are_reproducible(tmp_path, reference_run, capsys, monkeypatch):
    res = main_inproc(ARGS + ["--out", "again"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert_same_run(reference_run, tmp_path / "again")
    # and a different seed gives a different run (the comparison above can fail)
    res = main_inproc(ARGS[:-2] + ["seed=4", "augment=true", "--out", "other"], tmp_path, capsys, monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_run(reference_run, tmp_path / "other")


# a stochastic gradient method: EP with a random nudge sign per call, whose generator lives in
# the method object (checkpointed through the block's state_dict)
EP_ARGS = ["digits", "progress=false", "num_threads=1", "batch_size=64", "epochs=2", "ckpt_every=5", "seed=3",
           "variant=random", "model_options=hidden=32,width=16"]


def test_stochastic_method_resume_is_exact(tmp_path, capsys, monkeypatch):
    res = run_train(EP_ARGS + ["--out", "ref"], tmp_path)
    assert res.returncode == 0, res.stderr
    ck = C.load(tmp_path / "ref" / C.CKPT)
    extra = [k for k in ck["model"] if k.endswith("_extra_state")]
    assert extra and all("sign_generator" in ck["model"][k]["gradient"] for k in extra)
    res = run_train(EP_ARGS + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=30)
    assert res.returncode == -signal.SIGKILL
    res = main_inproc(["--resume", "run", "--trust-code"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    wa, _, ma, ha = _final_state(tmp_path / "ref")
    wb, _, mb, hb = _final_state(tmp_path / "run")
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert torch.equal(wa[k], wb[k]), k
        else:
            assert torch.equal(wa[k]["gradient"]["sign_generator"], wb[k]["gradient"]["sign_generator"]), k
    assert ma == mb and ha == hb


def test_resume_restores_the_global_random_stream(tmp_path, capsys, monkeypatch):
    """Dropout draws on torch's global generator: resume must restore it to end bit-identical."""
    args = ARGS + ["model_options=dropout=0.3"]
    res = run_train(args + ["--out", "ref"], tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_train(args + ["--out", "run"], tmp_path, FFEBM_FAULT_AT_STEP=30)
    assert res.returncode == -signal.SIGKILL
    res = main_inproc(["--resume", "run", "--trust-code"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_extending_a_finished_run_follows_the_longer_cosine_schedule(tmp_path):
    """--resume RUN epochs=N: the lr goes on falling along the cosine of the new length (it never
    climbs back up) and ends at min_lr, like a run trained for N epochs from the start."""
    from train.recipes import build_config
    from train.trainer import train

    over = {"train_subset": "64", "test_subset": "32", "batch_size": "32", "progress": "false",
            "tensorboard": "false", "num_threads": "1", "t1": "10", "t2": "4"}
    run = tmp_path / "r"
    train(build_config("digits", dict(over, epochs="2")), run, log=lambda s: None)
    m = train(build_config("digits", dict(over, epochs="8")), run, resume=True, log=lambda s: None)
    lrs = [h["lr"] for h in m["history"]]
    assert len(lrs) == 8 and m["steps"] == 16
    assert all(b <= a + 1e-12 for a, b in zip(lrs[2:], lrs[3:])), lrs     # no climb after the extension
    fresh = train(build_config("digits", dict(over, epochs="8")), tmp_path / "f", log=lambda s: None)
    assert abs(lrs[-1] - fresh["history"][-1]["lr"]) < 1e-12 and lrs[-1] < 1e-9
    assert [round(x, 12) for x in lrs[3:]] == [round(h["lr"], 12) for h in fresh["history"][3:]]


def test_a_run_stopped_by_max_steps_is_extended_by_max_steps_and_refused_without(tmp_path):
    """--resume RUN epochs=N on a run that max_steps stopped would add no step: refused in words;
    with max_steps=0 (or a larger max_steps) the run goes on to its epochs."""
    from train.checkpoint import CheckpointError
    from train.recipes import build_config
    from train.trainer import train

    over = {"train_subset": "64", "test_subset": "32", "batch_size": "32", "progress": "false",
            "tensorboard": "false", "num_threads": "1", "t1": "10", "t2": "4"}
    run = tmp_path / "r"
    m = train(build_config("digits", dict(over, epochs="4", max_steps="3")), run, log=lambda s: None)
    assert m["steps"] == 3
    with pytest.raises(CheckpointError, match="stopped at max_steps=3 .* max_steps=0"):
        train(build_config("digits", dict(over, epochs="6", max_steps="3")), run, resume=True, log=lambda s: None)
    logs = []
    m = train(build_config("digits", dict(over, epochs="6", max_steps="0")), run, resume=True, log=logs.append)
    # max_steps ended epoch 2 after its first batch (marked partial); the run goes on from epoch 3
    assert m["steps"] == 11 and len(m["history"]) == 6 and m["history"][1].get("partial")
    assert any("max_steps 3 -> none" in line for line in logs), logs


def test_the_command_line_extends_a_run_stopped_by_max_steps(tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    monkeypatch.chdir(tmp_path)
    small = ["train_subset=64", "test_subset=32", "batch_size=32", "progress=false", "tensorboard=false",
             "num_threads=1", "t1=10", "t2=4"]
    assert main(["digits", "epochs=4", "max_steps=3", *small, "--out", "r"]) == 0
    assert main(["--resume", "r", "epochs=6"]) == 2
    assert "max_steps=0" in capsys.readouterr().err
    assert main(["--resume", "r", "max_steps=2"]) == 2  # not shortened
    assert "not shortened" in capsys.readouterr().err
    assert main(["--resume", "r", "epochs=6", "max_steps=0"]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["steps"] == 11 and len(m["history"]) == 6
