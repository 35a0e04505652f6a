"""Run folders that are safe to share and hard to corrupt; inputs checked before work is spent."""
import errno
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, folder_digest, main_inproc, one_line_error, run_train, subprocess_env
from train import checkpoint as C
from train.runlock import RunFolderLock

DIGITS_SMALL = ["digits", "model=digits", "progress=false", "num_threads=1", "tensorboard=false", "model_options=hidden=32,width=16"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    res = run_train(TINY + ["epochs=1", "--out", "run"], d)
    assert res.returncode == 0, res.stderr
    return d


def _copy_run(src, dst):
    dst.mkdir()
    for name in ("config.json", C.CKPT):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ------------------------------------------------------------------------------------------
# 1. a run folder never executes code
# ------------------------------------------------------------------------------------------
def _hub_folder(root, name):
    """A run folder whose config names torch.hub:load on a hubconf.py it ships (the attack)."""
    run = root / name
    run.mkdir()
    marker = root / f"{name}-pwned"
    (run / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "def build(**kw):\n    import torch\n    return torch.nn.Linear(64, 10)\n")
    cfg = json.loads((root / "run" / "config.json").read_text())
    cfg.update(model="torch.hub:load", model_options=f"repo_or_dir={run},model=build,source=local")
    (run / "config.json").write_text(json.dumps(cfg))
    (run / C.CKPT).write_bytes((root / "run" / C.CKPT).read_bytes())
    return run, marker


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_stored_user_model_is_not_imported(finished, capsys, monkeypatch, command):
    run, marker = _hub_folder(finished, f"evil-{command}")
    before = folder_digest(run)
    if command == "evaluate":
        res = main_inproc([str(run)], finished, capsys, monkeypatch, module="train.evaluate")
    else:
        res = main_inproc(["--resume", str(run)], finished, capsys, monkeypatch)
    line = one_line_error(res)
    assert "torch.hub:load" in line and "--trust-code" in line and "module 'torch.hub'" in line
    assert not marker.exists()  # nothing from the folder ran
    assert folder_digest(run) == before


def test_trust_code_names_what_it_imports_and_is_needed_for_user_models(finished, capsys, monkeypatch):
    res = main_inproc([str(finished / "run")], finished, capsys, monkeypatch, module="train.evaluate")
    line = one_line_error(res)
    assert "tinymodel:build" in line and "tinymodel.py" in line  # where the module would come from
    res = main_inproc([str(finished / "run"), "--trust-code"], finished, capsys, monkeypatch,
                      module="train.evaluate")
    assert res.returncode == 0 and "test accuracy" in res.stdout


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_a_pickled_object_is_called_malicious(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "pickled")
    ck = C.load(run / C.CKPT)
    ck["history"] = [Payload()]
    with open(run / C.CKPT, "wb") as f:
        pickle.dump(ck, f)  # a plain pickle: what weights_only refuses
    torch.save({**ck, "history": [{"x": Payload()}]}, run / C.CKPT)
    res = main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch)
    line = one_line_error(res)
    assert "non-tensor object" in line and "malicious" in line and "system" in line, line


