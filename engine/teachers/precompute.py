"""Building a teacher store: each teacher (one, or an ensemble's members) run once over the shards, batch by batch,
part by part.

Resumable: shards already in the store are skipped (each part is written atomically); a part that is damaged or
was built from other data is refused. One process builds a store at a time (engine.core.lock).
engine.teachers.store holds the layout and the augmentation decision.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import models

from ..core.errors import StoreError
from ..core.io import sweep_temporaries
from ..core.lock import DEFAULT_TIMEOUT, building
from ..data import shards as data_lib
from . import reinforced
from . import store as store_lib


def check_unique_keys(urls: list[str]) -> dict[str, int]:
    """Refuse a dataset in which a ``__key__`` repeats (in one shard or across two), naming the key and shards;
    returns the samples in each shard."""
    seen: dict[str, str] = {}
    counts = {}
    for url in urls:
        keys = data_lib.shard_keys(url)  # a remote shard is read through once
        counts[url] = len(keys)
        for key in keys:
            if key in seen:
                where = f"twice in shard {url}" if seen[key] == url else f"in shards {seen[key]} and {url}"
                raise StoreError(f"sample key {key!r} appears {where}; every sample needs a unique "
                                           f"__key__ for its teacher embeddings to be found")
            seen[key] = url
    return counts


# images per teacher forward when not given: on a CPU a small batch's activations stay in the processor's caches
# (the default teacher embeds 1.7x faster in batches of 64 than of 500 on 2 cores); a GPU wants large ones
FORWARD_BATCH = {"cpu": 64, "cuda": 500}


def build_store(pattern: str, teachers: Sequence[tuple[str, str]], root: str | Path, batch_size: Optional[int] = None,
                progress: bool = True, device: str | torch.device | None = None,
                timeout: float = DEFAULT_TIMEOUT, settings: reinforced.Reinforcement = reinforced.Reinforcement()
                ) -> Path:
    """Run the ``teachers`` ((open_clip model, pretrained tag or checkpoint file) per member, in order) over every
    shard without a part yet, batch by batch as samples stream (memory independent of shard size): per sample and
    member one image forward per stored view (``settings.views``, at least one) and one text forward per caption
    (``settings.captions``; a caption repeated within a shard is run once), about ``batch_size`` images per forward
    (default: FORWARD_BATCH of the device).
    The members' rows are stored side by side along the last axis. One process builds a store at a time: another
    waits (at most ``timeout`` seconds) and then finds it built; the temporaries of killed builds are swept first."""
    root = Path(root)
    urls = data_lib.expand_urls(pattern)
    counts = check_unique_keys(urls)
    sizes = {url: counts[url] if size is None else size for url, size in data_lib.shard_sizes(urls).items()}
    fingerprints = [store_lib.teacher_fingerprint(name, pretrained) for name, pretrained in teachers]
    store_lib.create_root(root)
    with building(root, f"teacher store {root}", timeout):
        sweep_temporaries(root)
        sweep_temporaries(root / "parts")
        previous = store_lib.reopen(root, fingerprints)  # the output is checked before the teachers are loaded
        if previous:
            reinforced.check_settings(f"--teacher-store {root}", previous, settings, "pass its --augmentations, "
                                      "--aug-cfg and --captions, another --teacher-store, or delete it to rebuild it")
        todo = store_lib.shards_to_build(root, previous, urls) if previous else urls
        if previous and not todo:  # built already, or meanwhile by the process this one waited for
            if not previous["complete"]:
                store_lib.finish(root, previous)
            return root
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        batch_size = batch_size or FORWARD_BATCH.get(device.type, FORWARD_BATCH["cpu"])
        members = [models.create_teacher(name, pretrained, device=device) for name, pretrained in teachers]
        first = reinforced.TeacherInputs(members[0], models.get_tokenizer(teachers[0][0]), settings)
        inputs = reinforced.StoreInputs([first] + [
            reinforced.TeacherInputs(model, models.get_tokenizer(name), settings, first.image_hw)
            for model, (name, _) in zip(members[1:], teachers[1:])])
        records = [member_record(name, pretrained, fingerprint, model)
                   for (name, pretrained), fingerprint, model in zip(teachers, fingerprints, members)]
        manifest = previous or store_lib.begin(root, records, settings.record(inputs.reference_hw, inputs.resize_mode),
                                               pattern)
        _build_parts(root, manifest, todo, sizes, members, inputs, batch_size, progress)
        store_lib.finish(root, manifest)
    return root


def member_record(name: str, pretrained: str, fingerprint: str, teacher) -> dict:
    """A member's entry of the manifest's ``teachers`` (engine.teachers.manifest.MEMBER_FIELDS)."""
    return {"model": name, "pretrained": os.path.abspath(pretrained) if os.path.isfile(pretrained) else str(pretrained),
            "fingerprint": fingerprint, "logit_scale": teacher.logit_scale.exp().item(),
            "logit_bias": None if teacher.logit_bias is None else teacher.logit_bias.item(),  # a SigLIP teacher's
            "embed_dim": models.embed_dim(name)}


@torch.no_grad()
def _build_parts(root: Path, manifest: dict, todo: list[str], sizes: dict[str, int], members: list,
                 inputs: reinforced.StoreInputs, batch_size: int, progress: bool) -> None:
    device = next(members[0].parameters()).device
    views = inputs.settings.views
    samples_per_batch = max(1, batch_size // max(views, 1))  # about batch_size images per forward
    # closed (its line cleared) however the loop ends, so that an error is printed on a line of its own
    with tqdm(total=sum(sizes[u] for u in todo), desc="teacher embeddings", disable=not progress, leave=False) as bar:
        for url in todo:
            writer = store_lib.PartWriter(root, manifest, url, sizes[url])
            captions = [CaptionEmbeddings(teacher, device) for teacher in members]  # a part depends on its shard only
            try:
                decoded = (inputs(raw) for raw in data_lib.read_shard(url, sizes[url]))
                # the next batch decoded and its views replayed in a thread while the teachers embed this one
                for batch in data_lib.Prefetcher(data_lib.batched(decoded, samples_per_batch), depth=1):
                    rows = [(embed_images(teacher, member, batch[f"images_{k}"], device),
                             captions[k](batch[f"tokens_{k}"]))
                            for k, (teacher, member) in enumerate(zip(members, inputs.members))]
                    # the members side by side: (B, V, sum D_k), (B, C, sum D_k)
                    image, text = (torch.cat([member[i] for member in rows], dim=-1) for i in (0, 1))
                    writer.append(batch["key"], batch["digest"].tolist(), image, text,
                                  np.stack(batch["views"]) if views else None, np.stack(batch["source_hw"]))
                    bar.update(len(batch["key"]))
                writer.commit()
            except BaseException:
                writer.abort()
                raise


def embed_images(teacher, inputs: reinforced.TeacherInputs, images: torch.Tensor, device) -> torch.Tensor:
    """One teacher's L2-normalised embeddings of a batch's views, images uint8 (B, V, 3, H, W) -> (B, V, D), on the
    CPU."""
    image = teacher.encode_image(inputs.pixels(images.flatten(0, 1)).to(device), normalize=True)
    return F.normalize(image.float(), dim=-1).cpu().unflatten(0, images.shape[:2])


class CaptionEmbeddings:
    """One teacher's L2-normalised caption embeddings within one shard, each distinct caption (its token ids) run
    through the teacher once: captions repeat across a shard's samples (templated and synthetic captions, web
    duplicates), and a repeat is looked up instead. Kept for the shard only, so a part stays a function of its shard
    whatever was built before it (a resumed build writes the same bytes), and at most ``max_bytes`` of rows, the
    least recently used dropped first."""

    def __init__(self, teacher, device, max_bytes: int = 64 << 20):
        self.teacher, self.device, self.max_bytes = teacher, device, max_bytes
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # token ids' bytes -> (D,) float32

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, C, L) -> (B, C, D) float32 on the CPU."""
        flat = tokens.flatten(0, 1)
        keys = [row.tobytes() for row in flat.numpy()]
        first = {}  # each caption not yet embedded -> its first row in this batch
        for i, key in enumerate(keys):
            if key not in self.rows:
                first.setdefault(key, i)
        if first:
            new = self.teacher.encode_text(flat[list(first.values())].to(self.device), normalize=True)
            self.rows.update(zip(first, F.normalize(new.float(), dim=-1).cpu()))
        out = torch.stack([self.rows[key] for key in keys]).unflatten(0, tokens.shape[:2])
        for key in keys:
            self.rows.move_to_end(key)
        row_bytes = out.shape[-1] * out.element_size() + len(keys[0]) + 200  # + key and objects' overhead
        while len(self.rows) * row_bytes > self.max_bytes:
            self.rows.popitem(last=False)
        return out
