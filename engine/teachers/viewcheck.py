"""Checking a reinforced store's views: stored views replayed from their parameters and embedded again by the store's
teachers must give the stored embeddings, to within fp16 rounding.

The check reads only the shards of the chosen samples, and each chosen sample must still be the one the store was
built from (key and content digest). A store of a teacher ensemble is checked member by member: each member replays
the chosen views at its own image size and is compared with its own slice of the stored rows, and the worst error is
reported per member. DataCompDR shards (``verify_shard_views``), which carry their own views and embeddings, are
checked the same way against the teachers the user names. ``python -m engine.store verify-views`` is its command.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import models

from ..core.errors import StoreError, UserError
from ..data import datacompdr as dr
from ..data.shards import decode_image, expand_urls, read_shard, sample_digest
from . import reinforced
from .manifest import match_parts
from .store import TeacherStore, teacher_fingerprint

# 1 - cosine between a replayed view's embedding and the stored one. Rounding a unit vector to fp16 turns it by at
# most 2^-11 rad, a cosine error of at most 2^-23; 2^-20 leaves room for another device's float arithmetic (a store
# built on a GPU), and a crop moved by one pixel measured 3e-5 on the tiny teacher.
VIEW_TOLERANCE = 2.0 ** -20


@dataclass
class ViewCheck:
    """One teacher's outcome: its fingerprint, how many views were replayed, the worst cosine error, which view."""

    teacher: str
    checked: int
    worst: float
    where: str
    tolerance: float = VIEW_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance


