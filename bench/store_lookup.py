"""Teacher-store lookups at scale: ``python -m bench.store_lookup [--samples 2000000] [--processes 2]``.

Writes a store of ``--samples`` x 2 x ``--dim`` fp16 rows directly as arrays (random unit vectors, no teacher),
then starts ``--processes`` processes that each open it (with the full verification a training run does) and look
up random batches of 256 samples for ``--seconds``. Each process reports its resident memory before opening,
after opening and after the lookups, split as /proc reports it: RssAnon (private to the process: the index) and
RssFile (pages of the memory-mapped parts, shared with every other process through the page cache), and its
lookup throughput. Results: ``bench/results/store/lookup.json``. The store is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.cli import HelpFormatter
from engine.teachers import store as store_lib

BATCH = 256
DEFAULT_OUT = Path(__file__).parent / "results" / "store" / "lookup.json"


def _memory() -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of this process, bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def _key(i: int) -> str:
    return f"sample{i:010d}"


def write_store(root: Path, samples: int, dim: int, part_size: int) -> None:
    """A complete store of random unit rows, part by part (memory: one part)."""
    manifest = store_lib.begin(root, [{"model": "random", "pretrained": "none", "fingerprint": "random:bench",
                                       "logit_scale": 100.0, "logit_bias": None, "embed_dim": dim}])
    rng = np.random.default_rng(0)
    for start in range(0, samples, part_size):
        stop = min(start + part_size, samples)
        url = root / f"shard-{start // part_size:05d}.tar"
        url.write_bytes(b"")  # the writer records the shard's size; these parts stand for empty shards
        writer = store_lib.PartWriter(root, manifest, str(url), stop - start)
        for chunk in range(start, stop, 65536):
            end = min(chunk + 65536, stop)
            rows = torch.from_numpy(rng.standard_normal((2, end - chunk, dim), dtype=np.float32))
            rows = torch.nn.functional.normalize(rows, dim=-1)
            writer.append([_key(i) for i in range(chunk, end)], np.arange(chunk, end).tolist(), rows[0], rows[1])
        writer.commit()
    store_lib.finish(root, manifest)


def _lookup_worker(root: str, samples: int, seconds: float, seed: int, results) -> None:
    torch.set_num_threads(1)
    before = _memory()
    start = time.perf_counter()
    store = store_lib.TeacherStore(root)
    open_s = time.perf_counter() - start
    opened = _memory()
    rng = np.random.default_rng(seed)
    looked_up, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = rng.integers(0, samples, BATCH)
        image, text = store.lookup([_key(i) for i in rows], rows.tolist(), [None] * BATCH)
        assert image.shape == (BATCH, store.embed_dim)
        looked_up += BATCH
    elapsed = time.perf_counter() - start
    results.put({"open_s": open_s, "samples_per_s": looked_up / elapsed, "looked_up": looked_up,
                 "memory_before": before, "memory_opened": opened, "memory_after": _memory()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_lookup", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--samples", type=int, default=2_000_000, help="samples in the store")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--part-size", type=int, default=100_000, help="samples per part (per shard)")
    parser.add_argument("--processes", type=int, default=2, help="processes looking up at the same time")
    parser.add_argument("--seconds", type=float, default=20.0, help="lookup time per process")
    parser.add_argument("--dir", default=None, help="where to write the store (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="store-bench-")) / "store"
    try:
        start = time.perf_counter()
        write_store(root, args.samples, args.dim, args.part_size)
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in root.rglob("*.npy"))
        print(f"wrote {args.samples} samples x 2 x {args.dim} fp16 ({size / 2**30:.2f} GiB) in {write_s:.1f} s")
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_lookup_worker, args=(str(root), args.samples, args.seconds, seed, results))
                   for seed in range(args.processes)]
        for worker in workers:
            worker.start()
        records = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
    finally:
        if not args.keep:
            shutil.rmtree(root.parent if args.dir is None else root, ignore_errors=True)
    mib = lambda b: b / 2**20  # noqa: E731
    for i, r in enumerate(records):
        growth = {k: r["memory_after"][k] - r["memory_before"][k] for k in r["memory_before"]}
        r["growth"] = growth
        print(f"process {i}: opened in {r['open_s']:.1f} s, {r['samples_per_s']:.0f} samples/s; memory growth "
              f"private (RssAnon) {mib(growth['RssAnon']):.0f} MiB, mapped store pages (RssFile, shared) "
              f"{mib(growth['RssFile']):.0f} MiB")
    summary = {"samples": args.samples, "dim": args.dim, "store_bytes": size, "write_s": write_s,
               "processes": records, "batch": BATCH, "torch_threads": 1, "machine_cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
