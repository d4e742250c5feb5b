"""One process builds a folder at a time: an exclusive ``flock`` on ``<folder>/.lock``, waited for with a message.

The embedded dataset and a teacher store are built by the first run that needs them; a second run (or command)
started meanwhile waits for that build, then finds the folder complete. The kernel releases the lock of a process
that dies, so a killed build never blocks the next one (which sweeps its temporaries and resumes).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BusyError

LOCK_NAME = ".lock"
DEFAULT_TIMEOUT = 3600.0  # seconds to wait for another process's build
POLL_SECONDS = 0.2
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem without flock (Lustre without -o flock)


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    """The pid the holder wrote in the lock file ("unknown" until it has)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def building(folder: str | os.PathLike, what: str, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold ``folder``'s build lock for the block (``folder`` must exist). Another process holding it is waited for,
    at most ``timeout`` seconds (a BusyError then), saying so once on stderr."""
    path = Path(folder) / LOCK_NAME
    with open(path, "ab", buffering=0) as handle:  # unbuffered: nothing left to flush when it is closed
        try:
            locked = _try_lock(handle)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            locked = None
        if locked is None:
            print(f"warning: {path}: the filesystem has no file locks; building {what} without one (do not start "
                  f"a second build of it meanwhile)", file=sys.stderr, flush=True)
            yield
            return
        if not locked:
            _wait(handle, path, what, timeout)
        with contextlib.suppress(OSError):  # a full disk: the lock holds without the pid that names its holder
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.truncate(0)  # released: no pid left to name
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait(handle, path: Path, what: str, timeout: float) -> None:
    holder = _holder(path)
    print(f"waiting for another process building {what} (pid {holder}), at most {timeout:g} s", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + timeout
    while not _try_lock(handle):
        if time.monotonic() > deadline:
            raise BusyError(f"{what}: another process (pid {_holder(path)}) is still building it after {timeout:g} s; "
                            f"let it finish, or stop it and run again (its build resumes)")
        time.sleep(POLL_SECONDS)


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs, or refuse at once: for something that belongs to one
    process (a training run's folder), where waiting would only run the same work twice. A BusyError names the
    holder's pid."""
    with open(path, "a+") as handle:
        try:
            locked = _try_lock(handle)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            locked = True  # no file locks on this filesystem: nothing can tell, so nothing is refused
        if not locked:
            raise BusyError(f"{what} is in use by another process (pid {_holder(path)}); wait for it to finish or "
                            f"pass another --name")
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