# ------------------------------------------------------------------------------------------
# 2. one process per run folder
# ------------------------------------------------------------------------------------------
def test_a_busy_run_folder_is_refused_and_its_temps_survive(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "busy")
    temp = run / ".checkpoint.pt.inflight.tmp"   # the live trainer's checkpoint being written
    temp.write_bytes(b"partial")
    lock = RunFolderLock(run).acquire()          # a live trainer (this process) holds the folder
    try:
        for argv, module in ((["--resume", str(run), "--trust-code"], "train"),
                             (TINY + ["epochs=1", "--out", str(run)], "train"),
                             ([str(run), "--trust-code", "--json", str(run / "eval.json")], "train.evaluate")):
            line = one_line_error(main_inproc(argv, finished, capsys, monkeypatch, module=module))
            assert f"in use by pid {os.getpid()}" in line, line
        assert temp.exists()
    finally:
        lock.release()
    # reading without writing into the folder stays possible
    res = main_inproc([str(run), "--trust-code"], finished, capsys, monkeypatch, module="train.evaluate")
    assert res.returncode == 0, res.stderr


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from train.runlock import RunFolderLock; "
            "RunFolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(C.Path(C.__file__).parents[1])],
                         stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"in use by pid {p.pid}"):
            RunFolderLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = RunFolderLock(tmp_path).acquire()     # the dead holder's lock is taken over
    lock.release()
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------------
# 3. "last good" means finite
# ------------------------------------------------------------------------------------------
def test_last_good_checkpoint_is_finite(tmp_path):
    res = run_train(DIGITS_SMALL + ["epochs=2", "ckpt_every=5", "lr=1e6", "optimizer=sgd", "grad_clip=0", "weight_decay=3e-4",
                                    "--out", "run"], tmp_path)
    assert res.returncode == 3, res.stderr
    assert "after the optimiser step" in res.stderr  # stopped at the step that broke the weights
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    good = failure["last_good_checkpoint"]
    assert good and good in res.stderr and f"step {failure['last_good_step']}" in res.stderr
    ck = C.load(tmp_path / good)
    assert ck["position"]["global_step"] == failure["last_good_step"]
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if isinstance(v, torch.Tensor))
    for state in ck["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))
    for p in (tmp_path / "run").glob("checkpoint*.pt"):  # no checkpoint on disk is non-finite
        m = C.load(p)["model"]
        assert all(torch.isfinite(v).all() for v in m.values() if isinstance(v, torch.Tensor)), p


def test_overflow_before_an_energy_block_stops_in_words(tmp_path):
    # the default recipe's conv model: a huge step overflows the conv/batch-norm/linear layers
    # before block 2, whose input check then fires mid-run (it used to end in a traceback)
    res = run_train(["digits", "progress=false", "num_threads=1", "tensorboard=false", "model_options=hidden=32,width=16",
                     "epochs=2", "ckpt_every=5", "lr=1e6", "optimizer=sgd", "grad_clip=0", "weight_decay=3e-4",
                     "--out", "run"], tmp_path)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert "training stopped: non-finite input to energy block 'block2'" in res.stderr, res.stderr
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    for p in (tmp_path / "run").glob("checkpoint*.pt"):  # no checkpoint on disk is non-finite
        m = C.load(p)["model"]
        assert all(torch.isfinite(v).all() for v in m.values() if isinstance(v, torch.Tensor)), p
    assert failure["last_good_checkpoint"] is None or (tmp_path / failure["last_good_checkpoint"]).exists()


# ------------------------------------------------------------------------------------------
# 4. data validated at load, before a run folder or an epoch is spent
# ------------------------------------------------------------------------------------------
def _py2_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar(root, labels_of_test, n=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = labels_of_test if name == "test_batch" else rng.integers(0, 10, n).tolist()
        _py2_pickle(d / name, {b"labels": labels, b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)})


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def _mnist(root, train_side=28, test_side=28, test_labels=None):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, train_side, train_side)))
    _idx(raw / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    _idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, test_side, test_side)))
    _idx(raw / "t10k-labels-idx1-ubyte.gz", test_labels if test_labels is not None else rng.integers(0, 10, 10))
    return raw


@pytest.mark.parametrize("labels,expect", [
    ([57] + [0] * 9, "labels must be integers in 0..9 (found 0..57)"),
    ([-3] + [0] * 9, "labels must be integers in 0..9 (found -3..0)"),
    ([0.5] * 10, "labels must be integers, found float64"),
    (["cat"] * 10, "labels must be integers, found <U3"),
])
def test_bad_cifar_labels_refused_before_any_work(tmp_path, capsys, monkeypatch, labels, expect):
    _cifar(tmp_path / "data", labels)
    res = main_inproc(["digits", "dataset=cifar10", "data_root=data", "model=tinymodel:build", "--out", "run"],
                      tmp_path, capsys, monkeypatch)
    line = one_line_error(res)
    assert expect in line and "test_batch" in line, line
    assert not (tmp_path / "run").exists()  # no run folder left behind


def test_bad_mnist_labels_and_test_shape(tmp_path, capsys, monkeypatch):
    _mnist(tmp_path / "a", test_labels=[200] + [0] * 9)
    line = one_line_error(main_inproc(["digits", "dataset=mnist", "data_root=a", "model=tinymodel:build",
                                       "--out", "r"], tmp_path, capsys, monkeypatch))
    assert "t10k-labels-idx1-ubyte.gz" in line and "found 0..200" in line
    _mnist(tmp_path / "b", test_side=20)
    line = one_line_error(main_inproc(["digits", "dataset=mnist", "data_root=b", "model=tinymodel:build",
                                       "--out", "r"], tmp_path, capsys, monkeypatch))
    assert "t10k-images-idx3-ubyte.gz" in line and "(1, 20, 20)" in line and "(1, 28, 28)" in line
    assert not (tmp_path / "r").exists()


