"""``python -m engine.precompute``: run the teacher once over the shards and write the embedding store.

Resumable: shards already in the store are skipped (each part is written atomically); a part that is damaged or
was built from other data is refused. See engine.store for the layout and the augmentation decision.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import store as store_lib
from .cli import HelpFormatter


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
                raise store_lib.StoreError(f"sample key {key!r} appears {where}; every sample needs a unique "
                                           f"__key__ for its teacher embeddings to be found")
            seen[key] = url
    return counts


@torch.no_grad()
def build_store(pattern: str, teacher_name: str, pretrained: str, root: str | Path, batch_size: int = 500,
                progress: bool = True, device: str | torch.device | None = None) -> Path:
    """Run the teacher over every shard, batch by batch as samples stream (memory independent of shard size)."""
    from tqdm import tqdm

    import models

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(root)
    urls = data_lib.expand_urls(pattern)
    counts = check_unique_keys(urls)
    sizes = {url: counts[url] if size is None else size for url, size in data_lib.shard_sizes(urls).items()}
    fingerprint = store_lib.teacher_fingerprint(teacher_name, pretrained)
    previous = store_lib.reopen(root, fingerprint)  # the output is checked before the teacher is loaded
    todo = store_lib.shards_to_build(root, previous, urls) if previous else urls
    teacher = models.create_teacher(teacher_name, pretrained, device=device)
    teacher_info = {"model": teacher_name, "pretrained": str(pretrained), "fingerprint": fingerprint}
    manifest = previous or store_lib.begin(root, teacher_info, teacher.logit_scale.exp().item(),
                                           models.embed_dim(teacher_name))
    codec = data_lib.Codec(images={"image": models.get_preprocess(teacher)},
                           texts={"text": models.get_tokenizer(teacher_name)})
    bar = tqdm(total=sum(sizes[u] for u in todo), desc="teacher embeddings", disable=not progress, leave=False)
    for url in todo:
        writer = store_lib.PartWriter(root, manifest, url, sizes[url])
        try:
            decoded = (codec(raw) for raw in data_lib.read_shard(url, sizes[url]))
            for batch in data_lib.batched(decoded, batch_size, codec.collate):
                out = teacher(batch["image"].to(device), batch["text"].to(device))
                writer.append(batch["key"], batch["digest"].tolist(),
                              F.normalize(out["image_features"].float(), dim=-1).cpu(),
                              F.normalize(out["text_features"].float(), dim=-1).cpu())
                bar.update(len(batch["key"]))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    bar.close()
    store_lib.finish(root, manifest)
    return root


def main(argv=None) -> None:
    import sys

    from .defaults import DEFAULT_TEACHER, cache_root, default_store_dir, default_teacher_path, ensure_default_data

    parser = argparse.ArgumentParser(prog="python -m engine.precompute", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--train-data", default=None,
                        help="webdataset shards, brace-expandable, '::'-separated (default: the embedded dataset)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher open_clip model name")
    parser.add_argument("--teacher-pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint file (default: the shipped default teacher)")
    parser.add_argument("--teacher-store", default=None,
                        help="output directory (default: <cache>/stores/<teacher fingerprint>-<data id>)")
    parser.add_argument("--batch-size", type=int, default=500, help="samples per teacher forward pass")
    parser.add_argument("--cache-dir", default=None,
                        help="cache of the embedded dataset and default stores (default: $CLIP_RD_CACHE or "
                             "~/.cache/clip_rd)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size: must be >= 1, got {args.batch_size}")
    cache = cache_root(args.cache_dir)
    try:
        train = args.train_data or ensure_default_data(cache)["train"]
    except (ValueError, OSError) as exc:  # a --cache-dir that is a file or read-only, or holds other data
        sys.exit(f"error: --cache-dir {cache}: cannot prepare the embedded dataset there: {exc}")
    pretrained = args.teacher_pretrained
    if pretrained is None:
        if args.teacher != DEFAULT_TEACHER:
            sys.exit(f"error: --teacher {args.teacher}: pass --teacher-pretrained (open_clip tag or checkpoint file)")
        pretrained = str(default_teacher_path())
    fingerprint = store_lib.teacher_fingerprint(args.teacher, pretrained)
    root = args.teacher_store or default_store_dir(cache, fingerprint, train)
    start = time.time()
    try:
        build_store(train, args.teacher, pretrained, root, args.batch_size)
    except (ValueError, FileNotFoundError) as exc:  # StoreError and ShardError are ValueErrors
        sys.exit(f"error: {exc}")
    manifest = store_lib.read_manifest(root)
    print(f"teacher store {root}: {manifest['count']} samples, width {manifest['embed_dim']}, "
          f"teacher {manifest['teacher']['fingerprint']} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
