"""Shared helpers for the training-system tests."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))   # makes tinymodel importable in-process


def subprocess_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in [k for k in env if k.startswith("FFEBM_FAULT")]:
        del env[k]
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(args, cwd, timeout=240, module="train", **env):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=str(cwd), env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def folder_digest(path: Path):
    """{relative path: sha256} of every file under path (to prove nothing changed)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_in_folder(tmp_path_factory, prefix: str, argv) -> Path:
    """Run ``python -m train argv --out ref`` in-process in a fresh folder; returns the run folder
    (module-scoped reference runs of the resume tests)."""
    from train.__main__ import main

    d = tmp_path_factory.mktemp(prefix)
    old = os.getcwd()
    os.chdir(d)
    try:
        assert main(list(argv) + ["--out", "ref"]) == 0
    finally:
        os.chdir(old)
    return d / "ref"


def assert_same(a, b, where="checkpoint"):
    """Recursive exact equality of checkpoint values (tensors bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


class InProc:
    """Result of running a command's main() in this process (same code path, no interpreter start-up)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_inproc(argv, cwd, capsys, monkeypatch, module="train"):
    import importlib

    monkeypatch.chdir(cwd)
    mod = importlib.import_module(module + ".__main__" if module == "train" else module)
    capsys.readouterr()
    code = mod.main(list(argv))
    out, err = capsys.readouterr()
    return InProc(code, out, err)



# a fast configuration for trainer mechanics: tiny MLP, digits, 1 thread, no progress bar
TINY = ["digits", "model=tinymodel:build", "progress=false", "num_threads=1", "batch_size=64", "lr=0.01"]


@pytest.fixture
def tiny_args():
    return list(TINY)


def one_line_error(res, code=2):
    """The stderr of a command that failed with ``code`` in one line, no traceback: that line."""
    assert res.returncode == code, (res.returncode, res.stdout[-500:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]
