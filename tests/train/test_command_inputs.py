"""The smaller commands check their flags: a bad number is an argparse error naming the flag (exit 2,
no traceback, no empty result); the device sweep neither trains a device twice nor overwrites an
earlier sweep's results, and unknown device names are answered with the names the commands take;
usage texts name the command the way the user started it."""
import json
import subprocess
import sys

import pytest

from conftest import subprocess_env

DEVICE_NAMES = "constant_step, exp_step, ideal, linear_step, piecewise_step, pow_step, soft_bounds"


def _argparse_error(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("module,argv,expect", [
    ("train.bench.algorithms", ["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    ("train.bench.algorithms", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("train.bench.algorithms", ["--steps", "x"], "argument --steps: expected an integer, got 'x'"),
    ("train.bench.algorithms", ["--taus", "0.4", "0"], "argument --taus: must be > 0, got 0"),
    ("train.bench.algorithms", ["--offset", "nan"], "argument --offset: must be a finite number"),
    ("train.bench.algorithms", ["--offset", "5"], "argument --offset: 5:"),
    ("train.bench.algorithms", ["--threads", "0"], "argument --threads: must be >= 1"),
    ("train.bench.algorithms", ["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N"),
    ("train.experiments.device_response", ["--pulses", "0"], "argument --pulses: must be >= 1, got 0"),
    ("train.experiments.device_response", ["--pulses", "10000000"], "argument --pulses: 10000000 pulses is more than"),
    ("train.experiments.device_response", ["--devices", "0"], "argument --devices: must be >= 1, got 0"),
    ("train.experiments.device_response", ["--dw-min", "0"], "argument --dw-min: must be > 0, got 0"),
    ("train.experiments.device_response", ["--dw-min", "5"], "argument --dw-min: 5 is not below the device's weight"),
    ("train.experiments.device_response", ["--dw-min", "1e-12"], "or a larger --dw-min"),
    ("train.experiments.device_response", ["--seed", "-1"], "argument --seed: must be in [0, 2**63 - 1], got -1"),
    ("train.experiments.device_sweep", ["--jobs", "0"], "argument --jobs: must be >= 1, got 0"),
    ("train.experiments.device_sweep", ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    ("train.experiments.device_sweep", ["--limit", "-1"], "argument --limit: must be >= 0, got -1"),
    ("train.experiments.device_sweep", ["--seed", "-1"], "argument --seed: must be in"),
    ("train.bench.analog", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("train.bench.analog", ["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
    ("train.bench.steps", ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    ("train.compare", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("train.compare", ["--t2", "0"], "argument --t2: must be >= 1, got 0"),
    ("train.compare", ["--beta", "nan"], "argument --beta: must be finite numbers > 0"),
])
def test_bad_numeric_flags_are_argparse_errors_naming_the_flag(tmp_path, capsys, module, argv, expect):
    import importlib

    main = importlib.import_module(module).main
    if module.endswith(("device_response", "device_sweep")):
        argv = argv + ["--out", str(tmp_path / "out")]
    line = _argparse_error(main, argv, capsys)
    assert expect in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module,flag", [("train.experiments.device_response", "--device"),
                                         ("train.experiments.device_sweep", "--devices")])
def test_an_unknown_device_lists_the_names_the_command_takes(tmp_path, capsys, module, flag):
    import importlib

    main = importlib.import_module(module).main
    line = _argparse_error(main, [flag, "memristor", "--out", str(tmp_path / "out")], capsys)
    assert f"argument {flag}: unknown device model 'memristor'; device models: {DEVICE_NAMES}" in line, line
    assert "SoftBounds" not in line


# ------------------------------------------------------------------------------------------
# the device sweep: duplicates, a second sweep into the same folder (training replaced by a stub)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def stub_runs(monkeypatch):
    from train.experiments import device_sweep

    trained = []

    def run_one(task):
        trained.append(task["device"])
        return {"device": task["device"], "algorithm": "c-ttv2" if task["device"] else "digital",
                "recipe": task["recipe"], "run_dir": task["run_dir"], "overrides": task["overrides"],
                "final_test_accuracy": 0.5, "error": None,
                "history": [{"epoch": 1, "test_accuracy": 0.5}], "wall_s": 0.0}

    monkeypatch.setattr(device_sweep, "run_one", run_one)
    return trained


def test_duplicate_devices_are_trained_once_with_a_note(tmp_path, capsys, stub_runs):
    from train.experiments import device_sweep

    res = device_sweep.main(["--devices", "soft_bounds,SoftBounds,exp_step,soft_bounds", "--jobs", "1",
                             "--no-digital", "--out", str(tmp_path / "s")])
    assert stub_runs == ["soft_bounds", "exp_step"] and [r["device"] for r in res] == ["soft_bounds", "exp_step"]
    err = capsys.readouterr().err
    assert "note: --devices names soft_bounds 3 times (soft_bounds, SoftBounds, soft_bounds): training it once" in err


def test_a_second_sweep_into_the_same_folder_is_refused_before_any_work(tmp_path, capsys, stub_runs):
    from train.experiments import device_sweep

    out = tmp_path / "s"
    device_sweep.main(["--devices", "soft_bounds", "--jobs", "1", "--no-digital", "--out", str(out)])
    before = (out / "sweep.json").read_text()
    stub_runs.clear()
    line = _argparse_error(device_sweep.main, ["--devices", "exp_step", "--jobs", "1", "--no-digital",
                                               "--out", str(out)], capsys)
    assert f"{out / 'sweep.json'} exists (an earlier sweep): choose another --out" in line, line
    assert stub_runs == [] and (out / "sweep.json").read_text() == before
    assert not (out / "exp_step").exists()
    assert [r["device"] for r in json.loads(before)] == ["soft_bounds"]


# ------------------------------------------------------------------------------------------
# usage texts name the command as it was started
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,target,expect", [
    ("ffebm-train", "ffebm.train.__main__", ["usage: ffebm-train [RECIPE]", "-m ffebm.train [RECIPE]",
                                             "ffebm-train --list"]),
    ("ffebm-evaluate", "ffebm.train.evaluate", ["usage: ffebm-evaluate RUN_DIR"]),
    ("ffebm-compare", "ffebm.train.compare", ["usage: ffebm-compare"]),
    ("ffebm-bench", "ffebm.train.bench", ["usage: ffebm-bench"]),
])
def test_console_script_help_names_the_console_script(tmp_path, script, target, expect):
    launcher = tmp_path / script   # what pip installs: a launcher named after the command
    launcher.write_text(f"import sys\nfrom {target} import main\nsys.exit(main())\n")
    res = subprocess.run([sys.executable, str(launcher), "--help"], cwd=str(tmp_path), env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for e in expect:
        assert e in res.stdout, res.stdout
    assert "python -m train" not in res.stdout


@pytest.mark.parametrize("module,expect", [("train", "usage: python -m train [RECIPE]"),
                                           ("train.evaluate", "usage: python -m train.evaluate RUN_DIR")])
def test_module_help_names_python_m(tmp_path, module, expect):
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=str(tmp_path), env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and expect in res.stdout, res.stdout + res.stderr
