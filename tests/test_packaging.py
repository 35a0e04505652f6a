"""The package claims only the name ffebm: a user's own models.py / train.py never shadow it."""
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _user_folder(tmp_path):
    for name in ("models.py", "train.py"):
        (tmp_path / name).write_text("raise SystemExit('the user file was imported')\n")
    return tmp_path


def test_models_and_train_import_as_ffebm_subpackages_next_to_user_files(tmp_path):
    code = ("import ffebm.models, ffebm.train.trainer, ffebm.train.recipes, ffebm.train.bench.analog, "
            "ffebm.train.bench.algorithms, ffebm.train.experiments.device_sweep; "
            "print(ffebm.models.__file__); print(ffebm.train.trainer.__file__); "
            "print(len(ffebm.models.available()))")
    res = subprocess.run([sys.executable, "-c", code], cwd=_user_folder(tmp_path), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    models_file, trainer_file, n = res.stdout.split()
    assert Path(models_file).parent.name == "models" and Path(trainer_file).parent.name == "train"
    assert int(n) >= 3


def test_python_m_ffebm_train_runs_from_a_user_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ffebm.train", "--help"], cwd=_user_folder(tmp_path),
                         capture_output=True, text=True)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr


def test_console_scripts_are_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("ffebm-")}
    assert scripts == {"ffebm-train": "ffebm.train.__main__:main", "ffebm-evaluate": "ffebm.train.evaluate:main",
                       "ffebm-compare": "ffebm.train.compare:main", "ffebm-bench": "ffebm.train.bench:main"}


def test_one_version_string():
    import ffebm
    from importlib.metadata import version

    assert version("ffebm") == ffebm.__version__
    assert "version = " not in (ROOT / "pyproject.toml").read_text().split("[project.optional")[0].split("dynamic")[0]


def test_the_wheel_carries_the_kernel_source(tmp_path):
    # the fused CPU kernels are compiled from fused.c on first use: an installed package needs it
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("ffebm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ffebm/analog/kernels/fused.c" in names and "ffebm/analog/kernels/__init__.py" in names
