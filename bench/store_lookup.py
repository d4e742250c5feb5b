"""Teacher-store lookups at scale: ``python -m bench.store_lookup [--samples 2000000] [--processes 2]
[--views V --captions C]``.

Writes a store of ``--samples`` rows of ``--dim`` fp16 embeddings directly as arrays (no teacher), then starts
``--processes`` processes that each open it with the real ``TeacherStore`` (the full verification a training run
does) and look up random batches of 256 samples for ``--seconds``.

- Plain store (``--views 0 --captions 1``, the defaults): each sample has one image and one text row (random unit
  vectors), and a lookup reads view 0 and caption 0. Results: ``bench/results/store/lookup.json``.
- Reinforced store (``--views V`` > 0 and/or ``--captions C`` > 1): each sample has V image rows and C text rows
  and, with views, what the real store writes beside them (engine.teachers.reinforced): V view-parameter rows (view
  0 the evaluation view, the others real views drawn by ``engine.data.augment.sample_view`` with the default
  ``--aug-cfg``) and its source image's size, so that opening runs every check of a reinforced store unchanged (the
  views' crops against their images included). Rows come from a pool of random unit vectors (drawing 16 x 2 M fresh
  ones would take longer than the lookups measured). Each lookup draws a random stored view and caption per sample,
  as a training step does, and reads each sample's view parameters as the data pipeline does
  (``TeacherStore.view_rows``, one call per sample before its view is replayed); the two are timed apart. Results:
  ``bench/results/store/lookup-views.json``.

The store is opened as training opens it: its row arrays' memory maps advised as read at random (madvise
MADV_RANDOM), so that a page fault on a store larger than the page cache reads that page alone rather than a
readahead window. ``--access normal`` (a diagnostic) leaves the kernel's default readahead, as the store did before.

Each process reports its resident memory before opening, after opening and after the lookups, split as /proc
reports it: RssAnon (private to the process: the index) and RssFile (pages of the memory-mapped parts, shared with
every other process through the page cache), and its lookup throughput. The 1-minute load average is recorded
before writing and before and after the lookups. The store is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.cli import HelpFormatter
from engine.data import augment
from engine.teachers import reinforced
from engine.teachers import store as store_lib
from engine.teachers.parts import ACCESS

BATCH = 256
RESULTS = Path(__file__).parent / "results" / "store"
DEFAULT_OUT = RESULTS / "lookup.json"
DEFAULT_VIEWS_OUT = RESULTS / "lookup-views.json"
CHUNK = 65536  # samples per append of a plain store (random rows drawn per chunk)
VIEWS_CHUNK = 8192  # samples per append of a reinforced store: (8192, 16, 512) fp16 rows are 128 MiB
ROW_POOL = 65536  # random unit rows a reinforced store's embeddings are drawn from
VIEW_POOL = 4096  # real views (parameter rows) a reinforced store's views 1..V-1 are drawn from
SOURCE_HW = (256, 320)  # the (height, width) recorded for every sample's source image
REFERENCE_HW = (224, 224)  # the teacher image size recorded in the manifest (the views' operations are drawn for it)


def _memory() -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of this process, bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def _key(i: int) -> str:
    return f"sample{i:010d}"


def settings_of(views: int, captions: int) -> reinforced.Reinforcement:
    """The store's views and captions: --augmentations V and --captions C with the default --aug-cfg."""
    return reinforced.Reinforcement.from_flags(views, {}, captions)


def begin_store(root: Path, dim: int, settings: reinforced.Reinforcement) -> dict:
    """A new store's manifest, recording the views and captions as engine.precompute does."""
    return store_lib.begin(root, [{"model": "random", "pretrained": "none", "fingerprint": "random:bench",
                                   "logit_scale": 100.0, "logit_bias": None, "embed_dim": dim}],
                           augmentation=settings.record(REFERENCE_HW, "shortest"))


def view_pool(settings: reinforced.Reinforcement, rng: np.random.Generator) -> np.ndarray:
    """(VIEW_POOL, P) float32 parameter rows of real views of a SOURCE_HW image, drawn as engine.precompute draws
    views 1..K-1 (engine.data.augment.sample_view with the store's --aug-cfg)."""
    return np.stack([augment.sample_view(settings.aug, SOURCE_HW, REFERENCE_HW, rng).row() for _ in range(VIEW_POOL)])


