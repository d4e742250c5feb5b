"""The teacher embedding store: L2-normalised fp16 teacher embeddings, each bound to the exact sample it came from.

Layout of a store directory (specification in the README, section "Teacher store")::

    manifest.json              teacher (model, pretrained, fingerprint), logit_scale, logit_bias (SigLIP teachers;
                               null for CLIP ones), embed_dim, count, parts,
                               complete, and "digest": the sha256 of everything else in the file
    parts/<shard>/keys.npy     (count,) unicode: the samples' ``__key__``, in shard order
    parts/<shard>/key_hashes.npy  (count,) int64: blake2b-64 of each key (the index is built from these)
    parts/<shard>/digests.npy  (count,) int64: blake2b-64 of the sample's raw members, names included
    parts/<shard>/image.npy    (count, D) fp16, L2-normalised teacher image embeddings
    parts/<shard>/text.npy     (count, D) fp16, L2-normalised teacher text embeddings

Building goes shard by shard; a part is written into a temporary folder and renamed into place, then recorded (with
the sha256 of each file) in the manifest, itself written to a temporary file and renamed; a killed build resumes
where it stopped. Loading checks the manifest digest, the teacher, every part's checksums and finiteness, that no
key appears twice, and that the training shards are the ones the store was built from. Every lookup checks key
and sample digest together, so a sample can never be paired with another sample's targets.

The part arrays are memory-mapped: the processes of a machine share one copy in the page cache, and a process's
private memory holds only the index (16 bytes per sample).

Augmentation: the store holds one embedding per sample of the teacher's deterministic evaluation view; the
student trains on the same deterministic view (no random augmentation), so cached targets match what the
student sees exactly. Masked feature distillation (--mfd-mask-ratio) drops patches inside the student only, which
is compatible with full-image targets by design. Augmented training needs per-view targets: use --online-teacher.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.errors import ShardError, StoreError
from ..data.shards import (
    expand_urls,
    is_remote,
    key_hash,
    read_shard,
    sample_digest,
    shard_keys,
    shard_sizes,
)

FORMAT_VERSION = 2
AUGMENTATION = "none: one embedding per sample of the teacher's deterministic evaluation view"
PART_ARRAYS = ("keys", "key_hashes", "digests", "image", "text")
_READ_CHUNK = 1 << 24  # bytes per read when verifying a part file


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


def part_dir_name(url: str) -> str:
    return Path(url).name.rsplit(".", 1)[0]


# ------------------------------------------------------------------------------------------------------ manifest


def _content_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_manifest(root: Path, manifest: dict) -> None:
    manifest["digest"] = _content_digest(manifest)
    tmp = root / f".manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / "manifest.json")


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a store, refused (StoreError naming the file) if missing, unreadable, edited or old."""
    path = Path(root) / "manifest.json"
    if Path(root).is_file():
        raise StoreError(f"{root}: is a file; a teacher store is a directory with a manifest.json")
    if not path.exists():
        raise StoreError(f"no teacher store at {root} (manifest.json missing); build it with "
                         f"`python -m engine.precompute --teacher-store {root} ...`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}): the file is damaged or truncated; rebuild the store "
                         f"with engine.precompute") from exc
    except OSError as exc:  # a directory in its place, or unreadable
        raise StoreError(f"{path}: cannot read it ({exc.strerror}); restore it or rebuild the store with "
                         f"engine.precompute") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise StoreError(f"{path}: store format {found} is not {FORMAT_VERSION} (an older or foreign store); "
                         f"rebuild it with engine.precompute")
    if manifest.get("digest") != _content_digest(manifest):
        raise StoreError(f"{path}: content does not match its digest (the file was edited or damaged); restore it "
                         f"or rebuild the store with engine.precompute")
    return manifest


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


def reopen(root: Path, fingerprint: str) -> Optional[dict]:
    """The manifest of a store begun earlier, None for a new one (its directory is created); refuses a store that
    cannot be written or that another teacher began. Needs no teacher: a build checks its output first."""
    create_root(root)
    if not (root / "manifest.json").exists():
        return None
    manifest = read_manifest(root)
    if manifest["teacher"]["fingerprint"] != fingerprint:
        raise StoreError(f"{root}: store was built by teacher {manifest['teacher']['fingerprint']}, "
                         f"not {fingerprint}; use another --teacher-store directory")
    return manifest


