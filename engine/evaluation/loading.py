"""Which model to evaluate, and loading it: a training checkpoint, an open_clip checkpoint or tag, the shipped
teacher; every file that does not fit is refused in one line naming ``--pretrained``."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Optional

import models
from models.factory import load_failure

from ..core.checkpoint import LATEST, non_finite_weight, read_torch_file
from ..core.errors import CheckpointError, UserError
from ..teachers.default import DEFAULT_TEACHER, DEFAULT_TEACHER_TAG, default_teacher_path

DEFAULT_STUDENT = "tiny-vit-student"


def latest_checkpoint(logs: str) -> Optional[Path]:
    """The most recently written ``<logs>/<name>/checkpoints/epoch_latest.pt``, if any."""
    found = sorted(Path(logs).glob(f"*/checkpoints/{LATEST}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def checkpoint_to_evaluate(pretrained: Optional[str], model_name: Optional[str], logs: str) -> tuple[str, str]:
    """(--pretrained, --model) with their defaults: the shipped teacher for 'default-teacher', the latest run's student
    under ``logs`` without --pretrained, the model an engine checkpoint names, else tiny-vit-student."""
    if pretrained == DEFAULT_TEACHER_TAG:
        pretrained, model_name = str(default_teacher_path()), model_name or DEFAULT_TEACHER
    elif pretrained is None:
        latest = latest_checkpoint(logs)
        if latest is None:
            raise UserError(f"no --pretrained given and no run under --logs {logs}: pass a checkpoint with "
                            f"--pretrained (e.g. logs/<name>/checkpoints/epoch_latest.pt) or 'default-teacher'")
        pretrained = str(latest)
        print(f"evaluating the latest run's student: {latest}", file=sys.stderr)
    if Path(pretrained).is_file():  # else an open_clip tag
        model_name = model_name or saved_model_name(pretrained)
    return pretrained, model_name or DEFAULT_STUDENT


def saved_model_name(pretrained: str) -> Optional[str]:
    """The model an engine checkpoint names (None in open_clip's weight files); a CheckpointError for a file that is
    not a checkpoint or names its model with something other than a string."""
    saved = read_torch_file(pretrained, "--pretrained")
    name = saved.get("model") if isinstance(saved, dict) else None
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f'--pretrained {pretrained}: its "model" entry is {name!r}, not a model name (pass '
                              f'--model)')
    return name


def load_model(model_name: str, pretrained: str):
    """The model with ``pretrained``'s weights; a one-line error naming --pretrained when they do not load into it
    or are not finite (NaN scores would rank every pair first)."""
    models.model_config(model_name)  # an unknown model name is not the weights' fault
    try:
        model = models.create_model(model_name, pretrained)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as exc:
        if not Path(pretrained).is_file():  # an unknown tag: models' message says so
            raise
        # AssertionError: open_clip's checks of the checkpoint's shapes
        raise CheckpointError(f"--pretrained {pretrained}: cannot load it into {model_name}: "
                              f"{load_failure(pretrained, exc)}") from exc
    name = non_finite_weight(model.state_dict())
    if name is not None:
        raise CheckpointError(f"--pretrained {pretrained}: weight {name} holds NaN or inf: the checkpoint's weights "
                              f"are not finite (from a diverged run?)")
    return model
