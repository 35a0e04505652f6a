"""The device sweep: one trainer run of the analog digits recipe per device model, a table, JSON and a PNG."""
import json

import pytest

from train.experiments import device_sweep

SMALL = ["model_options=hidden=32,width=16,tol=none,average_last=4", "t1=20", "t2=10", "batch_size=16"]


def test_sweep_smoke_writes_run_folders_json_and_png(tmp_path, capsys):
    out = tmp_path / "sweep"
    res = device_sweep.main(["--devices", "soft_bounds,exp_step", "--epochs", "1", "--limit", "48", "--jobs", "1",
                             "--out", str(out), *SMALL])
    assert [r["device"] for r in res] == ["soft_bounds", "exp_step", None]  # digital reference last
    assert [r["algorithm"] for r in res] == ["c-ttv2", "c-ttv2", "digital"]
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["final_test_accuracy"] for r in saved] == [r["final_test_accuracy"] for r in res]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("soft_bounds", "exp_step", "digital"):   # each run is an ordinary run folder
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["recipe"] == "digits-analog" and m["steps"] == 3
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["analog"] == ("" if name == "digital" else name) and cfg["train_subset"] == 48
    assert json.loads((out / "digital" / "config.json").read_text())["beta"] == 0.5
    printed = capsys.readouterr().out
    assert "| soft_bounds | c-ttv2 |" in printed and "| (digital) | digital |" in printed
    with pytest.raises(SystemExit) as e:   # a second sweep into the same folder is refused, nothing lost
        device_sweep.main(["--devices", "soft_bounds", "--epochs", "1", "--limit", "48", "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err


def test_sweep_devices_really_differ(tmp_path):
    """Same seed and data, only the device model changes: each run trains its tiles, and differently."""
    res = device_sweep.sweep(["constant_step", "pow_step"], epochs=2, digital=False, limit=128, out=tmp_path,
                             progress=False, extra=dict(kv.split("=", 1) for kv in SMALL) | {"lr": "0.01"})
    for r in res:
        assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"] - 0.02, r["history"]
    a, b = (r["history"][-1] for r in res)
    assert (a["train_loss"], a["tile_abs_mean"]) != (b["train_loss"], b["tile_abs_mean"])


def test_sweep_rejects_unknown_device_and_bad_overrides(tmp_path, capsys):
    for args in (["--devices", "soft_bounds,memristor"], ["--devices", "soft_bounds", "nosuchkey=1"]):
        with pytest.raises(SystemExit) as e:
            device_sweep.main([*args, "--out", str(tmp_path / "s")])
        assert e.value.code == 2
        assert ("memristor" if "memristor" in args[1] else "nosuchkey") in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    real = device_sweep.run_overrides

    def overrides(device, *a, **kw):  # the exp_step run blows up at its first step
        over = real(device, *a, **kw)
        return dict(over, lr="1e37") if device == "exp_step" else over

    monkeypatch.setattr(device_sweep, "run_overrides", overrides)
    res = device_sweep.main(["--devices", "exp_step,soft_bounds", "--epochs", "2", "--limit", "48", "--jobs", "1",
                             "--no-digital", "--out", str(tmp_path / "s"), *SMALL])
    bad, good = res
    assert bad["final_test_accuracy"] is None and "training stopped: loss is inf at step 2" in bad["error"]
    assert good["error"] is None and len(good["history"]) == 2
    assert "| exp_step | c-ttv2 | diverged (" in capsys.readouterr().out
    assert (tmp_path / "s" / "sweep.png").exists()
