"""Fused CPU kernels of the analog simulation (``fused.c``), compiled on first use.

Reads. A tile read is a matrix product wrapped in a dozen element-wise passes (noise
management, DAC, output noise, ADC bound and quantisation, scaling back) and one Gaussian draw
per output. On the CPU those passes and torch's Mersenne-Twister normal draws (about 3.4 ns each)
cost two to three times the product itself. ``fused.c`` does them in two passes (a prologue
before the product, an epilogue after it) with its own normal draws (a 256-layer ziggurat on
xoshiro256++ streams, about 2 ns each).

Pulse bits. The pulsed update draws one uniform number per bit slot, sample and input / output
(``ffebm.analog.pulses.sample_bits``); the kernel draws them from the same kind of streams and
writes the signed bits in one pass.

Every draw is seeded from the tile's ``torch.Generator`` (one number of it per call), so seeds,
checkpoints and resumes work as before, and the numbers do not depend on the thread count.

The C file is compiled with the system's C compiler (``$CC``, else ``cc``) into a per-user cache
(``$FFEBM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ffebm/kernels``, else ``~/.cache/ffebm/kernels``),
named by a hash of the source, the flags, the compiler and the machine, and loaded with
:mod:`ctypes` (no torch headers, so a build takes about a second). Without a working compiler
everything stays on the torch path (one warning says why).

Which path is used: :func:`set_cpu_kernels` (``"auto"``: fused for CPU float32 / float64 tensors
where the kernel builds; ``"torch"``: never; ``"fused"``: required, an error if it cannot be
built), or the environment variable ``FFEBM_CPU_KERNELS`` with the same values. Both paths
implement the same model; their random streams differ (each is reproducible from its seed).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional

__all__ = ["set_cpu_kernels", "cpu_kernels", "kernel_library", "KernelUnavailable", "CHOICES"]

CHOICES = ("auto", "torch", "fused")
_SOURCE = Path(__file__).with_name("fused.c")
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing",
          "-fno-trapping-math"]  # no FP traps: compares and selects vectorise

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None
_choice: Optional[str] = None


class KernelUnavailable(RuntimeError):
    """The fused CPU kernels were required (``"fused"``) but cannot be built or loaded."""


def _env_choice() -> str:
    v = os.environ.get("FFEBM_CPU_KERNELS", "auto").strip().lower() or "auto"
    if v not in CHOICES:
        raise ValueError(f"FFEBM_CPU_KERNELS={v!r} is not one of {', '.join(CHOICES)}")
    return v


def set_cpu_kernels(choice: Optional[str]) -> None:
    """Choose the CPU path of reads and pulse bits: ``"auto"`` (default), ``"torch"`` or ``"fused"`` (see the module
    docstring); None: back to ``$FFEBM_CPU_KERNELS`` (``"auto"`` when unset). ``"fused"`` builds
    the kernel now and raises :class:`KernelUnavailable` if it cannot."""
    global _choice
    if choice is None:
        _choice = None
        return
    if isinstance(choice, str):
        choice = choice.strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"read kernel {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "fused" and kernel_library() is None:
        raise KernelUnavailable(f"the fused CPU kernels cannot be used: {_failure}")
    _choice = choice


def cpu_kernels() -> str:
    """The path CPU reads and pulse bits take now: ``"fused"`` or ``"torch"``."""
    choice = _choice if _choice is not None else _env_choice()
    if choice == "torch":
        return "torch"
    if kernel_library() is not None:
        return "fused"
    if choice == "fused":
        raise KernelUnavailable(f"FFEBM_CPU_KERNELS=fused but the fused CPU kernels cannot be used: {_failure}")
    return "torch"


def _cache_dir() -> Path:
    if os.environ.get("FFEBM_KERNEL_CACHE"):
        return Path(os.path.expanduser(os.environ["FFEBM_KERNEL_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.expanduser(base)) / "ffebm" / "kernels"


def _compiler() -> Optional[List[str]]:
    """The compiler command: ``$CC`` (split like a shell word list: ``ccache gcc`` works), else
    ``cc``, else ``gcc``; None when none is found."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            words = shlex.split(cc)
        except ValueError as e:  # an unclosed quote, say
            raise RuntimeError(f"$CC={cc!r} cannot be split into a command: {e}") from None
        exe = shutil.which(words[0]) if words else None
        return [exe, *words[1:]] if exe else None
    exe = shutil.which("cc") or shutil.which("gcc")
    return [exe] if exe else None