def shards_to_build(root: Path, manifest: dict, urls: list[str]) -> list[str]:
    """The shards that have no part yet in a reopened store.

    A recorded part whose files are missing or changed, or whose shard changed size or begins with another sample,
    is refused rather than rebuilt: the store was then built from other data (or damaged), and rebuilding only the
    parts that differ would mix two datasets in one store without a word; the user chooses another --teacher-store
    or deletes this one. Only a shard's first sample is compared, so resuming does not read the data again (every
    lookup in training compares the samples one by one).
    """
    for url in urls:
        record = manifest["parts"].get(Path(url).name)
        problem = record and (part_damage(root, record) or shard_change(url, record)
                              or _first_sample_change(root, record, url))
        if problem:
            raise StoreError(f"--teacher-store {root}: cannot resume its build: {problem}; the store was built from "
                             f"other data or is damaged: pass another --teacher-store, or delete {root} to rebuild it")
    return [url for url in urls if Path(url).name not in manifest["parts"]]


def _first_sample_change(root: Path, record: dict, url: str) -> Optional[str]:
    """None if a local shard begins with the sample (key and content digest) that its part begins with."""
    if is_remote(url):
        return None
    stored = zip(np.load(root / record["dir"] / "keys.npy", mmap_mode="r")[:1],
                 np.load(root / record["dir"] / "digests.npy", mmap_mode="r")[:1])
    found = [(raw["__key__"], sample_digest(raw)) for raw in itertools.islice(read_shard(url), 1)]
    if found == [(str(key), int(digest)) for key, digest in stored]:
        return None
    return f"shard {url} does not begin with the sample its part was built from (key or content differs)"


def begin(root: Path, teacher: dict, logit_scale: float, embed_dim: int, logit_bias: Optional[float] = None) -> dict:
    """Create or reopen a store for resuming; refuses a store begun by another teacher."""
    root = Path(root)
    manifest = reopen(root, teacher["fingerprint"])
    if manifest is not None:
        return manifest
    manifest = {"format": FORMAT_VERSION, "teacher": teacher, "logit_scale": float(logit_scale),
                "logit_bias": None if logit_bias is None else float(logit_bias), "embed_dim": int(embed_dim),
                "dtype": "float16", "normalized": True, "augmentation": AUGMENTATION,
                "sample_digest": "blake2b-64 over the sample's raw members (name, size, bytes) in name order",
                "count": 0, "parts": {}, "complete": False}
    _write_manifest(root, manifest)
    return manifest


def finish(root: Path, manifest: dict) -> None:
    manifest["complete"] = True
    _write_manifest(Path(root), manifest)


# --------------------------------------------------------------------------------------------------------- parts


class PartWriter:
    """Writes one shard's part row batch by row batch into memory-mapped arrays (memory independent of shard size).

    ``append`` refuses non-finite rows (naming their keys); ``commit`` renames the finished part into place and
    records it in the manifest. Nothing is recorded if the part is not committed.
    """

    def __init__(self, root: Path, manifest: dict, url: str, count: int):
        self.root, self.manifest, self.url, self.count = Path(root), manifest, url, count
        self.name = part_dir_name(url)
        self.tmp = self.root / "parts" / f".{self.name}.tmp{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        dim = manifest["embed_dim"]
        self.keys: list[str] = []
        self.key_hashes = np.empty(count, dtype=np.int64)
        self.digests = np.empty(count, dtype=np.int64)
        self.image = np.lib.format.open_memmap(self.tmp / "image.npy", "w+", np.float16, (count, dim))
        self.text = np.lib.format.open_memmap(self.tmp / "text.npy", "w+", np.float16, (count, dim))

    def append(self, keys: Sequence[str], digests: Sequence[int], image: torch.Tensor, text: torch.Tensor) -> None:
        start, stop = len(self.keys), len(self.keys) + len(keys)
        if stop > self.count:
            raise StoreError(f"shard {self.url}: more than the {self.count} samples its size says")
        image16, text16 = image.to(torch.float16).numpy(), text.to(torch.float16).numpy()
        bad = ~(np.isfinite(image16).all(axis=1) & np.isfinite(text16).all(axis=1))
        if bad.any():
            named = [keys[i] for i in np.flatnonzero(bad)[:10]]
            raise StoreError(f"shard {self.url}: the teacher gave non-finite embeddings for {int(bad.sum())} "
                             f"sample(s), keys {named}; refusing to store them (check the teacher weights)")
        self.keys.extend(keys)
        self.key_hashes[start:stop] = [key_hash(k) for k in keys]
        self.digests[start:stop] = digests
        self.image[start:stop], self.text[start:stop] = image16, text16

    def commit(self) -> None:
        if len(self.keys) != self.count:
            raise StoreError(f"shard {self.url}: read {len(self.keys)} samples, its size says {self.count}")
        self.image.flush()
        self.text.flush()
        del self.image, self.text
        np.save(self.tmp / "keys.npy", np.array(self.keys, dtype=str))
        np.save(self.tmp / "key_hashes.npy", self.key_hashes)
        np.save(self.tmp / "digests.npy", self.digests)
        final = self.root / "parts" / self.name
        shutil.rmtree(final, ignore_errors=True)  # a leftover of an interrupted build, never recorded
        os.replace(self.tmp, final)
        self.manifest["parts"][Path(self.url).name] = {
            "dir": f"parts/{self.name}", "count": self.count,
            "shard_bytes": None if is_remote(self.url) else os.path.getsize(self.url),
            "sha256": {array: sha256_file(final / f"{array}.npy") for array in PART_ARRAYS}}
        self.manifest["count"] = sum(part["count"] for part in self.manifest["parts"].values())
        _write_manifest(self.root, self.manifest)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def verify_part_file(path: Path, expected_sha256: str, check_finite: bool) -> Optional[str]:
    """None if the .npy file has its recorded checksum (and only finite values), else what is wrong.

    Reads the file once with plain reads (not through the memory map), so verifying leaves no pages mapped.
    """
    if not path.exists():
        return f"{path} is missing"
    try:
        handle = open(path, "rb")
    except OSError as exc:  # a directory in its place, or unreadable
        return f"{path} cannot be read ({exc.strerror})"
    digest = hashlib.sha256()
    with handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(handle)
        except ValueError as exc:
            return f"{path} is not a valid array file ({exc})"
        header = handle.tell()
        handle.seek(0)
        digest.update(handle.read(header))
        carry = b""
        for block in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(block)
            if check_finite:
                data = carry + block
                usable = len(data) - len(data) % dtype.itemsize
                if not np.isfinite(np.frombuffer(data[:usable], dtype=dtype)).all():
                    return f"{path} holds non-finite values"
                carry = data[usable:]
    if digest.hexdigest() != expected_sha256:
        return f"{path}: checksum does not match the manifest (the file was changed or damaged)"
    return None