def test_imagenet32_val_of_another_size_refused(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    tr, va = tmp_path / "d" / "Imagenet32_train", tmp_path / "d" / "Imagenet32_val"
    tr.mkdir(parents=True)
    va.mkdir()
    _py2_pickle(tr / "train_data_batch_1", {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                                            "labels": list(range(1, 9))})
    _py2_pickle(va / "val_data", {"data": rng.integers(0, 256, (4, 768), dtype=np.uint8), "labels": [1, 2, 3, 4]})
    line = one_line_error(main_inproc(["digits", "dataset=imagenet32", "data_root=d", "model=tinymodel:build",
                                       "--out", "r"], tmp_path, capsys, monkeypatch))
    assert "val_data" in line and "(3, 16, 16)" in line


def test_gzip_bomb_is_read_no_further_than_its_header_declares(tmp_path):
    from train.formats import DataError, _read_idx

    path = tmp_path / "bomb-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:  # declares 10 labels, then 200 MB of zeros (~200 KB on disk)
        f.write(struct.pack(">HBBI", 0, 8, 1, 10))
        chunk = bytes(1 << 20)
        for _ in range(200):
            f.write(chunk)
    assert path.stat().st_size < 1 << 20
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(DataError, match="more data than its declared shape"):
        _read_idx(path, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # bounded by the declared size, not the 200 MB body


# ------------------------------------------------------------------------------------------
# 5. resume continues the same run
# ------------------------------------------------------------------------------------------
def test_resume_refuses_an_edited_configuration(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "edited")
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(lr=0.5, seed=9)
    (run / "config.json").write_text(json.dumps(cfg))
    before = folder_digest(run)
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert "another configuration" in line and "lr: 0.01 -> 0.5" in line and "seed: 0 -> 9" in line
    assert folder_digest(run) == before


@pytest.mark.parametrize("field,value,expect", [
    ("position", None, "field 'position' is missing"),
    ("position", {"epoch": "1", "step_in_epoch": 0, "global_step": 3}, "position.epoch is '1'"),
    ("rng", {}, "field 'rng' lacks"),
    ("history", "oops", "field 'history' is a str"),
])
def test_malformed_checkpoint_fields_refused(finished, capsys, monkeypatch, field, value, expect):
    run = _copy_run(finished / "run", finished / f"bad-{field}-{type(value).__name__}")
    ck = C.load(run / C.CKPT)
    if value is None:
        del ck[field]
    else:
        ck[field] = value
    torch.save(ck, run / C.CKPT)
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert expect in line, line


def test_checkpoint_that_is_a_folder_refused(finished, capsys, monkeypatch):
    run = finished / "dirckpt"
    run.mkdir()
    (run / "config.json").write_bytes((finished / "run" / "config.json").read_bytes())
    (run / C.CKPT).mkdir()
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert "checkpoint.pt is not a file" in line


# ------------------------------------------------------------------------------------------
# 6. I/O errors are one line and lose nothing
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch, error):
    real = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) >= 3:  # the third checkpoint write finds the disk full
            raise error
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(C.torch, "save", failing_save)
    res = main_inproc(TINY + ["epochs=1", "ckpt_every=5", "--out", "run"], tmp_path, capsys, monkeypatch)
    line = one_line_error(res, code=4)
    assert "cannot write" in line and "checkpoint.pt" in line and "last good checkpoint" in line and "step 10" in line
    if isinstance(error, OSError):
        assert "No space left on device" in line
    else:
        assert "write failed" in line and "MB free" in line
    monkeypatch.setattr(C.torch, "save", real)
    assert C.load(tmp_path / "run" / C.CKPT)["position"]["global_step"] == 10
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_unusable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(main_inproc(TINY + ["--out", "afile/run"], tmp_path, capsys, monkeypatch))
    assert "cannot create run folder afile/run" in line
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            line = one_line_error(main_inproc(TINY + ["--out", "ro/run"], tmp_path, capsys, monkeypatch))
            assert "Permission denied" in line
        finally:
            ro.chmod(0o700)


