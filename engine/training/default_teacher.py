"""Training the default teacher (tiny-vit-teacher) on the embedded dataset (the command: ``python -m engine.teacher``).

The package ships its result (``models/pretrained/tiny-vit-teacher.pt``, with ``tiny-vit-teacher.json`` recording its
evaluation and this command), so ordinary runs never train it; run this to regenerate it or to train a variant.
Plain CLIP training (the ``baseline`` preset) through the same loop as the student; the run lives in
<cache>/teachers/runs/ and resumes if interrupted.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from ..core.checkpoint import LATEST, Checkpoint, resumable
from ..core.errors import ConfigError, WriteError
from ..core.io import atomic_torch_save, atomic_write_json
from ..data.embedded import ensure_default_data
from ..teachers import default as defaults
from .config import TrainConfig
from .distributed import DistEnv
from .loop import run
from .prepare import resolve

# About 8x the student's compute per sample: ~4 minutes on 2 idle cores.
TEACHER_EPOCHS = 3
TEACHER_LR = 2e-3
TEACHER_BATCH = 128


def teacher_config(cache: Path, epochs: int = TEACHER_EPOCHS, progress: bool = True) -> TrainConfig:
    patterns = ensure_default_data(cache, progress)
    logs, name = str(cache / "teachers" / "runs"), defaults.DEFAULT_TEACHER
    return TrainConfig(train_data=patterns["train"], val_data=patterns["val"], cache_dir=str(cache),
                       model=defaults.DEFAULT_TEACHER, preset="baseline", epochs=epochs, lr=TEACHER_LR,
                       batch_size=TEACHER_BATCH, logs=logs, name=name, resume=resumable(logs, name), progress=progress,
                       grad_clip_norm=1.0)


def train_default_teacher(cache: Path, output: Path, epochs: int = TEACHER_EPOCHS, progress: bool = True) -> Path:
    """Train, then write ``output`` (an open_clip-loadable ``{"state_dict": ...}``) and its ``.json`` record."""
    check_arguments(cache, output, epochs)
    cfg = teacher_config(cache, epochs, progress)
    start = time.perf_counter()
    result = run(cfg, resolve(cfg, progress), DistEnv())
    final = Checkpoint.load(result.run_dir / "checkpoints" / LATEST)
    atomic_torch_save({"state_dict": final.state_dict, "model": final.model}, output, "teacher checkpoint")
    record = {"model": defaults.DEFAULT_TEACHER, "metrics": result.metrics,
              "command": f"python -m engine.teacher --epochs {epochs}",
              "training": {"preset": "baseline", "epochs": epochs, "lr": TEACHER_LR, "batch_size": TEACHER_BATCH,
                           "seed": cfg.seed, "steps": result.steps,
                           "wall_s": round(time.perf_counter() - start, 1)},
              "software": {"torch": torch.__version__, "python": platform.python_version()}}
    atomic_write_json(output.with_suffix(".json"), record, "teacher record")
    return output


def check_arguments(cache: Path, output: Path, epochs: int) -> None:
    """Every flag, checked before training; the output's folder is created here, so that it cannot fail after."""
    if epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {epochs}")
    if cache.exists() and not cache.is_dir():
        raise WriteError(f"--cache-dir {cache}: exists and is not a folder")
    if output.suffix == ".json":  # the record goes to output.with_suffix(".json"): it would replace the checkpoint
        raise ConfigError(f"--output {output}: a .json name is the record's; name the checkpoint e.g. {output.stem}.pt")
    if output.is_dir() or output.with_suffix(".json").is_dir():
        raise WriteError(f"--output {output}: it or its .json record is a folder; name a checkpoint file")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file has that name" if isinstance(exc, FileExistsError) else exc.strerror
        raise WriteError(f"--output {output}: cannot create its folder {output.parent} ({reason})") from exc
    if not os.access(output.parent, os.W_OK):
        raise WriteError(f"--output {output}: its folder {output.parent} is not writable")
