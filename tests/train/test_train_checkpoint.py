import json
import random

import numpy as np
import pytest
import torch

import tinymodel
from train import checkpoint as C
from train.config import apply_overrides
from train.recipes import build_config
from train.trainer import Trainer


def small_cfg(**kw):
    base = dict(model="tinymodel:build", progress="false", tensorboard="false", num_threads="1", epochs="2",
                train_subset="256", test_subset="100", batch_size="32")
    base.update({k: str(v) for k, v in kw.items()})
    return build_config("digits", base)


def test_atomic_save_rotates_and_loads_weights_only(tmp_path):
    C.save(tmp_path, {"model_name": "m", "x": torch.ones(2)}, {"step": 1})
    C.save(tmp_path, {"model_name": "m", "x": torch.zeros(2)}, {"step": 2})
    assert (tmp_path / C.CKPT).is_file() and (tmp_path / C.PREV).is_file()
    assert json.loads((tmp_path / C.SUMMARY).read_text())["step"] == 2
    assert torch.equal(C.load(tmp_path / C.CKPT)["x"], torch.zeros(2))
    assert torch.equal(C.load(tmp_path / C.PREV)["x"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))
    # crash between the two renames: only the previous one is left
    (tmp_path / C.CKPT).unlink()
    assert C.find(tmp_path) == tmp_path / C.PREV


def test_non_plain_values_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="non-plain"):
        C.save(tmp_path, {"obj": object()})
    assert not (tmp_path / C.CKPT).exists()


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    C.save(tmp_path, {"model_name": "m"})
    C.save(tmp_path, {"model_name": "m"})
    p = tmp_path / C.CKPT
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(C.CheckpointError, match="corrupt or truncated.*checkpoint_prev.pt"):
        C.load(p)
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not a training checkpoint"):
        C.load(tmp_path / "other.pt")


def test_rng_state_roundtrip():
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    s = C.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.set_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_generic_extra_state_roundtrip():
    m = tinymodel.build_with_state()
    m.device_state.counter += 5
    m.gen = torch.Generator().manual_seed(3)
    st = C.collect_extra_state(m)
    assert set(st) == {"device_state", "gen"}
    expected = torch.rand(2, generator=m.gen)
    m2 = tinymodel.build_with_state()
    m2.gen = torch.Generator().manual_seed(99)
    C.restore_extra_state(m2, st)
    assert torch.equal(m2.device_state.counter, torch.full((3,), 5.0))
    assert torch.equal(torch.rand(2, generator=m2.gen), expected)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    cfg = small_cfg(epochs=1)
    t = Trainer(cfg, tmp_path, log=lambda m: None).setup()
    t.commit(existing=False)
    t.fit()
    other = apply_overrides(cfg, {"model": "tinymodel:build_with_state"})
    with pytest.raises(C.CheckpointError, match="written for model 'tinymodel:build'"):
        Trainer(other, tmp_path).setup(resume_from=tmp_path / C.CKPT)

    # same name, different shapes (e.g. another hidden size)
    def wider(cfg, info):
        return tinymodel.build(num_classes=10, in_channels=1, image_size=8, hidden=48)
    with pytest.raises(C.CheckpointError, match="does not match this model"):
        Trainer(cfg, tmp_path, model_fn=wider).setup(resume_from=tmp_path / C.CKPT)


def test_analog_state_is_checkpointed(tmp_path):
    cfg = small_cfg(model="tinymodel:build_with_state", epochs=1)
    t = Trainer(cfg, tmp_path, log=lambda m: None).setup()
    t.core.device_state.counter += 7
    t.commit(existing=False)
    t.fit()
    t2 = Trainer(cfg, tmp_path, log=lambda m: None).setup(resume_from=tmp_path / C.CKPT)
    assert torch.equal(t2.core.device_state.counter, torch.full((3,), 7.0))


def test_checkpoint_files_get_the_users_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        C.save(tmp_path, {"model_name": "m", "x": torch.ones(2)}, {"step": 1})
    finally:
        os.umask(old)
    for name in (C.CKPT, C.SUMMARY):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # not mkstemp's 0600
