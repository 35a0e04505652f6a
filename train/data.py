"""Data sets for training, held in memory as uint8 images ``[N, C, H, W]`` + int64 labels.

Supported (``dataset=`` key) and where they are read from (``data_root=``, default ``data``):

============== ================================================================================
digits         scikit-learn's built-in 8x8 digits (no file needed).  Fixed split:
               ``train_test_split(test_size=360, random_state=0, stratify=labels)`` gives 1437
               training and 360 test images; pixels 0..16 scaled to [0, 1], shape [B, 1, 8, 8],
               no normalisation (the energy blocks' hard-sigmoid units expect [0, 1] inputs).
mnist          ``{root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
               (torchvision's layout; ``{root}/MNIST`` or ``{root}`` itself also work).
fashion_mnist  the same under ``{root}/FashionMNIST/raw``.
cifar10        ``{root}/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the "python version").
cifar100       ``{root}/cifar-100-python/{train,test}`` (fine labels).
imagenet32     downsampled ImageNet 32x32 (Chrabaszcz et al. 2017): ``train_data_batch_1..10``
               and ``val_data`` (pickled dicts with ``data`` N x 3072 uint8 and 1-based
               ``labels``), or the same names with ``.npz``; looked for in ``{root}/imagenet32``,
               ``{root}/Imagenet32``, ``{root}/Imagenet32_train`` + ``{root}/Imagenet32_val`` and
               ``{root}``.  These files cannot be downloaded automatically (registration needed).
fake           random images (deterministic), shape from ``image_size``/``in_channels``/
               ``num_classes``; for smoke tests.
============== ================================================================================

``download=true`` lets torchvision fetch MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 into
``data_root`` (when the network allows); the files are then read by the readers below.

Pickled files (CIFAR, ImageNet32) are read with a *restricted* unpickler that only resolves the
few numpy functions needed to rebuild arrays (``numpy.core.multiarray._reconstruct``,
``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray.scalar``,
``numpy.core.numeric._frombuffer`` and ``_codecs.encode`` used by protocol-2 pickles for byte
strings).  Any other global in the file (anything that could run code) is refused, so a
tampered data file cannot execute code.  ``.npz`` files are read with ``np.load(allow_pickle=False)``.

Augmentation (random crop with 4-pixel zero padding + horizontal flip, on by default for CIFAR
and ImageNet32) is applied per batch with a generator seeded from (seed, epoch, step, rank), so
a resumed run sees exactly the same augmented batches.
"""

from __future__ import annotations

import gzip
import math
import importlib
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TrainConfig, UserError


class DataError(UserError):
    pass


@dataclass
class ArrayDataset:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]
    source: str = ""       # the file the images came from (named in errors)

    def __len__(self):
        return int(self.labels.shape[0])

    def subset(self, n: int) -> "ArrayDataset":
        if n <= 0 or n >= len(self):
            return self
        return ArrayDataset(self.images[:n], self.labels[:n], self.source)


@dataclass
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    scale: float                    # uint8 value -> [0, 1]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: bool                   # resolved augmentation switch
    source: str                     # where the data came from


