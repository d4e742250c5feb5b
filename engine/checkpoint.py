"""Checkpoints: atomic writes (temp file + os.replace), ``epoch_K.pt`` and ``epoch_latest.pt`` (open_clip names)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

LATEST = "epoch_latest.pt"


def atomic_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