def chosen_views(store: TeacherStore, samples: int, seed: int) -> dict[int, dict[int, list[int]]]:
    """``samples`` random (sample, view) pairs of the store, all of them when it holds fewer: part -> row -> views."""
    views, total = store.reinforcement.views, int(store.offsets[-1]) * store.reinforcement.views
    picked = np.arange(total) if samples >= total else np.sort(np.random.default_rng(seed).choice(total, samples,
                                                                                                   replace=False))
    chosen: dict[int, dict[int, list[int]]] = {}
    for flat in picked.tolist():
        part, row = store._where(flat // views)
        chosen.setdefault(part, {}).setdefault(row, []).append(flat % views)
    return chosen


def store_teacher(store: TeacherStore, member: int, device) -> torch.nn.Module:
    """Member ``member`` of the store's teachers, from the file or tag its manifest names (which must still be that
    one)."""
    record = store.teachers[member]
    if teacher_fingerprint(record["model"], record["pretrained"]) != record["fingerprint"]:
        raise StoreError(f"{store.root}: its teacher {record['pretrained']} is no longer the one it was built by "
                         f"({record['fingerprint']}); the views cannot be checked against it")
    return models.create_teacher(record["model"], record["pretrained"], device=device)


def shard_urls(store: TeacherStore, train_data: Optional[str]) -> dict[str, str]:
    """Part name -> the path or URL of its shard, from ``train_data`` or the data the store was built from."""
    pattern = train_data or store.manifest.get("train_data")
    if pattern is None:
        raise UserError(f"{store.root}: the store does not record its data: pass --train-data")
    urls = expand_urls(pattern)
    return {name: url for name, url in zip(match_parts(store.manifest["parts"], urls), urls) if name is not None}


@torch.no_grad()
def verify_views(root: str | os.PathLike, samples: int, train_data: Optional[str] = None, seed: int = 0,
                 device: str = "cpu", batch_size: int = 256) -> list[ViewCheck]:
    """Replay ``samples`` random stored views (every one, with ``samples`` >= the store's views) from their stored
    parameters, embed them with each of the store's teachers and compare with that teacher's stored embeddings; one
    ViewCheck per teacher, in the store's order."""
    if samples < 1:
        raise UserError(f"--samples: must be >= 1, got {samples}")
    store = TeacherStore(root)
    if not store.reinforcement.views:
        raise StoreError(f"{root}: the store holds no stored views (built without --augmentations), nothing to replay")
    urls = shard_urls(store, train_data)
    chosen = [sample for part, rows in chosen_views(store, samples, seed).items()
              for sample in chosen_samples(store, part, rows, urls)]
    names = [name for sample_names, _, _, _ in chosen for name in sample_names]
    stored = torch.cat([rows for _, _, _, rows in chosen])  # (views checked, W): every member side by side
    reference_hw = tuple(store.manifest["augmentation"]["reference_hw"])  # the size the views were drawn for
    checks, start = [], 0
    for member, width in enumerate(store.member_dims):
        teacher = store_teacher(store, member, device)
        inputs = reinforced.TeacherInputs(teacher, models.get_tokenizer(store.teachers[member]["model"]),
                                          store.reinforcement, reference_hw)
        images = torch.cat([inputs.replayed(image, views) for _, image, views, _ in chosen])
        checks.append(member_check(teacher, inputs, images, stored[:, start:start + width], names,
                                   store.teachers[member]["fingerprint"], device, batch_size))
        start += width
    return checks


def member_check(teacher: torch.nn.Module, inputs: reinforced.TeacherInputs, images: torch.Tensor,
                 stored: torch.Tensor, names: list[str], fingerprint: str, device, batch_size: int,
                 tolerance: float = VIEW_TOLERANCE) -> ViewCheck:
    """One teacher's embeddings of the replayed views, uint8 (N, 3, H, W) at its size, against its stored rows (N, D):
    the worst cosine error and the view it belongs to (``names``, one per view)."""
    fresh = torch.cat([teacher.encode_image(inputs.pixels(chunk).to(device), normalize=True).float().cpu()
                       for chunk in images.split(batch_size)])
    fresh, stored = (F.normalize(x.double(), dim=-1) for x in (fresh, stored))  # the cosine, not its float32 ulp
    errors = 1 - (fresh * stored).sum(dim=-1)
    worst = int(errors.argmax())
    return ViewCheck(fingerprint, len(names), float(errors[worst]), names[worst], tolerance)


def chosen_samples(store: TeacherStore, part: int, rows: dict[int, list[int]], urls: dict[str, str]):
    """Per chosen sample of one part: (names of its chosen views, its decoded image, their stored parameters
    (k, P), their stored embeddings (k, W)); the sample must be the one the store was built from."""
    arrays, shard = store.parts[part], store.parts[part]["shard"]
    if arrays["name"] not in urls:
        raise UserError(f"--train-data: has no shard {shard}, which the store was built from")
    url = urls[arrays["name"]]
    wanted = {str(arrays["keys"][row]): row for row in rows}
    for raw in read_shard(url):
        row = wanted.pop(raw["__key__"], None)
        if row is None:
            continue
        if sample_digest(raw) != int(arrays["digests"][row]):
            raise StoreError(f"{store.root}: sample {raw['__key__']!r} of shard {url} is not the sample the store was "
                             f"built from (content digest differs)")
        views = rows[row]
        yield ([f"sample {raw['__key__']!r} of shard {Path(url).name}, view {v}" for v in views], decode_image(raw),
               np.asarray(arrays["views"][row])[views], torch.from_numpy(np.asarray(arrays["image"][row])[views]))
    if wanted:
        raise UserError(f"--train-data: shard {url} lacks samples the store holds, e.g. {sorted(wanted)[:3]}")


# DataCompDR's pth.gz rows are bf16: rounding each component of a unit vector by at most 2^-9 of it turns the vector
# by at most 2^-9 rad, a cosine error of at most 2^-19; 2^-17 leaves the same room as VIEW_TOLERANCE does for fp16.
BF16_VIEW_TOLERANCE = 2.0 ** -17


@torch.no_grad()
def verify_shard_views(pattern: str, teachers: list[tuple[str, str]], samples: int,
                       reference_hw: Optional[tuple[int, int]] = None, seed: int = 0, device: str = "cpu",
                       batch_size: int = 256) -> list[ViewCheck]:
    """The same check on DataCompDR shards, which carry their views and embeddings but do not name their teachers:
    ``teachers`` (model, weights) in the order of the rows' members, their widths summing to the stored width. The
    views of the samples of the shards, visited in a random order (``seed``), are replayed until ``samples`` views
    (all of them when the shards hold fewer) at each teacher's size, the operations' translations scaled from
    ``reference_hw`` (the reinforcement config's size; None: the first teacher's), and compared with that teacher's
    slice of ``image_emb``. One ViewCheck per teacher; its tolerance is bf16's where a checked sample's rows are
    ``pth.gz``."""
    if samples < 1:
        raise UserError(f"--samples: must be >= 1, got {samples}")
    urls = expand_urls(pattern)
    models_ = [models.create_teacher(model, weights, device=device) for model, weights in teachers]
    widths = [models.embed_dim(model) for model, _ in teachers]
    inputs = [reinforced.TeacherInputs(teacher, None, reinforced.Reinforcement(),
                                       reference_hw or reinforced.image_hw(models_[0])) for teacher in models_]
    names, images, stored, bf16 = [], [[] for _ in models_], [], False
    order = np.random.default_rng(seed).permutation(urls).tolist()
    for raw in (raw for url in order for raw in read_shard(url)):
        views, image_emb, _ = dr.read_views_and_embeddings(raw)
        if sum(widths) != image_emb.shape[1]:
            raise UserError(f"--teacher: the teachers' widths {widths} sum to {sum(widths)}, but sample "
                            f"{raw['__key__']!r} of shard {raw['__url__']} stores rows {image_emb.shape[1]} wide")
        image, take = decode_image(raw), min(len(views), samples - len(names))
        dr.check_views_replayable(raw, views[:take], image)
        rows = np.stack([view.row() for view in views[:take]])
        for member, member_inputs in enumerate(inputs):
            images[member].append(member_inputs.replayed(image, rows))
        stored.append(torch.from_numpy(image_emb[:take]))
        names += [f"sample {raw['__key__']!r} of shard {Path(raw['__url__']).name}, view {v}" for v in range(take)]
        bf16 |= "pth.gz" in raw
        if len(names) == samples:
            break
    if not names:
        raise UserError(f"{pattern}: the shards hold no samples")
    rows, checks, start = torch.cat(stored), [], 0
    for member, (teacher, width) in enumerate(zip(models_, widths)):
        model, weights = teachers[member]
        checks.append(member_check(teacher, inputs[member], torch.cat(images[member]), rows[:, start:start + width],
                                   names, teacher_fingerprint(model, weights), device, batch_size,
                                   BF16_VIEW_TOLERANCE if bf16 else VIEW_TOLERANCE))
        start += width
    return checks