# name: (channels, size, classes, mean, std, augment by default)
DATASETS = {
    "digits": (1, 8, 10, None, None, False),
    "mnist": (1, 28, 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": (1, 28, 10, (0.2860,), (0.3530,), False),
    "cifar10": (3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": (3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    # ImageNet statistics (the downsampled set's are within 0.01 of them)
    "imagenet32": (3, 32, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
    "fake": (3, 32, 10, None, None, False),
}

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


# ------------------------------------------------------------------------------------------
# restricted unpickling
# ------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        key = (module, name)
        if key not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")
        for mod in _ALLOWED_GLOBALS[key]:
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def safe_unpickle(path: Path):
    """Load a pickle that may contain only plain containers and numpy arrays."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 -- any failure means a malformed file
        raise DataError(f"{path}: not a valid pickled numpy batch ({type(e).__name__}: {e})") from None


def _key(d, name):
    """Dict lookup accepting both str and bytes keys (CIFAR pickles come from Python 2)."""
    if not isinstance(d, dict):
        raise KeyError(name)
    if name in d:
        return d[name]
    b = name.encode()
    if b in d:
        return d[b]
    raise KeyError(name)


# ------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------
def _load_digits() -> Tuple[ArrayDataset, ArrayDataset, str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)            # values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=DIGITS_TEST_SIZE,
                                          random_state=DIGITS_SPLIT_SEED, stratify=y)
    mk = lambda a, b: ArrayDataset(torch.from_numpy(np.ascontiguousarray(a))[:, None], torch.from_numpy(b))
    return mk(xtr, ytr), mk(xte, yte), "sklearn.datasets.load_digits"


MAX_IDX_BYTES = 4 << 30  # a declared idx body above 4 GiB is refused (MNIST-like sets are ~50 MB)


def _read_idx(path: Path, expect_dims: int, max_count: Optional[int] = None) -> np.ndarray:
    """Read an idx file; memory is bounded by the size its header declares (a gzip bomb behind a
    small header is never decompressed beyond that)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            zero, dtype_code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
                raise ValueError(f"bad idx header (type 0x{dtype_code:02x}, {ndim} dims; expected uint8, {expect_dims})")
            dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
            count = math.prod(dims)  # Python ints: no overflow
            limit = MAX_IDX_BYTES if max_count is None else min(MAX_IDX_BYTES, max_count)
            if count > limit:
                raise ValueError(f"declared shape {tuple(dims)} is {count} values, above the limit of {limit}"
                                 + (" (the number of images)" if max_count is not None else ""))
            body = f.read(count)
            if len(body) != count:
                raise ValueError(f"{len(body)} data bytes for shape {tuple(dims)} (truncated)")
            if f.read(1):
                raise ValueError(f"more data than its declared shape {tuple(dims)}")
        return np.frombuffer(body, dtype=np.uint8).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: malformed idx file ({e})") from None


def check_labels(raw, path: Path, num_classes: int, base: int = 0) -> np.ndarray:
    """Labels as int64 in ``[0, num_classes)`` (stored as ``base``-based integers); a clear
    DataError naming ``path`` for anything else (floats, strings, out of range)."""
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError) as e:
        raise DataError(f"{path}: labels are not an array of integers ({e})") from None
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                         for v in arr.reshape(-1)):
            try:
                arr = arr.astype(np.int64)
            except OverflowError:
                raise DataError(f"{path}: labels must be integers in 0..{num_classes - 1} (found a huge value)") \
                    from None
        else:
            example = arr.reshape(-1)[0] if arr.size else None
            raise DataError(f"{path}: labels must be integers, found {arr.dtype} values (e.g. {example!r})")
    arr = arr.reshape(-1)
    if arr.size and (int(arr.min()) < base or int(arr.max()) >= base + num_classes):
        based = f" ({base}-based)" if base else ""
        raise DataError(f"{path}: labels must be integers in {base}..{base + num_classes - 1}{based} "
                        f"(found {arr.min()}..{arr.max()})")
    return arr.astype(np.int64) - base if base else arr.astype(np.int64)


def _find_file(dirs: Sequence[Path], names: Sequence[str]) -> Optional[Path]:
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def _load_mnist_like(root: Path, folder: str, label: str) -> Tuple[ArrayDataset, ArrayDataset, str]:
    dirs = [root / folder / "raw", root / folder, root]
    out = []
    for prefix in ("train", "t10k"):
        paths = []
        for kind, dims in (("images-idx3", 3), ("labels-idx1", 1)):
            stem = f"{prefix}-{kind}-ubyte"
            p = _find_file(dirs, [stem, stem + ".gz"])
            if p is None:
                raise DataError(
                    f"{label} not found: looked for {stem}[.gz] in {', '.join(str(d) for d in dirs)}; "
                    f"pass download=true (needs network) or put the idx files in {root / folder / 'raw'}")
            paths.append((p, dims))
        images = _read_idx(*paths[0])
        # one label per image: a label file declaring more is refused before it is read
        labels = check_labels(_read_idx(*paths[1], max_count=images.shape[0]), paths[1][0], 10)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{paths[0][0]}: {images.shape[0]} images but {labels.shape[0]} labels in {paths[1][0]}")
        out.append(ArrayDataset(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels),
                                str(paths[0][0])))
    return out[0], out[1], str(paths[0][0].parent)


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    try:
        data = np.asarray(_key(d, "data"))
        labels = check_labels(_key(d, label_key), path, num_classes)
    except KeyError as e:
        raise DataError(f"{path}: malformed CIFAR batch (missing key {e})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: malformed CIFAR batch (data {data.dtype} {data.shape}, {labels.shape[0]} labels; "
                        f"expected uint8 N x 3072)")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(root: Path, which: str) -> Tuple[ArrayDataset, ArrayDataset, str]:
    if which == "cifar10":
        folder, train_files, test_files, key, label = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR-10"
        k = 10
    else:
        folder, train_files, test_files, key, label = "cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR-100"
        k = 100
    d = root / folder
    missing = [n for n in train_files + test_files if not (d / n).is_file()]
    if missing:
        raise DataError(f"{label} not found: missing {', '.join(missing)} in {d}; pass download=true (needs network) "
                        f"or extract the python version of {label} into {root}")
    sets = []
    for names in (train_files, test_files):
        parts = [_cifar_batch(d / n, key, k) for n in names]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        sets.append(ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), str(d / names[0])))
    return sets[0], sets[1], str(d)


