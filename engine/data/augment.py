"""Replayable image augmentations: a view's random parameters are drawn once, stored, and applied again later.

A view of an image is a RandomResizedCrop box in the SOURCE image's pixels (so a model of another resolution replays
the same region), an optional horizontal flip, and ``num_ops`` RandAugment operations with their applied, signed
magnitudes. Replay goes through torchvision's own functional ops (``resized_crop``, ``hflip`` and RandAugment's
``_apply_op``), so a view replayed anywhere is the view that was drawn.

The settings follow open_clip_train's ``--aug-cfg`` (``scale``, ``ratio``) plus RandAugment's ``num_ops`` and
``magnitude`` (torchvision's meanings, 31 magnitude bins) and ``hflip`` (the flip's probability). A view's parameters
are stored as one fixed-size float32 row (exact: integers and torchvision's float32 magnitudes)::

    [i, j, h, w, flip, op_1, magnitude_1, ..., op_n, magnitude_n]        n = num_ops

``op`` indexes torchvision's RandAugment order (``OP_NAMES``); TranslateX/Y magnitudes are pixels of the image the
operations were drawn for (the ``reference`` size): a replay at another size scales them. ``to_param_aug`` and
``from_param_aug`` convert to and from MobileCLIP's DataCompDR ``param_aug`` entries
(``[[i, j, h, w], [[op_index, magnitude], ...]]``, with the flip between them when ``hflip`` is on).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from ..core.errors import ConfigError, UserError

# torchvision's RandAugment operations, in the order of its augmentation space (MobileCLIP's op indices)
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
MAGNITUDE_BINS = 31  # torchvision's RandAugment default
HEAD = 5  # i, j, h, w, flip: the columns of a stored row before the operations
# open_clip's AugmentationCfg keys that a stored view cannot replay (random per step, or timm's pipeline)
OPEN_CLIP_ONLY = ("color_jitter", "re_prob", "re_count", "use_timm", "color_jitter_prob", "gray_scale_prob")


@dataclass(frozen=True)
class AugmentCfg:
    """How views are drawn: open_clip's ``scale``/``ratio`` of RandomResizedCrop, the flip's probability, and
    torchvision's RandAugment ``num_ops`` (0: none) at ``magnitude`` (of 31 bins)."""

    scale: tuple[float, float] = (0.9, 1.0)  # open_clip_train's default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision's default (open_clip_train passes none)
    hflip: float = 0.0  # open_clip_train flips nothing
    num_ops: int = 2  # torchvision's RandAugment defaults
    magnitude: int = 9

    @property
    def width(self) -> int:
        """Columns of a stored row."""
        return HEAD + 2 * self.num_ops

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, given: dict, flag: str = "--aug-cfg") -> "AugmentCfg":
        """The settings ``given`` (key -> value) over the defaults; an unknown key or a bad value is one line."""
        known = [f.name for f in fields(cls)]
        for key in given:
            if key in OPEN_CLIP_ONLY:
                raise ConfigError(f"{flag}: open_clip's {key!r} cannot be stored as a replayable view; the keys are "
                                  f"{', '.join(known)}")
            if key not in known:
                raise ConfigError(f"{flag}: unknown augmentation key {key!r}; the keys are {', '.join(known)}")
        values = {k: _as_pair(v, flag, k) if k in ("scale", "ratio") else v for k, v in given.items()}
        cfg = cls(**values)
        cfg.check(flag)
        return cfg

    def check(self, flag: str) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"{flag}: scale={self.scale} must be two numbers with 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"{flag}: ratio={self.ratio} must be two numbers with 0 < min <= max")
        if not (isinstance(self.hflip, (int, float)) and 0 <= self.hflip <= 1):
            raise ConfigError(f"{flag}: hflip={self.hflip!r} must be a probability in [0, 1]")
        if type(self.num_ops) is not int or self.num_ops < 0:
            raise ConfigError(f"{flag}: num_ops={self.num_ops!r} must be an integer >= 0")
        if type(self.magnitude) is not int or not 0 <= self.magnitude < MAGNITUDE_BINS:
            raise ConfigError(f"{flag}: magnitude={self.magnitude!r} must be an integer in [0, {MAGNITUDE_BINS - 1}]")


