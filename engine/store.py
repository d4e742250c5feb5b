"""The teacher embedding store: L2-normalised fp16 teacher image/text embeddings keyed by ``__key__``.

Layout of a store directory::

    manifest.json         teacher (model, pretrained, fingerprint), logit_scale, embed_dim, count, parts, complete
    parts/<shard>.npz     keys (str), image (count x D fp16), text (count x D fp16) for one shard

Building goes shard by shard, each part written atomically, so a killed build resumes where it stopped. Loading
checks the manifest is complete, the teacher fingerprint, every part's sha256, and that the requested shards'
keys are all present (missing keys are named in the error).

Augmentation: the store holds one embedding per sample of the teacher's deterministic evaluation view; the
student trains on the same deterministic view (no random augmentation), so cached targets match what the
student sees exactly. Masked feature distillation (--mfd-mask-ratio) drops patches inside the student only, which
is compatible with full-image targets by design. Augmented training needs per-view targets: use --online-teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

FORMAT_VERSION = 1
AUGMENTATION = "none: one embedding per sample of the teacher's deterministic evaluation view"


class StoreError(ValueError):
    """A store that is missing, incomplete, corrupt, from another teacher, or lacks keys (message says which)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(model: str, pretrained: Optional[str]) -> str:
    """Identifies a teacher: ``model`` + the sha256 of a checkpoint file, or + the open_clip tag."""
    if pretrained and os.path.isfile(pretrained):
        return f"{model}:sha256={sha256_file(pretrained)[:16]}"
    return f"{model}:tag={pretrained}"


def part_name(url: str) -> str:
    return Path(url).name.rsplit(".", 1)[0] + ".npz"


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise StoreError(f"no teacher store at {root} (manifest.json missing); build it with "
                         f"`python -m engine.precompute --teacher-store {root} ...`")
    return json.loads(path.read_text())


def begin(root: Path, teacher: dict, logit_scale: float, embed_dim: int) -> dict:
    """Create or reopen a store for resuming; refuses a store begun by another teacher."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir(exist_ok=True)
    if (root / "manifest.json").exists():
        manifest = read_manifest(root)
        if manifest["teacher"]["fingerprint"] != teacher["fingerprint"]:
            raise StoreError(f"{root}: store was built by teacher {manifest['teacher']['fingerprint']}, "
                             f"not {teacher['fingerprint']}; use another --teacher-store directory")
        return manifest
    manifest = {"format": FORMAT_VERSION, "teacher": teacher, "logit_scale": logit_scale, "embed_dim": embed_dim,
                "dtype": "float16", "normalized": True, "augmentation": AUGMENTATION, "count": 0, "parts": {},
                "complete": False}
    _atomic_write_json(root / "manifest.json", manifest)
    return manifest


def write_part(root: Path, manifest: dict, url: str, keys: list[str], image: torch.Tensor, text: torch.Tensor) -> None:
    """Write one shard's embeddings atomically and record it (with checksum and shard size) in the manifest."""
    name = part_name(url)
    tmp = root / "parts" / (name + ".tmp")
    with open(tmp, "wb") as handle:  # np.savez would append .npz to a temp name
        np.savez(handle, keys=np.array(keys), image=image.to(torch.float16).numpy(),
                 text=text.to(torch.float16).numpy())
    os.replace(tmp, root / "parts" / name)
    manifest["parts"][Path(url).name] = {"file": f"parts/{name}", "count": len(keys),
                                         "sha256": sha256_file(root / "parts" / name),
                                         "shard_bytes": os.path.getsize(url)}
    manifest["count"] = sum(part["count"] for part in manifest["parts"].values())
    _atomic_write_json(root / "manifest.json", manifest)


def finish(root: Path, manifest: dict) -> None:
    manifest["complete"] = True
    _atomic_write_json(root / "manifest.json", manifest)


class TeacherStore:
    """Loaded, verified store: ``lookup(keys) -> (image (B, D), text (B, D))`` fp16 tensors."""

    def __init__(self, root: str | os.PathLike, urls: list[str], expected_teacher: Optional[str] = None,
                 check_keys: bool = True):
        from .data import shard_keys

        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.manifest = manifest
        if manifest.get("format") != FORMAT_VERSION:
            raise StoreError(f"{root}: store format {manifest.get('format')} is not {FORMAT_VERSION}")
        fingerprint = manifest["teacher"]["fingerprint"]
        if expected_teacher is not None and fingerprint != expected_teacher:
            raise StoreError(f"{root}: store was built by teacher {fingerprint}, but this run's teacher is "
                             f"{expected_teacher}; rebuild it with engine.precompute or pass the matching teacher")
        missing_shards = [u for u in urls if Path(u).name not in manifest["parts"]]
        if missing_shards:
            keys = [k for u in missing_shards[:3] for k in shard_keys(u)[:3]]
            state = "" if manifest["complete"] else " (the store build did not finish: rerun engine.precompute)"
            raise StoreError(f"{root}: store lacks the keys of {len(missing_shards)} shard(s) "
                             f"{[Path(u).name for u in missing_shards[:5]]}, e.g. missing keys {keys}{state}")
        self.logit_scale = float(manifest["logit_scale"])
        self.embed_dim = int(manifest["embed_dim"])
        self.teacher = manifest["teacher"]
        index, images, texts, offset = {}, [], [], 0
        for url in urls:
            part = manifest["parts"][Path(url).name]
            if os.path.getsize(url) != part["shard_bytes"]:
                raise StoreError(f"{root}: shard {url} changed since the store was built "
                                 f"({os.path.getsize(url)} bytes, store recorded {part['shard_bytes']}); rebuild")
            path = self.root / part["file"]
            if not path.exists() or sha256_file(path) != part["sha256"]:
                raise StoreError(f"{root}: part {part['file']} is missing or its checksum does not match the manifest")
            with np.load(path) as data:
                keys, image, text = list(data["keys"]), data["image"], data["text"]
            if check_keys:
                absent = sorted(set(shard_keys(url)) - set(keys))
                if absent:
                    raise StoreError(f"{root}: store lacks {len(absent)} key(s) of shard {url}: {absent[:10]}")
            index.update((str(k), offset + i) for i, k in enumerate(keys))
            images.append(torch.from_numpy(image))
            texts.append(torch.from_numpy(text))
            offset += len(keys)
        self.index = index
        self.image = torch.cat(images)
        self.text = torch.cat(texts)

    def lookup(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.index.get(k) for k in keys]
        if None in rows:
            absent = [k for k, r in zip(keys, rows) if r is None]
            raise StoreError(f"{self.root}: teacher store has no embeddings for key(s) {absent[:10]}")
        rows = torch.tensor(rows)
        return self.image[rows], self.text[rows]
