"""Folder locks: one process at a time writes a study folder, a training run folder or a run.

A lock is a file (``FOLDER/.sparseslice.lock`` by default) held with ``fcntl.flock`` for as
long as the process works in the folder. The file records its holder as JSON (pid, host,
start time, command line), so that a refused process can name it. The kernel releases a
``flock`` when its process dies, however it dies (``kill -9`` too): the file a killed process
leaves behind is stale and the next process takes it over. A process that finishes removes
the file (and the folder, when it created the folder and left nothing in it).

A lock is per open file, not per process: a second :func:`hold` of the same file in the
same process is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from sparseslice.errors import UserError

#: Name of the lock file inside a locked folder.
LOCK_FILE = ".sparseslice.lock"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lock."""

    pid: int
    host: str
    started: float
    command: str = ""

    @classmethod
    def me(cls) -> Holder:
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else ""
        return cls(os.getpid(), socket.gethostname(), time.time(), command[:300])

    def running(self) -> bool | None:
        """Whether the holder's process still exists; ``None`` when it runs on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        text = f"pid {self.pid} on host {self.host} (since {since}"
        text += f", {self.command!r})" if self.command else ")"
        if self.running() is False:  # the lock is held, so a process it started inherited it
            text += ", not running any more: a process it started still holds the lock"
        return text


@dataclass
class Lock:
    """A held lock: its file and, when it was taken over from a killed process, that holder."""

    path: Path
    holder: Holder
    previous: Holder | None = None


@contextlib.contextmanager
def hold(folder: str | os.PathLike[str], *, what: str = "folder", name: str = LOCK_FILE,
         fix: str = "wait for it to finish, or stop that process") -> Iterator[Lock]:
    """Hold the lock of ``folder`` for the ``with`` block, creating the folder if needed.

    Parameters
    ----------
    folder : path
        The folder to lock; the lock file is ``folder / name``.
    what : str
        What the folder is, for the message (``"study folder"``, ``"run folder"``...).
    name : str
        Name of the lock file inside ``folder`` (several locks may share a folder).
    fix : str
        What a refused user should do.

    Yields
    ------
    Lock
        ``previous`` names the holder of a stale lock taken over (a process that was killed).

    Raises
    ------
    UserError
        Another process holds the lock (the message names its pid and host), or ``folder``
        cannot hold a lock file (a file, read-only).
    """
    folder = Path(folder)
    created = _make_folder(folder, what=what)
    path = folder / name
    try:
        fd, previous = _acquire(path, what=what, folder=folder, fix=fix)
    except BaseException:
        _remove_created(created)
        raise
    lock = Lock(path, Holder.me(), previous)
    try:
        if fd is not None:
            _write_holder(fd, lock.holder)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding: a process that opened the old file sees it is gone
        if fd is not None:
            os.close(fd)
        _remove_created(created)


def holds(argument: str, *, what: str) -> Callable[[F], F]:
    """Decorate a function so that it runs holding the lock of the folder given as ``argument``."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments[argument]
            with hold(folder, what=what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def remove_stale(folder: str | os.PathLike[str], *, name: str = LOCK_FILE) -> bool:
    """Remove the lock file ``folder / name`` that a killed process left, when no process holds it.

    A process killed after finishing its work but before removing its lock file leaves a
    stale file that nothing would take over (a rerun that finds the work done never locks it
    again). The file is locked first, so a lock still held is left alone.

    Returns
    -------
    bool
        Whether a stale lock file was removed.
    """
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a process (or no locks on this file system): not ours to remove
            return False
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            return False
        if same:  # while holding it, as a holder that finishes does
            path.unlink()
        return same
    finally:
        os.close(fd)


def read_holder(path: str | os.PathLike[str], *, tries: int = 10) -> Holder | None:
    """The holder recorded in a lock file; ``None`` when there is none (or it is unreadable).

    A holder writes its record just after locking: an empty read is retried ``tries`` times.
    """
    for _ in range(tries):
        try:
            record = json.loads(Path(path).read_text())
            return Holder(int(record["pid"]), str(record["host"]), float(record["started"]),
                          str(record.get("command", "")))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return None


def _acquire(path: Path, *, what: str, folder: Path, fix: str) -> tuple[int | None, Holder | None]:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # OSError: the CLI's one line
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(path)
            who = holder.describe() if holder else "another process (it has not recorded its pid yet)"
            raise UserError(f"{what} {str(folder)!r} is in use by {who}; {fix}") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warnings.warn(f"{what} {str(folder)!r} cannot be locked on this file system ({exc.strerror}); "
                          "going on without a lock: run one process at a time on it", stacklevel=4)
            os.close(fd)
            return None, None
        try:  # the file may have been removed (and maybe created anew) by a holder that just finished
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, read_holder(path, tries=1)  # what a killed holder left
        os.close(fd)


def _write_holder(fd: int, holder: Holder) -> None:
    data = (json.dumps(asdict(holder)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _make_folder(folder: Path, *, what: str) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} must be a folder, got {str(folder)!r} (a file); pass a new or existing folder")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)  # an OSError reaches the CLI's one-line form (argument, path, fix)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Remove the folders :func:`_make_folder` created, as long as they are empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return
