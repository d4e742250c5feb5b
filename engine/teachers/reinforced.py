"""The reinforced teacher store (MobileCLIP's dataset reinforcement): K stored views and C captions per sample.

A store built with ``--augmentations K`` (K > 0) holds per sample K views: view 0 is the evaluation view (the region
the teacher's evaluation transform keeps, no flip, no operations: for the tiny models exactly the evaluation
image), views 1..K-1 are drawn with ``--aug-cfg`` from a generator seeded by the sample's key (a rebuild draws the
same views). Per view: its parameters (engine.data.augment's row, MobileCLIP's ``param_aug`` content) and the
teacher's image embedding of exactly that view, replayed at the teacher's size. ``--captions C``: the embeddings of
the sample's first C captions (its ``.txt``, then its ``syn.json`` synthetic captions). K = 0: one image embedding,
of the teacher's evaluation transform (not replayed), as stores always held.

Part arrays (besides keys, key_hashes, digests)::

    image.npy      (count, max(K, 1), D) fp16      text.npy  (count, C, D) fp16
    views.npy      (count, K, 5 + 2 num_ops) float32 (K > 0)
    source_hw.npy  (count, 2) int32: each source image's height and width (K > 0), against which every stored crop
                   is checked when the store is opened

The manifest's ``augmentation`` record says all of this (``Reinforcement.record``); a run asking for other settings
than a store's is refused in one line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import models

from ..core.errors import ConfigError, StoreError
from ..data import augment
from ..data.shards import decode_image, key_hash, sample_captions, sample_digest, split_transform

VIEW_ARRAYS = ("views", "source_hw")  # the part arrays of a store with views
TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.int32): torch.int32}
VIEW_ZERO = "the evaluation view: the region the evaluation transform keeps, no flip, no operations"


@dataclass(frozen=True)
class Reinforcement:
    """What a store holds per sample: ``views`` (K) stored views drawn with ``aug``, ``captions`` (C) captions."""

    views: int = 0
    captions: int = 1
    aug: Optional[augment.AugmentCfg] = None  # None exactly when views == 0

    @classmethod
    def from_flags(cls, views: Optional[int], aug_cfg: Optional[dict], captions: Optional[int]) -> "Reinforcement":
        """--augmentations K, --aug-cfg key=value ... and --captions C, checked (one line naming the flag)."""
        views = 0 if views is None else views
        captions = 1 if captions is None else captions
        if type(views) is not int or views < 0:
            raise ConfigError(f"--augmentations: must be an integer >= 0 (0: the evaluation view alone), got {views}")
        if type(captions) is not int or captions < 1:
            raise ConfigError(f"--captions: must be an integer >= 1 (1: the .txt caption alone), got {captions}")
        if aug_cfg and views == 0:
            raise ConfigError("--aug-cfg: applies to stored views: pass --augmentations K > 0 as well")
        return cls(views, captions, augment.AugmentCfg.from_dict(aug_cfg or {}) if views else None)

    @property
    def param_width(self) -> int:
        return self.aug.width if self.aug else 0

    def settings(self) -> dict:
        """What must match between a store and a run asking for it."""
        return {"views": self.views, "captions": self.captions, "aug_cfg": self.aug.to_dict() if self.aug else None}

    def record(self, reference_hw: Optional[tuple[int, int]] = None, resize_mode: Optional[str] = None) -> dict:
        """The manifest's ``augmentation`` entry; with views, the teacher's image size (the views' operations were
        drawn for it) and resize mode (view 0's region)."""
        record = self.settings()
        if self.views:
            record.update(reference_hw=list(reference_hw), resize_mode=resize_mode, view_0=VIEW_ZERO,
                          param_row="i, j, h, w, flip, then (op, magnitude) x num_ops; op in torchvision's "
                          f"RandAugment order {list(augment.OP_NAMES)}; TranslateX/Y in pixels of reference_hw")
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Reinforcement":
        """The settings of a manifest's ``augmentation`` record (a ConfigError, KeyError or TypeError when it is not
        one)."""
        views, aug = record["views"], record["aug_cfg"]
        if (aug is None) != (views == 0):
            raise ConfigError("aug_cfg is recorded exactly when views are")
        return cls.from_flags(views, aug, record["captions"])

    def slug(self) -> str:
        """A short name of these settings for the cache's store folder ('' for a plain store)."""
        if self == Reinforcement():
            return ""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:6]
        return f"-k{self.views}c{self.captions}-{digest}"

    def describe(self) -> str:
        if not self.views:
            return f"the evaluation view only; {self.captions} caption(s) per sample"
        return f"{self.views} views per sample (view 0 {VIEW_ZERO}), drawn with {self.aug.to_dict()}; " \
               f"{self.captions} caption(s) per sample"


