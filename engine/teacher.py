"""``python -m engine.teacher``: train the default teacher (tiny-vit-teacher) on the embedded dataset.

The package ships its result (models/pretrained/tiny-vit-teacher.pt, with tiny-vit-teacher.json recording its
evaluation and this command), so ordinary runs never train it; run this to regenerate it or to train a variant.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import HelpFormatter, run_command
from .data.embedded import cache_root
from .teachers.default import SHIPPED_TEACHER
from .training.default_teacher import TEACHER_EPOCHS, train_default_teacher


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.teacher", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--cache-dir", default=None,
                   help="where the data and the teacher's run go (default: $CLIP_RD_CACHE or ~/.cache/clip_rd)")
    p.add_argument("--epochs", type=int, default=TEACHER_EPOCHS, help="training epochs")
    p.add_argument("--output", default=str(SHIPPED_TEACHER),
                   help="checkpoint file to write, its .json record beside it (the default replaces the shipped "
                   "teacher: stores built from the old one are then rebuilt once)")
    return p


def train_teacher(argv=None) -> None:
    args = parser().parse_args(argv)
    path = train_default_teacher(cache_root(args.cache_dir), Path(args.output), args.epochs)
    print(f"default teacher: {path} (record: {path.with_suffix('.json')})")


def main(argv=None) -> None:
    run_command(train_teacher, argv)


if __name__ == "__main__":
    main()
