"""The shipped default teacher and where the cache keeps a teacher's store of the data.

The default teacher ships with the package (``models/pretrained/tiny-vit-teacher.pt``, with its recorded metrics
and the command that regenerates it in ``tiny-vit-teacher.json``), so a first run only generates data and a store.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import models

from ..core.errors import UserError
from .manifest import FORMAT_VERSION
from .reinforced import Reinforcement

DEFAULT_TEACHER = "tiny-vit-teacher"
SHIPPED_TEACHER = Path(models.__file__).parent / "pretrained" / f"{DEFAULT_TEACHER}.pt"
# ``--teacher-pretrained default-teacher`` names the shipped checkpoint.
DEFAULT_TEACHER_TAG = "default-teacher"


def default_teacher_path() -> Path:
    if not SHIPPED_TEACHER.exists():
        raise UserError(f"the default teacher {SHIPPED_TEACHER} is missing from this installation; "
                                f"regenerate it with `python -m engine.teacher`")
    return SHIPPED_TEACHER


def default_teacher_record() -> dict:
    """The shipped teacher's recorded metrics and the command that regenerates it."""
    return json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())


def default_store_dir(cache: Path, fingerprint: str, train_pattern: str,
                      settings: Reinforcement = Reinforcement()) -> Path:
    """<cache>/stores/<teacher fingerprint>-<hash of the store format and the data's pattern>[<views and captions>];
    a pattern inside the cache is hashed relative to it, so a moved or copied cache keeps using its store (every
    lookup still checks each sample); stores of other views and captions (engine.teachers.reinforced) live beside
    each other."""
    if "://" not in train_pattern and not train_pattern.startswith("pipe:"):
        relative = os.path.relpath(os.path.abspath(train_pattern), os.path.abspath(cache))
        if not relative.startswith(os.pardir):
            train_pattern = relative
    # the format is part of the name: a store of an older format is left as it was, and a new one built beside it
    data_id = hashlib.sha256(f"format {FORMAT_VERSION}: {train_pattern}".encode()).hexdigest()[:10]
    return cache / "stores" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', fingerprint)}-{data_id}{settings.slug()}"
