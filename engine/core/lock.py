"""Exclusive locks between processes: ``fcntl.flock`` on a lock file, released when the holder exits (even by
kill -9), so a crashed holder never blocks the next run."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError


def _holder(handle) -> str:
    handle.seek(0)
    pid = handle.read().strip()
    return f"pid {pid}" if pid else "another process"


@contextmanager
def exclusive(path: Path, what: str, timeout_s: float = 0.0,
              on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs. Another holder: wait up to
    ``timeout_s`` seconds (``on_wait`` is told once who holds it), then a UserError naming ``what`` and the holder."""
    with open(path, "a+") as handle:
        deadline, told = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(f"{what} is in use by {_holder(handle)} (lock {path})") from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for {_holder(handle)}, which holds {what} (at most {timeout_s:g} s)")
                    told = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
