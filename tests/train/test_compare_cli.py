"""``python -m train.compare`` on the image presets: a size the model can take runs at the batch
given; one it cannot is refused at argument parsing, naming the smallest size it takes (checked
here by building the model and running a forward, independently of how the command finds it)."""
import json
import re

import pytest
import torch

from ffebm import models
from train import compare


def _refusal(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _takes(name, size, batch):
    """Whether the model builds at this size and a batch of random images passes a forward (one
    relaxation step, training mode: batch norms use the batch's statistics)."""
    try:
        model = models.build(name, image_size=size, t1=1, tol=None)
        with torch.no_grad():
            model(torch.rand(batch, 3, size, size))
    except (ValueError, RuntimeError):
        return False
    return True


def test_static_gradient_analysis_runs_at_16x16_with_a_batch_of_2(tmp_path, capsys):
    """16 halves to a 1x1 map before the last two blocks' batch norms: two values per channel at
    batch 2, so the comparison runs (the probe used to run a single sample and refuse)."""
    assert _takes("static_gradient_analysis", 16, 2) and not _takes("static_gradient_analysis", 16, 1)
    compare.main(["--model", "static_gradient_analysis", "--batch", "2", "--beta", "0.02", "--image-size", "16",
                  "--t1", "2", "--t2", "2", "--candidates", "centered", "--reference", "unrolled",
                  "--out", str(tmp_path)])
    data = json.loads((tmp_path / "compare.json").read_text())
    blocks = {r["block"] for r in data["rows"] if r["comparable"]}
    assert {f"block{i}" for i in range(1, 7)} <= blocks
    assert set(data["free_residual"]) == {f"block{i}" for i in range(1, 7)}
    assert "16x16" not in capsys.readouterr().err


@pytest.mark.parametrize("name,size,batch", [
    ("static_gradient_analysis", 16, 1),   # a batch norm left with one value per channel
    ("static_gradient_analysis", 8, 2),    # a map pooled to nothing
    ("splitting_small_1block", 24, 2),     # a pool inside a coupling meets an odd map (above the smallest)
])
def test_a_size_the_model_cannot_take_is_refused_with_the_smallest_it_takes(tmp_path, capsys, name, size, batch):
    line = _refusal(["--model", name, "--batch", str(batch), "--image-size", str(size), "--t1", "1", "--t2", "1",
                     "--out", str(tmp_path / "out")], capsys)
    assert f"--image-size {size}: {name} cannot take {size}x{size} images at --batch {batch}" in line, line
    smallest = int(re.search(rf"the smallest size it takes at --batch {batch} is (\d+)", line).group(1))
    assert not _takes(name, size, batch)
    assert _takes(name, smallest, batch) and not _takes(name, smallest - 1, batch)
    if size > smallest:   # the taken sizes either side of the one asked for
        below, above = map(int, re.search(rf"the nearest to {size}: (\d+) and (\d+)", line).groups())
        assert below < size < above and _takes(name, below, batch) and _takes(name, above, batch)
        assert not any(_takes(name, s, batch) for s in range(below + 1, above) if s != size)
    if batch == 1:   # and the smallest at a batch of two, where it is smaller
        pair = int(re.search(r"\((\d+) at --batch 2 or more\)", line).group(1))
        assert pair < smallest and _takes(name, pair, 2) and not _takes(name, pair - 1, 2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,expect", [
    (["--tol", "0"], "argument --tol: must be > 0, got 0"),
    (["--gdd", "--model", "splitting_small_3block", "--image-size", "16", "--precision", "float16", "--double"],
     "--precision float16 relaxes in a lower precision and --double compares in float64: choose one"),
    (["--gdd", "--candidates", "centered,bogus"], "--candidates: 'bogus' is not one of centered, positive"),
    (["--out", "{file}"], "--out {file}: exists and is not a folder"),
    (["--out", "{file}/sub"], "--out {file}/sub: cannot create the folder"),
    (["--gdd", "--model", "digits_conv", "--form", "difference"],
     "EP(form='difference') on block 'block1': coupling 0 (ConvCoupling): a max pool with live winners"),
    (["--beta", "1e-320", "--candidates", "centered"], "the comparison at --beta 1e-320 failed: relaxation of block"),
    (["--gdd", "--beta", "1e-320"], "the comparison at --beta 1e-320 failed: relaxation of block"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys, argv, expect):
    file = tmp_path / "a_file"
    file.write_text("")
    argv = [a.replace("{file}", str(file)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    line = _refusal(["--batch", "2", "--t1", "3", "--t2", "3", *argv, *out], capsys)
    assert expect.replace("{file}", str(file)) in line, line
    assert file.read_text() == ""