# ------------------------------------------------------------------------------------------
# 7. configuration values are finite and sane
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv,expect", [
    ("lr=nan", "lr=nan: must be a finite number"), ("weight_decay=nan", "weight_decay=nan"),
    ("analog_lr=nan", "analog_lr=nan"), ("lr=inf", "lr=inf"), ("min_lr=nan", "min_lr=nan"),
    ("grad_clip=nan", "grad_clip=nan"), ("analog_omega=nan", "analog_omega=nan"), ("beta=inf", "beta=inf"),
    (f"seed={2 ** 70}", "seed="), ("num_threads=100000", "num_threads=100000"),
    ("model_options=hiden=32", "has no option 'hiden' (did you mean 'hidden'?)"),
])
def test_insane_values_refused_at_validation(tmp_path, capsys, monkeypatch, kv, expect):
    line = one_line_error(main_inproc(["digits", kv, "--out", "run"], tmp_path, capsys, monkeypatch))
    assert expect in line, line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_non_finite_state_is_never_written(tmp_path):
    from train.recipes import build_config
    from train.trainer import Trainer, TrainingStopped

    cfg = build_config("digits", dict(model="tinymodel:build", progress="false", tensorboard="false",
                                      num_threads="1", epochs="1"))
    t = Trainer(cfg, tmp_path / "run", log=lambda m: None).setup()
    t.commit(existing=False)
    t.t0 = 0.0
    t.save_checkpoint("every")
    good = C.load(tmp_path / "run" / C.CKPT)
    with torch.no_grad():
        next(t.core.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match="non-finite state .* at checkpoint time") as e:
        t.save_checkpoint("every")
    assert e.value.code == 3
    assert torch.equal(C.load(tmp_path / "run" / C.CKPT)["model"]["1.weight"], good["model"]["1.weight"])


# ------------------------------------------------------------------------------------------
# hardening found by trying to break the above
# ------------------------------------------------------------------------------------------
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "linked")
    victim = finished / "victim.txt"
    victim.write_text("precious")
    (run / ".lock").symlink_to(victim)
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert "symbolic link" in line
    assert victim.read_text() == "precious"


def test_idx_header_cannot_overflow_the_size_check(tmp_path):
    from train.formats import DataError, _read_idx

    path = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:  # 65535 * 42009217 * 6700417 = 2**64 - 1 (int64 wraps to -1)
        f.write(struct.pack(">HBBIII", 0, 8, 3, 65535, 42009217, 6700417) + bytes(1000))
    with pytest.raises(DataError, match="above the limit"):
        _read_idx(path, 3)


def test_label_file_larger_than_the_images_is_not_read(tmp_path):
    from train.formats import DataError, _read_idx

    path = tmp_path / "x-labels-idx1-ubyte.gz"
    _idx(path, np.zeros(5000))
    with pytest.raises(DataError, match="above the limit of 10 \\(the number of images\\)"):
        _read_idx(path, 1, max_count=10)


def test_special_config_file_refused(finished, capsys, monkeypatch):
    run = finished / "special"
    run.mkdir()
    (run / "config.json").symlink_to("/dev/zero")
    line = one_line_error(main_inproc(["--resume", str(run)], finished, capsys, monkeypatch))
    assert "not a configuration file" in line


