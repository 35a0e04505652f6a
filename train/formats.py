"""Reading the data sets' file formats safely: MNIST's idx files, the pickled batches of CIFAR and
ImageNet32 (through a restricted unpickler that only rebuilds numpy arrays: a tampered file cannot
run code), their ``.npz`` variants (``allow_pickle=False``), and the label checks every reader applies.
A malformed file raises :class:`DataError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import gzip
import importlib
import io
import math
import pickle
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .config import UserError


class DataError(UserError):
    pass


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
