"""The training checkpoint: one type that train, eval, export and the default-teacher command read and write.

A checkpoint is ``logs/<name>/checkpoints/epoch_K.pt`` or ``epoch_latest.pt`` (open_clip's names), a dict saved
with ``torch.save`` that loads with ``weights_only=True`` (RNG states as tensors and plain values): the run's
``config`` (TrainConfig as a dict), ``model`` (the student's open_clip name), ``state_dict`` (the student's
weights), the optimizer, scaler and loss module's states, the counters, and the RNG streams. Writes are atomic
(engine.core.io), and a checkpoint whose weights are not finite is never written: a good file is only ever
replaced by a good one.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.factory import describe_unloadable

from .errors import CheckpointError, NonFiniteLossError
from .io import atomic_torch_save

LATEST = "epoch_latest.pt"
STUDENT_KEYS = ("config", "model", "state_dict")  # what eval, export and the teacher's record read
RESUME_KEYS = STUDENT_KEYS + ("optimizer", "step")  # what resuming reads besides


def read_torch_file(path: str | os.PathLike, flag: str, mmap: bool = False):
    """Whatever ``path`` holds as a weights-only torch file; anything else (a text file, a shard, an image, a file
    cut short) is a one-line CheckpointError naming ``flag`` and what the file is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises several types for files that are not checkpoints
        raise CheckpointError(f"{flag} {path}: not a checkpoint file ({describe_unloadable(path, exc)})") from exc


def non_finite_weight(state_dict: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or Inf, else None."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


@dataclass
class Checkpoint:
    """A training checkpoint of engine.train: ``content`` is the saved dict; the properties are what readers use."""

    path: Path
    content: dict

    @property
    def model(self) -> str:
        return self.content["model"]

    @property
    def config(self) -> dict:
        return self.content["config"]

    @property
    def state_dict(self) -> dict:
        return self.content["state_dict"]

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str = "--resume", mmap: bool = False,
             required: tuple[str, ...] = RESUME_KEYS) -> "Checkpoint":
        """Read and check a training checkpoint holding the ``required`` entries; anything else is a one-line
        CheckpointError naming ``flag``. ``mmap``: the tensors are mapped, not read (enough to look at the
        config)."""
        content = read_torch_file(path, flag, mmap)
        missing = [key for key in required if not isinstance(content, dict) or key not in content]
        if missing:
            raise CheckpointError(f"{flag} {path}: not a training checkpoint of engine.train (no {', '.join(missing)}:"
                                  f" a model or teacher weights file? teacher weights go in --teacher-pretrained; "
                                  f"expected logs/<name>/checkpoints/epoch_latest.pt or epoch_K.pt)")
        if not isinstance(content["model"], str):
            raise CheckpointError(f"{flag} {path}: 'model' should be an open_clip model name, got "
                                  f"{type(content['model']).__name__}")
        weights = content["state_dict"]
        if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
            raise CheckpointError(f"{flag} {path}: 'state_dict' is not a non-empty mapping of tensors")
        return cls(Path(path), content)

    def require_finite(self, flag: str) -> None:
        name = non_finite_weight(self.state_dict)
        if name is not None:
            raise CheckpointError(f"{flag} {self.path}: weight {name} holds NaN or infinite values (from a diverged "
                                  f"run?)")

    @staticmethod
    def save(content: dict, path: Path) -> None:
        """Write atomically; refuse weights that are not finite (the file there, if any, stays as it was)."""
        name = non_finite_weight(content["state_dict"]) or non_finite_weight(content.get("loss_state_dict", {}))
        if name is not None:
            raise NonFiniteLossError(f"not saving {path}: weight {name} is not finite; the file there, if any, is the "
                                     f"last good state")
        atomic_torch_save(content, path)


def resolve_resume(resume: Optional[str], checkpoint_dir: Path) -> Optional[Path]:
    """The checkpoint ``--resume`` names: ``latest`` is checkpoint_dir/epoch_latest.pt, anything else a file; one
    that does not exist is a CheckpointError saying where it looked (a run must never start over silently)."""
    if resume is None:
        return None
    if resume == "latest":
        path = checkpoint_dir / LATEST
        if not path.exists():
            raise CheckpointError(f"--resume latest: no {LATEST} in {checkpoint_dir}; {runs_beside(checkpoint_dir)}")
        return path
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume: checkpoint {resume} does not exist")
    return Path(resume)


def runs_beside(checkpoint_dir: Path) -> str:
    """The resumable runs in the --logs folder of ``checkpoint_dir`` (logs/<name>/checkpoints), for messages."""
    logs = checkpoint_dir.parent.parent
    names = sorted(p.parent.parent.name for p in logs.glob(f"*/checkpoints/{LATEST}"))
    if not names:
        return f"no run under {logs} has a checkpoint to resume"
    return f"runs under {logs} that can be resumed (--name): {', '.join(names[-10:])}"


def resumable(logs: str, name: str) -> Optional[str]:
    """``"latest"`` when the run ``logs/name`` has a checkpoint, else None: for callers that start or resume."""
    return "latest" if (Path(logs) / name / "checkpoints" / LATEST).exists() else None


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
