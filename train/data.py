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

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TrainConfig
from .formats import DataError, _cifar_batch, _imagenet_batch, _read_idx, check_labels


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
