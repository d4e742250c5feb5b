"""The embedded default: procedural data, the default teacher and its store, created once in the cache.

Layout of the cache (``--cache-dir``, ``$CLIP_RD_CACHE``, else ``~/.cache/clip_rd``)::

    data/                         train-{00000..00023}.tar, val-00000.tar, sizes.json, classnames.json
    teachers/tiny-vit-teacher.pt  the default teacher (state_dict + its evaluation metrics)
    teachers/runs/                the teacher's training run (logs, checkpoints: an interrupted run resumes)
    stores/<teacher>-<data>/      teacher embedding stores (engine.store)
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import synthetic
from .paths import default_cache_dir

DEFAULT_TEACHER = "tiny-vit-teacher"


@dataclass
class Sources:
    train: str
    val: Optional[str]
    teacher_pretrained: Optional[str]
    teacher_fingerprint: Optional[str]
    store_dir: Optional[Path]


def cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def ensure_default_data(cache: Path) -> dict[str, str]:
    return synthetic.build(cache / "data", synthetic.SyntheticSpec())


def default_teacher_path(cache: Path) -> Path:
    return cache / "teachers" / f"{DEFAULT_TEACHER}.pt"


def ensure_default_teacher(cache: Path, progress: bool = True) -> Path:
    path = default_teacher_path(cache)
    if not path.exists():
        from .teacher import train_default_teacher

        train_default_teacher(cache, progress=progress)
    return path


def default_store_dir(cache: Path, fingerprint: str, train_pattern: str) -> Path:
    data_id = hashlib.sha256(train_pattern.encode()).hexdigest()[:10]
    return cache / "stores" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', fingerprint)}-{data_id}"


def resolve_sources(cfg, log) -> Sources:
    """Data patterns, teacher weights and the store for a run, creating the embedded default when needed."""
    from .store import read_manifest, teacher_fingerprint

    cache = cache_root(cfg.cache_dir)
    train, val = cfg.train_data, cfg.val_data
    if train is None:
        patterns = ensure_default_data(cache)
        train, val = patterns["train"], val or patterns["val"]
        log.info(f"embedded procedural dataset: train {train}, val {val}")
    weights = cfg.loss_weights()
    if not any(v != 0 for k, v in weights.items() if k != "task"):
        return Sources(train, val, None, None, None)
    explicit_store = cfg.teacher_store is not None
    if explicit_store and not cfg.online_teacher and cfg.teacher_pretrained is None:
        # a given store names its teacher; only verify it if a teacher is given too
        store_dir = Path(cfg.teacher_store)
        read_manifest(store_dir)
        return Sources(train, val, None, None, store_dir)
    pretrained = cfg.teacher_pretrained
    if pretrained is None:
        if cfg.teacher != DEFAULT_TEACHER:
            raise ValueError(f"--teacher {cfg.teacher}: pass --teacher-pretrained (open_clip tag or checkpoint file)")
        pretrained = str(ensure_default_teacher(cache, cfg.progress))
    fingerprint = teacher_fingerprint(cfg.teacher, pretrained)
    if cfg.online_teacher:
        return Sources(train, val, pretrained, fingerprint, None)
    store_dir = Path(cfg.teacher_store) if explicit_store else default_store_dir(cache, fingerprint, train)
    manifest_file = store_dir / "manifest.json"
    complete = manifest_file.exists() and read_manifest(store_dir).get("complete")
    if not complete:
        from .precompute import build_store

        log.info(f"building teacher store {store_dir} (engine.precompute)")
        build_store(train, cfg.teacher, pretrained, store_dir, progress=cfg.progress)
    return Sources(train, val, pretrained, fingerprint, store_dir)