def test_folder_of_a_trainer_killed_before_its_config_is_reused(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("12345\n")            # left by kill -9 (its flock died with it)
    (run / ".config.json.abc.tmp").write_text("{")
    res = main_inproc(TINY + ["epochs=1", "--out", "run"], tmp_path, capsys, monkeypatch)
    assert res.returncode == 0, res.stderr
    assert (run / "metrics.json").exists() and not (run / ".lock").exists()


def test_evaluate_refuses_to_write_over_the_runs_own_files(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "clobber")
    before = folder_digest(run)
    for name in ("checkpoint.pt", "config.json"):
        line = one_line_error(main_inproc([str(run), "--trust-code", "--json", str(run / name)], finished, capsys,
                                          monkeypatch, module="train.evaluate"))
        assert "not the run's files" in line
    line = one_line_error(main_inproc([str(run), "--trust-code", "--json", str(finished / "no" / "where.json")],
                                      finished, capsys, monkeypatch, module="train.evaluate"))
    assert "cannot write" in line
    assert folder_digest(run) == before


@pytest.mark.parametrize("change,expect", [
    (lambda ck: ck["model"].__setitem__("1.weight", ck["model"]["1.weight"] * float("nan")), "holds NaN or inf"),
    (lambda ck: ck["position"].__setitem__("step_in_epoch", 500), "outside this run"),
    (lambda ck: ck.__setitem__("history", [{"train_samples": "x"}]), "history[0].train_samples"),
    (lambda ck: ck.__setitem__("accum", {"loss_sum": "x"}), "does not fit this run"),
    (lambda ck: ck["rng"].__setitem__("torch", torch.zeros(3)), "does not fit this run"),
    (lambda ck: ck.update(finished=True, final="done"), "final metrics"),
    (lambda ck: ck.update(finished=True, final={"test_accuracy": float("nan")}), "final metrics"),
    (lambda ck: ck.update(finished="yes"), "'finished' must be true or false"),
    (lambda ck: ck["optimizer"]["param_groups"][0].__setitem__("lr", "x"), "param_groups[0].lr is 'x'"),
    (lambda ck: [st.__setitem__("exp_avg", st["exp_avg"] * float("nan")) for st in ck["optimizer"]["state"].values()],
     "holds NaN or inf"),
    (lambda ck: ck.__setitem__("elapsed", float("nan")), "must be finite numbers"),
])
def test_crafted_checkpoint_contents_refused_in_one_line(finished, capsys, monkeypatch, change, expect):
    import uuid

    run = _copy_run(finished / "run", finished / f"crafted-{uuid.uuid4().hex[:6]}")
    ck = C.load(run / C.CKPT)
    change(ck)
    torch.save(ck, run / C.CKPT)
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert expect in line, line


def test_results_lost_to_a_full_disk_are_written_by_the_next_resume(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "nometrics")
    assert not (run / "metrics.json").exists()
    res = main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch)
    assert res.returncode == 0 and "already complete" in res.stdout
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == C.load(run / C.CKPT)["final"][
        "test_accuracy"]


@pytest.mark.parametrize("kv,expect", [("model_dtype=foo", "model_dtype='foo'"), ("min_lr=0.5", "must not exceed lr")])
def test_more_insane_values(tmp_path, capsys, monkeypatch, kv, expect):
    line = one_line_error(main_inproc(["digits", kv, "--out", "run"], tmp_path, capsys, monkeypatch))
    assert expect in line and not (tmp_path / "run").exists()


def test_model_that_cannot_take_the_data_fails_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    res = main_inproc(["digits", "dataset=fake", "progress=false", "num_threads=1", "--out", "run"], tmp_path, capsys,
                      monkeypatch)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot take the fake batches" in res.stderr and "[64, 3, 32, 32]" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["hardlink", "fifo"])
def test_a_lock_that_is_not_a_plain_file_of_the_folder_is_refused(finished, capsys, monkeypatch, kind):
    run = _copy_run(finished / "run", finished / f"lock-{kind}")
    victim = finished / f"victim-{kind}.txt"
    victim.write_text("precious")
    if kind == "hardlink":
        os.link(victim, run / ".lock")
    else:
        os.mkfifo(run / ".lock")
    line = one_line_error(main_inproc(["--resume", str(run), "--trust-code"], finished, capsys, monkeypatch))
    assert "not a plain file of this folder" in line
    assert victim.read_text() == "precious"


def test_evaluate_writes_only_new_json_files_into_a_run_folder(finished, capsys, monkeypatch):
    run = _copy_run(finished / "run", finished / "evaljson")
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"event")
    for target in (run / "tb" / "events.out.tfevents.1", run / "tb" / "x.json", run / "notes.txt"):
        line = one_line_error(main_inproc([str(run), "--trust-code", "--json", str(target)], finished, capsys,
                                          monkeypatch, module="train.evaluate"))
        assert "only a new .json file" in line
    assert (run / "tb" / "events.out.tfevents.1").read_bytes() == b"event"
    res = main_inproc([str(run), "--trust-code", "--json", str(run / "eval.json")], finished, capsys, monkeypatch,
                      module="train.evaluate")
    assert res.returncode == 0 and json.loads((run / "eval.json").read_text())["test_accuracy"] >= 0


@pytest.mark.parametrize("kv,expect", [("method=implicit", "method=implicit: model 'tinymodel:build_ep_always' ignored"),
                                       ("beta=0.2", "beta=0.2: model 'tinymodel:build_ep_always' ignored"),
                                       ("variant=positive", "variant=positive")])
def test_settings_a_user_model_ignores_are_refused(tmp_path, capsys, monkeypatch, kv, expect):
    args = ["digits", "model=tinymodel:build_ep_always", "progress=false", "num_threads=1", kv, "--out", "run"]
    line = one_line_error(main_inproc(args, tmp_path, capsys, monkeypatch))
    assert expect in line, line
    assert not (tmp_path / "run").exists()
