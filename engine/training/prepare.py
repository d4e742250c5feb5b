"""Preparing a run's inputs before training: data, teacher weights and the teacher store, checked at the door.

``prepare(cfg, env)`` resolves every input a run reads, generating the embedded default (procedural data, the
store of the shipped teacher) into the cache when no data is given, and checks that each given file exists and is
what it should be. Under torchrun, rank 0 prepares while the other ranks wait for its outcome (up to
``cfg.prepare_timeout`` seconds), so that ranks never build the same files at once; two runs build one folder
through a lock on it (engine.core.lock), the second waiting as long for the first. The training loop receives the
result as ``Sources``; from here it uses only that type and ``needs_teacher``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Optional

import torch.distributed as dist

from ..core.errors import ShardError, StoreError, UserError
from ..data.embedded import cache_root, ensure_default_data
from ..data.shards import expand_urls, require_sizes, shard_sizes
from ..evaluation.metrics import classnames_beside, imagenet_folder
from ..teachers import default as defaults
from ..teachers.precompute import build_store
from ..teachers.reinforced import Reinforcement, of_manifest
from ..teachers.store import read_manifest, teacher_fingerprint
from .config import report_to
from .distributed import DistEnv
from .logger import summary_writer_class


class Teacher(NamedTuple):
    """One teacher of a run, resolved: its open_clip model, its weights (a tag or a file) and its fingerprint."""

    model: str
    pretrained: str
    fingerprint: str


@dataclass
class Sources:
    """Everything a run reads besides its configuration, resolved to explicit paths."""

    train: str
    val: Optional[str]
    # the run's teachers in order (several: an ensemble); empty without a teacher, and for a given --teacher-store
    # without --teacher-pretrained (the store names its own)
    teachers: tuple[Teacher, ...]
    store_dir: Optional[Path]
    # the shipped default teacher's recorded evaluation, where ``val`` is the data it was recorded on (the embedded
    # validation split); otherwise the run evaluates its teacher on ``val`` itself
    teacher_metrics: Optional[dict] = None


def needs_teacher(cfg) -> bool:
    return any(v != 0 for k, v in cfg.loss_weights().items() if k != "task")


def check_student_inputs(cfg) -> None:
    """The student's --pretrained file, --imagenet-val and --report-to, checked before anything is built."""
    if cfg.pretrained and defaults.looks_like_file(cfg.pretrained) and not os.path.isfile(cfg.pretrained):
        raise UserError(f"--pretrained: checkpoint file {cfg.pretrained} does not exist")
    if cfg.imagenet_val is not None:
        imagenet_folder(cfg.imagenet_val)
    if "tensorboard" in report_to(cfg.report_to):
        summary_writer_class()


def _check_val_data(val: str, num_samples: Optional[int]) -> None:
    """The validation shards exist (local ones), hold --val-num-samples samples when it is given, and the
    classnames.json beside them, if any, can be read (else the first evaluation, after an epoch, would stop)."""
    try:
        urls = expand_urls(val)
        sizes = shard_sizes(urls) if num_samples is not None else {}
        classnames_beside(val)
    except (ShardError, ValueError) as exc:
        raise ShardError(f"--val-data: {exc}") from exc
    known = [size for size in sizes.values() if size is not None]
    if sizes and len(known) == len(sizes) and sum(known) != num_samples:
        raise ShardError(f"--val-num-samples {num_samples}: the --val-data shards hold {sum(known)} samples")


def store_settings(cfg, manifest: Optional[dict]) -> Reinforcement:
    """The views and captions of the run's store: a given store's own (refused, in one line, where the run asks for
    others), else the run's --augmentations, --aug-cfg and --captions over the defaults."""
    if manifest is None:
        return cfg.store_settings()
    settings = of_manifest(manifest)
    mismatch = cfg.store_mismatch(settings)
    if mismatch:
        raise StoreError(f"--teacher-store {cfg.teacher_store}: built with other augmentation settings than this run "
                         f"asks for: {mismatch}; build a store with them (python -m engine.precompute --augmentations "
                         f"K --aug-cfg ... --captions C) or leave those flags out to train on this one as it is")
    return settings


