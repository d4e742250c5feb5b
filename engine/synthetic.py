"""``python -m engine.synthetic``: generate the procedural image-caption dataset as webdataset shards."""
from __future__ import annotations

import argparse

from .cli import HelpFormatter, run_command
from .data.embedded import data_dir, default_cache_dir
from .data.synthetic import SyntheticSpec, build


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.synthetic", description=__doc__.split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default=str(data_dir(default_cache_dir())),
                   help="output folder (shards, sizes.json, classnames.json, dataset.json)")
    p.add_argument("--train-samples", type=int, default=SyntheticSpec.train_samples, help="training samples")
    p.add_argument("--val-samples", type=int, default=SyntheticSpec.val_samples, help="validation samples")
    p.add_argument("--shard-size", type=int, default=SyntheticSpec.shard_size, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="generator seed: another seed, other images and captions")
    return p


def generate(argv=None) -> None:
    args = parser().parse_args(argv)
    patterns = build(args.data_dir, SyntheticSpec(args.train_samples, args.val_samples, args.shard_size, args.seed))
    for split, pattern in patterns.items():
        print(f"{split}: {pattern}")


def main(argv=None) -> None:
    run_command(generate, argv)


if __name__ == "__main__":
    main()
