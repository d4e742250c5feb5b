"""``python -m engine.precompute``: run the teacher (or each teacher of an ensemble) once over the shards and write
its embedding store.

Resumable: shards already in the store are skipped (each part is written atomically); a part that is damaged or
was built from other data is refused. The store's layout is engine.teachers.store's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import HelpFormatter, run_command
from .core.errors import ConfigError, UserError
from .core.io import check_writable_folder
from .data.augment import parse_pairs
from .data.datacompdr import EMBEDDING_MEMBERS
from .data.embedded import cache_root, ensure_default_data
from .teachers import default as default_teacher
from .teachers import store as store_lib
from .teachers.datacompdr_export import export_datacompdr
from .teachers.precompute import build_store
from .teachers.reinforced import Reinforcement


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.precompute", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--train-data", default=None,
                   help="webdataset shards, brace-expandable, '::'-separated (default: the embedded dataset)")
    p.add_argument("--teacher", action="append", default=None, metavar="MODEL",
                   help="teacher open_clip model name; repeat it for a teacher ensemble (one --teacher-pretrained "
                   "per --teacher, in the same order): the store holds every member's L2-normalised rows side by "
                   f"side, and each member runs once per view and caption (default: {default_teacher.DEFAULT_TEACHER})")
    p.add_argument("--teacher-pretrained", action="append", default=None, metavar="TAG_OR_FILE",
                   help="open_clip pretrained tag or checkpoint file, once per --teacher for an ensemble (default: "
                   "the shipped default teacher's)")
    p.add_argument("--teacher-store", default=None,
                   help="output directory (default: <cache>/stores/<teacher fingerprint, or for an ensemble the "
                   "member count and a hash of every member's fingerprint>-<data id>)")
    p.add_argument("--batch-size", type=int, default=None, help="images per teacher forward pass (default: 64 on the "
                   "CPU, where a small batch stays in the processor's caches, 500 on a GPU)")
    p.add_argument("--augmentations", type=int, default=0, metavar="K",
                   help="stored views per sample (MobileCLIP's dataset reinforcement): view 0 is the evaluation "
                   "view, views 1..K-1 are drawn with --aug-cfg; each view's parameters and the teacher's embedding "
                   "of it are stored; 0: the evaluation view alone, not replayed")
    p.add_argument("--aug-cfg", nargs="*", default=[], metavar="KEY=VALUE",
                   help="how views are drawn: open_clip_train's --aug-cfg keys scale and ratio "
                   "(RandomResizedCrop), hflip (the flip's probability), and torchvision's RandAugment num_ops "
                   "(0: none) and magnitude (of 31 bins) (default: scale=0.9,1.0 ratio=0.75,1.333 hflip=0 num_ops=2 "
                   "magnitude=9)")
    p.add_argument("--captions", type=int, default=1, metavar="C",
                   help="captions per sample whose text embeddings are stored: the .txt, then the first C-1 of "
                   "its syn.json synthetic captions")
    p.add_argument("--output-format", default="store", choices=("store", "datacompdr"),
                   help="'store': the teacher store alone; 'datacompdr': also DataCompDR shards in --output, each "
                   "sample with its views (paug.json), its teachers' embeddings (npz or pth.gz: "
                   "--datacompdr-embeddings; an ensemble's members side by side, for --distill-teacher-dimension "
                   "D1 D2 ...), syn.json and json (uid, sha256), for "
                   "engine.train --dataset-reinforcement (needs --augmentations K >= 1)")
    p.add_argument("--output", default=None, help="with --output-format datacompdr: the folder of the shards")
    p.add_argument("--datacompdr-embeddings", default="npz", choices=EMBEDDING_MEMBERS,
                   help="with --output-format datacompdr: the embeddings' member, 'npz' (fp32 numpy archive) or "
                   "'pth.gz' (gzip'd torch.save of bf16 tensors, DataCompDR-1B's form: 0.4 of npz's bytes at "
                   "DataCompDR's sizes, bf16's rounding)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of the embedded dataset and default stores (default: $CLIP_RD_CACHE or "
                   "~/.cache/clip_rd)")
    return p


def precompute(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    settings = Reinforcement.from_flags(args.augmentations, parse_pairs(args.aug_cfg), args.captions)
    if (args.output_format == "datacompdr") != (args.output is not None):
        raise ConfigError("--output-format datacompdr and --output DIR go together")
    if args.datacompdr_embeddings != "npz" and args.output_format != "datacompdr":
        raise ConfigError("--datacompdr-embeddings only applies with --output-format datacompdr")
    if args.output_format == "datacompdr" and (settings.views < 1 or settings.captions < 2):
        raise ConfigError("--output-format datacompdr: DataCompDR samples carry their views and synthetic captions; "
                          "pass --augmentations K >= 1 and --captions C >= 2")
    if args.output is not None:
        check_writable_folder(Path(args.output), "--output")
    # (model, weights) per teacher, paired and checked before any data is prepared
    teachers = [(model, default_teacher.teacher_weights(model, pretrained)) for model, pretrained in
                default_teacher.pair_teachers(args.teacher or [], args.teacher_pretrained or [])]
    cache = cache_root(args.cache_dir)
    try:
        train = args.train_data or ensure_default_data(cache)["train"]
    except (ValueError, OSError) as exc:  # a --cache-dir that is a file or read-only, or holds other data
        raise UserError(f"--cache-dir {cache}: cannot prepare the embedded dataset there: {exc}") from exc
    fingerprints = [store_lib.teacher_fingerprint(model, pretrained) for model, pretrained in teachers]
    root = args.teacher_store or default_teacher.default_store_dir(cache, fingerprints, train, settings)
    start = time.time()
    build_store(train, teachers, root, args.batch_size, settings=settings)
    manifest = store_lib.read_manifest(root)
    print(f"teacher store {root}: {manifest['count']} samples, width {manifest['embed_dim']}, "
          f"{'teacher' if len(fingerprints) == 1 else 'teachers'} {', '.join(fingerprints)}, {settings.describe()} "
          f"({time.time() - start:.1f} s)")
    if args.output_format == "datacompdr":
        sizes = export_datacompdr(train, Path(root), Path(args.output), embeddings=args.datacompdr_embeddings)
        print(f"DataCompDR shards {args.output}: {len(sizes)} shard(s), {sum(sizes.values())} samples")


def main(argv=None) -> None:
    run_command(precompute, argv)


if __name__ == "__main__":
    main()
