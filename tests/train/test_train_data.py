import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from train.config import TrainConfig, apply_overrides
from train.batches import Preprocess, TrainBatches, augment_batch, shard_test_set
from train.data import load_datasets
from train.formats import DataError, safe_unpickle


def cfg_for(name, root, **kw):
    return apply_overrides(TrainConfig(), dict(dataset=name, data_root=str(root), **kw))


# ---------------------------------------------------------------- digits
def test_digits_split_is_fixed():
    tr, te, info = load_datasets(cfg_for("digits", "unused"))
    assert len(tr) == 1437 and len(te) == 360
    assert tr.images.shape[1:] == (1, 8, 8) and info.num_classes == 10
    tr2, te2, _ = load_datasets(cfg_for("digits", "unused"))
    assert torch.equal(te.labels, te2.labels) and torch.equal(tr.images, tr2.images)
    assert int(tr.images.max()) == 16 and info.scale == 1 / 16 and info.mean == (0.0,)
    assert torch.bincount(te.labels).min() >= 35  # stratified


# ---------------------------------------------------------------- MNIST idx
def write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_mnist(root, folder="MNIST", gz=True, n=(20, 10)):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in zip(("train", "t10k"), n):
        sfx = ".gz" if gz else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (count, 28, 28)), gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, (count,)), gz)
    return raw


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, gz, name, folder):
    make_mnist(tmp_path, folder, gz)
    tr, te, info = load_datasets(cfg_for(name, tmp_path))
    assert tr.images.shape == (20, 1, 28, 28) and te.images.shape == (10, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.max() < 10
    assert info.augment is False and info.mean != (0.0,)


def test_mnist_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_datasets(cfg_for("mnist", tmp_path / "nowhere"))
    with pytest.raises(DataError, match="MNIST not found.*train-images-idx3-ubyte"):
        load_datasets(cfg_for("mnist", tmp_path))
    raw = make_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(DataError, match="malformed idx"):
        load_datasets(cfg_for("mnist", tmp_path))


# ---------------------------------------------------------------- CIFAR pickles
def py2_style_pickle(path, d):
    """CIFAR's python files come from Python 2: bytes keys, protocol 2."""
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def make_cifar10(root, n=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        py2_style_pickle(d / name, {b"batch_label": b"x", b"labels": list(rng.integers(0, 10, n).tolist()),
                                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                    b"filenames": [b"a.png"] * n})
    return d


def test_cifar10_batches(tmp_path):
    make_cifar10(tmp_path)
    tr, te, info = load_datasets(cfg_for("cifar10", tmp_path))
    assert tr.images.shape == (50, 3, 32, 32) and te.images.shape == (10, 3, 32, 32)
    assert info.augment is True and len(info.mean) == 3


def test_cifar100_batches(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 12), ("test", 6)):
        py2_style_pickle(d / name, {b"fine_labels": rng.integers(0, 100, n).tolist(),
                                    b"coarse_labels": rng.integers(0, 20, n).tolist(),
                                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    tr, te, info = load_datasets(cfg_for("cifar100", tmp_path))
    assert len(tr) == 12 and len(te) == 6 and info.num_classes == 100


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found.*download=true"):
        load_datasets(cfg_for("cifar10", tmp_path))
    d = make_cifar10(tmp_path)
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_datasets(cfg_for("cifar10", tmp_path))
    py2_style_pickle(d / "test_batch", {b"labels": [1, 2]})
    with pytest.raises(DataError, match="missing key"):
        load_datasets(cfg_for("cifar10", tmp_path))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "evil"
    with open(p, "wb") as f:
        pickle.dump({"data": _Evil()}, f)
    with pytest.raises(DataError, match="refusing to load global"):
        safe_unpickle(p)
    # numpy arrays in every protocol are fine
    for proto in (2, 3, 4, 5):
        with open(p, "wb") as f:
            pickle.dump({"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2]}, f, protocol=proto)
        d = safe_unpickle(p)
        assert d["data"].shape == (2, 3)


# ---------------------------------------------------------------- ImageNet32
def make_imagenet32(root, batches=2, npz=False, n=8):
    d = root / "Imagenet32_train"
    v = root / "Imagenet32_val"
    d.mkdir(parents=True)
    v.mkdir()
    rng = np.random.default_rng(2)

    def write(path, count):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(1, 1001, count).tolist()
        if npz:
            np.savez(str(path) + ".npz", data=data, labels=np.array(labels), mean=np.zeros(3072))
        else:
            with open(path, "wb") as f:
                pickle.dump({"data": data, "labels": labels, "mean": data.mean(0)}, f)

    for i in range(1, batches + 1):
        write(d / f"train_data_batch_{i}", n)
    write(v / "val_data", n // 2)


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32_batches(tmp_path, npz):
    make_imagenet32(tmp_path, npz=npz)
    tr, te, info = load_datasets(cfg_for("imagenet32", tmp_path))
    assert tr.images.shape == (16, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    assert tr.labels.min() >= 0 and tr.labels.max() <= 999 and info.num_classes == 1000


def test_imagenet32_missing_and_bad_labels(tmp_path):
    with pytest.raises(DataError, match="ImageNet32 not found.*train_data_batch_1"):
        load_datasets(cfg_for("imagenet32", tmp_path))
    make_imagenet32(tmp_path, batches=1)
    with open(tmp_path / "Imagenet32_val" / "val_data", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 5]}, f)
    with pytest.raises(DataError, match="1-based"):
        load_datasets(cfg_for("imagenet32", tmp_path))


# ---------------------------------------------------------------- batching / augmentation
def test_augmentation_is_crop_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, pad=2)
    assert y.shape == x.shape and y.dtype == torch.uint8
    y2 = augment_batch(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(y, y2)
    # with no padding the only change is a horizontal flip
    y0 = augment_batch(x, torch.Generator().manual_seed(3), pad=0)
    for i in range(2):
        assert torch.equal(y0[i], x[i]) or torch.equal(y0[i], x[i].flip(-1))


def test_input_noise_is_clipped_gaussian_on_training_batches_only():
    _, _, info = load_datasets(cfg_for("digits", "unused"))
    x = torch.full((400, 1, 8, 8), 8, dtype=torch.uint8)           # every pixel 0.5
    clean = Preprocess(info, "cpu")(x)
    noisy = Preprocess(info, "cpu", input_noise=0.1)
    assert torch.equal(noisy(x), clean)                             # evaluation (no generator): untouched
    a = noisy(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, noisy(x, torch.Generator().manual_seed(1)))  # seeded per batch: resumable
    d = a - clean
    assert abs(d.mean().item()) < 0.005 and abs(d.std().item() - 0.1) < 0.005
    assert not torch.equal(a, noisy(x, torch.Generator().manual_seed(2)))
    big = Preprocess(info, "cpu", input_noise=3.0)(x, torch.Generator().manual_seed(0))
    assert big.min().item() == 0.0 and big.max().item() == 1.0      # clipped to the pixel range
    # noise comes after the augmentation's draws: the augmentation stream is unchanged
    aug = Preprocess(info, "cpu", augment=True)(x, torch.Generator().manual_seed(4))
    both = Preprocess(info, "cpu", augment=True, input_noise=1e-6)(x, torch.Generator().manual_seed(4))
    assert torch.allclose(aug, both, atol=1e-4)


def test_sharded_batches_union_equals_single_process():
    tr, _, _ = load_datasets(cfg_for("digits", "x"))
    single = TrainBatches(tr, 64, 1, 0, seed=5)
    shards = [TrainBatches(tr, 64, 2, r, seed=5) for r in range(2)]
    assert single.steps_per_epoch == shards[0].steps_per_epoch == 22
    s_batches = list(single.epoch(3))
    r_batches = [list(s.epoch(3)) for s in shards]
    for i in range(single.steps_per_epoch):
        a = sorted(s_batches[i][2].tolist())
        assert s_batches[i][1].shape[0] == 64 and r_batches[0][i][1].shape[0] == 32
        # same samples: compare image bytes
        one = {bytes(t.numpy().tobytes()) for t in s_batches[i][1]}
        two = {bytes(t.numpy().tobytes()) for r in range(2) for t in r_batches[r][i][1]}
        assert one == two and len(a) == 64
    # resuming mid-epoch yields the remaining batches
    rest = list(single.epoch(3, start_step=10))
    assert rest[0][0] == 10 and torch.equal(rest[0][1], s_batches[10][1])
    te = load_datasets(cfg_for("digits", "x"))[1]
    parts = [shard_test_set(te, 2, r) for r in range(2)]
    assert len(parts[0]) + len(parts[1]) == len(te)


def test_fake_dataset_shapes():
    tr, te, info = load_datasets(cfg_for("fake", "x", image_size=16, in_channels=3, num_classes=7,
                                         fake_train_size=10, fake_test_size=4))
    assert tr.images.shape == (10, 3, 16, 16) and info.num_classes == 7 and len(te) == 4