def _imagenet32_dirs(root: Path) -> List[Path]:
    return [root / "imagenet32", root / "Imagenet32", root / "ImageNet32",
            root / "Imagenet32_train", root / "Imagenet32_val", root]


def _imagenet_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data, labels = np.asarray(z["data"]), np.asarray(z["labels"])
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: malformed ImageNet32 npz batch ({type(e).__name__}: {e})") from None
    else:
        d = safe_unpickle(path)
        try:
            data, labels = np.asarray(_key(d, "data")), np.asarray(_key(d, "labels"))
        except KeyError as e:
            raise DataError(f"{path}: malformed ImageNet32 batch (missing key {e})") from None
    labels = check_labels(labels, path, 1000, base=1)  # stored 1-based
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: malformed ImageNet32 batch (data {data.dtype} {data.shape}, {labels.shape[0]} labels)")
    side = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * side * side != data.shape[1]:
        raise DataError(f"{path}: rows of {data.shape[1]} values are not 3 x S x S images")
    return data.reshape(-1, 3, side, side), labels


def _load_imagenet32(root: Path) -> Tuple[ArrayDataset, ArrayDataset, str]:
    dirs = _imagenet32_dirs(root)
    train_paths = []
    for i in range(1, 11):
        p = _find_file(dirs, [f"train_data_batch_{i}", f"train_data_batch_{i}.npz"])
        if p is None:
            if i == 1:
                train_paths = None
            break
        train_paths.append(p)
    val = _find_file(dirs, ["val_data", "val_data.npz"])
    if not train_paths or val is None:
        raise DataError(
            "ImageNet32 not found: looked for train_data_batch_1..10 and val_data (or .npz) in "
            f"{', '.join(str(d) for d in dirs)}; download Imagenet32_train and Imagenet32_val "
            "(registration at image-net.org, 'downsampled ImageNet 32x32') and unpack them there")
    if len(train_paths) < 10:
        print(f"note: ImageNet32: using {len(train_paths)} of 10 training batches", flush=True)
    parts = [_imagenet_batch(p) for p in train_paths]
    for p, part in zip(train_paths, parts):
        if part[0].shape[1:] != parts[0][0].shape[1:]:
            raise DataError(f"{p}: images of shape {tuple(part[0].shape[1:])}, but {train_paths[0]} holds "
                            f"{tuple(parts[0][0].shape[1:])}")
    n = sum(p[0].shape[0] for p in parts)
    x = np.empty((n,) + parts[0][0].shape[1:], dtype=np.uint8)
    y = np.empty((n,), dtype=np.int64)
    i = 0
    for a, b in parts:
        x[i:i + a.shape[0]] = a
        y[i:i + a.shape[0]] = b
        i += a.shape[0]
    del parts
    vx, vy = _imagenet_batch(val)
    return (ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), str(train_paths[0])),
            ArrayDataset(torch.from_numpy(vx), torch.from_numpy(vy), str(val)), str(train_paths[0].parent))


def _load_fake(cfg: TrainConfig, c: int, s: int, k: int) -> Tuple[ArrayDataset, ArrayDataset, str]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for n in (cfg.fake_train_size, cfg.fake_test_size):
        labels = torch.randint(0, k, (n,), generator=g)
        images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.int64).to(torch.uint8)
        out.append(ArrayDataset(images, labels))
    return out[0], out[1], "synthetic"


def _download(name: str, root: Path):
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100}.get(name)
    if cls is None:
        raise DataError(f"{name} cannot be downloaded automatically; see train/data.py for where to put it")
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 -- network errors come in many types
        raise DataError(f"downloading {name} into {root} failed ({type(e).__name__}: {e}); "
                        f"check the network or place the files there by hand") from None