def part_damage(root: Path, record: dict) -> Optional[str]:
    """None if every file of a part has its recorded checksum (and the embeddings are finite), else what is wrong."""
    for array in PART_ARRAYS:
        problem = verify_part_file(root / record["dir"] / f"{array}.npy", record["sha256"][array],
                                   array in ("image", "text"))
        if problem:
            return problem
    return None


def shard_change(url: str, record: dict) -> Optional[str]:
    """None if a local shard has the size recorded when its part was built (a remote one is not checked here)."""
    if is_remote(url) or record["shard_bytes"] is None or os.path.getsize(url) == record["shard_bytes"]:
        return None
    return (f"shard {url} changed since the store was built ({os.path.getsize(url)} bytes, store recorded "
            f"{record['shard_bytes']})")


# --------------------------------------------------------------------------------------------------------- store


class TeacherStore:
    """A verified, memory-mapped store: ``lookup(keys, digests, urls) -> (image (B, D), text (B, D))`` fp16.

    ``urls``: the training shards; each must have a part built from an identical shard. None: every part.
    """

    def __init__(self, root: str | os.PathLike, urls: Optional[list[str]] = None,
                 expected_teacher: Optional[str] = None, check_keys: bool = True):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.manifest = manifest
        fingerprint = manifest["teacher"]["fingerprint"]
        if expected_teacher is not None and fingerprint != expected_teacher:
            raise StoreError(f"{root}: store was built by teacher {fingerprint}, but this run's teacher is "
                             f"{expected_teacher}; rebuild it with engine.precompute or pass the matching teacher")
        self.logit_scale = float(manifest["logit_scale"])
        # a SigLIP teacher's logit bias (None for a CLIP teacher, and in stores written before it was recorded)
        self.logit_bias = manifest.get("logit_bias")
        self.embed_dim = int(manifest["embed_dim"])
        self.teacher = manifest["teacher"]
        names = list(manifest["parts"]) if urls is None else [Path(u).name for u in urls]
        present = [name for name in names if name in manifest["parts"]]
        self.part_names, self.parts = present, []
        for name in present:
            self.parts.append(self._open_part(name))
        self._build_index()
        if urls is not None:
            self._check_shards(urls, check_keys)

    def _open_part(self, shard: str) -> dict:
        record = self.manifest["parts"][shard]
        folder = self.root / record["dir"]
        problem = part_damage(self.root, record)
        if problem:
            raise StoreError(f"{self.root}: part of shard {shard}: {problem}; rebuild the store")
        arrays = {array: np.load(folder / f"{array}.npy", mmap_mode="r") for array in PART_ARRAYS}
        if any(len(arrays[a]) != record["count"] for a in PART_ARRAYS):
            raise StoreError(f"{self.root}: part of shard {shard} does not hold the {record['count']} rows the "
                             f"manifest records; rebuild the store")
        return {"shard": shard, **arrays}

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

    def _check_shards(self, urls: list[str], check_keys: bool) -> None:
        manifest = self.manifest
        missing = [u for u in urls if Path(u).name not in manifest["parts"]]
        if missing:
            keys = [k for u in missing[:3] for k in shard_keys(u)[:50]]
            absent = [k for k in keys if not self.contains(k)][:5]
            state = "" if manifest["complete"] else " (the store build did not finish: rerun engine.precompute)"
            raise StoreError(f"{self.root}: store has no part for {len(missing)} training shard(s) "
                             f"{[Path(u).name for u in missing[:5]]}; keys without embeddings include {absent}"
                             f"{state}")
        for url, part in zip(urls, self.parts):
            if is_remote(url):  # read only as it streams: checked sample by sample at lookup (key and digest)
                continue
            changed = shard_change(url, manifest["parts"][part["shard"]])
            if changed:
                raise StoreError(f"{self.root}: {changed}; rebuild")
            if check_keys:
                keys = shard_keys(url)
                if keys != list(map(str, part["keys"])):
                    absent = sorted(set(keys) - set(map(str, part["keys"])))
                    detail = f"keys {absent[:10]} have no embeddings" if absent else "its keys differ in order"
                    raise StoreError(f"{self.root}: shard {url} does not have the samples its part was built from: "
                                     f"{detail}; rebuild the store")

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

    def lookup(self, keys: Sequence[str], digests: Sequence[int], urls: Sequence[Optional[str]]):
        """Teacher rows of these samples; the key and the sample digest must both match the stored ones."""
        parts, rows = self._locate(keys)
        digests = np.asarray(digests, dtype=np.int64)
        image = np.empty((len(keys), self.embed_dim), dtype=np.float16)
        text = np.empty_like(image)
        for i in np.flatnonzero(parts < 0)[:1]:
            raise StoreError(f"{self.root}: no teacher embeddings for sample {keys[i]!r} of shard {urls[i]}; the "
                             f"store was built from other shards: rebuild it with engine.precompute")
        for part in np.unique(parts):
            mine = np.flatnonzero(parts == part)
            mine = mine[np.argsort(rows[mine])]  # ascending rows read the memory map sequentially
            stored = self.parts[part]
            differ = np.flatnonzero(stored["digests"][rows[mine]] != digests[mine])
            if len(differ):
                i = mine[differ[0]]
                raise StoreError(f"{self.root}: sample {keys[i]!r} of shard {urls[i]} is not the sample the store "
                                 f"was built from (content digest differs): the shard was rewritten or edited; "
                                 f"rebuild the store with engine.precompute")
            image[mine] = stored["image"][rows[mine]]
            text[mine] = stored["text"][rows[mine]]
        return torch.from_numpy(image), torch.from_numpy(text)