def _as_pair(value, flag: str, key: str) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
        raise ConfigError(f"{flag}: {key}={value!r} must be two numbers, e.g. {key}=0.5,1.0")
    return float(value[0]), float(value[1])


def parse_pairs(pairs: Sequence[str], flag: str = "--aug-cfg") -> dict:
    """open_clip_train's ``--aug-cfg key=value ...``: each value read as a Python literal (``scale=0.5,1`` is a
    tuple), else kept as text."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: {pair!r} is not key=value (e.g. scale=0.5,1.0 hflip=0.5)")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


@dataclass(frozen=True)
class View:
    """One view's parameters: ``box`` (i, j, h, w) in source pixels, ``flip``, ``ops`` ((op index, magnitude), ...)."""

    box: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[int, float], ...]

    def row(self) -> np.ndarray:
        """The stored form: (5 + 2 n,) float32."""
        return np.array([*self.box, float(self.flip), *(x for op in self.ops for x in op)], dtype=np.float32)

    @classmethod
    def from_row(cls, row: Sequence[float]) -> "View":
        row = [float(x) for x in row]
        ops = tuple((int(row[k]), row[k + 1]) for k in range(HEAD, len(row), 2))
        return cls(tuple(int(x) for x in row[:4]), bool(row[4]), ops)

    def to_param_aug(self, cfg: AugmentCfg) -> list:
        """MobileCLIP's compressed parameters of this view under ``cfg``: crop, the flip when ``cfg.hflip`` is on,
        the RandAugment operations when ``cfg.num_ops`` is."""
        out: list = [list(self.box)]
        if cfg.hflip > 0:
            out.append(self.flip)
        if cfg.num_ops > 0:
            out.append([[op, magnitude] for op, magnitude in self.ops])
        return out

    @classmethod
    def from_param_aug(cls, entry: Sequence, cfg: AugmentCfg) -> "View":
        box, rest = entry[0], list(entry[1:])
        flip = bool(rest.pop(0)) if cfg.hflip > 0 else False
        ops = tuple((int(op), float(magnitude)) for op, magnitude in (rest.pop(0) if cfg.num_ops > 0 else []))
        return cls(tuple(int(x) for x in box), flip, ops)


