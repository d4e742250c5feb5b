"""The teacher embedding store: L2-normalised fp16 teacher embeddings, each bound to the exact sample it came from.

Layout of a store directory (specification in the README, section "Teacher store")::

    manifest.json              format, teachers (per member, in order: model, pretrained, fingerprint, logit_scale,
                               logit_bias (a SigLIP teacher's; null for CLIP ones), embed_dim), embed_dim (the
                               rows' width: the members' summed), count, parts (per part: the shard's path or URL,
                               count, its size, each file's sha256),
                               complete, and "digest": the sha256 of everything else in the file
    parts/<file name>-<hash>/  one shard's keys, key hashes, sample digests, image and text rows, and a reinforced
                               store's view parameters (engine.teachers.parts); the hash is of the shard's full path
                               (engine.teachers.manifest)
    .lock                      held by the process building the store (engine.core.lock)

Building goes shard by shard, one process at a time; a part is written into a temporary folder and renamed into
place, then recorded (with the sha256 of each file) in the manifest, itself written atomically; a killed build
resumes where it stopped, and the temporaries it left are swept. Loading checks the manifest (digest, fields, logit
scale, the teacher's own scale when its checkpoint is still there), every part's dtypes, shapes, checksums and
finiteness, that no key appears twice, and that each training shard is the one its part was built from (size, keys
in order). Every lookup checks key and sample digest together, so a sample can never be paired with another
sample's targets. ``verify`` checks all that, and more: key hashes, unit-norm rows, and with the shards every
sample's content digest.

The part arrays are memory-mapped: the processes of a machine share one copy in the page cache, and a process's
private memory holds only the index (16 bytes per sample).

A teacher ensemble (several ``--teacher``): every row holds the members' embeddings side by side, each member's
slice L2-normalised on its own (engine.teachers.manifest says why); ``lookup`` returns the whole rows and
``StoreTeacher`` (engine.teachers.sources) splits them into the members.

Augmentation (engine.teachers.reinforced, the manifest's ``augmentation``): a plain store holds one embedding per
sample of the teacher's deterministic evaluation view (V = 1), and the student trains on the same deterministic
view; a reinforced store holds V = K stored views per sample (their parameters and embeddings) and C captions, and
the student trains on one stored view and caption per sample and step, replayed exactly. Masked feature
distillation (--mfd-mask-ratio) drops patches inside the student only, which is compatible with full-image targets
by design.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.errors import ShardError, StoreError
from ..data.shards import expand_urls, is_remote, key_hash, read_shard, sample_digest, shard_keys, shard_sizes
from . import reinforced
from .manifest import (
    FORMAT_VERSION,
    PART_ARRAYS,
    REBUILD,
    match_parts,
    member_dims,
    member_fingerprints,
    part_name,
    read_manifest,
    sha256_file,
    shard_source,
    teacher_fingerprint,
    teacher_scale_problem,
    teachers_mismatch,
    write_manifest,
)
from .parts import ACCESS, PartWriter, advise, open_part, part_damage, shard_change

__all__ = ["FORMAT_VERSION", "PART_ARRAYS", "PartWriter", "StoreError", "TeacherStore", "begin", "describe",
           "finish", "part_name", "read_manifest", "reopen", "sha256_file", "shards_to_build", "teacher_fingerprint",
           "verify", "write_manifest"]
UNIT_NORM_TOLERANCE = 1e-2  # |squared norm - 1| of a unit row rounded to fp16 stays below 1e-3


# ------------------------------------------------------------------------------------------------------ building


def create_root(root: Path) -> None:
    """Create the store directory and its parts/ folder, and make sure files can be written there."""
    probe = root / f".write-test.tmp{os.getpid()}"
    try:
        (root / "parts").mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:  # a file in the way, a read-only or immutable folder
        raise StoreError(f"--teacher-store {root}: cannot write the store there ({exc.strerror}: {exc.filename})") \
            from exc


def reopen(root: Path, fingerprints: list[str]) -> Optional[dict]:
    """The manifest of a store begun earlier, None for a new one (its directory must exist: create_root); refuses a
    store that other teachers began (other members, order or count). Needs no teacher: a build checks its output
    first."""
    if not (root / "manifest.json").exists():
        return None
    manifest = read_manifest(root)
    mismatch = teachers_mismatch(member_fingerprints(manifest), fingerprints)
    if mismatch:
        raise StoreError(f"{root}: store was built by other teachers: {mismatch}; use another --teacher-store "
                         f"directory")
    return manifest


def shards_to_build(root: Path, manifest: dict, urls: list[str]) -> list[str]:
    """The shards that have no part yet in a reopened store.

    A recorded part whose files are missing or changed, or whose shard changed size or begins with another sample,
    is refused rather than rebuilt: the store was then built from other data (or damaged), and rebuilding only the
    parts that differ would mix two datasets in one store without a word; the user chooses another --teacher-store
    or deletes this one. Only a shard's first sample is compared, so resuming does not read the data again (every
    lookup in training compares the samples one by one).
    """
    matched = match_parts(manifest["parts"], urls)
    for url, name in zip(urls, matched):
        record = manifest["parts"].get(name)
        problem = record and (part_damage(root, name, record, manifest["embed_dim"], reinforced.of_manifest(manifest))
                              or shard_change(url, record)
                              or _first_sample_change(root, name, url))
        if problem:
            raise StoreError(f"--teacher-store {root}: cannot resume its build: {problem}; the store was built from "
                             f"other data or is damaged: pass another --teacher-store, or delete {root} to rebuild it")
    return [url for url, name in zip(urls, matched) if name is None]


def _first_sample_change(root: Path, name: str, url: str) -> Optional[str]:
    """None if a local shard begins with the sample (key and content digest) that its part begins with."""
    if is_remote(url):
        return None
    part = open_part(root, name)
    stored = [(str(key), int(digest)) for key, digest in zip(part["keys"][:1], part["digests"][:1])]
    if [(raw["__key__"], sample_digest(raw)) for raw in itertools.islice(read_shard(url), 1)] == stored:
        return None
    return f"shard {url} does not begin with the sample its part was built from (key or content differs)"


def begin(root: Path, teachers: list[dict], augmentation: Optional[dict] = None,
          train_data: Optional[str] = None) -> dict:
    """Create or reopen a store for resuming; refuses a store begun by other teachers. ``teachers``: one record per
    member, in order (engine.teachers.manifest.MEMBER_FIELDS); ``augmentation``: the views and captions it holds
    (engine.teachers.reinforced's record; None: a plain store); ``train_data``: the shards it is built from, as
    given (verify-views reads them)."""
    root = Path(root)
    create_root(root)
    manifest = reopen(root, [member["fingerprint"] for member in teachers])
    if manifest is not None:
        return manifest
    manifest = {"format": FORMAT_VERSION, "teachers": teachers,
                "embed_dim": sum(member["embed_dim"] for member in teachers), "dtype": "float16", "normalized": True,
                "augmentation": augmentation or reinforced.Reinforcement().record(), "train_data": train_data,
                "sample_digest": "blake2b-64 over the sample's raw members (name, size, bytes) in name order",
                "count": 0, "parts": {}, "complete": False}
    write_manifest(root, manifest)
    return manifest


def finish(root: Path, manifest: dict) -> None:
    manifest["complete"] = True
    write_manifest(Path(root), manifest)


# --------------------------------------------------------------------------------------------------------- store


class TeacherStore:
    """A verified, memory-mapped store: ``lookup(keys, digests, urls) -> (image (B, W), text (B, W))`` fp16, W the
    members' widths side by side (one member: its width).

    ``urls``: the training shards; each must have a part built from an identical shard. None: every part.
    ``expected_teachers``: the fingerprints of the teachers the run asks for, in order (None: the store's own).
    ``access``: how the rows will be read, "random" (training's lookups), "sequential" (verify, export) or "normal"
    (no particular order), advised to the kernel for every mapped row array.
    """

    def __init__(self, root: str | os.PathLike, urls: Optional[list[str]] = None,
                 expected_teachers: Optional[list[str]] = None, access: str = "random"):
        if access not in ACCESS:
            raise ValueError(f"access must be one of {list(ACCESS)}, got {access!r}")
        self.root, self.access, self.maps_advised = Path(root), access, 0
        manifest = read_manifest(self.root)
        self.manifest = manifest
        mismatch = expected_teachers and teachers_mismatch(member_fingerprints(manifest), list(expected_teachers))
        if mismatch:
            raise StoreError(f"{root}: store was built by other teachers than this run's: {mismatch}; rebuild it "
                             f"with engine.precompute or pass the teachers it was built by, in its order")
        problem = teacher_scale_problem(manifest)
        if problem:
            raise StoreError(f"{self.root / 'manifest.json'}: {problem} (the file was edited); {REBUILD}")
        self.teachers = manifest["teachers"]  # one record per member, in the rows' order
        self.member_dims = member_dims(manifest)
        self.logit_scales = [float(member["logit_scale"]) for member in self.teachers]
        # a SigLIP teacher's logit bias (None for a CLIP teacher)
        self.logit_biases = [member["logit_bias"] for member in self.teachers]
        self.embed_dim = int(manifest["embed_dim"])
        self.reinforcement = reinforced.of_manifest(manifest)
        matched = list(manifest["parts"]) if urls is None else match_parts(manifest["parts"], urls)
        self.part_names = [name for name in matched if name is not None]
        self.parts = [self._open_part(name) for name in self.part_names]
        self._index_of = {name: i for i, name in enumerate(self.part_names)}
        self._build_index()
        if urls is not None:
            self._check_shards(urls, matched)

    def _open_part(self, name: str) -> dict:
        record = self.manifest["parts"][name]
        problem = part_damage(self.root, name, record, self.embed_dim, self.reinforcement)
        arrays = open_part(self.root, name, list(record["sha256"])) if problem is None else {}
        if problem is None and self.reinforcement.views:
            problem = reinforced.views_problem(arrays)
        if problem:
            raise StoreError(f"{self.root}: part of shard {record['shard']}: {problem}; rebuild the store")
        self.maps_advised += advise(arrays, self.access)
        return {"name": name, "shard": record["shard"], **arrays}

    def _build_index(self) -> None:
        """Sorted key hashes and their (part, row): 16 bytes per sample; a key in two places is refused."""
        hashes = [np.asarray(part["key_hashes"]) for part in self.parts]
        counts = [len(h) for h in hashes]
        all_hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64)
        self.order = np.argsort(all_hashes, kind="stable")
        self.sorted_hashes = all_hashes[self.order]
        self.offsets = np.cumsum([0] + counts)
        repeated = np.flatnonzero(self.sorted_hashes[1:] == self.sorted_hashes[:-1])
        if len(repeated):
            first, second = (self._where(int(self.order[i])) for i in (repeated[0], repeated[0] + 1))
            keys = [str(self.parts[p]["keys"][r]) for p, r in (first, second)]
            shards = [self.parts[first[0]]["shard"], self.parts[second[0]]["shard"]]
            what = f"key {keys[0]!r} appears twice" if keys[0] == keys[1] else f"keys {keys} share a hash"
            raise StoreError(f"{self.root}: {what} (parts of shards {shards[0]} and {shards[1]}); every sample key "
                             f"must be unique: rebuild the store from shards with unique keys")

    def _where(self, global_row: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.offsets, global_row, side="right")) - 1
        return part, global_row - int(self.offsets[part])

    def _check_shards(self, urls: list[str], matched: list[Optional[str]]) -> None:
        missing = [url for url, name in zip(urls, matched) if name is None]
        if missing:
            keys = [k for u in missing[:3] for k in shard_keys(u)[:50]]
            absent = [k for k in keys if not self.contains(k)][:5]
            state = "" if self.manifest["complete"] else " (the store build did not finish: rerun engine.precompute)"
            raise StoreError(f"{self.root}: store has no part for {len(missing)} training shard(s) "
                             f"{[Path(u).name for u in missing[:5]]}; keys without embeddings include {absent}"
                             f"{state}")
        for url, name in zip(urls, matched):
            problem = self.shard_problem(url, name)
            if problem:
                raise StoreError(f"{self.root}: {problem}; rebuild the store")

    def shard_problem(self, url: str, name: str) -> Optional[str]:
        """What differs between a local training shard and its part without reading its samples (its size, its keys
        in order), else None; a remote shard is checked sample by sample as it streams (every lookup)."""
        if is_remote(url):
            return None
        return shard_change(url, self.manifest["parts"][name]) or self._key_problem(url, name, shard_keys(url))

    def sample_problem(self, url: str, name: str, expected: Optional[int]) -> Optional[str]:
        """What differs between a shard's samples, read in full, and its part: keys in order, content digests."""
        found = [(raw["__key__"], sample_digest(raw)) for raw in read_shard(url, expected)]
        keys = [key for key, _ in found]
        problem = self._key_problem(url, name, keys)
        if problem:
            return problem
        digests = np.fromiter((digest for _, digest in found), dtype=np.int64, count=len(found))
        differ = np.flatnonzero(digests != self.parts[self._index_of[name]]["digests"])
        if len(differ):
            return (f"shard {url}: {len(differ)} sample(s) differ from the ones the store was built from, e.g. "
                    f"{[keys[i] for i in differ[:5]]}")
        return None

    def _key_problem(self, url: str, name: str, keys: list[str]) -> Optional[str]:
        stored = [str(key) for key in self.parts[self._index_of[name]]["keys"]]
        if keys == stored:
            return None
        extra, lost = sorted(set(keys) - set(stored)), sorted(set(stored) - set(keys))
        detail = (f"keys {extra[:5]} are not in its part" if extra else f"its part's keys {lost[:5]} are not in it"
                  if lost else "its keys are in another order")
        source = self.manifest["parts"][name]["shard"]
        moved = "" if source == shard_source(url) else f"; that part was built from {source}"
        return f"shard {url} does not have the samples its part was built from ({detail}){moved}"

    def contains(self, key: str) -> bool:
        return self._locate([key])[0][0] >= 0

    def _locate(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(part, row) of every key, -1 where the store has no such key; vectorised per part."""
        hashes = np.fromiter((key_hash(k) for k in keys), dtype=np.int64, count=len(keys))
        slots = np.minimum(np.searchsorted(self.sorted_hashes, hashes), max(len(self.sorted_hashes) - 1, 0))
        found = self.sorted_hashes[slots] == hashes if len(self.sorted_hashes) else np.zeros(len(keys), bool)
        global_rows = self.order[slots]
        parts = np.where(found, np.searchsorted(self.offsets, global_rows, side="right") - 1, -1)
        rows = np.where(found, global_rows - self.offsets[np.maximum(parts, 0)], -1)
        wanted = np.asarray(keys, dtype=str)
        for part in np.unique(parts[parts >= 0]):  # a 64-bit hash match must also be the same key
            mine = np.flatnonzero(parts == part)
            same = self.parts[part]["keys"][rows[mine]] == wanted[mine]
            parts[mine[~same]], rows[mine[~same]] = -1, -1
        return parts, rows

    def _checked(self, keys: Sequence[str], digests: Sequence[int], urls: Sequence[Optional[str]]):
        """(part, positions in ``keys``, rows of that part) of these samples, part by part in ascending rows; the key
        and the sample digest must both match the stored ones (else a StoreError naming the sample)."""
        parts, rows = self._locate(keys)
        digests = np.asarray(digests, dtype=np.int64)
        for i in np.flatnonzero(parts < 0)[:1]:
            raise StoreError(f"{self.root}: no teacher embeddings for sample {keys[i]!r} of shard {urls[i]}; the "
                             f"store was built from other shards: rebuild it with engine.precompute")
        for part in np.unique(parts):
            mine = np.flatnonzero(parts == part)
            mine = mine[np.argsort(rows[mine])]  # ascending rows read the memory map sequentially
            differ = np.flatnonzero(self.parts[part]["digests"][rows[mine]] != digests[mine])
            if len(differ):
                i = mine[differ[0]]
                raise StoreError(f"{self.root}: sample {keys[i]!r} of shard {urls[i]} is not the sample the store "
                                 f"was built from (content digest differs): the shard was rewritten or edited; "
                                 f"rebuild the store with engine.precompute")
            yield part, mine, rows[mine]

    def lookup(self, keys: Sequence[str], digests: Sequence[int], urls: Sequence[Optional[str]],
               views: Optional[Sequence[int]] = None, captions: Optional[Sequence[int]] = None):
        """Teacher rows (B, W) of these samples: the image embedding of stored view ``views[b]`` and the text
        embedding of caption ``captions[b]`` (None: view and caption 0), every member's side by side; key and sample
        digest are checked."""
        chosen = [np.zeros(len(keys), np.int64) if index is None else np.asarray(index, dtype=np.int64)
                  for index in (views, captions)]
        image = np.empty((len(keys), self.embed_dim), dtype=np.float16)
        text = np.empty_like(image)
        for part, mine, rows in self._checked(keys, digests, urls):
            image[mine] = self.parts[part]["image"][rows, chosen[0][mine]]
            text[mine] = self.parts[part]["text"][rows, chosen[1][mine]]
        return torch.from_numpy(image), torch.from_numpy(text)

    def view_rows(self, key: str, digest: int, url: Optional[str] = None) -> np.ndarray:
        """The stored views' parameters (K, P) of one sample, bound to it as its embeddings are (key and digest).
        One sample per call (the data pipeline's), so scalar steps rather than ``_checked``'s vectorised ones."""
        wanted = key_hash(key)
        slot = int(np.searchsorted(self.sorted_hashes, wanted))
        part, row = self._where(int(self.order[slot])) if slot < len(self.order) else (0, -1)
        arrays = self.parts[part] if row >= 0 else {}
        if not (arrays and str(arrays["keys"][row]) == key and int(arrays["digests"][row]) == digest):
            next(self._checked([key], [digest], [url]))  # not this sample: raises the lookup's StoreError
        return np.asarray(arrays["views"][row])


# ------------------------------------------------------------------------------------------------- verification


def verify(root: str, train_data: Optional[str] = None) -> list[str]:
    """Everything wrong with a store (and, with ``train_data``, with its shards); empty when it is sound. Checks
    what loading it for training checks, then key hashes and unit-norm rows, and every sample's content digest."""
    try:
        store = TeacherStore(root, None, access="sequential")
        problem = deep_problem(store)
    except (StoreError, ShardError) as exc:
        return [str(exc)]
    problems = [problem] if problem else []
    if not store.manifest["complete"]:
        problems.append(f"{root}: the build did not finish (rerun engine.precompute)")
    if train_data is None:
        return problems
    try:
        urls = expand_urls(train_data)
        sizes = shard_sizes(urls)
        matched = match_parts(store.manifest["parts"], urls)
    except (ShardError, StoreError) as exc:
        return problems + [str(exc)]
    for url, name in zip(urls, matched):
        try:
            problem = f"shard {url}: no part in the store" if name is None else \
                store.shard_problem(url, name) or store.sample_problem(url, name, sizes[url])
        except ShardError as exc:
            problem = str(exc)
        if problem:
            problems.append(problem)
    return problems


def deep_problem(store: TeacherStore) -> Optional[str]:
    """What only reading every row finds: key hashes that are not their keys', member slices of rows that are not
    unit-norm."""
    bounds = np.cumsum([0] + store.member_dims)  # member k's slice of a row: bounds[k]:bounds[k + 1]
    for name, part in zip(store.part_names, store.parts):
        folder = store.root / "parts" / name
        hashes = np.fromiter((key_hash(str(key)) for key in part["keys"]), dtype=np.int64, count=len(part["keys"]))
        if not np.array_equal(hashes, part["key_hashes"]):
            return f"{folder / 'key_hashes.npy'} does not hold the hashes of its keys (the file was edited)"
        for array in ("image", "text"):
            off = np.zeros(len(store.member_dims), dtype=np.int64)  # rows off unit norm, per member
            for rows in _row_blocks(part[array]):
                squares = np.add.reduceat(rows * rows, bounds[:-1], axis=1)  # (n, members) squared norms
                off += (np.abs(squares - 1) > UNIT_NORM_TOLERANCE).sum(axis=0)
            for k in np.flatnonzero(off)[:1]:
                member = f" of teacher {k + 1}" if len(store.member_dims) > 1 else ""
                return (f"{folder / f'{array}.npy'}: {off[k]} row(s){member} are not unit-norm (the embeddings were "
                        f"edited)")
    return None


def _row_blocks(rows: np.ndarray, size: int = 1 << 16):
    """(n, D) float32 blocks of a part's (count, V or C, D) rows."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size].reshape(-1, rows.shape[-1]).astype(np.float32)


def describe(root: str) -> str:
    manifest = read_manifest(root)
    members = manifest["teachers"]
    lines = [f"teacher store {root}"]
    for k, member in enumerate(members):
        label = f"teacher {k + 1}" if len(members) > 1 else "teacher"
        bias = "" if member["logit_bias"] is None else f", logit bias {member['logit_bias']:.4f}"
        lines.append(f"  {label:<12} {member['fingerprint']} ({member['pretrained']}): width {member['embed_dim']}, "
                     f"logit scale {member['logit_scale']:.4f}{bias}")
    lines += [f"  width        {manifest['embed_dim']} ({manifest['dtype']}, L2-normalised"
              + (f" per teacher, side by side: {member_dims(manifest)})" if len(members) > 1 else ")"),
              f"  samples      {manifest['count']} in {len(manifest['parts'])} part(s); "
              f"{'complete' if manifest['complete'] else 'INCOMPLETE build'}",
              f"  augmentation {reinforced.of_manifest(manifest).describe()}"]
    lines += [f"  part {name}: {part['count']} samples, shard {part['shard']} ({part['shard_bytes']} bytes)"
              for name, part in sorted(manifest["parts"].items())]
    return "\n".join(lines)
