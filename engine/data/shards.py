"""Streaming webdataset shards: shard lists and sizes, per-(rank, worker) splits, deterministic shuffling,
exact mid-epoch resume, decoding and batching.

One epoch's sample order is a pure function of (seed, epoch, rank, worker): shards are permuted with
``Random((seed, epoch))`` and dealt to ranks then DataLoader workers; each worker reads its shards in order through
a seeded shuffle buffer and cuts fixed-size batches (the last partial batch is dropped). PyTorch's DataLoader
returns worker batches round-robin, so the first n batches of an epoch hold a computable number of batches from
each worker: resume skips exactly those (before decoding) and continues with batch n.

Shards are local tar files or webdataset URLs (``pipe:<command writing the tar to stdout>``, ``http(s)://...``):
remote shards are not checked for existence and their sizes are unknown, so an epoch's length then comes from
``--train-num-samples`` (open_clip's meaning: the samples in an epoch), spread evenly over the shards; a worker
whose shards hold fewer samples than their share starts over its shards, one whose shards hold more stops at its
share. The order stays a pure function of (seed, epoch, rank, worker), so resume stays exact for data that does
not change.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import itertools
import json
import os
import queue
import random
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import Compose, Normalize

from ..core.errors import ConfigError, ShardError
from . import tario

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _hash64(parts) -> int:
    """blake2b-64 of a byte sequence, as a signed int64 (numpy/torch friendly)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest(), "little", signed=True)


def sample_digest(raw: dict) -> int:
    """Digest of a raw webdataset sample: every member (name, size, bytes) in name order; ``__key__`` etc. excluded.

    The teacher store records it at precompute and checks it at every lookup, so targets stay bound to the exact
    bytes the teacher saw.
    """
    members = sorted((name, value) for name, value in raw.items() if not name.startswith("__"))
    return _hash64(part for name, value in members
                   for part in (name.encode(), len(value).to_bytes(8, "little"), bytes(value)))


def key_hash(key: str) -> int:
    return _hash64([key.encode()])


def _url_scheme(url: str) -> Optional[str]:
    match = re.match(r"^([a-z][a-z0-9+.-]*):(//)?", url)
    return match.group(1) if match and (match.group(2) or match.group(1) == "pipe") else None


def is_remote(url: str) -> bool:
    """A webdataset URL (``pipe:...``, ``http(s)://...``, any scheme webdataset opens) rather than a local file."""
    return _url_scheme(url) is not None


def expand_urls(pattern: str) -> list[str]:
    """``a-{000..009}.tar::b.tar`` -> list of shard paths or URLs (open_clip's ``::`` separator); checks that local
    ones exist and that remote ones have a scheme webdataset can open."""
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ShardError(f"no shards in {pattern!r}")
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    foreign = [url for url in urls if is_remote(url) and _url_scheme(url) not in schemes]
    if foreign:
        known = sorted(s for s in schemes if not s.startswith("_"))
        raise ShardError(f"shard {foreign[0]}: webdataset cannot open {_url_scheme(foreign[0])!r} URLs (it opens "
                         f"{known}; other sources through pipe:<command>)")
    folder = next((url for url in urls if not is_remote(url) and os.path.isdir(url)), None)
    if folder is not None:
        raise ShardError(f"{folder} is a directory, not a shard: give its shards as a pattern such as "
                         f"{os.path.join(folder, 'train-{00000..00015}.tar')}")
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        raise ShardError(f"missing shard(s): {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} of {len(urls)} in {pattern!r})")
    return urls


def shard_sizes(urls: list[str]) -> dict[str, Optional[int]]:
    """Samples per local shard from the ``sizes.json`` next to it, else by listing the tar's members; None for a
    remote shard (unknown)."""
    sizes = {}
    for url in urls:
        if is_remote(url):
            sizes[url] = None
            continue
        known = read_sizes_file(Path(url).parent / "sizes.json")
        sizes[url] = known[Path(url).name] if Path(url).name in known else len(shard_keys(url))
    return sizes


def read_sizes_file(path: Path) -> dict[str, int]:
    """A ``sizes.json`` (shard name -> samples), {} when there is none; a damaged one is refused, naming it."""
    if not path.exists():
        return {}
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict) or not all(type(n) is int and n >= 0 for n in known.values()):
            raise ValueError("not a map of shard names to sample counts")
    except (OSError, ValueError) as exc:  # a directory, unreadable, not UTF-8, not JSON, or not counts
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise ShardError(f"{path}: damaged sizes file ({reason}); repair or delete it (without it, the shards' "
                         f"samples are counted)") from exc
    return known


