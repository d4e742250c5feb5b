"""A writer of small DataCompDR shards for the tests, made with torchvision's own ops and two tiny teachers (not
with engine.data.datacompdr): per sample a PNG, .txt, syn.json, paug.json (K views), npz (fp32) or pth.gz (bf16)
with the teachers' embeddings concatenated along the last axis, and json (uid, sha256)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import _apply_op

import models

NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
         "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # RandAugment's order (MobileCLIP's)
SIZE = 32  # the teachers' and the student's image size: the views' operations are drawn for it
VIEWS = 3
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 210), "yellow": (220, 210, 40)}
SYNTHETIC = {"syn_text": ["a {c} thing on grey", "something {c}"], "syn_other": ["the colour {c}"]}


def draw_view(rng: np.random.Generator, hw: tuple[int, int]) -> list:
    """A param_aug entry: a crop box inside the image, a flip, two RandAugment operations at magnitude bin 9."""
    height, width = hw
    h, w = int(rng.integers(height // 2, height + 1)), int(rng.integers(width // 2, width + 1))
    box = [int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w]
    table = RandAugment()._augmentation_space(31, (SIZE, SIZE))
    ops = []
    for _ in range(2):
        op = int(rng.integers(len(NAMES)))
        bins, signed = table[NAMES[op]]
        magnitude = float(bins[9].item()) if bins.ndim > 0 else 0.0
        ops.append([op, -magnitude if signed and rng.integers(2) else magnitude])
    return [box, bool(rng.integers(2)), ops]


def apply_view(image: Image.Image, entry: list) -> Image.Image:
    """torchvision's primitives with the entry's parameters: resized crop (bicubic), flip, each operation."""
    (i, j, h, w), flip, ops = entry
    out = TF.resized_crop(image, i, j, h, w, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC, antialias=True)
    out = TF.hflip(out) if flip else out
    for op, magnitude in ops:
        out = _apply_op(out, NAMES[op], magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return out


def pixels(image: Image.Image) -> torch.Tensor:
    """(3, 32, 32) normalised as the tiny models' preprocessing (mean and std 0.5)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


@torch.no_grad()
def embed(teachers: list, images: list[Image.Image], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(len(images), W) and (len(captions), W) fp32: each teacher's normalised embeddings, concatenated."""
    batch = torch.stack([pixels(image) for image in images])
    tokens = models.get_tokenizer("tiny-vit-teacher")(captions)
    image = torch.cat([F.normalize(t.encode_image(batch), dim=-1) for t in teachers], dim=-1)
    text = torch.cat([F.normalize(t.encode_text(tokens), dim=-1) for t in teachers], dim=-1)
    return image.numpy(), text.numpy()


def make_sample(index: int, teachers: list, rng: np.random.Generator, embeddings: str) -> dict:
    colour = list(COLOURS)[index % len(COLOURS)]
    array = np.full((40, 48, 3), 128, np.uint8)
    y, x = int(rng.integers(0, 20)), int(rng.integers(0, 24))
    array[y:y + 20, x:x + 24] = COLOURS[colour]
    array = np.clip(array + rng.integers(-20, 21, array.shape), 0, 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    image = Image.open(io.BytesIO(png.getvalue())).convert("RGB")
    entries = [draw_view(rng, (40, 48)) for _ in range(VIEWS)]
    synthetic = {key: [text.format(c=colour) for text in texts] for key, texts in SYNTHETIC.items()}
    captions = [f"a {colour} box"] + [text for texts in synthetic.values() for text in texts]
    image_emb, text_emb = embed(teachers, [apply_view(image, entry) for entry in entries], captions)
    key = f"{index:06d}"
    members = {"png": png.getvalue(), "txt": captions[0].encode(), "syn.json": json.dumps(synthetic).encode(),
               "paug.json": json.dumps({"param_aug": entries if index % 2 else json.dumps(entries)}).encode(),
               "json": json.dumps({"uid": key, "sha256": hashlib.sha256(png.getvalue()).hexdigest()}).encode()}
    if embeddings == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, image_emb=image_emb, text_emb=text_emb)
        members["npz"] = buffer.getvalue()
    else:
        buffer = io.BytesIO()
        torch.save({"image_emb": torch.from_numpy(image_emb).bfloat16(),
                    "text_emb": torch.from_numpy(text_emb).bfloat16()}, buffer)
        members["pth.gz"] = gzip.compress(buffer.getvalue())
    return {"__key__": key, **members}


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                if name.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, teachers: list, shards: int = 2, per_shard: int = 12, seed: int = 0,
                 edit: Optional[Callable[[dict], dict]] = None) -> str:
    """``shards`` tars of ``per_shard`` samples under ``root`` (shard 0 npz, the others pth.gz); ``edit`` may change
    each sample's members before writing. Returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        samples = [make_sample(shard * per_shard + k, teachers, rng, "npz" if shard == 0 else "pth.gz")
                   for k in range(per_shard)]
        write_tar(root / f"{shard:05d}.tar", [edit(s) if edit else s for s in samples])
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def read_tar(path: Path) -> list[dict]:
    """The samples of a tar written by write_tar (for tests that edit shards)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(info).read()
    return list(samples.values())
