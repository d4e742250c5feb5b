"""Atomic writes and write checks: one temporary-name pattern for every file the engine writes, and its sweep.

Every output (checkpoint, manifest, shard, store part, metrics, export) is written to ``.<name>.tmp<pid>`` beside
its final path and renamed into place, so a reader only ever sees the old or the new complete file. A killed
process leaves its temporary behind; ``sweep_temporaries`` removes those of processes that are no longer alive
(never a live process's, so concurrent runs and torchrun ranks can share a folder).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .errors import WriteError

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: os.umask can only be read by setting it
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)")
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                      errno.EISDIR, errno.ENOENT)


def temp_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries (files or folders) that dead processes left in ``folder``; returns what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp*")) if Path(folder).is_dir() else []:
        match = TEMP_NAME.fullmatch(path.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_failure(path: Path, exc: BaseException, tmp: Path | None = None) -> str:
    """Why writing ``path`` failed, in words (torch reports a full disk as an internal zip-writer assertion)."""
    folder = (tmp or path).parent
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        folder.is_dir() and shutil.disk_usage(folder).free < FULL_DISK_BYTES)
    if full:
        return "no space left on the device"
    return getattr(exc, "strerror", None) or " ".join(str(exc).split())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file") -> Path:
    """``write(tmp)`` then rename onto ``path``; a failed write removes the temporary and raises WriteError naming
    ``path`` (the previous file there, if any, is intact)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~UMASK)  # an ordinary file's permissions (safetensors creates it private)
        os.replace(tmp, path)
    except BaseException as exc:
        reason = write_failure(path, exc, tmp) if isinstance(exc, (OSError, RuntimeError)) else None
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if reason is None:  # interrupted, or the writer's own error: not a failed write
            raise
        # torch.save reports a failed write as RuntimeError
        raise WriteError(f"could not write {what} {path}: {reason}; the previous file there, if any, is intact") \
            from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def atomic_write_json(path: str | os.PathLike, obj, what: str = "file", indent: int = 1, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n", what)


def atomic_torch_save(obj, path: str | os.PathLike, what: str = "checkpoint") -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), what)


def check_writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and write a probe file in it; a WriteError naming ``flag`` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-probe")
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(f"{flag}: cannot write in {folder} ({exc.strerror or exc})") from exc


def is_environment_error(exc: BaseException) -> bool:
    """An OSError the user's environment caused (full disk, read-only or missing folder), not a bug."""
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def check_writable_file(output: Path, flag: str) -> None:
    """Refuse an output file that could not be written, before the work that produces it: a folder, a missing or
    read-only folder, a read-only file."""
    if output.is_dir():
        raise WriteError(f"{flag} {output}: is a folder; name a file, e.g. {output / 'metrics.json'}")
    folder = output.parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise WriteError(f"{flag} {output}: {folder} {state}")
    probe = temp_path(output)
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WriteError(f"{flag} {output}: cannot write in {folder} ({exc.strerror})") from exc
    if output.exists() and not os.access(output, os.W_OK):
        raise WriteError(f"{flag} {output}: the file is read-only")
