"""A teacher store's part: one shard's arrays in ``parts/<part name>/``, written once and checked at every load.

    keys.npy        (count,) unicode: the samples' ``__key__``, in shard order
    key_hashes.npy  (count,) int64: blake2b-64 of each key (the index is built from these)
    digests.npy     (count,) int64: blake2b-64 of the sample's raw members, names included
    image.npy       (count, V, D) fp16, L2-normalised teacher image embeddings of V views (V = 1: the evaluation view)
    text.npy        (count, C, D) fp16, L2-normalised teacher text embeddings of C captions
    views.npy       (count, K, P) float32, a reinforced store's view parameters (engine.teachers.reinforced)
    source_hw.npy   (count, 2) int32, a reinforced store's source image sizes

A part is written into ``parts/.<part name>.tmp<pid>/`` (engine.core.io's temporary pattern, swept when its process
is dead) and renamed into place, then recorded in the manifest. Every array is a plain dtype (never unpickled).
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.errors import StoreError, WriteError
from ..core.io import temp_path, write_failure
from ..data.shards import is_remote, key_hash
from . import reinforced
from .manifest import PART_ARRAYS, part_name, sha256_file, shard_source, write_manifest

FINITE = ("image", "text", "views")  # arrays whose every value must be finite
PLAIN_DTYPES = {"key_hashes": np.dtype(np.int64), "digests": np.dtype(np.int64), "image": np.dtype(np.float16),
                "text": np.dtype(np.float16), "views": np.dtype(np.float32),
                "source_hw": np.dtype(np.int32)}  # keys: any native unicode width
_READ_CHUNK = 1 << 24  # bytes per read when verifying a part file


class PartWriter:
    """Writes one shard's part batch by batch, rows appended with plain file writes: memory independent of shard
    size, and a full disk is a WriteError naming the part (a memory-mapped write would die of SIGBUS).

    ``append`` refuses non-finite rows (naming their keys and views); ``commit`` renames the finished part into place
    and records it in the manifest. Nothing is recorded if the part is not committed; ``abort`` removes its
    temporary.
    """

    def __init__(self, root: Path, manifest: dict, url: str, count: int):
        self.root, self.manifest, self.url, self.count = Path(root), manifest, url, count
        self.name = part_name(url)
        self.final = self.root / "parts" / self.name
        self.tmp = temp_path(self.final)
        self.keys: list[str] = []
        self.key_hashes = np.empty(count, dtype=np.int64)
        self.digests = np.empty(count, dtype=np.int64)
        self.files = {}
        self.shapes = reinforced.row_shapes(reinforced.of_manifest(manifest), manifest["embed_dim"])
        with self._writing():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            for array, shape in self.shapes.items():
                self.files[array] = open(self.tmp / f"{array}.npy", "wb")
                np.lib.format.write_array_header_1_0(self.files[array], {
                    "descr": np.lib.format.dtype_to_descr(PLAIN_DTYPES[array]), "fortran_order": False,
                    "shape": (count, *shape)})

    @contextlib.contextmanager
    def _writing(self):
        """An OSError (full disk, read-only folder) removes the temporary and is a WriteError naming the part."""
        try:
            yield
        except OSError as exc:
            reason = write_failure(self.final, exc, self.tmp)
            self.abort()
            raise WriteError(f"could not write store part {self.final}: {reason}; the store is as it was before "
                             f"this part") from exc

    def append(self, keys: Sequence[str], digests: Sequence[int], image: torch.Tensor, text: torch.Tensor,
               views: Optional[np.ndarray] = None, source_hw: Optional[np.ndarray] = None) -> None:
        """Rows of ``keys``: image (B, V, D), text (B, C, D) (a plain store's may be (B, D)), and with stored views
        their parameters (B, K, P) and the source images' sizes (B, 2)."""
        start, stop = len(self.keys), len(self.keys) + len(keys)
        if stop > self.count:
            raise StoreError(f"shard {self.url}: more than the {self.count} samples its size says")
        given = {"image": image, "text": text, "views": views, "source_hw": source_hw}
        rows = {array: reinforced.as_rows(given[array], PLAIN_DTYPES[array], (len(keys), *shape))
                for array, shape in self.shapes.items()}
        bad = reinforced.non_finite_rows(rows)
        if bad is not None:
            count, (samples, what) = bad
            raise StoreError(f"shard {self.url}: the teacher gave non-finite embeddings for {count} sample(s), keys "
                             f"{[keys[i] for i in samples[:10]]} (first: {what}); refusing to store them (check the "
                             f"teacher weights)")
        self.keys.extend(keys)
        self.key_hashes[start:stop] = [key_hash(k) for k in keys]
        self.digests[start:stop] = digests
        with self._writing():
            for array, values in rows.items():
                self.files[array].write(np.ascontiguousarray(values).data)

    def commit(self) -> None:
        if len(self.keys) != self.count:
            raise StoreError(f"shard {self.url}: read {len(self.keys)} samples, its size says {self.count}")
        with self._writing():
            for handle in self.files.values():
                handle.close()
            np.save(self.tmp / "keys.npy", np.array(self.keys, dtype=str))
            np.save(self.tmp / "key_hashes.npy", self.key_hashes)
            np.save(self.tmp / "digests.npy", self.digests)
            shutil.rmtree(self.final, ignore_errors=True)  # a leftover of a build killed before recording it
            os.replace(self.tmp, self.final)
        parts = self.manifest["parts"]
        parts[self.name] = {"shard": shard_source(self.url), "count": self.count,
                            "shard_bytes": None if is_remote(self.url) else os.path.getsize(self.url),
                            "sha256": {array: sha256_file(self.final / f"{array}.npy")
                                       for array in dict.fromkeys([*PART_ARRAYS, *self.shapes])}}
        self.manifest["count"] = sum(part["count"] for part in parts.values())
        try:
            write_manifest(self.root, self.manifest)
        except WriteError:  # not recorded: the part goes, the manifest on disk is the previous one
            del parts[self.name]
            self.manifest["count"] = sum(part["count"] for part in parts.values())
            shutil.rmtree(self.final, ignore_errors=True)
            raise

    def abort(self) -> None:
        for handle in self.files.values():
            with contextlib.suppress(OSError):  # the data that did not fit: removed with the folder
                handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ checks


def _read_header(handle) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy file's header (never its data)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def _layout_problem(path: Path, array: str, header: tuple, shape: tuple) -> Optional[str]:
    """None if a part file holds the plain dtype and the shape (rows, and width: the manifest's) it should."""
    found_shape, fortran, dtype = header
    plain = dtype.kind == "U" and dtype.isnative if array == "keys" else dtype == PLAIN_DTYPES[array]
    if not plain:
        expected = "plain text keys" if array == "keys" else PLAIN_DTYPES[array].name
        return f"{path} holds {dtype.name} values, not {expected}"
    if tuple(found_shape) != shape or fortran:
        return f"{path} holds an array of shape {tuple(found_shape)}, not {shape} (the manifest's count, embed_dim, " \
               f"views and captions)"
    return None


def verify_part_file(path: Path, expected_sha256: str, array: str, shape: tuple) -> Optional[str]:
    """None if the .npy file has the layout, the recorded checksum and (embeddings) only finite values, else what
    is wrong. Reads the file once with plain reads (not through the memory map), so verifying leaves no pages
    mapped."""
    if not path.exists():
        return f"{path} is missing"
    try:
        handle = open(path, "rb")
    except OSError as exc:  # a directory in its place, or unreadable
        return f"{path} cannot be read ({exc.strerror})"
    with handle:
        try:
            header = _read_header(handle)
        except ValueError as exc:
            return f"{path} is not a valid array file ({exc})"
        problem = _layout_problem(path, array, header, shape)
        if problem:
            return problem
        size = handle.tell()
        handle.seek(0)
        digest = hashlib.sha256(handle.read(size))
        dtype, carry = header[2], b""
        for block in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(block)
            if array in FINITE:
                data = carry + block
                usable = len(data) - len(data) % dtype.itemsize
                if not np.isfinite(np.frombuffer(data[:usable], dtype=dtype)).all():
                    return f"{path} holds non-finite values"
                carry = data[usable:]
    if digest.hexdigest() != expected_sha256:
        return f"{path}: checksum does not match the manifest (the file was changed or damaged)"
    return None


def part_shapes(count: int, width: int, settings: reinforced.Reinforcement) -> dict[str, tuple]:
    """Every file of a part and its shape: the keys' (count,), the rows' as the store's views and captions give."""
    rows = reinforced.row_shapes(settings, width)
    return {**{array: (count,) for array in PART_ARRAYS if array not in rows},
            **{array: (count, *shape) for array, shape in rows.items()}}


def part_damage(root: Path, name: str, record: dict, width: int,
                settings: reinforced.Reinforcement = reinforced.Reinforcement()) -> Optional[str]:
    """None if every file of a part is what its record and the manifest say (dtype, shape, checksum, finite
    embeddings and view parameters), else what is wrong."""
    for array, shape in part_shapes(record["count"], width, settings).items():
        problem = verify_part_file(Path(root) / "parts" / name / f"{array}.npy", record["sha256"][array], array,
                                   shape)
        if problem:
            return problem
    return None


def open_part(root: Path, name: str, arrays=PART_ARRAYS) -> dict[str, np.ndarray]:
    """A checked part's ``arrays``, memory-mapped (never unpickled)."""
    return {array: np.load(Path(root) / "parts" / name / f"{array}.npy", mmap_mode="r", allow_pickle=False)
            for array in arrays}


# How a store's row arrays will be read, as madvise advice: training looks rows up at random, verify and the
# DataCompDR export read them in order ("normal": the kernel's default readahead). Random matters for a store larger
# than the page cache: a page fault then reads its page alone instead of the kernel's readahead window
# (bench.store_lookup: 59-101 against 2 120 lookups/s on a 35.6 GiB store).
ACCESS = {"random": mmap.MADV_RANDOM, "sequential": mmap.MADV_SEQUENTIAL, "normal": mmap.MADV_NORMAL}
ROW_ARRAYS = ("image", "text", "views")  # read per looked-up sample (keys and hashes are read whole when opened)


def advise(arrays: dict[str, np.ndarray], access: str) -> int:
    """madvise the memory maps of a part's row arrays for ``access`` (a key of ACCESS); the number advised."""
    advised = 0
    for name in ROW_ARRAYS:
        mapping = getattr(arrays.get(name), "_mmap", None)  # numpy.memmap's mmap.mmap (np.load with mmap_mode)
        if mapping is not None:
            mapping.madvise(ACCESS[access])
            advised += 1
    return advised


def shard_change(url: str, record: dict) -> Optional[str]:
    """None if a local shard has the size recorded when its part was built (a remote one is not checked here)."""
    if is_remote(url) or record["shard_bytes"] is None or os.path.getsize(url) == record["shard_bytes"]:
        return None
    return (f"shard {url} changed since the store was built ({os.path.getsize(url)} bytes, store recorded "
            f"{record['shard_bytes']})")