# ------------------------------------------------------------------------------------------------- verification


def verify(root: str, train_data: Optional[str] = None) -> list[str]:
    """Everything wrong with a store (and, with ``train_data``, with its shards); empty when it is sound."""
    try:
        store = TeacherStore(root, None)
    except (StoreError, ShardError) as exc:
        return [str(exc)]
    problems = [] if store.manifest["complete"] else [f"{root}: the build did not finish (rerun engine.precompute)"]
    if train_data is None:
        return problems
    try:
        urls = expand_urls(train_data)
        sizes = shard_sizes(urls)
    except ShardError as exc:
        return problems + [str(exc)]
    for url in urls:
        if Path(url).name not in store.manifest["parts"]:
            problems.append(f"shard {url}: no part in the store")
            continue
        changed = shard_change(url, store.manifest["parts"][Path(url).name])
        if changed:
            problems.append(changed)
        mismatched, unknown = [], []
        try:
            for raw in read_shard(url, sizes[url]):
                (part,), (row,) = store._locate([raw["__key__"]])
                if part < 0:
                    unknown.append(raw["__key__"])
                elif int(store.parts[part]["digests"][row]) != sample_digest(raw):
                    mismatched.append(raw["__key__"])
        except ShardError as exc:
            problems.append(str(exc))
            continue
        if unknown:
            problems.append(f"shard {url}: {len(unknown)} sample(s) have no embeddings, e.g. {unknown[:5]}")
        if mismatched:
            problems.append(f"shard {url}: {len(mismatched)} sample(s) differ from the ones the store was built "
                            f"from, e.g. {mismatched[:5]}")
    return problems


def describe(root: str) -> str:
    manifest = read_manifest(root)
    lines = [f"teacher store {root}",
             f"  teacher      {manifest['teacher']['fingerprint']} ({manifest['teacher'].get('pretrained')})",
             f"  logit scale  {manifest['logit_scale']:.4f}",
             f"  width        {manifest['embed_dim']} ({manifest['dtype']}, L2-normalised)",
             f"  samples      {manifest['count']} in {len(manifest['parts'])} part(s); "
             f"{'complete' if manifest['complete'] else 'INCOMPLETE build'}",
             f"  augmentation {manifest['augmentation']}"]
    lines += [f"  part {name}: {part['count']} samples, shard {part['shard_bytes']} bytes"
              for name, part in sorted(manifest["parts"].items())]
    return "\n".join(lines)
