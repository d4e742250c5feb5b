"""Checkpoints: atomic writes (temp file + os.replace), ``epoch_K.pt`` and ``epoch_latest.pt`` (open_clip names)."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.factory import describe_unloadable

LATEST = "epoch_latest.pt"


TEMP_PATTERN = ".*.tmp*"
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file, then rename: ``path`` is always either the old or the new complete file.

    A failed write (full disk, read-only folder) removes its temporary file and raises OSError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        # torch's message for a full disk is an internal zip-writer assertion: say what happened instead
        full = tmp.exists() and shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES
        tmp.unlink(missing_ok=True)
        reason = "no space left on the device" if full else " ".join(str(exc).split())
        raise OSError(f"could not write checkpoint {path}: {reason}; the previous file there, if any, is intact") \
            from exc


def remove_stale_temporaries(checkpoint_dir: Path) -> list[Path]:
    """Delete temporary files left by a killed run (never a complete checkpoint); returns what was removed."""
    stale = sorted(Path(checkpoint_dir).glob(TEMP_PATTERN))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rng_state() -> dict:
    """RNG states as tensors and plain Python values, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def resolve_resume(resume: Optional[str], checkpoint_dir: Path) -> Optional[Path]:
    """``latest`` -> checkpoint_dir/epoch_latest.pt if it exists (else None: a fresh start); a path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        path = checkpoint_dir / LATEST
        return path if path.exists() else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: checkpoint {resume} does not exist")
    return Path(resume)


def load(path: Path, mmap: bool = False) -> dict:
    """A training checkpoint of engine.train; anything else (text, shard, model weights) is a one-line error.
    ``mmap``: tensors are mapped, not read (enough to look at the config)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises several types for files that are not checkpoints
        raise ValueError(f"--resume {path}: not a checkpoint file ({describe_unloadable(path, exc)})") from exc
    required = ("config", "optimizer", "state_dict", "step")
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"--resume {path}: not a training checkpoint of engine.train (no {', '.join(missing)}: "
                         f"a model or teacher weights file? teacher weights go in --teacher-pretrained)")
    return state
