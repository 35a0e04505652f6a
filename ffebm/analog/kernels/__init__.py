"""Fused CPU kernels of the analog read model (``read.c``), compiled on first use.

A tile read is a matrix product wrapped in a dozen element-wise passes (noise management, DAC,
output noise, ADC bound and quantisation, scaling back) and one Gaussian draw per output. On the
CPU those passes and torch's Mersenne-Twister normal draws (about 3.4 ns each) cost two to three
times the product itself. ``read.c`` does them in two passes (a prologue before the product, an
epilogue after it) with its own normal draws (a ziggurat on xoshiro256++ streams seeded from
the tile's ``torch.Generator``, about 1 ns each), so a read is the product plus two passes.

The C file is compiled with the system's C compiler (``$CC``, else ``cc``) into a per-user cache
(``$FFEBM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ffebm/kernels``, else ``~/.cache/ffebm/kernels``),
named by a hash of the source, the flags, the compiler and the machine, and loaded with
:mod:`ctypes` (no torch headers, so a build takes about a second). Without a working compiler
the reads stay on the torch path (one warning says why).

Which path reads use: :func:`set_read_kernel` (``"auto"``: fused on the CPU for float32 /
float64 where the kernel builds; ``"torch"``: never; ``"fused"``: required, an error if it
cannot be built), or the environment variable ``FFEBM_READ_KERNEL`` with the same values.
Both paths implement the same read model; their noise streams differ (each is reproducible from
the tile's seed).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["set_read_kernel", "read_kernel", "kernel_library", "KernelUnavailable", "CHOICES"]

CHOICES = ("auto", "torch", "fused")
_SOURCE = Path(__file__).with_name("read.c")
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing",
          "-fno-trapping-math"]  # no FP traps: compares and selects vectorise

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None
_choice: Optional[str] = None


class KernelUnavailable(RuntimeError):
    """The fused read kernel was required (``"fused"``) but cannot be built or loaded."""


def _env_choice() -> str:
    v = os.environ.get("FFEBM_READ_KERNEL", "auto").strip().lower() or "auto"
    if v not in CHOICES:
        raise ValueError(f"FFEBM_READ_KERNEL={v!r} is not one of {', '.join(CHOICES)}")
    return v


def set_read_kernel(choice: Optional[str]) -> None:
    """Choose the CPU read path: ``"auto"`` (default), ``"torch"`` or ``"fused"`` (see the module
    docstring); None: back to ``$FFEBM_READ_KERNEL`` (``"auto"`` when unset). ``"fused"`` builds
    the kernel now and raises :class:`KernelUnavailable` if it cannot."""
    global _choice
    if choice is None:
        _choice = None
        return
    if choice not in CHOICES:
        raise ValueError(f"read kernel {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "fused" and kernel_library() is None:
        raise KernelUnavailable(f"the fused read kernel cannot be used: {_failure}")
    _choice = choice


def read_kernel() -> str:
    """The path CPU reads take now: ``"fused"`` or ``"torch"``."""
    choice = _choice if _choice is not None else _env_choice()
    if choice == "torch":
        return "torch"
    if kernel_library() is not None:
        return "fused"
    if choice == "fused":
        raise KernelUnavailable(f"FFEBM_READ_KERNEL=fused but the kernel cannot be used: {_failure}")
    return "torch"


def _cache_dir() -> Path:
    if os.environ.get("FFEBM_KERNEL_CACHE"):
        return Path(os.environ["FFEBM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ffebm" / "kernels"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or (shutil.which("gcc") if not os.environ.get("CC") else None)


def _build(cc: str) -> Path:
    src = _SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + version + platform.machine().encode()
                         + platform.platform().encode() + sys.version.encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"read-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # build into a temporary name and rename: concurrent processes (torchrun) never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-600:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u64, d, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_double, ctypes.c_int
    lib.ffebm_init.restype = i
    lib.ffebm_zig_top.restype = d
    for sfx in ("f32", "f64"):
        f = getattr(lib, f"ffebm_randn_{sfx}")
        f.argtypes, f.restype = [p, i64, u64, d, i], None
        f = getattr(lib, f"ffebm_prologue_{sfx}")
        f.argtypes, f.restype = [p, p, p, p, i64, i64, i64, d, d, i, i, i, i], None
        f = getattr(lib, f"ffebm_epilogue_{sfx}")
        f.argtypes, f.restype = [p, p, i64, i64, i64, d, u64, d, d, d, p, i], i64


def kernel_library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on the first call; None (with one warning giving
    the reason) when it cannot be built or loaded."""
    global _lib, _failure
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is not None or _failure is not None:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set $CC, or install gcc / clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            lib.ffebm_init()
            _lib = lib
        except Exception as e:  # any failure leaves the torch path in place
            _failure = str(e) or type(e).__name__
            if (_choice or _env_choice()) != "torch":
                warnings.warn(f"ffebm: the fused analog read kernel is unavailable, reads use the torch "
                              f"path ({_failure})", RuntimeWarning, stacklevel=2)
    return _lib


