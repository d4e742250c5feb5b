"""Training from DataCompDR shards (--dataset-reinforcement): the run's inputs resolved and checked without a store,
the codec and the teacher source built from MobileCLIP's flags.

Before any step, the first training shard is read whole and every sample of it checked (views, embeddings, widths
against --distill-teacher-dimension, captions, NaNs); with --dataset-reinforcement-verify-sha256 (and without
--dataset-reinforcement-drop-mismatched) every local shard is read once and each image's bytes hashed, and any
mismatch stops the run with their count and first keys. Samples of later shards are checked as they are read.
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

import models

from ..core.errors import ShardError
from ..data.datacompdr import (
    DataCompDRCodec,
    DRSettings,
    check_views_replayable,
    read_config,
    read_embeddings,
    read_sample,
    sha256_mismatch,
    syn_key_pattern,
)
from ..data.shards import decode_image, expand_urls, is_remote, read_shard, require_sizes
from ..teachers.datacompdr import DataCompDRTeacher
from ..teachers.reinforced import image_hw
from .config import TrainConfig
from .prepare import Sources, _check_val_data, check_student_inputs

FIRST_KEYS = 3  # keys named in a sha256 refusal


def dr_settings(cfg: TrainConfig) -> DRSettings:
    """The run's reading of DataCompDR samples, from MobileCLIP's flags."""
    reference = read_config(cfg.dataset_reinforcement_config) if cfg.dataset_reinforcement_config else None
    dims = tuple(cfg.distill_teacher_dimension) if cfg.distill_teacher_dimension else None
    return DRSettings(dims, reference, cfg.dataset_reinforcement_mix_synthetic,
                      cfg.dataset_reinforcement_mix_synthetic_ratio, cfg.dataset_reinforcement_sample_sequential,
                      cfg.dataset_reinforcement_syn_text_key_regex, cfg.dataset_reinforcement_verify_sha256,
                      cfg.dataset_reinforcement_drop_mismatched, cfg.seed)


def check_shard(url: str, settings: DRSettings, pattern: re.Pattern, content: bool) -> list[str]:
    """The keys of ``url``'s samples whose image does not match its sha256 (with verify on); with ``content`` every
    sample is also read and checked as training reads it (one line for the first problem)."""
    mismatched = []
    for raw in read_shard(url):
        if settings.verify_sha256 and sha256_mismatch(raw):
            mismatched.append(raw["__key__"])
            continue
        if content:
            sample = read_sample(raw, settings, pattern)
            check_views_replayable(raw, sample.views, decode_image(raw))
    return mismatched


def check_shards(train: str, settings: DRSettings) -> None:
    """The first shard's samples checked whole; with a sha256 check that stops, every local shard's images hashed."""
    urls, pattern = expand_urls(train), syn_key_pattern(settings.syn_key_regex)
    strict = settings.verify_sha256 and not settings.drop_mismatched
    mismatched = []
    for index, url in enumerate(urls):  # the first shard whole; the others' images when a mismatch stops the run
        if index == 0 or (strict and not is_remote(url)):
            mismatched += check_shard(url, settings, pattern, content=index == 0)
    if strict and mismatched:
        raise ShardError(f"--dataset-reinforcement-verify-sha256: {len(mismatched)} image(s) do not match their "
                         f"json's sha256 (first: {', '.join(mismatched[:FIRST_KEYS])}); fix the shards, or pass "
                         f"--dataset-reinforcement-drop-mismatched to train without them")


def resolve_datacompdr(cfg: TrainConfig) -> Sources:
    """The inputs of a --dataset-reinforcement run, checked before any step (no teacher weights, no store)."""
    check_student_inputs(cfg)
    if cfg.train_data is None:
        raise ShardError("--dataset-reinforcement: pass --train-data, the DataCompDR shards")
    require_sizes(expand_urls(cfg.train_data), cfg.train_num_samples)
    if cfg.val_data is not None and cfg.eval:
        _check_val_data(cfg.val_data, cfg.val_num_samples)
    check_shards(cfg.train_data, dr_settings(cfg))
    return Sources(cfg.train_data, cfg.val_data, (), None)


def stored_width(train: str) -> int:
    """The concatenated teachers' width W, from the first sample of the first shard."""
    url = expand_urls(train)[0]
    raw = next(iter(read_shard(url)), None)
    if raw is None:
        raise ShardError(f"DataCompDR shard {url} holds no samples")
    return read_embeddings(raw)[0].shape[1]


def datacompdr_codec(cfg: TrainConfig, student: nn.Module) -> DataCompDRCodec:
    return DataCompDRCodec({"image": models.get_preprocess(student)}, {"text": models.get_tokenizer(cfg.model)},
                           dr_settings(cfg), image_hw(student))


def datacompdr_teacher(cfg: TrainConfig, train: str) -> DataCompDRTeacher:
    bias: Optional[float] = cfg.distill_logit_bias
    return DataCompDRTeacher.of(cfg.distill_teacher_dimension, cfg.distill_logit_scale, bias, stored_width(train))
