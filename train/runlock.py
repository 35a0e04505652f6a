"""One process per run folder: an exclusive lock held for the life of the trainer.

``RUN/.lock`` is locked with ``fcntl.flock`` (released by the kernel when the process dies, so a
lock left by a killed trainer is taken over safely) and holds the owner's pid, which a second
trainer, ``--resume`` or a writing ``train.evaluate`` names when it refuses the folder. The
file is removed on release (after taking a lock, the holder checks that the file it locked is
still the one at the path, so removal cannot let two processes in). Where
``fcntl`` is missing the lock file is created exclusively and a stale one (its pid no longer
running) is taken over.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional

from .config import UserError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


class RunFolderUnwritable(UserError):
    """The run folder cannot be created or written."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolderLock:
    """Exclusive, process-lifetime lock of ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self) -> "RunFolderLock":
        if fcntl is not None:
            while True:
                if self.path.is_symlink():  # a shipped link would make us truncate its target
                    raise RunFolderUnwritable(f"{self.path} is a symbolic link; refusing to use it as a lock")
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                except OSError as e:
                    raise RunFolderUnwritable(f"cannot create lock {self.path}: {e.strerror or e}") from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise RunFolderBusy(f"{self.run_dir} is in use by pid {self._owner()} (another trainer, "
                                            "resume or evaluation writing to it); wait for it or choose another "
                                            "folder") from None
                    raise
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    # a FIFO, device or a hard link to a file elsewhere: never truncate it
                    os.close(fd)
                    raise RunFolderUnwritable(f"{self.path} is not a plain file of this folder (a special file or a "
                                              "hard link); refusing to use it as a lock")
                # the holder we waited on may have removed the file on release: lock the file
                # that is at the path now, not an orphan
                try:
                    same = os.path.samestat(st, os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
        else:  # pragma: no cover - non-POSIX fallback
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                    break
                except FileExistsError:
                    owner = self._owner()
                    if owner.isdigit() and _pid_alive(int(owner)):
                        raise RunFolderBusy(f"{self.run_dir} is in use by pid {owner}") from None
                    self.path.unlink(missing_ok=True)  # stale: its owner is gone
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (a run folder keeps no trace of it) and drop the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(run_dir: Path) -> None:
    """Write and remove a probe file: a read-only or full folder fails here, before any work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=str(run_dir))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunFolderUnwritable(f"cannot write to {run_dir}: {e.strerror or e}") from None


#: what a run writes before its first checkpoint: without a checkpoint beside them they are not worth keeping
PRE_CHECKPOINT = (LOCK_FILE, "config.json", "tb", "failure.json")


def _ours_before_a_checkpoint(p: Path) -> bool:
    return p.name in PRE_CHECKPOINT or (p.name.startswith(".") and p.name.endswith(".tmp"))


class ClaimedRunFolder:
    """The run folder of this process: created if needed, locked, checked writable. ``release(failed=True)``
    unlocks it and, if the folder was new (created by this process, or empty) and holds no checkpoint,
    removes what the run wrote into it (and the folder itself if this process created it): a run that
    fails before its first checkpoint leaves nothing behind; one that fails later keeps its last good
    checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.created = False
        self.fresh = False
        self.lock = RunFolderLock(self.run_dir)

    def claim(self) -> "ClaimedRunFolder":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunFolderUnwritable(f"{self.run_dir} exists and is not a folder")
        if not self.run_dir.exists():
            try:
                self.run_dir.mkdir(parents=True)
            except OSError as e:
                raise RunFolderUnwritable(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from None
            self.created = True
        else:  # an empty folder, or one left by a trainer killed before it wrote anything (lock, temp files)
            self.fresh = all(p.name == LOCK_FILE or (p.name.startswith(".") and p.name.endswith(".tmp"))
                             for p in self.run_dir.iterdir())
        self.fresh = self.fresh or self.created
        try:
            check_writable(self.run_dir)
            self.lock.acquire()
        except BaseException:
            self._remove_unfinished()
            raise
        return self

    def _remove_unfinished(self) -> None:
        if not self.fresh:
            return
        try:
            entries = list(self.run_dir.iterdir())
        except OSError:
            return
        if not all(_ours_before_a_checkpoint(p) for p in entries):
            return  # a checkpoint (or anything else) is there: keep the folder as it is
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for p in entries:
            if p.name == LOCK_FILE:
                continue  # removed by the lock's release
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failure before the first checkpoint, leave no half-made folder behind."""
        if failed:
            self._remove_unfinished()
        self.lock.release()


class Terminated(BaseException):
    """SIGTERM outside the training loop (setup, writing the run folder): unwinds like Ctrl-C, so the
    run folder is released (and removed if nothing was trained) instead of the process dying at once."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


class TerminateRaises:
    """Context manager: while it is active (and the training loop's :class:`SignalCatcher` is not),
    SIGTERM raises :class:`Terminated` in the main thread."""

    def __init__(self):
        self._old: Optional[Any] = None

    @staticmethod
    def _raise(signum, frame):
        raise Terminated(signum)

    def __enter__(self) -> "TerminateRaises":
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
