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
from typing import Optional, Sequence

import models

from ..core.errors import ConfigError, UserError
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


def pair_teachers(teachers: Sequence[str], pretrained: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """--teacher and --teacher-pretrained as given, each possibly repeated, paired in order: (model, pretrained or
    None) per member. No --teacher: the default teacher; one teacher takes at most one --teacher-pretrained (None: the
    shipped weights of the default teacher); several teachers (an ensemble) take one --teacher-pretrained each."""
    models_ = list(teachers) or [DEFAULT_TEACHER]
    if len(models_) == 1 and len(pretrained) <= 1:
        return [(models_[0], pretrained[0] if pretrained else None)]
    if len(pretrained) != len(models_):
        raise ConfigError(f"--teacher-pretrained is given {len(pretrained)} time(s) for {len(models_)} teacher(s) "
                          f"(--teacher; the default teacher when it is not given): a teacher ensemble takes one "
                          f"--teacher-pretrained per --teacher, paired in order")
    return list(zip(models_, pretrained))


def teacher_weights(model: str, pretrained: Optional[str]) -> str:
    """A teacher's weights: ``pretrained`` (an open_clip tag or a checkpoint file, which must exist), or for the
    default teacher without one (or with ``default-teacher``) the shipped checkpoint."""
    if pretrained in (None, DEFAULT_TEACHER_TAG):
        if model != DEFAULT_TEACHER:
            raise ConfigError(f"--teacher {model}: pass --teacher-pretrained (open_clip tag or checkpoint file)")
        return str(default_teacher_path())
    if looks_like_file(pretrained) and not os.path.isfile(pretrained):
        raise UserError(f"--teacher-pretrained: checkpoint file {pretrained} does not exist")
    return pretrained


def looks_like_file(pretrained: str) -> bool:
    """Whether a pretrained argument names a file rather than an open_clip tag."""
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def default_teacher_record() -> dict:
    """The shipped teacher's recorded metrics and the command that regenerates it."""
    return json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())


def default_store_dir(cache: Path, fingerprints: list[str], train_pattern: str,
                      settings: Reinforcement = Reinforcement()) -> Path:
    """<cache>/stores/<teachers>-<hash of the store format and the data's pattern>[<views and captions>], where
    <teachers> is one teacher's fingerprint, or for an ensemble its member count and a hash of every member's
    fingerprint in order (so that other members, another order or another count is another store); a pattern inside
    the cache is hashed relative to it, so a moved or copied cache keeps using its store (every lookup still checks
    each sample); stores of other views and captions (engine.teachers.reinforced) live beside each other."""
    if "://" not in train_pattern and not train_pattern.startswith("pipe:"):
        relative = os.path.relpath(os.path.abspath(train_pattern), os.path.abspath(cache))
        if not relative.startswith(os.pardir):
            train_pattern = relative
    # the format is part of the name: a store of an older format is left as it was, and a new one built beside it
    data_id = hashlib.sha256(f"format {FORMAT_VERSION}: {train_pattern}".encode()).hexdigest()[:10]
    teachers = fingerprints[0]
    if len(fingerprints) > 1:
        members_id = hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:12]
        teachers = f"ensemble{len(fingerprints)}-{members_id}"
    return cache / "stores" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', teachers)}-{data_id}{settings.slug()}"