def require_sizes(urls: list[str], num_samples: Optional[int]) -> None:
    """Refuse remote shards without ``num_samples`` (--train-num-samples): their sizes are unknown."""
    remote = [url for url in urls if is_remote(url)]
    if remote and num_samples is None:
        raise ShardError(f"--train-data: the size of remote shard {remote[0]!r} is unknown ({len(remote)} remote "
                         f"shard(s)): pass --train-num-samples, the number of samples in an epoch")


def epoch_sizes(urls: list[str], num_samples: Optional[int] = None) -> dict[str, int]:
    """Samples each shard contributes to an epoch: ``num_samples`` (--train-num-samples) spread evenly over the
    shards, else the shards' own sizes."""
    require_sizes(urls, num_samples)
    if num_samples is not None:
        return {url: num_samples * (i + 1) // len(urls) - num_samples * i // len(urls) for i, url in enumerate(urls)}
    return shard_sizes(urls)


def shard_keys(url: str) -> list[str]:
    """The ``__key__`` of every sample in a shard, in order (a local shard: only its tar headers are read)."""
    if is_remote(url):
        return [sample["__key__"] for sample in read_shard(url)]
    try:  # an uncompressed tar: its headers alone, several times faster than tarfile (engine.data.tario)
        with open(url, "rb") as stream:
            if stream.peek(1) and not tario.is_compressed(stream.peek(8)):
                return _keys_in_order(tario.regular_member_names(stream))
    except (tario.TarFormatError, OSError):
        pass  # tarfile below reads compressed tars and names what is wrong with a damaged one as it always has
    try:
        with tarfile.open(url) as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError) as exc:
        # tarfile.open's own message lists every compression it tried, one per line
        reason = "not a tar archive" if str(exc).startswith("file could not be opened successfully") else exc
        raise ShardError(f"corrupt shard {url}: {reason}") from exc
    return _keys_in_order(names)


def _keys_in_order(names) -> list[str]:
    """The sample keys of a shard's member names, in order, grouped as webdataset groups them."""
    keys = []
    for name in names:
        match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)  # webdataset's base_plus_ext grouping
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    return keys


def epoch_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """This rank's shards for an epoch: a (seed, epoch)-seeded permutation dealt round-robin to ranks."""
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world_size]