def _reset_for_tests() -> None:
    """Forget the loaded library and any failure (tests of the build and the fallback)."""
    global _lib, _failure, _choice
    _lib, _failure, _choice = None, None, None


# ----------------------------------------------------------------------------------------------
# torch-facing calls (CPU tensors, float32 / float64, contiguous)
# ----------------------------------------------------------------------------------------------
import torch  # noqa: E402  (below the build machinery, which does not need it)
from torch import Tensor  # noqa: E402

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def supports(t: Tensor, generator: Optional[torch.Generator] = None) -> bool:
    """Whether a read of ``t`` may take the fused path now: a CPU float32 / float64 tensor, a CPU
    generator (or none), the path chosen (:func:`read_kernel`) and the library loaded."""
    return (t.device.type == "cpu" and t.dtype in _SUFFIX
            and (generator is None or generator.device.type == "cpu")
            and read_kernel() == "fused")


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """One 63-bit seed from ``generator`` (torch's global RNG if None): each fused draw advances
    the tile's generator by one number, so seeds, checkpoints and forks of it keep working."""
    return int(torch.randint(0, 2 ** 63 - 1, (), generator=generator))


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def randn(shape, generator: Optional[torch.Generator], like: Tensor, std: float = 1.0) -> Tensor:
    """``N(0, std^2)`` draws of ``shape`` (ziggurat), seeded from ``generator``."""
    out = torch.empty(shape, dtype=like.dtype, device="cpu")
    fn = getattr(_lib, f"ffebm_randn_{_SUFFIX[like.dtype]}")
    fn(_ptr(out), out.numel(), draw_seed(generator), float(std), _threads())
    return out


def prologue(x3: Tensor, step: float, bound: float, absmax: bool, quant: bool):
    """``(q, alpha)`` of the input vectors of ``x3`` [B, F, L] (contiguous): ``alpha`` [B, L]
    the noise-management scale, ``q = round(clamp(x (1 / alpha) / step, +-bound / step))``."""
    B, F, L = x3.shape
    q = torch.empty_like(x3)
    alpha = torch.empty(B, L, dtype=x3.dtype)
    rinv = torch.empty(B, L, dtype=x3.dtype)
    clamp = bound > 0 and bound != float("inf")
    fn = getattr(_lib, f"ffebm_prologue_{_SUFFIX[x3.dtype]}")
    fn(_ptr(x3), _ptr(q), _ptr(alpha), _ptr(rinv), B, F, L, float(step), float(bound) if clamp else 0.0,
       int(absmax), int(clamp), int(quant), _threads())
    return q, alpha


def epilogue(y3: Tensor, alpha: Tensor, std: float, generator: Optional[torch.Generator],
             bound: float, qscale: float, unit: float, want_clipped: bool):
    """In place on ``y3`` [B, F, L] (contiguous): add ``std`` normal noise, clip to ``+-bound``
    (``inf``: none), quantise ``round(y qscale)`` (``qscale`` 0: none) and multiply by
    ``alpha * unit``. Returns the [B, L] bool mask of vectors that reached the bound, or None
    when none did (or ``want_clipped`` is False)."""
    B, F, L = y3.shape
    mask = torch.empty(B, L, dtype=torch.uint8) if want_clipped else None
    seed = draw_seed(generator) if std > 0 else 0
    fn = getattr(_lib, f"ffebm_epilogue_{_SUFFIX[y3.dtype]}")
    n = fn(_ptr(y3), _ptr(alpha), B, F, L, float(std), seed,
           float(bound) if bound != float("inf") else 0.0, float(qscale), float(unit),
           _ptr(mask) if mask is not None else None, _threads())
    return mask.bool() if (mask is not None and n > 0) else None