def write_store(root: Path, samples: int, dim: int, part_size: int, views: int = 0, captions: int = 1) -> None:
    """A complete store, part by part, through the real PartWriter (memory: one chunk of rows). ``views`` 0 and
    ``captions`` 1: a plain store of fresh random unit rows (as this benchmark always wrote it); else a reinforced
    store of ``views`` views and ``captions`` captions per sample, rows drawn from a pool."""
    settings = settings_of(views, captions)
    manifest = begin_store(root, dim, settings)
    rng = np.random.default_rng(0)
    plain = settings == reinforced.Reinforcement()
    chunk_size = CHUNK if plain else VIEWS_CHUNK
    if not plain:
        pool = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((ROW_POOL, dim), np.float32)),
                                             dim=-1).to(torch.float16).numpy()  # (ROW_POOL, D) unit rows, fp16
    if settings.views:
        evaluation = augment.evaluation_view(SOURCE_HW, "shortest", settings.aug.num_ops).row()  # (P,)
        other_views = view_pool(settings, rng)
    for start in range(0, samples, part_size):
        stop = min(start + part_size, samples)
        url = root / f"shard-{start // part_size:05d}.tar"
        url.write_bytes(b"")  # the writer records the shard's size; these parts stand for empty shards
        writer = store_lib.PartWriter(root, manifest, str(url), stop - start)
        for chunk in range(start, stop, chunk_size):
            end = min(chunk + chunk_size, stop)
            keys, digests, count = [_key(i) for i in range(chunk, end)], np.arange(chunk, end).tolist(), end - chunk
            if plain:
                rows = torch.from_numpy(rng.standard_normal((2, count, dim), dtype=np.float32))
                rows = torch.nn.functional.normalize(rows, dim=-1)
                writer.append(keys, digests, rows[0], rows[1])
                continue
            image = pool[rng.integers(0, ROW_POOL, (count, max(settings.views, 1)))]  # (count, V, D) fp16
            text = pool[rng.integers(0, ROW_POOL, (count, settings.captions))]  # (count, C, D) fp16
            view_rows = source_hw = None
            if settings.views:
                view_rows = other_views[rng.integers(0, VIEW_POOL, (count, settings.views))]  # (count, V, P) float32
                view_rows[:, 0] = evaluation  # view 0 is always the evaluation view
                source_hw = np.broadcast_to(np.array(SOURCE_HW, np.int32), (count, 2))  # (count, 2)
            writer.append(keys, digests, image, text, view_rows, source_hw)
        writer.commit()
    store_lib.finish(root, manifest)