def _no_compiler_message() -> str:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return f"$CC={cc!r} is not an executable compiler"
    return "no C compiler found (install gcc or clang, or set $CC)"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is the library its build wrote (the digest recorded next to it): a file
    cut short (a full disk, a killed copy) would crash the process that maps it (SIGBUS)."""
    record = target.with_suffix(".sha256")
    try:
        return target.is_file() and record.read_text().strip() == _digest(target)
    except OSError:
        return False


def _build(cc: List[str]) -> Path:
    src = _SOURCE.read_bytes()
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`{' '.join(cc)} --version` failed: {e}") from None
    key = hashlib.sha256(src + " ".join([*cc[1:], *_FLAGS]).encode() + version + platform.machine().encode()
                         + platform.platform().encode() + sys.version.encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"fused-{key}.so"
    if _intact(target):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    # build into a temporary name and rename: concurrent processes (torchrun) never load half a
    # file; the digest is written first and checked before every load
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        cmd = [*cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`{' '.join(cmd)}` did not finish within 120 s") from None
        if r.returncode != 0:
            out = (r.stderr or r.stdout).strip()[-600:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit code {r.returncode})" + (f": {out}" if out else ""))
        digest = _digest(Path(tmp))
        record_tmp = tmp + ".sha256"
        Path(record_tmp).write_text(digest + "\n")
        os.replace(record_tmp, target.with_suffix(".sha256"))
        os.replace(tmp, target)
    finally:
        for t in (tmp, tmp + ".sha256"):
            if os.path.exists(t):
                os.unlink(t)
    return target


def _remove_leftovers(folder: Path, age_s: float = 3600.0) -> None:
    """Temporary files of builds killed part-way (older than an hour: not a build running now)."""
    now = time.time()
    for f in folder.glob("*.so.tmp*"):
        try:
            if now - f.stat().st_mtime > age_s:
                f.unlink()
        except OSError:
            pass


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u64, d, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_double, ctypes.c_int
    lib.ffebm_init.restype = i
    for sfx in ("f32", "f64"):
        f = getattr(lib, f"ffebm_prologue_{sfx}")
        f.argtypes, f.restype = [p, p, p, p, i64, i64, i64, d, d, i, i, i, i], None
        f = getattr(lib, f"ffebm_epilogue_{sfx}")
        f.argtypes, f.restype = [p, p, i64, i64, i64, d, u64, d, d, d, p, i], i64
        f = getattr(lib, f"ffebm_bits_{sfx}")
        f.argtypes, f.restype = [p, p, p, p, p, i64, i64, i64, u64, i], None
        f = getattr(lib, f"ffebm_absmax_{sfx}")
        f.argtypes, f.restype = [p, p, i64, i64, i], None


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
                raise RuntimeError(_no_compiler_message())
            path = _build(cc)
            try:
                lib = ctypes.CDLL(str(path))
                _declare(lib)
            except (OSError, AttributeError):
                # not our library after all (replaced by hand, say): build it again, once
                path.unlink(missing_ok=True)
                path.with_suffix(".sha256").unlink(missing_ok=True)
                lib = ctypes.CDLL(str(_build(cc)))
                _declare(lib)
            lib.ffebm_init()
            _lib = lib
        except Exception as e:  # any failure leaves the torch path in place
            _failure = str(e) or type(e).__name__
            if (_choice or _env_choice()) == "auto":  # "fused" raises where it is asked for
                warnings.warn(f"ffebm: the fused analog CPU kernels are unavailable, reads and pulses use "
                              f"the torch path ({_failure})", RuntimeWarning, stacklevel=2)
    return _lib


# ----------------------------------------------------------------------------------------------
# torch-facing calls (CPU tensors, float32 / float64, contiguous)
# ----------------------------------------------------------------------------------------------
import torch  # noqa: E402  (below the build machinery, which does not need it)
from torch import Tensor  # noqa: E402

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_FNS: dict = {}  # dtype -> (prologue, epilogue, bits, absmax) of the loaded library


def _functions(dtype: torch.dtype):
    fns = _FNS.get(dtype)
    if fns is None:
        sfx = _SUFFIX[dtype]
        fns = _FNS[dtype] = tuple(getattr(_lib, f"ffebm_{k}_{sfx}")
                                  for k in ("prologue", "epilogue", "bits", "absmax"))
    return fns


def _fused_enabled() -> bool:
    # the hot check of every read: the environment's plain values and a loaded library decide
    # without the normalisation and build of cpu_kernels()
    c = _choice if _choice is not None else os.environ.get("FFEBM_CPU_KERNELS", "auto")
    if c == "torch":
        return False
    if _lib is not None and c in CHOICES:
        return True
    return cpu_kernels() == "fused"


def supports(t: Tensor, generator: Optional[torch.Generator] = None) -> bool:
    """Whether a read of ``t`` may take the fused path now: a CPU float32 / float64 tensor, a CPU
    generator (or none), the path chosen (:func:`cpu_kernels`) and the library loaded."""
    return (t.device.type == "cpu" and t.dtype in _SUFFIX
            and (generator is None or generator.device.type == "cpu")
            and _fused_enabled())


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """One 63-bit seed from ``generator`` (torch's global RNG if None): each fused draw advances
    the tile's generator by one number, so seeds, checkpoints and forks of it keep working."""
    return int(torch.randint(0, 2 ** 63 - 1, (), generator=generator))


def prologue(x3: Tensor, step: float, bound: float, absmax: bool, quant: bool):
    """``(q, alpha)`` of the input vectors of ``x3`` [B, F, L] (contiguous): ``alpha`` [B, L]
    the noise-management scale, ``q = round(clamp(x (1 / alpha) / step, +-bound / step))``."""
    B, F, L = x3.shape
    if B * F * L == 0:
        raise ValueError(f"prologue: empty input {list(x3.shape)} (the caller reads empty batches itself)")
    q = torch.empty_like(x3)
    ar = torch.empty(2, B, L, dtype=x3.dtype)  # alpha and (1 / alpha) / step
    clamp = 0.0 < bound < float("inf")
    _functions(x3.dtype)[0](x3.data_ptr(), q.data_ptr(), ar[0].data_ptr(), ar[1].data_ptr(), B, F, L,
                            float(step), float(bound) if clamp else 0.0, int(absmax), int(clamp), int(quant),
                            torch.get_num_threads())
    return q, ar[0]


def epilogue(y3: Tensor, alpha: Tensor, std: float, generator: Optional[torch.Generator],
             bound: float, qscale: float, unit: float, want_clipped: bool):
    """In place on ``y3`` [B, F, L] (contiguous): add ``std`` normal noise, clip to ``+-bound``
    (``inf``: none), quantise ``round(y qscale)`` (``qscale`` 0: none) and multiply by
    ``alpha * unit``. Returns the [B, L] bool mask of vectors that reached the bound, or None
    when none did (or ``want_clipped`` is False)."""
    B, F, L = y3.shape
    if B * F * L == 0:
        return None
    mask = torch.empty(B, L, dtype=torch.uint8) if want_clipped else None
    n = _functions(y3.dtype)[1](y3.data_ptr(), alpha.data_ptr(), B, F, L, float(std),
                                draw_seed(generator) if std > 0 else 0,
                                float(bound) if bound != float("inf") else 0.0, float(qscale), float(unit),
                                mask.data_ptr() if mask is not None else None, torch.get_num_threads())
    return mask.bool() if (mask is not None and n > 0) else None


def bits(p: Tensor, bl: Tensor, L: int, generator: Optional[torch.Generator], sign: Optional[Tensor]) -> Tensor:
    """Pulse bits [B, L, n] of :func:`ffebm.analog.pulses.sample_bits`: ``sign`` ([B, n], or 1)
    where a uniform draw is below ``p`` [B, n] in the slots ``t < bl[b]``, 0 elsewhere; in
    ``p``'s dtype."""
    B, n = p.shape
    if B * n * L == 0:
        return p.new_zeros(B, L, n)
    p = p.contiguous()
    s = sign.to(p.dtype).contiguous() if sign is not None else None
    bl = bl.to(torch.int64).contiguous()
    out = torch.empty(B, L, n, dtype=p.dtype)
    _functions(p.dtype)[2](p.data_ptr(), s.data_ptr() if s is not None else None, None, bl.data_ptr(),
                           out.data_ptr(), B, L, n, draw_seed(generator), torch.get_num_threads())
    return out


def value_bits(v: Tensor, scale: Tensor, bl: Tensor, L: int, generator: Optional[torch.Generator]) -> Tensor:
    """:func:`bits` with probabilities ``min(scale_b |v_bj|, 1)`` (0 where NaN) and signs
    ``sign(v_bj)`` formed in the kernel from the values ``v`` [B, n] and per-sample ``scale`` [B]."""
    B, n = v.shape
    if B * n * L == 0:
        return v.new_zeros(B, L, n)
    v = v.contiguous()
    sc = scale.to(v.dtype).contiguous()
    bl = bl.to(torch.int64).contiguous()
    out = torch.empty(B, L, n, dtype=v.dtype)
    _functions(v.dtype)[2](v.data_ptr(), None, sc.data_ptr(), bl.data_ptr(), out.data_ptr(), B, L, n,
                           draw_seed(generator), torch.get_num_threads())
    return out


def row_abs_max(v: Tensor) -> Tensor:
    """``max_j |v_bj|`` of each row of ``v`` [B, n] (NaN where a row has one)."""
    B, n = v.shape
    if B * n == 0:
        return v.new_zeros(B)
    v = v.contiguous()
    out = torch.empty(B, dtype=v.dtype)
    _functions(v.dtype)[3](v.data_ptr(), out.data_ptr(), B, n, torch.get_num_threads())
    return out