def load_datasets(cfg: TrainConfig) -> Tuple[ArrayDataset, ArrayDataset, DataInfo]:
    """Load the training and test sets named by ``cfg.dataset``; raises DataError when absent."""
    name = cfg.dataset
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; available: {', '.join(DATASETS)}")
    c, s, k, mean, std, aug = DATASETS[name]
    root = Path(cfg.data_root).expanduser()
    scale = 1.0 / 255.0
    if name == "digits":
        train, test, source = _load_digits()
        scale = 1.0 / 16.0
    elif name == "fake":
        c = cfg.in_channels or c
        s = cfg.image_size or s
        k = cfg.num_classes or k
        train, test, source = _load_fake(cfg, c, s, k)
    else:
        if cfg.download:
            _download(name, root)
        if not root.exists():
            raise DataError(f"data folder {root} does not exist (data set {name}); set data_root=DIR "
                            f"or pass download=true" + ("" if name != "imagenet32" else
                                                        " (ImageNet32 must be downloaded by hand)"))
        if name in ("mnist", "fashion_mnist"):
            folder = "MNIST" if name == "mnist" else "FashionMNIST"
            train, test, source = _load_mnist_like(root, folder, "MNIST" if name == "mnist" else "Fashion-MNIST")
        elif name in ("cifar10", "cifar100"):
            train, test, source = _load_cifar(root, name)
        else:
            train, test, source = _load_imagenet32(root)
    if train.images.shape[1:] != (c, s, s):
        raise DataError(f"{train.source or source}: images of shape {tuple(train.images.shape[1:])}, "
                        f"expected {(c, s, s)}")
    if test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"{test.source or source}: test images of shape {tuple(test.images.shape[1:])}, but the "
                        f"training images are {tuple(train.images.shape[1:])}")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{source}: empty training or test set")
    train = train.subset(cfg.train_subset)
    test = test.subset(cfg.test_subset)
    if mean is None or not cfg.normalize:
        mean, std = (0.0,) * c, (1.0,) * c
    info = DataInfo(name=name, num_classes=k, in_channels=c, image_size=s, scale=scale,
                    mean=tuple(mean), std=tuple(std),
                    augment=aug if cfg.augment is None else bool(cfg.augment), source=source)
    return train, test, info


# ------------------------------------------------------------------------------------------
# batching, augmentation, sharding
# ------------------------------------------------------------------------------------------
def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` zero padding + random horizontal flip, on a uint8 batch."""
    b, c, h, w = x.shape
    dev = x.device
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (off[0][:, None] + torch.arange(h)[None]).to(dev)        # [B, H]
    cols = (off[1][:, None] + torch.arange(w)[None])                # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(dev)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class Preprocess:
    """uint8 batch -> float batch: optional augmentation, scaling to [0,1], normalisation."""

    def __init__(self, info: DataInfo, device, dtype=torch.float32):
        self.scale = info.scale
        self.mean = torch.tensor(info.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.dtype = dtype
        self.device = device

    def __call__(self, x_u8: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is not None:
            x_u8 = augment_batch(x_u8, generator)
        x = x_u8.to(self.device, non_blocking=True).to(self.dtype) * self.scale
        return (x - self.mean) / self.std


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A deterministic 63-bit seed for the augmentation of one batch."""
    h = (seed * 1_000_003 + epoch) * 1_000_033 + step
    h = h * 1_009 + rank
    return (h * 0x9E3779B97F4A7C15) % (2 ** 63 - 1)


class TrainBatches:
    """Deterministic, resumable sharded batches of the training set.

    The order of epoch ``e`` comes from ``DistributedSampler(seed=seed).set_epoch(e)`` (with
    one replica when not distributed), so it depends only on (seed, epoch); resuming at
    (epoch, step) skips the first ``step`` batches without loading them.  With W processes
    and a global batch B each rank takes B/W samples: rank r's samples at step i sit at
    positions ``j*W + r`` (i*B/W <= j < (i+1)*B/W) of the same permutation, so the union over
    ranks of one global step is exactly the single-process batch of that step.
    """

    def __init__(self, dataset: ArrayDataset, global_batch: int, world: int, rank: int, seed: int,
                 drop_last: bool = True):
        from torch.utils.data.distributed import DistributedSampler

        if global_batch % world:
            raise UserError(f"batch_size={global_batch} is not divisible by the {world} processes")
        self.dataset = dataset
        self.batch = global_batch // world
        self.world, self.rank, self.seed = world, rank, seed
        self.sampler = DistributedSampler(range(len(dataset)), num_replicas=world, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        per_rank = self.sampler.num_samples
        self.steps_per_epoch = per_rank // self.batch if drop_last else -(-per_rank // self.batch)
        if self.steps_per_epoch == 0:
            raise UserError(f"training set of {len(dataset)} samples is smaller than one batch of {global_batch}")

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.long)
        for step in range(start_step, self.steps_per_epoch):
            sel = idx[step * self.batch:(step + 1) * self.batch]
            yield step, self.dataset.images[sel], self.dataset.labels[sel]


def shard_test_set(dataset: ArrayDataset, world: int, rank: int) -> ArrayDataset:
    """Rank ``rank``'s disjoint share of the test set (no padding: counts add up exactly)."""
    if world == 1:
        return dataset
    return ArrayDataset(dataset.images[rank::world], dataset.labels[rank::world])
