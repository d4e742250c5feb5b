"""Writing DataCompDR shards from a reinforced teacher store (``engine.precompute --output-format datacompdr``).

Each source shard becomes one shard of the same name under the output folder, written atomically (a temporary
name, then a rename), so an interrupted export resumes with the shards not yet written. A sample keeps its image,
``txt`` and other members and gains ``paug.json`` (its K stored views as MobileCLIP's ``param_aug``), ``syn.json``
(the synthetic captions the store embedded, under ``syn_text``), the embeddings ``image_emb`` (K, W) and
``text_emb`` (C, W) (the store's rows as they are, a teacher ensemble's members side by side, DataCompDR's own
layout, which ``--distill-teacher-dimension D1 D2 ...`` splits again) and ``json`` (its ``uid``, kept if it had one,
else its key, and the image's ``sha256``). The embeddings are an ``npz`` (fp32 numpy archive) or a ``pth.gz``
(gzip'd ``torch.save`` of bf16 tensors, DataCompDR-1B's smaller form: 0.40 of npz's bytes for 30 views and 6
captions of two 768-wide teachers, at bf16's 8-bit mantissa). ``sizes.json`` records each shard's sample count,
``export.json`` the embeddings' member, so that a resumed export cannot mix the two.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core.errors import ConfigError
from ..core.io import atomic_write, atomic_write_json
from ..data.augment import View
from ..data.datacompdr import EMBEDDING_MEMBERS
from ..data.shards import IMAGE_EXTENSIONS, expand_urls, read_shard, read_sizes_file, sample_captions, sample_digest
from .store import TeacherStore

REPLACED = ("paug.json", "syn.json", *EMBEDDING_MEMBERS, "json")  # members the export writes itself


def embedding_member(image: np.ndarray, text: np.ndarray, embeddings: str) -> bytes:
    """The sample's ``npz`` (fp32) or ``pth.gz`` (bf16, gzip with a fixed time stamp: the same bytes every time)."""
    buffer = io.BytesIO()
    if embeddings == "npz":
        np.savez(buffer, image_emb=image, text_emb=text)
        return buffer.getvalue()
    torch.save({"image_emb": torch.from_numpy(image).bfloat16(), "text_emb": torch.from_numpy(text).bfloat16()},
               buffer)
    return gzip.compress(buffer.getvalue(), mtime=0)


def sample_members(raw: dict, store: TeacherStore, embeddings: str = "npz") -> dict:
    """The DataCompDR members of one source sample: its own, with views, captions, embeddings and json."""
    settings, key, digest, url = store.reinforcement, raw["__key__"], sample_digest(raw), raw.get("__url__")
    views = [View.from_row(row).to_param_aug(settings.aug) for row in store.view_rows(key, digest, url)]
    # (K, W) image rows, one lookup per view; (C, W) text rows, one per caption (W: every teacher's width, summed)
    image = np.stack([store.lookup([key], [digest], [url], [k], [0])[0][0].float().numpy()
                      for k in range(settings.views)])
    text = np.stack([store.lookup([key], [digest], [url], [0], [c])[1][0].float().numpy()
                     for c in range(settings.captions)])
    image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in raw)
    meta = json.loads(raw["json"]) if "json" in raw else {}
    meta = meta if isinstance(meta, dict) else {}
    meta = {**meta, "uid": meta.get("uid", key), "sha256": hashlib.sha256(raw[image_ext]).hexdigest()}
    kept = {name: value for name, value in raw.items() if not name.startswith("__") and name not in REPLACED}
    return {**kept, "paug.json": json.dumps({"param_aug": views}).encode(),
            "syn.json": json.dumps({"syn_text": sample_captions(raw, settings.captions)[1:]}).encode(),
            embeddings: embedding_member(image, text, embeddings), "json": json.dumps(meta).encode()}


def _write_tar(path: Path, samples: Iterator[tuple[str, dict]]) -> int:
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(members[name])
                tar.addfile(info, io.BytesIO(members[name]))
            count += 1
    return count


def export_datacompdr(train: str, store_root: Path, output: Path, progress: bool = True,
                      embeddings: str = "npz") -> dict[str, int]:
    """DataCompDR shards of ``train`` under ``output`` from the reinforced store at ``store_root`` (K >= 1 views),
    their embeddings as ``embeddings`` (npz or pth.gz); shards already there are kept. Returns shard name -> samples
    (also written to ``sizes.json``)."""
    if embeddings not in EMBEDDING_MEMBERS:
        raise ConfigError(f"--datacompdr-embeddings: {embeddings!r} is not one of {EMBEDDING_MEMBERS}")
    urls = expand_urls(train)
    store = TeacherStore(store_root, urls, access="sequential")  # every sample, shard by shard
    if store.reinforcement.views < 1:
        raise ConfigError("--output-format datacompdr: DataCompDR samples carry their views; pass --augmentations "
                          "K >= 1")
    output.mkdir(parents=True, exist_ok=True)
    record = output / "export.json"
    if record.exists():
        try:
            earlier = json.loads(record.read_text())["embeddings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--output {output}: its export.json is unreadable or damaged ({exc}); delete the "
                              f"folder or pass another --output") from exc
        if earlier != embeddings:
            raise ConfigError(f"--output {output}: holds shards with {earlier} embeddings, this export writes "
                              f"{embeddings}; pass --datacompdr-embeddings {earlier} to resume it, or another --output")
    else:
        atomic_write_json(record, {"embeddings": embeddings}, "export record")
    sizes = read_sizes_file(output / "sizes.json")
    for url in urls:
        name = Path(url).name
        if (output / name).exists() and name in sizes:  # written (atomically) by an earlier run
            continue
        counted = []
        atomic_write(output / name, lambda tmp, url=url: counted.append(_write_tar(
            tmp, ((raw["__key__"], sample_members(raw, store, embeddings)) for raw in read_shard(url)))),
            "DataCompDR shard")
        sizes[name] = counted[0]
        atomic_write_json(output / "sizes.json", sizes, "sizes file")
        if progress:
            print(f"{output / name}: {counted[0]} samples")
    return sizes
