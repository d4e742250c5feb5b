"""DataCompDR reinforced shards (MobileCLIP's dataset reinforcement): each sample carries its own teacher embeddings.

A sample holds the image (``jpg``/``png``/``webp``), ``txt`` (the ground-truth caption), ``syn.json`` (synthetic
captions: ``{"syn_text": [...], ...}``), ``paug.json`` (``{"param_aug": [...]}``: K views, each
``[[i, j, h, w], [[op_index, magnitude], ...]]``, optionally with a flip between them; a list or a JSON string of
it), ``npz`` (fp32) or ``pth.gz`` (bf16) with ``image_emb`` (K, W) and ``text_emb`` (1 + S, W): row 0 the
ground truth, then the S synthetic captions of every ``syn.json`` key in file order; W is the ensemble members'
widths concatenated. ``json`` holds the sample's ``uid`` and the image's ``sha256``.

``DataCompDRCodec`` decodes such a sample into the engine's batch form: one view (seeded by (seed, epoch, key), or
epoch modulo K with ``sequential``) replayed on the student's pixels through engine.data.augment, that view's
``image_emb`` row, one caption (the ground truth, or with ``mix_synthetic`` a synthetic one with probability
``synthetic_ratio``, among the keys matching ``syn_key_regex``) and its ``text_emb`` row; without ``mix_synthetic``
also a synthetic caption and its row (``syn_text``, ``dr_syn_text``), which MobileCLIP's DRClipLoss trains on as a
second loss over the same images. Every problem of a sample
is a one-line ShardError naming shard and sample; a width that the members' dimensions do not sum to, a ConfigError.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.errors import ConfigError, ShardError
from .augment import View, replay, view_problem
from .shards import (
    IMAGE_EXTENSIONS,
    _uint8_chw,
    collate,
    decode_image,
    sample_digest,
    sample_label,
    split_transform,
)

EMBEDDING_MEMBERS = ("npz", "pth.gz")  # fp32 numpy archive, or gzip'd torch.save of bf16 tensors
DEFAULT_SYN_KEY_REGEX = r"^syn_text.*$"  # MobileCLIP's default, matched from the key's start (re.match)


@dataclass(frozen=True)
class DRSettings:
    """How a run reads DataCompDR samples (MobileCLIP's --dataset-reinforcement-* and --distill-teacher-dimension)."""

    teacher_dims: Optional[tuple[int, ...]] = None  # the members' widths (None: one teacher of the stored width)
    reference_hw: Optional[tuple[int, int]] = None  # the size the views' operations were drawn for (None: student's)
    mix_synthetic: bool = False
    synthetic_ratio: float = 0.0
    sequential: bool = False
    syn_key_regex: str = DEFAULT_SYN_KEY_REGEX
    verify_sha256: bool = False
    drop_mismatched: bool = False  # with verify_sha256: drop such samples instead of stopping the run
    seed: int = 0


@dataclass
class DRSample:
    """What a DataCompDR sample holds besides its image: K views, (K, W) and (1 + S, W) fp32 embeddings, and the
    synthetic captions the regex selects with their text_emb rows."""

    views: list[View]
    image_emb: np.ndarray
    text_emb: np.ndarray
    synthetic: list[tuple[str, int]]  # (caption, text_emb row)


def read_config(path: str) -> tuple[int, int]:
    """The image size a --dataset-reinforcement-config's views were drawn for (its random_resized_crop size: the
    RandAugment translations are pixels of that size)."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        size = config["reinforce"]["image_augmentation"]["random_resized_crop"]["size"]
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"--dataset-reinforcement-config {path}: cannot read reinforce.image_augmentation."
                          f"random_resized_crop.size from it ({type(exc).__name__}: {exc})") from exc
    if height < 1 or width < 1:
        raise ConfigError(f"--dataset-reinforcement-config {path}: random_resized_crop size {size} is not positive")
    return height, width


def _bad(raw: dict, what: str) -> ShardError:
    return ShardError(f"DataCompDR shard {raw.get('__url__')}: sample {raw['__key__']!r} {what}")


def parse_view(entry: Any) -> View:
    """One ``param_aug`` entry as a View: the crop box first, then an optional flip (a number or boolean) and an
    optional list of [op_index, magnitude] pairs, in either order."""
    box, flip, ops = entry[0], False, ()
    for part in entry[1:]:
        if isinstance(part, (list, tuple)):
            ops = tuple((int(op), float(magnitude)) for op, magnitude in part)
        else:
            flip = bool(part)
    if len(box) != 4:
        raise ValueError(f"crop {box} is not [i, j, h, w]")
    return View(tuple(int(x) for x in box), flip, ops)


def read_views(raw: dict) -> list[View]:
    """The sample's paug.json views (its param_aug: a list, or a JSON string of one)."""
    if "paug.json" not in raw:
        raise _bad(raw, "lacks paug.json (the parameters of its views)")
    try:
        entries = json.loads(raw["paug.json"])["param_aug"]
        entries = json.loads(entries) if isinstance(entries, str) else entries
        return [parse_view(entry) for entry in entries]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _bad(raw, f"paug.json is not {{'param_aug': [[[i, j, h, w], [[op, magnitude], ...]], ...]}} "
                        f"({type(exc).__name__}: {exc})") from exc


def read_embeddings(raw: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb (K, W), text_emb (1 + S, W)) as fp32, from the npz (fp32) or pth.gz (bf16) member."""
    member = next((name for name in EMBEDDING_MEMBERS if name in raw), None)
    if member is None:
        raise _bad(raw, f"lacks its teacher embeddings ({' or '.join(EMBEDDING_MEMBERS)})")
    try:
        if member == "npz":
            with np.load(io.BytesIO(raw["npz"])) as archive:
                image, text = archive["image_emb"], archive["text_emb"]
        else:
            loaded = torch.load(io.BytesIO(gzip.decompress(raw["pth.gz"])), map_location="cpu", weights_only=True)
            image, text = (loaded[name].float().numpy() for name in ("image_emb", "text_emb"))
    except Exception as exc:  # numpy, zipfile, gzip and torch raise several types for damaged members
        raise _bad(raw, f"{member} cannot be read as image_emb and text_emb: {type(exc).__name__}: {exc}") from exc
    image, text = np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32)
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise _bad(raw, f"{member}: image_emb {image.shape} and text_emb {text.shape} are not (K, W) and (1 + S, W)")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise _bad(raw, f"{member} holds non-finite values (NaN or Inf)")
    return image, text


def read_synthetic(raw: dict, pattern: re.Pattern) -> tuple[int, list[tuple[str, int]]]:
    """(every synthetic caption's count, the selected ones with their text_emb rows): rows 1.. follow syn.json's
    keys in file order; the keys matching ``pattern`` are selected."""
    if "syn.json" not in raw:
        return 0, []
    try:
        table = json.loads(raw["syn.json"])
        lists = [(key, value if isinstance(value, list) else [value]) for key, value in table.items()]
    except (ValueError, AttributeError) as exc:
        raise _bad(raw, f"syn.json is not a JSON object of caption lists ({type(exc).__name__}: {exc})") from exc
    selected, row = [], 1
    for key, captions in lists:
        if pattern.match(key):
            selected += [(str(text), row + k) for k, text in enumerate(captions)]
        row += len(captions)
    return row - 1, selected


def sha256_mismatch(raw: dict) -> Optional[str]:
    """None if the image's bytes have the sha256 its ``json`` records, else what differs, in words."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    try:
        recorded = json.loads(raw["json"])["sha256"] if "json" in raw else None
    except (ValueError, TypeError, KeyError):
        recorded = None
    if recorded is None:
        return "has no sha256 in its json member"
    actual = hashlib.sha256(raw[image_ext]).hexdigest() if image_ext else None
    return None if actual == str(recorded).lower() else f"image sha256 {actual} is not its json's {recorded}"


def read_views_and_embeddings(raw: dict) -> tuple[list[View], np.ndarray, np.ndarray]:
    """The sample's views and its (K, W) image and (1 + S, W) text embeddings, one image row per view."""
    views, (image_emb, text_emb) = read_views(raw), read_embeddings(raw)
    if len(views) != len(image_emb):
        raise _bad(raw, f"has {len(views)} view(s) in paug.json but {len(image_emb)} image_emb row(s)")
    return views, image_emb, text_emb


def read_sample(raw: dict, settings: DRSettings, pattern: re.Pattern) -> DRSample:
    """Everything a DataCompDR sample carries besides its pixels, checked: one line per problem."""
    views, image_emb, text_emb = read_views_and_embeddings(raw)
    dims = settings.teacher_dims
    if dims is not None and sum(dims) != image_emb.shape[1]:
        raise ConfigError(f"--distill-teacher-dimension {' '.join(map(str, dims))}: sums to {sum(dims)}, but sample "
                          f"{raw['__key__']!r} of {raw.get('__url__')} stores embeddings {image_emb.shape[1]} wide")
    total, synthetic = read_synthetic(raw, pattern)
    if "syn.json" not in raw:  # MobileCLIP reads a synthetic caption in either mode
        flag = "--dataset-reinforcement-mix-synthetic" if settings.mix_synthetic else \
            "--dataset-reinforcement (a second caption per step, without --dataset-reinforcement-mix-synthetic)"
        raise _bad(raw, f"lacks syn.json, which {flag} reads")
    if not synthetic:
        raise _bad(raw, f"syn.json has no caption under a key matching --dataset-reinforcement-syn-text-key-regex "
                        f"{settings.syn_key_regex!r}")
    if len(text_emb) != 1 + total:
        raise _bad(raw, f"has {len(text_emb)} text_emb row(s) for 1 + {total} caption(s) (txt and syn.json)")
    return DRSample(views, image_emb, text_emb, synthetic)


def choose(settings: DRSettings, key: str, epoch: int, views: int, synthetic: int) -> tuple[int, Optional[int], bool]:
    """(view, synthetic caption or None when there is none, whether it replaces the ground truth) of sample ``key``
    in ``epoch``: a pure function of (seed, epoch, key), the same in any worker, rank or order and after a resume.
    Sequential: view and synthetic caption epoch mod their counts. The synthetic caption replaces the ground truth
    with probability ``synthetic_ratio`` under ``mix_synthetic``; without it, it is a second caption (MobileCLIP)."""
    digest = hashlib.blake2b(f"{settings.seed}/{epoch}/{key}".encode(), digest_size=24).digest()
    u = [int.from_bytes(digest[k:k + 8], "little") / 2 ** 64 for k in (0, 8, 16)]  # three uniforms in [0, 1)
    view = epoch % views if settings.sequential else int(u[0] * views)
    if not synthetic:
        return view, None, False
    caption = epoch % synthetic if settings.sequential else int(u[2] * synthetic)
    return view, caption, settings.mix_synthetic and u[1] < settings.synthetic_ratio


def split_members(rows: torch.Tensor, dims: Optional[Sequence[int]]):
    """(B, W) concatenated teacher rows -> one (B, W) tensor, or a list of (B, D_k) for an ensemble."""
    if dims is None or len(dims) == 1:
        return rows
    return list(torch.split(rows, list(dims), dim=-1))


class DataCompDRCodec:
    """``codec(raw, epoch)``: a DataCompDR sample as a decoded sample (the drawn view's pixels, the chosen caption's
    tokens, their teacher rows ``dr_image`` and ``dr_text`` (W,) fp32, ``view_index``, ``caption_index``; without
    mix_synthetic also ``syn_text``, ``dr_syn_text``, ``syn_caption_index``), or None
    for an image whose sha256 does not match when such samples are dropped; ``codec.collate(samples)`` batches."""

    def __init__(self, images: dict[str, Callable], texts: dict[str, Callable], settings: DRSettings,
                 out_hw: tuple[int, int]):
        self.images, self.texts, self.settings, self.out_hw = images, texts, settings, out_hw
        self.per_image, self.normalisation = split_transform(images["image"])
        if self.normalisation is None:
            raise ConfigError("DataCompDR views need an open_clip image transform (to-tensor, normalise)")
        self.pattern = syn_key_pattern(settings.syn_key_regex)
        self.dropped = 0  # samples dropped for a sha256 mismatch (this process)

    def __call__(self, raw: dict, epoch: int = 0) -> Optional[dict]:
        key, url = raw["__key__"], raw.get("__url__")
        if self.settings.verify_sha256:
            mismatch = sha256_mismatch(raw)
            if mismatch and self.settings.drop_mismatched:
                self.dropped += 1
                return None
            if mismatch:
                raise _bad(raw, f"{mismatch} (--dataset-reinforcement-verify-sha256)")
        sample, image = read_sample(raw, self.settings, self.pattern), decode_image(raw)
        view, synthetic, replaces = choose(self.settings, key, epoch, len(sample.views), len(sample.synthetic))
        caption, row = sample.synthetic[synthetic] if replaces else (raw["txt"].decode("utf-8"), 0)
        stored = sample.views[view]
        problem = view_problem(stored, (image.height, image.width))
        if problem:
            raise _bad(raw, f"view {view}: {problem}")
        reference = self.settings.reference_hw or self.out_hw
        out = {"key": key, "url": url, "digest": sample_digest(raw), "caption": caption,
               "image": _uint8_chw(replay(image, stored, self.out_hw, reference)),
               "dr_image": torch.from_numpy(sample.image_emb[view].copy()),
               "dr_text": torch.from_numpy(sample.text_emb[row].copy()), "view_index": view, "caption_index": row}
        for name, tokenizer in self.texts.items():
            out[name] = tokenizer([caption])[0]
        if not self.settings.mix_synthetic:  # MobileCLIP's second caption: a synthetic one, with its own loss
            syn_caption, syn_row = sample.synthetic[synthetic]
            out.update(syn_text=self.texts["text"]([syn_caption])[0], syn_caption=syn_caption,
                       dr_syn_text=torch.from_numpy(sample.text_emb[syn_row].copy()), syn_caption_index=syn_row)
        label = sample_label(raw)
        if label is not None:
            out["label"] = label
        return out

    def collate(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        mean, std = self.normalisation  # to-tensor's float(x) / 255, then normalise's (x - mean) / std
        batch["image"] = batch["image"].to(mean.dtype).div_(255).sub_(mean).div_(std)
        return batch


def syn_key_pattern(regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ConfigError(f"--dataset-reinforcement-syn-text-key-regex {regex!r}: not a regular expression: "
                          f"{exc}") from exc


def check_views_replayable(raw: dict, views: list[View], image: Image.Image) -> None:
    """Every view fits the image and names a RandAugment operation (the check a scan runs before training)."""
    for index, view in enumerate(views):
        problem = view_problem(view, (image.height, image.width))
        if problem:
            raise _bad(raw, f"view {index}: {problem}")
