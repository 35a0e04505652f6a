"""A user's own model builder (``model=module:function``) and a run that fails before its first
checkpoint: one-line errors, no traceback, no half-made run folder; the user's module is found
in the working directory also under the console script ``ffebm-train``."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from conftest import TINY, main_inproc, one_line_error, subprocess_env

BASE = ["digits", "progress=false", "num_threads=1", "epochs=1"]


def _module(folder, body):
    """A uniquely named module in ``folder`` (in-process imports are cached by name)."""
    name = f"usermodel_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return name


# ------------------------------------------------------------------------------------------
# 1. a builder that fails, a callable that is no builder, an update that overflows
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,fn,expect", [
    ("def build(**kw):\n    raise TypeError('hidden must be even')\n", "build",
     "the builder raised TypeError: hidden must be even"),
    ("def build(**kw):\n    return {'not': 'a module'}\n", "build", "did not return a torch.nn.Module (it returned dict)"),
    ("import os\nbuild = os.sep\n", "build", "is a str, not a function"),
    ("raise RuntimeError('broken at import')\n", "build", "importing module '{mod}' raised RuntimeError: broken at import"),
])
def test_a_failing_user_builder_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, body, fn, expect):
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = _module(tmp_path, body)
    line = one_line_error(main_inproc(BASE + [f"model={mod}:{fn}", "--out", "run"], tmp_path, capsys, monkeypatch))
    assert expect.format(mod=mod) in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec,expect", [
    ("os:system", "model='os:system' is not a model builder"),   # refused before it is called
    ("builtins:dict", "did not return a torch.nn.Module"),
    ("torch.nn:Linear", "is not a model builder"),
])
def test_a_callable_that_is_no_model_builder_is_refused(tmp_path, capsys, monkeypatch, spec, expect):
    line = one_line_error(main_inproc(BASE + [f"model={spec}", "--out", "run"], tmp_path, capsys, monkeypatch))
    assert expect in line and "torch.nn.Module" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kv", ["lr=1e300", "weight_decay=1e300"])
def test_an_overflowing_first_update_is_reported_plainly_and_leaves_no_folder(tmp_path, capsys, monkeypatch, kv):
    args = [a for a in TINY if not a.startswith("lr=")] + ["epochs=1", kv, "--out", "run"]
    line = one_line_error(main_inproc(args, tmp_path, capsys, monkeypatch), code=3)
    assert "non-finite" in line and "at step 1 (epoch 1, batch 1)" in line, line
    if kv == "lr=1e300":  # Adam's step size overflows float32 before any parameter is touched
        assert "non-finite update: the optimiser step overflowed" in line and "lr=1e+300" in line, line
    assert "no checkpoint had been written yet" in line
    assert not (tmp_path / "run").exists()


def test_a_failure_after_a_checkpoint_keeps_the_folder_with_it(tmp_path, capsys, monkeypatch):
    from train import checkpoint as C

    args = [a if not a.startswith("model=") else "model=tinymodel:build_failing" for a in TINY]
    res = main_inproc(args + ["epochs=1", "ckpt_every=2", "model_options=fail_at=4,kind=nan", "--out", "run"],
                      tmp_path, capsys, monkeypatch)
    assert res.returncode == 3 and "last good checkpoint" in res.stderr
    assert C.load(tmp_path / "run" / C.CKPT)["position"]["global_step"] == 2
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_failure_before_the_first_checkpoint_empties_a_given_empty_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()   # the user's own (empty) folder stays, empty again
    args = [a if not a.startswith("model=") else "model=tinymodel:build_failing" for a in TINY]
    res = main_inproc(args + ["epochs=1", "model_options=fail_at=3,kind=nan", "--out", "run"],
                      tmp_path, capsys, monkeypatch)
    assert res.returncode == 3 and "no checkpoint had been written yet" in res.stderr
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())


# ------------------------------------------------------------------------------------------
# 2. a user module in the working directory, under the console script
# ------------------------------------------------------------------------------------------
MYMODEL = """
import torch.nn as nn


def build(num_classes=10, in_channels=1, image_size=8, hidden=16, **kw):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
"""


def test_console_script_imports_a_user_module_from_the_working_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodel.py").write_text(MYMODEL)
    # what pip's console script ffebm-train does: a launcher elsewhere (its folder is sys.path[0], not cwd)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffebm-train").write_text("import sys\nfrom ffebm.train.__main__ import main\nsys.exit(main())\n")
    env = subprocess_env()
    assert str(work) not in env["PYTHONPATH"]
    res = subprocess.run([sys.executable, str(bin_dir / "ffebm-train"), "digits", "model=mymodel:build",
                          "model_options=hidden=8", "progress=false", "num_threads=1", "tensorboard=false",
                          "max_steps=2", "--out", "run"],
                         cwd=str(work), env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "run" / "metrics.json").exists()


def test_user_module_from_the_working_directory_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    mod = _module(tmp_path, MYMODEL)
    res = main_inproc(BASE + [f"model={mod}:build", "tensorboard=false", "max_steps=1", "--out", "run"], tmp_path,
                      capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path) not in sys.path   # on the path only while the builder is imported and called


def test_help_says_where_user_modules_are_found(capsys, monkeypatch, tmp_path):
    res = main_inproc(["--help"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0 and "working directory" in res.stdout


# ------------------------------------------------------------------------------------------
# 7. SIGTERM before the first checkpoint
# ------------------------------------------------------------------------------------------
SLOW = """
import pathlib
import time

import torch.nn as nn


def build(num_classes=10, in_channels=1, image_size=8, **kw):
    pathlib.Path('building').write_text('now')
    time.sleep(60)
    return nn.Linear(64, num_classes)
"""


def test_sigterm_during_setup_leaves_no_run_folder(tmp_path):
    (tmp_path / "slowmodel.py").write_text(SLOW)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    p = subprocess.Popen([sys.executable, "-m", "train", "digits", "model=slowmodel:build", "progress=false",
                          "num_threads=1", "--out", "run"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "building").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.1)
        assert (tmp_path / "run" / ".lock").exists()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM received before training started" in err, err
    assert not (tmp_path / "run").exists()
