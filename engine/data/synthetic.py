"""The embedded default dataset: procedural shape images with template captions, as webdataset tar shards.

Each sample is a 32x32 image of one shape (6 shapes x 6 colours = 36 zero-shot classes, class = "<colour> <shape>")
with a random size, position, background colour and noise, and a caption from a template that mentions the colour,
shape and some of the size, position and background (so retrieval needs more than the class). Shards follow
img2dataset's layout: ``{key}.png`` + ``{key}.txt`` + ``{key}.json`` per sample, plus DataCompDR's ``{key}.syn.json``
(``{"syn_text": [...]}``: ``SYNTHETIC_CAPTIONS`` more captions of the same image from the other templates), names
``train-{00000..000NN}.tar``, a ``sizes.json`` (shard file -> sample count) and a ``dataset.json`` recording how the
data was made. Generation is deterministic in (seed, split, shard), writes every file atomically (temp +
os.replace), one process at a time (engine.core.lock); the synthetic captions come from a generator of their own, so
images and ``.txt`` captions are those of format 1.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..core.errors import UserError
from ..core.io import atomic_write, atomic_write_json, sweep_temporaries
from ..core.lock import DEFAULT_TIMEOUT, building

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128), "brown": (110, 70, 40)}
SIZES = {"small": (9, 12), "large": (16, 21)}  # bounding-box side in pixels (inclusive range)
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "center": (0.5, 0.5),
             "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} in the {position}",
    "{background} background with a {size} {colour} {shape}",
    "a picture of a {colour} {shape} in the {position} of the image",
    "a {size} {colour} {shape} at the {position} with a {background} background",
)
# Zero-shot prompts: the class name "<colour> <shape>" goes in {c}.
PROMPT_TEMPLATES = ("a {c}.", "a photo of a {c}.", "a picture of a {c}.", "an image of a {c} on a background.")
CLASSNAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges
SYNTHETIC_CAPTIONS = 4  # captions in each sample's syn.json besides its .txt
FORMAT_VERSION = 2  # 2: the syn.json member
MEMBERS = ("png", "txt", "json", "syn.json")


@dataclass(frozen=True)
class SyntheticSpec:
    """How a procedural dataset is made; stored as dataset.json and compared on reuse."""

    train_samples: int = 16000
    val_samples: int = 1000
    shard_size: int = 1000
    seed: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("train_samples", "val_samples", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise UserError(f"--seed: must be >= 0, got {self.seed}")  # numpy seeds are non-negative


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    w = 0.36 * r  # cross arm half-width
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def render(shape: str, colour: tuple, background: tuple, side: float, center: tuple,
           rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One ``size`` x ``size`` RGB image (32x32 by default): ``shape`` of bounding-box ``side`` px at ``center``
    (pixels), with jitter and noise. Drawn at 4x 32 pixels and downsampled (anti-aliased edges), and directly from
    128 pixels on."""
    s = max(1, _SUPERSAMPLE * IMAGE_SIZE // size)
    def jitter(rgb, amount):
        return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)

    canvas = Image.new("RGB", (size * s, size * s), jitter(background, 12))
    draw = ImageDraw.Draw(canvas)
    cx, cy, r, fill = center[0] * s, center[1] * s, side * s / 2, jitter(colour, 25)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=canvas.getpixel((0, 0)))
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    image = np.asarray(canvas.resize((size, size), Image.BOX) if s > 1 else canvas, dtype=np.float32)
    image = image + rng.normal(0.0, 6.0, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_sample(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, dict]:
    """Draw one (image, metadata) pair; metadata holds the caption and the label (index into CLASSNAMES). ``size``:
    the image's side in pixels; shapes, positions and jitter scale with it (the same draws from ``rng`` at any
    size)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size_name = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    zoom = size / IMAGE_SIZE  # 1.0 by default: the draws and the arithmetic of the 32x32 dataset
    side = int(rng.integers(SIZES[size_name][0], SIZES[size_name][1] + 1)) * zoom
    fx, fy = POSITIONS[position]
    center = (fx * size + rng.uniform(-1.5, 1.5) * zoom, fy * size + rng.uniform(-1.5, 1.5) * zoom)
    image = render(shape, COLOURS[colour], BACKGROUNDS[background], side, center, rng, size)
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = template.format(size=size_name, colour=colour, shape=shape, position=position, background=background)
    meta = {"caption": caption, "shape": shape, "colour": colour, "size": size_name, "position": position,
            "background": background, "label": CLASSNAMES.index(f"{colour} {shape}"), "classname": f"{colour} {shape}"}
    return image, meta


def synthetic_captions(meta: dict, rng: np.random.Generator) -> list[str]:
    """``SYNTHETIC_CAPTIONS`` captions of the sample ``meta`` describes, from templates other than its caption's, in
    a random order."""
    attributes = {name: meta[name] for name in ("size", "colour", "shape", "position", "background")}
    others = [text for text in (t.format(**attributes) for t in CAPTION_TEMPLATES) if text != meta["caption"]]
    return [others[i] for i in rng.permutation(len(others))[:SYNTHETIC_CAPTIONS]]


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: byte-identical shards for equal seeds
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, split_id: int, shard: int, count: int, seed: int) -> None:
    """Write one shard atomically; keys are img2dataset-style ``{shard:05d}{index:04d}`` (prefixed by split)."""
    atomic_write(path, lambda tmp: _write_samples(tmp, split_id, shard, count, seed), "shard")


def _write_samples(tmp: Path, split_id: int, shard: int, count: int, seed: int) -> None:
    rng = np.random.default_rng([seed, split_id, shard])
    syn_rng = np.random.default_rng([seed, split_id, shard, 1])  # a stream of its own: the images stay format 1's
    with tarfile.open(tmp, "w") as tar:
        for index in range(count):
            image, meta = make_sample(rng)
            key = f"{split_id}{shard:05d}{index:04d}"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            meta = {"key": key, "width": IMAGE_SIZE, "height": IMAGE_SIZE, **meta}
            _add(tar, f"{key}.png", buffer.getvalue())
            _add(tar, f"{key}.txt", meta["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.syn.json", json.dumps({"syn_text": synthetic_captions(meta, syn_rng)}).encode())


def shard_pattern(root: Path, split: str, count: int) -> str:
    """Brace-expandable pattern of a split's shards, e.g. ``root/train-{00000..00023}.tar``."""
    return str(Path(root) / f"{split}-{{00000..{count - 1:05d}}}.tar")


def build(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True,
          timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """Generate (or reuse) the dataset under ``root``; returns {"train": pattern, "val": pattern}.

    One process generates at a time (a lock on ``root``; another waits at most ``timeout`` seconds, then reuses what
    it built). building.json records the spec of an unfinished build: a rerun with that spec keeps its intact shards
    (each is written atomically) and removes the temporaries of killed builds; dataset.json is written last and
    marks the dataset complete. A folder holding another spec, or shards of unknown origin, is refused (a UserError
    naming it).
    """
    root = Path(root)
    marker = root / "dataset.json"
    if not marker.exists():
        _make_folder(root)
        with building(root, f"the procedural dataset in {root}", timeout):
            sweep_temporaries(root)
            if not marker.exists():  # else another process finished it while this one waited
                _generate(root, spec, progress)
    found = _read_spec(marker)
    if found != asdict(spec):
        raise UserError(f"{root}: holds a procedural dataset made with {found}, not {asdict(spec)}; "
                        "use another --data-dir or delete it")
    return _patterns(root, spec)


def _generate(root: Path, spec: SyntheticSpec, progress: bool) -> None:
    building_file = root / "building.json"
    foreign = _read_spec(building_file) != asdict(spec) if building_file.exists() else _has_outputs(root)
    if foreign:
        raise UserError(f"{root}: holds an unfinished procedural dataset made with other settings (or shards of "
                        "unknown origin); remove it or pick another --data-dir")
    atomic_write_json(building_file, asdict(spec))
    sizes, jobs = {}, []
    for split_id, (split, total) in enumerate((("train", spec.train_samples), ("val", spec.val_samples)), start=1):
        for shard in range((total + spec.shard_size - 1) // spec.shard_size):
            count = min(spec.shard_size, total - shard * spec.shard_size)
            name = f"{split}-{shard:05d}.tar"
            sizes[name] = count
            if not _intact(root / name, count):
                jobs.append((root / name, split_id, shard, count))
    bar = _progress(len(jobs), "generating shards", progress)
    for path, split_id, shard, count in jobs:
        write_shard(path, split_id, shard, count, spec.seed)
        bar.update(1)
    bar.close()
    atomic_write_json(root / "sizes.json", sizes)
    atomic_write_json(root / "classnames.json", {"classnames": list(CLASSNAMES), "templates": list(PROMPT_TEMPLATES)})
    atomic_write_json(root / "dataset.json", asdict(spec))
    building_file.unlink()


def _read_spec(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable or damaged ({exc}); delete {path.parent} or use another --data-dir"
                         ) from exc


def _make_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder; use another --data-dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{root}: cannot create the data folder ({exc.strerror})") from exc
    if not os.access(root, os.W_OK):
        raise UserError(f"{root}: the data folder is not writable")


def _has_outputs(root: Path) -> bool:
    """``root`` holds files a build writes (without building.json, their spec is unknown)."""
    return any(re.fullmatch(r"(train|val)-\d{5}\.tar|sizes\.json|classnames\.json", p.name) for p in root.iterdir())


def _intact(path: Path, count: int) -> bool:
    """``path`` is a readable shard of ``count`` samples (a damaged one is written again)."""
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        # a shard cut inside its last member still lists every member
        complete = members and members[-1].offset_data + members[-1].size <= path.stat().st_size
        return len(members) == len(MEMBERS) * count and bool(complete)
    except (OSError, tarfile.TarError):
        return False


def _patterns(root: Path, spec: SyntheticSpec) -> dict[str, str]:
    def shards(n):
        return (n + spec.shard_size - 1) // spec.shard_size

    return {"train": shard_pattern(root, "train", shards(spec.train_samples)),
            "val": shard_pattern(root, "val", shards(spec.val_samples))}


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled or total == 0, leave=False)
