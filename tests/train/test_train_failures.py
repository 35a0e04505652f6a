"""NaN/inf losses, non-finite gradients and RelaxationDiverged stop the run with a one-line
message naming the step (and block) and keep the last good checkpoint."""

import json

import pytest
import torch

from conftest import TINY, folder_digest, main_inproc
from train import checkpoint as C

# 22 steps per epoch; checkpoints every 5 steps; the model fails at its 30th training step
TINY_FAILING = [a if not a.startswith("model=") else "model=tinymodel:build_failing" for a in TINY]
BASE = TINY_FAILING + ["epochs=3", "ckpt_every=5"]


@pytest.mark.parametrize("kind,expect", [
    ("nan", "loss is nan at step 30 (epoch 2, batch 8)"),
    ("diverge", "relaxation diverged in energy block 'hop' (relaxation step 7) at step 30 (epoch 2, batch 8)"),
    ("gradnan", "non-finite gradient of 'net.1.weight' (a digital layer) at step 30 (epoch 2, batch 8)"),
])
def test_failure_stops_run_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch, kind, expect):
    res = main_inproc(BASE + [f"model_options=fail_at=30,kind={kind}", "--out", "run"], tmp_path, capsys,
                      monkeypatch)
    assert res.returncode == 3
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert expect in lines[0], lines[0]
    assert "last good checkpoint: run/checkpoint.pt (step 25)" in lines[0]
    run = tmp_path / "run"
    ck = C.load(run / C.CKPT)
    assert ck["position"]["global_step"] == 25 and not ck["finished"]
    for v in ck["model"].values():
        assert torch.isfinite(v).all()
    assert json.loads((run / "failure.json").read_text())["global_step"] == 30
    assert not (run / "metrics.json").exists()
    # nothing else is touched by a second failing attempt from the same checkpoint
    before = {k: v for k, v in folder_digest(run).items() if not k.startswith(("tb/", "failure"))}
    res = main_inproc(["--resume", "run", "--trust-code"], tmp_path, capsys, monkeypatch)
    # the resumed model counts its forward passes from 0: it fails 30 steps later, after saving more
    assert res.returncode == 3 and "step 55" in res.stderr
    assert C.load(run / C.CKPT)["position"]["global_step"] == 55 - 5
    assert set(before) <= set(folder_digest(run))


def test_failure_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    res = main_inproc(TINY_FAILING + ["model_options=fail_at=3,kind=nan", "--out", "run"],
                      tmp_path, capsys, monkeypatch)
    assert res.returncode == 3 and "no checkpoint had been written yet" in res.stderr
    assert not (tmp_path / "run" / C.CKPT).exists()