def worker_batch_counts(urls: list[str], sizes: dict[str, int], batch_size: int, seed: int, epoch: int,
                        rank: int, world_size: int, workers: int) -> list[int]:
    """Full batches each DataLoader worker of this rank yields in an epoch (workers=0 counts as one)."""
    mine = epoch_shards(urls, seed, epoch, rank, world_size)
    return [sum(sizes[u] for u in mine[w::max(workers, 1)]) // batch_size for w in range(max(workers, 1))]


def steps_per_epoch(urls, sizes, batch_size, seed, epoch, world_size, workers) -> int:
    """Optimizer steps in an epoch: the smallest rank's batch count (every rank must take the same steps)."""
    return min(sum(worker_batch_counts(urls, sizes, batch_size, seed, epoch, r, world_size, workers))
               for r in range(world_size))


def round_robin(counts: list[int]) -> list[int]:
    """The worker of each batch in DataLoader order: cyclic over workers, skipping exhausted ones."""
    return [w for r in range(max(counts, default=0)) for w, count in enumerate(counts) if r < count]


def worker_skips(counts: list[int], batches_done: int) -> list[int]:
    """Batches of each worker among the first ``batches_done`` of the DataLoader's round-robin order."""
    order = round_robin(counts)[:batches_done]
    return [order.count(w) for w in range(len(counts))]


def next_worker(counts: list[int], batches_done: int) -> int:
    """The worker whose batch comes after the first ``batches_done`` (0 when the epoch is over)."""
    order = round_robin(counts)
    return order[batches_done] if batches_done < len(order) else 0


TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's and open_clip's (which passes tensors through)


def split_transform(transform: Callable) -> tuple[Callable, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """An open_clip evaluation transform (PIL steps, to-tensor, normalise) as its per-image part, which ends in a
    uint8 (C, H, W) tensor, and the (mean, std) of its normalisation, which ``Codec.collate`` applies to a whole
    batch at once: the same float operations in the same order (bit-identical), for a third less decoding time.
    Any other transform comes back whole, with None."""
    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or type(steps[-2]).__name__ not in TO_TENSOR:
        return transform, None
    mean, std = (torch.as_tensor(v, dtype=torch.get_default_dtype()).view(1, -1, 1, 1)
                 for v in (steps[-1].mean, steps[-1].std))
    return Compose([*steps[:-2], _uint8_chw]), (mean, std)


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    """(H, W, C) RGB pixels as a (C, H, W) uint8 view, what to-tensor makes before its division by 255."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


@dataclass
class Codec:
    """Turns raw samples into tensors: ``images``/``texts`` map an output name to a transform/tokenizer.

    ``codec(raw, epoch)`` decodes one sample; ``codec.collate(samples)`` stacks decoded samples into a batch and
    finishes the images' float conversion there (see ``split_transform``), so a decoded sample is only usable
    collated. With ``views`` (a reinforced store's, engine.data.augment.ViewDraw) each sample is decoded as the
    stored view and the caption drawn for it in ``epoch``: ``image`` is that view replayed at the student's size (a
    store without views: the evaluation transform's image), ``text`` that caption, and the sample carries their
    indices (``view_index``, ``caption_index``). With ``fresh`` (``--online-augment``, engine.data.augment.FreshViews)
    every image output is instead a new view drawn for the sample in ``epoch``, the same region at each output's size.
    """

    images: dict[str, Callable]
    texts: dict[str, Callable]
    views: Optional[Any] = None  # engine.data.augment.ViewDraw
    fresh: Optional[Any] = None  # engine.data.augment.FreshViews: a new view per sample and epoch, every image output

    def __post_init__(self):
        self._split = {name: split_transform(transform) for name, transform in self.images.items()}
        if self.views is not None and self._split["image"][1] is None:
            raise ConfigError("a reinforced store's views need an open_clip image transform (to-tensor, normalise)")
        if self.fresh is not None and any(norm is None for _, norm in self._split.values()):
            raise ConfigError("--online-augment needs open_clip image transforms (to-tensor, normalise)")

    def __call__(self, raw: dict, epoch: int = 0) -> dict:
        key, url = raw["__key__"], raw.get("__url__")
        image = decode_image(raw)
        view, caption = self.views.choose(key, epoch) if self.views is not None else (None, 0)
        text = sample_captions(raw, caption + 1)[caption]
        out = {"key": key, "url": url, "digest": sample_digest(raw), "caption": text}
        fresh = self.fresh.images(image, key, epoch) if self.fresh is not None else {}
        for name, (per_image, _) in self._split.items():
            if name in fresh:
                out[name] = _uint8_chw(fresh[name])
                continue
            replayed = view is not None and name == "image"
            out[name] = _uint8_chw(self.views.replay(image, raw, view, out["digest"])) if replayed \
                else per_image(image)
        for name, tokenizer in self.texts.items():
            out[name] = tokenizer([text])[0]
        if self.views is not None:  # view None: a store of the evaluation view alone, its row 0
            out["view_index"], out["caption_index"] = 0 if view is None else view, caption
        label = sample_label(raw)
        if label is not None:
            out["label"] = label
        return out

    def collate(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        for name, (_, normalisation) in self._split.items():
            if normalisation is not None:  # to-tensor's float(x) / 255, then normalise's (x - mean) / std
                mean, std = normalisation
                batch[name] = batch[name].to(mean.dtype).div_(255).sub_(mean).div_(std)
        return batch


def _corrupt(raw: dict, what: str) -> ShardError:
    return ShardError(f"corrupt shard {raw.get('__url__')}: sample {raw['__key__']!r} {what}")


def decode_image(raw: dict) -> Image.Image:
    """The sample's image as RGB; a sample without an image or a caption, or with a damaged image, is a
    ShardError naming shard and sample."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None or "txt" not in raw:
        raise _corrupt(raw, f"lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a .txt caption (has "
                            f"{sorted(k for k in raw if not k.startswith('__'))})")
    try:
        return Image.open(io.BytesIO(raw[image_ext])).convert("RGB")
    except Exception as exc:  # PIL raises several types for damaged files
        raise _corrupt(raw, f"cannot be decoded: {exc}") from exc


def sample_captions(raw: dict, count: int = 1) -> list[str]:
    """The sample's first ``count`` captions: its ``.txt`` (the ground truth), then the synthetic captions of its
    ``syn.json`` (DataCompDR's ``{"syn_text": [...]}``); fewer is a ShardError naming shard and sample."""
    try:
        captions = [raw["txt"].decode("utf-8")]
        if count > 1:
            synthetic = json.loads(raw["syn.json"])["syn_text"] if "syn.json" in raw else []
            captions += [str(text) for text in synthetic[:count - 1]]
    except (ValueError, TypeError, KeyError) as exc:  # not UTF-8, not JSON, no syn_text list
        raise _corrupt(raw, f"its captions cannot be read: {type(exc).__name__}: {exc}") from exc
    if len(captions) < count:
        raise _corrupt(raw, f"has {len(captions)} caption(s) (.txt and syn.json's syn_text), {count} are needed")
    return captions


def sample_label(raw: dict) -> Optional[int]:
    """The ``label`` of the sample's ``.json`` member, if any."""
    if "json" not in raw:
        return None
    try:
        meta = json.loads(raw["json"])
        label = meta.get("label") if isinstance(meta, dict) else None
        return None if label is None else int(label)
    except (ValueError, TypeError) as exc:  # not UTF-8, not JSON, or a label that is not a number
        raise ShardError(f"corrupt shard {raw.get('__url__')}: sample {raw['__key__']!r}: its .json member cannot be "
                         f"read: {exc}") from exc


def collate(samples: list[dict]) -> dict:
    batch = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def batched(samples: Iterator[dict], batch_size: int, collate_fn: Callable = collate) -> Iterator[dict]:
    """Collated batches of ``batch_size`` decoded samples as they stream, the last one possibly smaller."""
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield collate_fn(chunk)
            chunk = []
    if chunk:
        yield collate_fn(chunk)


def _raise_shard_error(exc: Exception) -> bool:
    where = [a for a in exc.args[1:] if isinstance(a, str)]
    raise ShardError(f"corrupt shard {where[-1] if where else '?'}: {exc.args[0] if exc.args else exc!r}") from exc


def read_shard(url: str, expected: Optional[int] = None) -> Iterator[dict]:
    """Raw samples of one shard, grouped by key as webdataset groups them; a short read is reported as a corrupt
    shard. A local uncompressed tar is read by ``engine.tario`` (several times faster than ``tarfile``), anything
    else (remote URLs, compressed tars) by webdataset's own reader."""
    count = 0
    for sample in _tar_samples(url):
        count += 1
        yield sample
    if expected is not None and count != expected:
        raise ShardError(f"corrupt shard {url}: read {count} samples, sizes file says {expected} (truncated?)")


WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's reader skips (e.g. __index__)


def _tar_samples(url: str) -> Iterator[dict]:
    if is_remote(url):
        yield from wds.tarfile_samples([{"url": url}], handler=_raise_shard_error)
        return
    try:
        stream = open(url, "rb")
    except OSError as exc:
        raise ShardError(f"corrupt shard {url}: {exc}") from exc
    with stream:
        if tario.is_compressed(stream.peek(8)):
            yield from wds.tarfile_samples([{"url": url}], handler=_raise_shard_error)
            return
        members = ({"fname": name, "data": data, "__url__": url} for name, data in tario.regular_members(stream)
                   if not WEBDATASET_META.match(name))
        try:
            yield from wds.tariterators.group_by_keys(members, handler=_raise_shard_error)
        except tario.TarFormatError as exc:
            raise ShardError(f"corrupt shard {url}: {exc}") from exc


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one epoch for one rank; call ``set_epoch(epoch, batches_done)`` before iterating."""

    def __init__(self, pattern: str, codec: Codec, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 num_samples: Optional[int] = None, resampled: bool = False):
        """``num_samples``: the samples in an epoch, spread evenly over the shards (None: the shards' sizes).
        ``resampled`` (open_clip's --dataset-resampled): each worker reads shards drawn at random with replacement,
        seeded by (seed, epoch, rank, worker), until the epoch's batches, num_samples // (batch x ranks) per rank."""
        self.urls = expand_urls(pattern)
        self.resampled = resampled
        self.sizes = epoch_sizes(self.urls, num_samples)
        self.exact = num_samples is None  # the sizes are the shards' own: a short read is a corrupt shard
        self.codec, self.batch_size, self.seed = codec, batch_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch, self.batches_done, self.dropped = 0, 0, 0
        total = sum(self.sizes.values())
        if batch_size * world_size > total:
            raise ConfigError(f"batch size {batch_size} x {world_size} process(es) is larger than the dataset "
                              f"({total} samples in {len(self.urls)} shard(s) of {pattern!r})")
        if self.steps_per_epoch(0) == 0:
            raise ConfigError(f"batch size {batch_size}: no full batch per rank/worker "
                              f"({len(self.urls)} shard(s), {world_size} rank(s), {workers} worker(s)); "
                              "use a smaller --batch-size or fewer --workers")

    def steps_per_epoch(self, epoch: int) -> int:
        if self.resampled:
            return sum(self.sizes.values()) // (self.batch_size * self.world_size)
        return steps_per_epoch(self.urls, self.sizes, self.batch_size, self.seed if self.shuffle else 0,
                               epoch if self.shuffle else 0, self.world_size, self.workers)

    def worker_counts(self, workers: int) -> list[int]:
        """Full batches each of ``workers`` DataLoader workers of this rank yields in the current epoch."""
        if self.resampled:  # the epoch's batches dealt evenly
            batches = self.steps_per_epoch(self.epoch)
            return [batches // workers + (w < batches % workers) for w in range(workers)]
        return [sum(self.sizes[u] for u in self._order()[w::workers]) // self.batch_size for w in range(workers)]

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        self.epoch, self.batches_done = epoch, batches_done
        self.dropped = 0  # samples the codec dropped this epoch (counted in this process: --workers 0)

    def _order(self):
        seed, epoch = (self.seed, self.epoch) if self.shuffle else (0, 0)
        if self.shuffle:
            return epoch_shards(self.urls, seed, epoch, self.rank, self.world_size)
        return self.urls[self.rank::self.world_size]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = self.worker_counts(workers)
        # a new DataLoader starts its round-robin at worker 0: rotate roles so that it is the one due next
        worker = (loader_worker + next_worker(counts, self.batches_done)) % workers
        skip = worker_skips(counts, self.batches_done)[worker] * self.batch_size
        limit = self.steps_per_epoch(self.epoch)  # equal step counts on every rank
        budget = worker_skips(counts, limit)[worker] * self.batch_size  # samples this worker may emit in total
        raw = self._resampled(worker) if self.resampled else self._raw_samples(self._order()[worker::workers], worker)
        batch = []
        for index, sample in enumerate(raw):
            if index >= budget:
                break
            if index < skip:
                continue
            decoded = self.codec(sample, self.epoch)
            if decoded is None:  # a sample the codec drops (DataCompDR's sha256 mismatch, when dropping)
                self.dropped += 1
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield self.codec.collate(batch)
                batch = []

    def _raw_samples(self, shards: list[str], worker: int) -> Iterator[dict]:
        """This worker's raw samples: its shards in order through a seeded shuffle buffer; with sizes from
        --train-num-samples, pass after pass (each pass shuffled on its own, the first one as without)."""
        for repeat in itertools.count():
            count = 0
            samples = (s for url in shards for s in read_shard(url, self.sizes[url] if self.exact else None))
            if self.shuffle:
                seed = f"{self.seed}-{self.epoch}-{self.rank}-{worker}" + (f"-pass{repeat}" if repeat else "")
                samples = _shuffled(samples, self.shuffle_buffer, random.Random(seed))
            for sample in samples:
                count += 1
                yield sample
            if self.exact or not shards:
                return
            if count == 0:
                raise ShardError(f"shards {shards[:3]}{' ...' if len(shards) > 3 else ''} hold no samples")

    def _resampled(self, worker: int) -> Iterator[dict]:
        """This worker's raw samples with --dataset-resampled: whole shards drawn with replacement from a generator
        seeded by (seed, epoch, rank, worker role), through the seeded shuffle buffer; endless (the budget stops it)."""
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        draw = random.Random(f"{seed}-resampled")

        def samples():
            while True:
                yield from read_shard(draw.choice(self.urls))

        return _shuffled(samples(), self.shuffle_buffer, random.Random(seed))


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: fill to ``size``, then emit a random element per new arrival; drain at the end."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class Prefetcher:
    """Iterates ``loader`` in a background thread, ``depth`` batches ahead of its consumer.

    With --workers 0 the next batch is then read and decoded while the current step computes (tar reading, PIL
    decoding and torch's operators release the GIL), instead of after it: the same batches in the same order,
    about 10 % less time for the default run on 2 cores. An exception in the thread is raised in the consumer;
    a consumer that stops early stops the thread.
    """

    def __init__(self, loader, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __iter__(self) -> Iterator:
        items, stop = queue.Queue(self.depth), threading.Event()

        def put(item) -> bool:  # False once the consumer has stopped
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.loader:
                    if not put(("batch", batch)):
                        return
                put(("end", None))
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
                put(("error", exc))

        thread = threading.Thread(target=produce, name="prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = items.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            thread.join()


def make_loader(stream: ShardStream):
    # own generator: creating an iterator then draws its base seed from it, not from the global RNG that a
    # checkpoint restores (otherwise a resumed epoch would shift every later random draw)
    generator = torch.Generator().manual_seed(stream.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stream.workers, generator=generator,
                                         persistent_workers=False, prefetch_factor=2 if stream.workers else None)
    return loader if stream.workers else Prefetcher(loader)  # worker processes prefetch on their own
