"""``python -m engine.export``: write a trained student as a folder that plain open_clip loads."""
from __future__ import annotations

import argparse

import models

from .cli import HelpFormatter, run_command
from .evaluation.export import export


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.export", formatter_class=HelpFormatter,
        description="Write a trained student as a folder that plain open_clip loads with "
                    "open_clip.create_model_and_transforms('local-dir:DIR') and "
                    "open_clip.get_tokenizer('local-dir:DIR'). "
                    "The weights are the checkpoint's, unchanged; the loss module's parameters (projections, fusion "
                    "layers, multipliers) are not part of the student and are left out. The tiny models' word "
                    "tokenizer is written for open_clip's Hugging Face tokenizer, which needs transformers where "
                    "the folder is loaded.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a training checkpoint of engine.train, e.g. logs/<name>/checkpoints/epoch_latest.pt")
    p.add_argument("--output", metavar="DIR", required=True, default=argparse.SUPPRESS,
                   help="folder to write (created if missing; must be empty unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR, replacing the files of a previous export (other files stay)")
    return p


def export_command(argv=None) -> None:
    args = parser().parse_args(argv)
    result = export(args.checkpoint, args.output, force=args.force)
    print(f"exported {result.model} ({result.tensors} tensors, weights as in the checkpoint) to {result.output}:")
    for path in result.files:
        print(f"  {path}")
    if result.left_out:
        print(f"left out, as not part of the student: the loss module's {len(result.left_out)} tensors "
              f"({', '.join(result.left_out)}), e.g. student-to-teacher projections and fusion layers")
    needs = (" (its word tokenizer loads through Hugging Face transformers: pip install transformers where you load "
             "it)") if result.model in models.WORD_TOKENIZER_MODELS else ""
    print(f"load it with open_clip.create_model_and_transforms('local-dir:{result.output}') and "
          f"open_clip.get_tokenizer('local-dir:{result.output}'){needs}")


def main(argv=None) -> None:
    run_command(export_command, argv)


if __name__ == "__main__":
    main()