@functools.lru_cache(maxsize=16)
def magnitudes(view_hw: tuple[int, int]) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's RandAugment magnitude table for an image of ``view_hw`` pixels: name -> (bins, signed) (one
    per size: building it costs more than drawing a view)."""
    return RandAugment(num_magnitude_bins=MAGNITUDE_BINS)._augmentation_space(MAGNITUDE_BINS, tuple(view_hw))


def sample_crop(cfg: AugmentCfg, source_hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (10 tries, then the central crop), drawn from ``rng``."""
    height, width = source_hw
    area, log_ratio = height * width, (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(cfg: AugmentCfg, source_hw: tuple[int, int], view_hw: tuple[int, int],
                rng: np.random.Generator) -> View:
    """A random view of an image of ``source_hw`` pixels whose operations act on a ``view_hw`` image (the size the
    crop is resized to): torchvision's RandomResizedCrop, a flip with probability ``hflip``, then RandAugment's
    ``num_ops`` uniform operations at ``magnitude``, each sign a coin toss where the operation is signed."""
    box = sample_crop(cfg, source_hw, rng)
    flip = bool(rng.random() < cfg.hflip)
    table, ops = magnitudes(view_hw), []
    for _ in range(cfg.num_ops):
        op = int(rng.integers(len(OP_NAMES)))
        bins, signed = table[OP_NAMES[op]]
        magnitude = float(bins[cfg.magnitude].item()) if bins.ndim > 0 else 0.0
        if signed and rng.integers(2):
            magnitude = -magnitude
        ops.append((op, magnitude))
    return View(box, flip, tuple(ops))


def evaluation_view(source_hw: tuple[int, int], resize_mode: str, num_ops: int) -> View:
    """The region an open_clip evaluation transform keeps, as a view without flip or operations: the whole image for
    ``squash`` (and ``longest``, whose padding a crop cannot express), the centred square for ``shortest``."""
    height, width = source_hw
    if resize_mode != "shortest":
        return View((0, 0, height, width), False, ((0, 0.0),) * num_ops)
    side = min(height, width)
    return View((int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side), False,
                ((0, 0.0),) * num_ops)


def view_problem(view: View, source_hw: tuple[int, int]) -> Optional[str]:
    """None if ``view`` can be replayed on an image of ``source_hw`` pixels, else what is wrong, in words."""
    i, j, h, w = view.box
    height, width = source_hw
    if not (h >= 1 and w >= 1 and 0 <= i and 0 <= j and i + h <= height and j + w <= width):
        return f"crop [i, j, h, w] = {list(view.box)} lies outside its {height}x{width} image"
    for op, magnitude in view.ops:
        if not 0 <= op < len(OP_NAMES) or not math.isfinite(magnitude):
            return f"operation ({op}, {magnitude}) is not a RandAugment operation index 0-{len(OP_NAMES) - 1} with " \
                   f"a finite magnitude"
    return None


def rows_problem(rows: np.ndarray, source_hw: np.ndarray) -> Optional[tuple[int, int, str]]:
    """The first (sample, view, what is wrong) among stored rows (N, K, P) of images (N, 2), else None."""
    box, height, width = rows[..., :4], source_hw[:, None, 0], source_hw[:, None, 1]
    ops = rows[..., HEAD::2]
    bad = ~np.isfinite(rows).all(axis=-1) | (box != np.round(box)).any(axis=-1) | ~np.isin(rows[..., 4], (0, 1))
    bad |= (box[..., 2] < 1) | (box[..., 3] < 1) | (box[..., 0] < 0) | (box[..., 1] < 0)
    bad |= (box[..., 0] + box[..., 2] > height) | (box[..., 1] + box[..., 3] > width)
    bad |= ((ops != np.round(ops)) | (ops < 0) | (ops >= len(OP_NAMES))).any(axis=-1)
    if not bad.any():
        return None
    sample, view = (int(x) for x in np.argwhere(bad)[0])
    row = rows[sample, view]
    what = view_problem(View.from_row(row), tuple(int(x) for x in source_hw[sample])) if np.isfinite(row).all() \
        else None
    return sample, view, what or f"parameters {row.tolist()} are not a crop, a flip of 0 or 1 and operations"


def replay(image: Image.Image, view: View, out_hw: tuple[int, int], reference_hw: tuple[int, int],
           interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> Image.Image:
    """``view`` applied to ``image`` at ``out_hw`` pixels through torchvision's ops: the crop resized (open_clip's
    bicubic), the flip, then each RandAugment operation (nearest, black fill: RandAugment's defaults), translations
    scaled from the ``reference_hw`` image they were drawn for. A view that does not fit the image is a UserError."""
    problem = view_problem(view, (image.height, image.width))
    if problem:
        raise UserError(f"view {problem}")
    image = F.resized_crop(image, *view.box, list(out_hw), interpolation=interpolation, antialias=True)
    if view.flip:
        image = F.hflip(image)
    for op, magnitude in view.ops:
        name = OP_NAMES[op]
        if name == "TranslateX":
            magnitude *= out_hw[1] / reference_hw[1]
        elif name == "TranslateY":
            magnitude *= out_hw[0] / reference_hw[0]
        image = _apply_op(image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return image


@dataclass(frozen=True)
class FreshViews:
    """A new view of every sample at every epoch (``--online-augment``): no store, so the teacher that runs on the
    batch sees the same view as the student. Drawn like a store's views (the crop box in source pixels, the
    operations for the ``reference_hw`` image) from a generator seeded by (seed, epoch, key), so the draw is the same
    in any worker, rank or order and after a resume; then replayed at each image output's own size."""

    cfg: AugmentCfg
    reference_hw: tuple[int, int]  # the image size the operations are drawn for (the teacher's, else the student's)
    out_hw: tuple[tuple[str, tuple[int, int]], ...]  # (image output name, its (height, width)) pairs
    seed: int = 0

    def draw(self, key: str, epoch: int, source_hw: tuple[int, int]) -> View:
        digest = hashlib.blake2b(f"fresh/{self.seed}/{epoch}/{key}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return sample_view(self.cfg, source_hw, self.reference_hw, rng)

    def images(self, image: Image.Image, key: str, epoch: int) -> dict[str, Image.Image]:
        """Output name -> this epoch's view of ``image`` at that output's size."""
        view = self.draw(key, epoch, (image.height, image.width))
        return {name: replay(image, view, hw, self.reference_hw) for name, hw in self.out_hw}


SAMPLINGS = ("random", "sequential")  # MobileCLIP's: a random stored view per step, or epoch modulo K


@dataclass(frozen=True)
class ViewDraw:
    """Which of its stored views and captions a sample gets in an epoch, and that view's pixels at the student's
    size. The draw is a pure function of (seed, epoch, key): the same in any worker, rank or order, and after a
    resume. ``sequential`` (MobileCLIP's sample-sequential) takes view ``epoch % views`` and synthetic caption
    ``epoch % (captions - 1)``; a synthetic caption replaces the ground truth with probability ``synthetic_ratio``
    (MobileCLIP's mix-synthetic ratio) either way."""

    rows: Callable[[str, int, Optional[str]], np.ndarray]  # (key, digest, url) -> the sample's stored rows (K, P)
    views: int  # stored views per sample (0: the store holds the evaluation view only, not replayed)
    captions: int  # stored captions per sample: the ground truth, then captions - 1 synthetic ones
    reference_hw: tuple[int, int]  # the image size the views' operations were drawn for (the teacher's)
    out_hw: tuple[int, int]  # the student's image size
    seed: int = 0
    sampling: str = "random"
    synthetic_ratio: float = 0.0

    def choose(self, key: str, epoch: int) -> tuple[Optional[int], int]:
        """(view, caption) of sample ``key`` in ``epoch``; view None when there are no stored views to replay."""
        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{key}".encode(), digest_size=24).digest()
        u = [int.from_bytes(digest[k:k + 8], "little") / 2 ** 64 for k in (0, 8, 16)]  # three uniforms in [0, 1)
        sequential = self.sampling == "sequential"
        view = None if self.views == 0 else epoch % self.views if sequential else int(u[0] * self.views)
        synthetic = self.captions - 1
        if synthetic == 0 or u[1] >= self.synthetic_ratio:
            return view, 0
        return view, 1 + (epoch % synthetic if sequential else int(u[2] * synthetic))

    def replay(self, image: Image.Image, raw: dict, view: int, digest: int) -> Image.Image:
        """Stored view ``view`` of the sample ``raw`` replayed on ``image``; its key and content ``digest`` (the
        codec's ``sample_digest``) are checked against the store."""
        key = raw["__key__"]
        stored = View.from_row(self.rows(key, digest, raw.get("__url__"))[view])
        problem = view_problem(stored, (image.height, image.width))
        if problem:
            raise UserError(f"sample {key!r} of shard {raw.get('__url__')}: stored view {view}: {problem}")
        return replay(image, stored, self.out_hw, self.reference_hw)