def _lookup_worker(root: str, samples: int, seconds: float, seed: int, access: str, results) -> None:
    torch.set_num_threads(1)
    before = _memory()
    start = time.perf_counter()
    store = store_lib.TeacherStore(root, access=access)
    open_s = time.perf_counter() - start
    advised = store.maps_advised
    opened = _memory()
    settings = store.reinforcement
    rng = np.random.default_rng(seed)
    looked_up, lookup_s, view_rows_s, start = 0, 0.0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = rng.integers(0, samples, BATCH)
        keys, digests = [_key(i) for i in rows], rows.tolist()
        # a random stored view and caption per sample, as a training step asks (plain store: view 0, caption 0)
        views = rng.integers(0, max(settings.views, 1), BATCH).tolist() if settings.views else None
        captions = rng.integers(0, settings.captions, BATCH).tolist() if settings.captions > 1 else None
        t0 = time.perf_counter()
        image, text = store.lookup(keys, digests, [None] * BATCH, views, captions)
        t1 = time.perf_counter()
        if settings.views:  # the data pipeline reads each sample's view parameters once, before replaying it
            for key, digest in zip(keys, digests):
                store.view_rows(key, digest)
        t2 = time.perf_counter()
        assert image.shape == text.shape == (BATCH, store.embed_dim)
        looked_up, lookup_s, view_rows_s = looked_up + BATCH, lookup_s + t1 - t0, view_rows_s + t2 - t1
    elapsed = time.perf_counter() - start
    record = {"open_s": open_s, "samples_per_s": looked_up / elapsed, "looked_up": looked_up,
              "memory_before": before, "memory_opened": opened, "memory_after": _memory(), "maps_advised": advised}
    if settings.views:  # the two parts of a sample's reads, each as samples per second of its own time
        record.update(lookup_samples_per_s=looked_up / lookup_s, view_rows_samples_per_s=looked_up / view_rows_s)
    results.put(record)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.store_lookup", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--samples", type=int, default=2_000_000, help="samples in the store")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--views", type=int, default=0, help="stored views per sample (a reinforced store, as "
                   "engine.precompute --augmentations V writes it); 0: a plain store")
    p.add_argument("--captions", type=int, default=1, help="stored captions per sample (engine.precompute "
                   "--captions C)")
    p.add_argument("--part-size", type=int, default=100_000, help="samples per part (per shard)")
    p.add_argument("--processes", type=int, default=2, help="processes looking up at the same time")
    p.add_argument("--seconds", type=float, default=20.0, help="lookup time per process")
    p.add_argument("--dir", default=None, help="where to write the store (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument("--access", default="random", choices=list(ACCESS),
                   help="the madvise advice on the store's row maps: 'random' is what training does (a page fault "
                   "reads one page instead of a readahead window); 'normal' (the kernel's readahead, what the store "
                   "did before) and 'sequential' are diagnostics")
    p.add_argument("--out", default=None, help="JSON results file (default: bench/results/store/lookup.json for a "
                   "plain store, lookup-views.json beside it with --views or --captions)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    settings = settings_of(args.views, args.captions)  # a bad --views or --captions is refused before writing
    out = Path(args.out or (DEFAULT_OUT if settings == reinforced.Reinforcement() else DEFAULT_VIEWS_OUT))
    root = Path(args.dir or tempfile.mkdtemp(prefix="store-bench-")) / "store"
    shape = f"{args.samples} samples x ({max(args.views, 1)} views + {args.captions} captions) x {args.dim} fp16"
    load = {"before_write": load_1m()}
    try:
        start = time.perf_counter()
        write_store(root, args.samples, args.dim, args.part_size, args.views, args.captions)
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in root.rglob("*.npy"))
        print(f"wrote {shape} ({size / 2**30:.2f} GiB) in {write_s:.1f} s")
        load["before_lookups"] = load_1m()
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_lookup_worker, args=(str(root), args.samples, args.seconds, seed,
                                                                     args.access, results))
                   for seed in range(args.processes)]
        for worker in workers:
            worker.start()
        records = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
        load["after_lookups"] = load_1m()
    finally:
        if not args.keep:
            shutil.rmtree(root.parent if args.dir is None else root, ignore_errors=True)
    mib = lambda b: b / 2**20  # noqa: E731
    for i, r in enumerate(records):
        growth = {k: r["memory_after"][k] - r["memory_before"][k] for k in r["memory_before"]}
        r["growth"] = growth
        parts = (f" (lookup alone {r['lookup_samples_per_s']:.0f}, view parameters alone "
                 f"{r['view_rows_samples_per_s']:.0f})") if "lookup_samples_per_s" in r else ""
        print(f"process {i}: opened in {r['open_s']:.1f} s, {r['samples_per_s']:.0f} samples/s{parts}; memory growth "
              f"private (RssAnon) {mib(growth['RssAnon']):.0f} MiB, mapped store pages (RssFile, shared) "
              f"{mib(growth['RssFile']):.0f} MiB")
    print(f"1-minute load average: {load}")
    summary = {"samples": args.samples, "dim": args.dim, "store_bytes": size, "write_s": write_s,
               "processes": records, "batch": BATCH, "torch_threads": 1, "machine_cpus": os.cpu_count(),
               "load_average_1m": load, "access": args.access}
    if settings != reinforced.Reinforcement():
        summary.update(views=args.views, captions=args.captions, part_size=args.part_size, seconds=args.seconds,
                       command=" ".join(["python -m bench.store_lookup", *(sys.argv[1:] if argv is None else argv)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
