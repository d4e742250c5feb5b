"""Writing DataCompDR shards from a reinforced teacher store (``engine.precompute --output-format datacompdr``).

Each source shard becomes one shard of the same name under the output folder, written atomically (a temporary
name, then a rename), so an interrupted export resumes with the shards not yet written. A sample keeps its image,
``txt`` and other members and gains ``paug.json`` (its K stored views as MobileCLIP's ``param_aug``), ``syn.json``
(the synthetic captions the store embedded, under ``syn_text``), ``npz`` (fp32 ``image_emb`` (K, W), ``text_emb``
(C, W): the store's rows as they are, a teacher ensemble's members side by side, DataCompDR's own layout, which
``--distill-teacher-dimension D1 D2 ...`` splits again) and ``json`` (its ``uid``, kept if it had one, else its
key, and the image's ``sha256``). ``sizes.json`` records each shard's sample count.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.errors import ConfigError
from ..core.io import atomic_write, atomic_write_json
from ..data.augment import View
from ..data.shards import IMAGE_EXTENSIONS, expand_urls, read_shard, read_sizes_file, sample_captions, sample_digest
from .store import TeacherStore

REPLACED = ("paug.json", "syn.json", "npz", "pth.gz", "json")  # members the export writes itself


def sample_members(raw: dict, store: TeacherStore) -> dict:
    """The DataCompDR members of one source sample: its own, with views, captions, embeddings and json."""
    settings, key, digest, url = store.reinforcement, raw["__key__"], sample_digest(raw), raw.get("__url__")
    views = [View.from_row(row).to_param_aug(settings.aug) for row in store.view_rows(key, digest, url)]
    # (K, W) image rows, one lookup per view; (C, W) text rows, one per caption (W: every teacher's width, summed)
    image = np.stack([store.lookup([key], [digest], [url], [k], [0])[0][0].float().numpy()
                      for k in range(settings.views)])
    text = np.stack([store.lookup([key], [digest], [url], [0], [c])[1][0].float().numpy()
                     for c in range(settings.captions)])
    buffer = io.BytesIO()
    np.savez(buffer, image_emb=image, text_emb=text)
    image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in raw)
    meta = json.loads(raw["json"]) if "json" in raw else {}
    meta = meta if isinstance(meta, dict) else {}
    meta = {**meta, "uid": meta.get("uid", key), "sha256": hashlib.sha256(raw[image_ext]).hexdigest()}
    kept = {name: value for name, value in raw.items() if not name.startswith("__") and name not in REPLACED}
    return {**kept, "paug.json": json.dumps({"param_aug": views}).encode(),
            "syn.json": json.dumps({"syn_text": sample_captions(raw, settings.captions)[1:]}).encode(),
            "npz": buffer.getvalue(), "json": json.dumps(meta).encode()}


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


def export_datacompdr(train: str, store_root: Path, output: Path, progress: bool = True) -> dict[str, int]:
    """DataCompDR shards of ``train`` under ``output`` from the reinforced store at ``store_root`` (K >= 1 views);
    shards already there are kept. Returns shard name -> samples (also written to ``sizes.json``)."""
    urls = expand_urls(train)
    store = TeacherStore(store_root, urls)
    if store.reinforcement.views < 1:
        raise ConfigError("--output-format datacompdr: DataCompDR samples carry their views; pass --augmentations "
                          "K >= 1")
    output.mkdir(parents=True, exist_ok=True)
    sizes = read_sizes_file(output / "sizes.json")
    for url in urls:
        name = Path(url).name
        if (output / name).exists() and name in sizes:  # written (atomically) by an earlier run
            continue
        counted = []
        atomic_write(output / name, lambda tmp, url=url: counted.append(_write_tar(
            tmp, ((raw["__key__"], sample_members(raw, store)) for raw in read_shard(url)))), "DataCompDR shard")
        sizes[name] = counted[0]
        atomic_write_json(output / "sizes.json", sizes, "sizes file")
        if progress:
            print(f"{output / name}: {counted[0]} samples")
    return sizes
