"""End-to-end tests of ``python -m train`` in subprocesses (tiny MLP on digits: seconds each)."""

import json
import signal

import pytest
import torch

from conftest import TINY, folder_digest, main_inproc, run_train
from train import checkpoint as C


def one_line_error(res, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    res = run_train(TINY + ["epochs=2", "log_every=5", "--out", "run"], d)
    assert res.returncode == 0, res.stderr
    return d, d / "run", res


def test_run_writes_config_metrics_checkpoint(finished_run):
    d, run, res = finished_run
    assert "configuration:" in res.stdout and "final test accuracy" in res.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["model"] == "tinymodel:build"
    m = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "train_loss", "epochs", "wall_seconds", "gradient_method", "relaxation"):
        assert key in m
    assert m["epochs"] == 2 and 0.5 < m["test_accuracy"] <= 1.0 and len(m["history"]) == 2
    ck = C.load(run / C.CKPT)
    assert ck["finished"] and ck["position"]["global_step"] == m["steps"]


def test_tensorboard_scalars_can_be_read_back(finished_run):
    from train.tblog import read_scalars

    _, run, _ = finished_run
    sc = read_scalars(run / "tb")
    for tag in ("train/loss", "train/accuracy", "train/lr", "train/samples_per_s", "epoch/test_accuracy",
                "epoch/train_loss"):
        assert tag in sc, sorted(sc)
    assert len(sc["epoch/test_accuracy"]) == 2
    assert [s for s, _ in sc["train/loss"]] == sorted(s for s, _ in sc["train/loss"])


def test_bad_key(finished_run):
    d, run, _ = finished_run
    before = folder_digest(run)
    line = one_line_error(run_train(TINY + ["epoch=3", "--out", "run"], d))
    assert "unknown key 'epoch'" in line and "batch_size" in line
    line = one_line_error(run_train(["--resume", "run", "--trust-code", "progres=false"], d))
    assert "unknown key" in line
    assert folder_digest(run) == before


def test_wrong_type(finished_run, capsys, monkeypatch):
    d, run, _ = finished_run
    before = folder_digest(run)
    line = one_line_error(run_train(TINY + ["epochs=two", "--out", "run"], d))
    assert "epochs='two'" in line and "expected int" in line
    one_line_error(main_inproc(["--resume", "run", "--trust-code", "ckpt_every=x"], d, capsys, monkeypatch))
    one_line_error(main_inproc(TINY + ["progress=maybe", "--out", "run"], d, capsys, monkeypatch))
    # changing a non-runtime key on resume is refused too
    one_line_error(main_inproc(["--resume", "run", "--trust-code", "lr=0.5"], d, capsys, monkeypatch))
    assert folder_digest(run) == before


def test_existing_out_folder_with_another_run_is_refused(finished_run, capsys, monkeypatch):
    d, run, _ = finished_run
    before = folder_digest(run)
    line = one_line_error(main_inproc(TINY + ["epochs=3", "--out", "run"], d, capsys, monkeypatch))
    assert "already holds a different run" in line
    (d / "notarun").mkdir(exist_ok=True)
    (d / "notarun" / "precious.txt").write_text("keep")
    line = one_line_error(main_inproc(TINY + ["--out", "notarun"], d, capsys, monkeypatch))
    assert "not a run folder" in line and (d / "notarun" / "precious.txt").read_text() == "keep"
    assert folder_digest(run) == before


def test_missing_data_folder(tmp_path, capsys, monkeypatch):
    res = run_train(["digits", "dataset=cifar10", "data_root=nowhere", "--out", "run"], tmp_path)
    line = one_line_error(res)
    assert "nowhere" in line and "download=true" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "data").mkdir()
    line = one_line_error(main_inproc(["digits", "dataset=mnist", "data_root=data", "--out", "run"], tmp_path,
                                      capsys, monkeypatch))
    assert "MNIST not found" in line and "train-images-idx3-ubyte" in line
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint(finished_run, capsys, monkeypatch):
    d, run, _ = finished_run
    bad = d / "badrun"
    bad.mkdir()
    (bad / "config.json").write_bytes((run / "config.json").read_bytes())
    data = (run / C.CKPT).read_bytes()
    (bad / C.CKPT).write_bytes(data[: len(data) // 2])
    before = folder_digest(bad)
    line = one_line_error(run_train(["--resume", "badrun", "--trust-code"], d))
    assert "corrupt or truncated" in line and "checkpoint.pt" in line
    assert folder_digest(bad) == before
    # garbage bytes too
    (bad / C.CKPT).write_bytes(b"\x00garbage" * 10)
    before = folder_digest(bad)
    one_line_error(main_inproc(["--resume", "badrun", "--trust-code"], d, capsys, monkeypatch))
    assert folder_digest(bad) == before


def test_resume_of_finished_run_changes_nothing(finished_run, capsys, monkeypatch):
    d, run, _ = finished_run
    before = folder_digest(run)
    res = main_inproc(["--resume", "run", "--trust-code"], d, capsys, monkeypatch)
    assert res.returncode == 0 and "already complete" in res.stdout
    assert folder_digest(run) == before


def test_evaluate_command(finished_run, capsys, monkeypatch):
    d, run, _ = finished_run
    before = folder_digest(run)
    res = main_inproc(["run", "--trust-code"], d, capsys, monkeypatch, module="train.evaluate")
    assert res.returncode == 0, res.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert f"test accuracy {100 * m['test_accuracy']:.2f}%" in res.stdout
    assert folder_digest(run) == before
    line = one_line_error(main_inproc(["nowhere"], d, capsys, monkeypatch, module="train.evaluate"))
    assert "not a run folder" in line


def test_evaluate_over_time(finished_run, tmp_path, capsys, monkeypatch):
    d, run, _ = finished_run
    # a model without analog tiles: clear one-line refusal
    line = one_line_error(main_inproc(["run", "--trust-code", "--times", "0,3600"], d, capsys, monkeypatch, module="train.evaluate"))
    assert "--times" in line and "analog" in line
    # a model on simulated analog tiles: one accuracy per time after programming
    args = [a if not a.startswith("model=") else "model=tinymodel:build_analog" for a in TINY]
    assert main_inproc(args + ["epochs=3", "analog_lr=0.5", "--out", "an"], tmp_path, capsys, monkeypatch).returncode == 0
    year = 365 * 86400
    res = main_inproc(["an", "--trust-code", "--times", f"0,3600,86400,{year}", "--json", "eval.json"], tmp_path, capsys,
                      monkeypatch, module="train.evaluate")
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "eval.json").read_text())
    assert list(out["accuracy_over_time"]) == ["0.0", "3600.0", "86400.0", f"{float(year)}"]
    acc, loss = out["accuracy_over_time"], out["loss_over_time"]
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert "t = 86400.0 s after programming" in res.stdout
    # drift is really applied: a year after programming the (compensated) weights have spread
    # apart, and the test loss is clearly worse than right after programming
    assert loss[f"{float(year)}"] > loss["0.0"] + 0.05, loss  # read noise alone moves it by ~0.005


def test_progress_bar_stays_out_of_redirected_logs(tmp_path):
    # stderr is a pipe here, as in `python -m train > log 2>&1`: no carriage-return bar lines
    res = run_train(["digits", "model=digits", "progress=true", "num_threads=1", "tensorboard=false",
                     "train_subset=128", "test_subset=32", "epochs=1", "--out", "run"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s" not in res.stderr, res.stderr[-500:]
    assert "final test accuracy" in res.stdout
