"""python -m train.experiments.seeds: overrides anywhere on the line, mean and range over seeds."""
import json

from train.experiments import seeds


def test_seeds_command_takes_overrides_after_the_options(tmp_path, capsys):
    out = tmp_path / "s.json"
    small = ["train_subset=64", "test_subset=32", "epochs=1", "num_threads=1", "t1=5", "t2=3"]
    assert seeds.main(["--seeds", "0,1", *small, "--json", str(out)]) == 0   # no recipe named: digits
    s = json.loads(out.read_text())
    assert s["recipe"] == "digits" and s["seeds"] == [0, 1] and s["overrides"]["epochs"] == "1"
    accs = [r["test_accuracy"] for r in s["runs"]]
    assert s["min"] == min(accs) and s["max"] == max(accs) and abs(s["mean"] - sum(accs) / 2) < 1e-12
    assert "range over seeds 0-1" in capsys.readouterr().out
    assert seeds.main(["digits", "nosuchkey=1", "--seeds", "0"]) == 2


def test_bad_seed_list_is_a_one_line_error(capsys):
    assert seeds.main(["--seeds", "abc"]) == 2
    assert "expected seeds" in capsys.readouterr().err