def of_manifest(manifest: dict) -> Reinforcement:
    return Reinforcement.from_record(manifest["augmentation"])


def check_settings(where: str, manifest: dict, wanted: Reinforcement, fix: str) -> None:
    """Refuse a store whose views and captions are not ``wanted`` (one line, ``fix`` says what to do)."""
    have = of_manifest(manifest)
    if have != wanted:
        raise StoreError(f"{where}: the store holds {have.settings()}, this run asks for {wanted.settings()}; {fix}")


def image_hw(model) -> tuple[int, int]:
    """(height, width) of the images an open_clip model takes."""
    size = model.visual.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def draw_views(key: str, source_hw: tuple[int, int], settings: Reinforcement, reference_hw: tuple[int, int],
               resize_mode: str) -> np.ndarray:
    """The stored rows (K, P) of sample ``key``: the evaluation view, then K - 1 views drawn from a generator
    seeded by the key (the same views at every rebuild)."""
    rng = np.random.default_rng(key_hash(key) & (2 ** 64 - 1))
    views = [augment.evaluation_view(source_hw, resize_mode, settings.aug.num_ops)]
    views += [augment.sample_view(settings.aug, source_hw, reference_hw, rng) for _ in range(settings.views - 1)]
    return np.stack([view.row() for view in views])


def row_shapes(settings: Reinforcement, dim: int) -> dict[str, tuple[int, ...]]:
    """Each row array of a part and its shape per sample (keys, key hashes and digests aside)."""
    shapes = {"image": (max(settings.views, 1), dim), "text": (settings.captions, dim)}
    if settings.views:
        shapes.update(views=(settings.views, settings.param_width), source_hw=(2,))
    return shapes