def resolve_teachers(cfg) -> tuple[Teacher, ...]:
    """The run's teachers in order, their weights resolved (the shipped default teacher's when none are given) and
    fingerprinted; a missing checkpoint file is refused in one line."""
    teachers = []
    for model, pretrained in cfg.teacher_members():
        weights = defaults.teacher_weights(model, pretrained)
        teachers.append(Teacher(model, weights, teacher_fingerprint(model, weights)))
    return tuple(teachers)


def resolve(cfg, progress: bool = True) -> Sources:
    """Resolve (and build when needed) the inputs of ``cfg``; every bad one is a one-line error."""
    check_student_inputs(cfg)
    cache = cache_root(cfg.cache_dir)
    train, val = cfg.train_data, cfg.val_data
    if train is None:
        patterns = ensure_default_data(cache, progress, cfg.prepare_timeout)
        train, val = patterns["train"], val or patterns["val"]
    require_sizes(expand_urls(train), cfg.train_num_samples)
    if val is not None and cfg.eval:
        _check_val_data(val, cfg.val_num_samples)
    if not needs_teacher(cfg):
        return Sources(train, val, (), None)
    given = None
    if cfg.teacher_store is not None and not cfg.online_teacher:
        given = read_manifest(cfg.teacher_store)  # a file, a missing or damaged store: refused here, before any step
        cfg.check_ensemble(len(given["teachers"]), f"--teacher-store {cfg.teacher_store}")
    settings = None if cfg.online_teacher else store_settings(cfg, given)  # the online teacher reads no store
    if cfg.teacher_store is not None and not cfg.online_teacher and cfg.teacher_pretrained is None:
        return Sources(train, val, (), Path(cfg.teacher_store))  # a given store names its own teachers
    teachers = resolve_teachers(cfg)
    fingerprints = [teacher.fingerprint for teacher in teachers]
    recorded = [teacher.pretrained for teacher in teachers] == [str(defaults.SHIPPED_TEACHER)] and \
        cfg.train_data is None and cfg.val_data is None
    metrics = defaults.default_teacher_record()["metrics"] if recorded else None
    if cfg.online_teacher:
        return Sources(train, val, teachers, None, metrics)
    store_dir = Path(cfg.teacher_store) if cfg.teacher_store else \
        defaults.default_store_dir(cache, fingerprints, train, settings)
    if not ((store_dir / "manifest.json").exists() and read_manifest(store_dir).get("complete")):
        build_store(train, [(teacher.model, teacher.pretrained) for teacher in teachers], store_dir,
                    progress=progress, timeout=cfg.prepare_timeout, settings=settings)
    return Sources(train, val, teachers, store_dir, metrics)


def prepare(cfg, env: DistEnv) -> Sources:
    """``resolve`` on rank 0; the other ranks wait for its outcome and fail with rank 0's message if it failed
    (rank 0 raises its own error, traceback and all)."""
    if env.world_size == 1:
        return resolve(cfg, progress=cfg.progress)
    # A group of its own: preparing may take longer than the training collectives' timeout.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.prepare_timeout))
    outcome, failure = [None], None
    if env.is_main:
        try:
            outcome = [resolve(cfg, progress=cfg.progress)]
        except Exception as exc:  # told to the other ranks first, then raised here
            outcome, failure = [f"{type(exc).__name__}: {exc}"], exc
    else:  # the run's log is not open yet: say it on stderr
        print(f"rank {env.rank}: waiting for rank 0 to prepare data, teacher and store (at most --prepare-timeout "
              f"{cfg.prepare_timeout:g} s)", file=sys.stderr, flush=True)
    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    except RuntimeError as exc:
        raise UserError(f"rank {env.rank}: rank 0 did not finish preparing data, teacher and store within "
                        f"--prepare-timeout {cfg.prepare_timeout:g} s (or it died): {exc}") from exc
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if isinstance(outcome[0], str):
        raise UserError(f"rank 0 could not prepare the run: {outcome[0]}")
    return outcome[0]
