"""The device sweep command: one analog digits run per device model, a table, JSON and a PNG."""
import json

import pytest

from train import device_sweep


def test_sweep_smoke_writes_json_and_png(tmp_path, capsys):
    res = device_sweep.main(["--devices", "soft_bounds,exp_step", "--epochs", "1", "--limit", "48", "--jobs", "1",
                             "--out", str(tmp_path)])
    assert [r["device"] for r in res] == ["soft_bounds", "exp_step", None]  # digital reference last
    assert [r["algorithm"] for r in res] == ["c-ttv2", "c-ttv2", "digital"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["final_test_acc"] for r in saved] == [r["final_test_acc"] for r in res]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| soft_bounds | c-ttv2 |" in out and "| (digital) | digital |" in out


def test_sweep_devices_really_differ(tmp_path):
    """Same seed and data, only the device model changes: the trained tiles must differ."""
    res = device_sweep.sweep(["constant_step", "pow_step"], epochs=2, digital=False, limit=128, batch=16,
                             hidden=32, width=16, t1=20, t2=10, average=4, init_gain=1.5, lr=0.01)
    for r in res:  # each run trains its tiles
        assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"] - 0.02, r["history"]
    a, b = (r["history"][-1] for r in res)
    assert (a["train_loss"], a["mean_abs_w_tile"]) != (b["train_loss"], b["mean_abs_w_tile"])


def test_sweep_rejects_unknown_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        device_sweep.main(["--devices", "soft_bounds,memristor", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "memristor" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import ffebm
    from train import analog_digits

    real = analog_digits.run

    def run(**kw):  # the exp_step run blows up in its first epoch
        if kw.get("device") == "exp_step":
            kw["lr"] = float("inf")
        return real(**kw)

    monkeypatch.setattr(analog_digits, "run", run)
    res = device_sweep.main(["--devices", "exp_step,soft_bounds", "--epochs", "2", "--limit", "48", "--jobs", "1",
                             "--no-digital", "--out", str(tmp_path)])
    bad, good = res
    assert bad["final_test_acc"] is None and "diverged" in bad["error"] and "block" in bad["error"]
    assert good["error"] is None and len(good["history"]) == 2
    out = capsys.readouterr().out
    assert "| exp_step | c-ttv2 | diverged (" in out
    assert (tmp_path / "sweep.png").exists()