def as_rows(value, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` (a tensor or array) as rows of a part file: ``dtype``, ``shape`` (a plain store's (B, D) embeddings
    are (B, 1, D))."""
    if value is None:
        raise StoreError(f"a store with views needs rows of shape {shape} for every part file, got none")
    if torch.is_tensor(value):  # torch's rounding to fp16, as the embeddings were always stored
        value = value.to(TORCH_DTYPES[dtype]).numpy()
    return np.asarray(value, dtype=dtype).reshape(shape)


def non_finite_rows(rows: dict[str, np.ndarray]) -> Optional[tuple[int, tuple[np.ndarray, str]]]:
    """(how many samples, (their indices, the first one's array and view)) with a non-finite value, else None."""
    bad = {name: ~np.isfinite(value).all(axis=-1) for name, value in rows.items()
           if name in ("image", "text", "views")}  # (B, V) per array
    samples = np.flatnonzero(np.any([flags.any(axis=1) for flags in bad.values()], axis=0))
    if not len(samples):
        return None
    name = next(name for name, flags in bad.items() if flags[samples[0]].any())
    index = int(np.flatnonzero(bad[name][samples[0]])[0])
    what = {"image": "image of view", "text": "text of caption", "views": "parameters of view"}[name]
    return len(samples), (samples, f"sample {int(samples[0])} of the batch, {what} {index}")


def views_problem(arrays: dict) -> Optional[str]:
    """None if every stored view of a part fits its image (its crop inside, its operations RandAugment's), else the
    first sample and view that does not, and why."""
    bad = augment.rows_problem(np.asarray(arrays["views"]), np.asarray(arrays["source_hw"]))
    if bad is None:
        return None
    sample, view, what = bad
    return f"sample {str(arrays['keys'][sample])!r}, stored view {view}: {what}"


def record_problem(record) -> Optional[str]:
    """What an ``augmentation`` record holds that no build writes, else None."""
    try:
        settings = Reinforcement.from_record(record)
        sizes = record["reference_hw"] if settings.views else [1, 1]
        if settings.views and record["resize_mode"] not in ("shortest", "longest", "squash"):
            raise ValueError(record["resize_mode"])
        if not (len(sizes) == 2 and all(type(x) is int and x > 0 for x in sizes)):
            raise ValueError(sizes)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        return f"augmentation {record!r} is not a record of views, captions and how they were drawn ({exc})"
    return None


class TeacherInputs:
    """One teacher's view of a sample: its image transform (the evaluation transform, or stored views replayed at its
    size), its normalisation and its tokenizer. ``reference_hw`` is the image size the stored views' translations were
    drawn for: this teacher's own, or an ensemble's first member's (engine.teachers.reinforced.StoreInputs)."""

    def __init__(self, teacher, tokenizer, settings: Reinforcement, reference_hw: Optional[tuple[int, int]] = None):
        self.per_image, normalisation = split_transform(models.get_preprocess(teacher))
        self.mean, self.std = normalisation
        self.tokenizer, self.settings = tokenizer, settings
        self.image_hw = image_hw(teacher)
        self.reference_hw = reference_hw or self.image_hw
        self.resize_mode = teacher.visual.preprocess_cfg.get("resize_mode", "shortest")

    def images(self, image, rows: Optional[np.ndarray]) -> torch.Tensor:
        """uint8 (V, 3, H, W) at this teacher's size: the stored rows (K, P) replayed, or (rows None) the evaluation
        transform's image."""
        return self.per_image(image)[None] if rows is None else self.replayed(image, rows)

    def replayed(self, image, rows: np.ndarray) -> torch.Tensor:
        """Stored rows (K', P) replayed on a PIL image at this teacher's size: uint8 (K', 3, H, W)."""
        views = [augment.replay(image, augment.View.from_row(row), self.image_hw, self.reference_hw) for row in rows]
        return torch.stack([torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1) for view in views])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the teacher's normalised floats, the evaluation transform's arithmetic."""
        return images.to(self.mean.dtype).div_(255).sub_(self.mean).div_(self.std)


class StoreInputs:
    """A raw sample as the inputs of every member of a store's teachers: the image decoded once and, with stored
    views, the views drawn once, for the first member's image size and resize mode (view 0 is its evaluation view);
    then per member k its V = max(K, 1) images (``images_k``, uint8 at its size: the views replayed, or its
    evaluation transform's image) and its tokens of the C captions (``tokens_k``)."""

    def __init__(self, members: list[TeacherInputs]):
        self.members = members
        self.settings = members[0].settings
        self.reference_hw, self.resize_mode = members[0].image_hw, members[0].resize_mode

    def __call__(self, raw: dict) -> dict:
        image, key = decode_image(raw), raw["__key__"]
        out = {"key": key, "digest": sample_digest(raw), "source_hw": np.array([image.height, image.width])}
        rows = None
        if self.settings.views:
            rows = draw_views(key, (image.height, image.width), self.settings, self.reference_hw, self.resize_mode)
            out["views"] = rows
        captions = sample_captions(raw, self.settings.captions)
        for k, member in enumerate(self.members):
            out[f"images_{k}"], out[f"tokens_{k}"] = member.images(image, rows), member.tokenizer(captions)
        return out
