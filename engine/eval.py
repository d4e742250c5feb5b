"""``python -m engine.eval``: zero-shot classification and retrieval of a trained student (or any open_clip
model) on validation shards, with clip_benchmark's metric names."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import models

from .cli import HelpFormatter, run_command
from .core.errors import ConfigError
from .core.io import atomic_write_json, check_writable_file
from .data.embedded import embedded_val_data
from .evaluation.loading import checkpoint_to_evaluate, load_model
from .evaluation.metrics import evaluate, imagenet_folder, imagenet_zero_shot, load_classnames


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.eval", description=" ".join(__doc__.split(": ", 1)[1].split()),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="open_clip model name (default: the checkpoint's model, else tiny-vit-student)")
    p.add_argument("--pretrained", default=None,
                   help="checkpoint file (engine or open_clip) or open_clip tag; 'default-teacher' = the shipped "
                   "teacher; default: the latest run's student under --logs")
    p.add_argument("--logs", default="./logs", help="where to look for the latest run without --pretrained")
    p.add_argument("--val-data", default=None, help="validation shards (default: embedded validation split)")
    p.add_argument("--classnames", default=None, help="JSON with classnames and templates (default: the "
                   "classnames.json beside the validation shards)")
    p.add_argument("--imagenet-val", default=None,
                   help="also zero-shot ImageNet (open_clip_train's --imagenet-val): an ImageFolder of the 1000 "
                   "class folders; None: the validation shards only")
    p.add_argument("--batch-size", type=int, default=500, help="samples per forward pass")
    p.add_argument("--cache-dir", default=None,
                   help="cache of the embedded dataset (default: $CLIP_RD_CACHE or ~/.cache/clip_rd)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    return p


def evaluate_command(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    output = Path(args.output) if args.output else None
    # the cheap checks first: a bad input stops the command before the model, the data and the evaluation
    if output is not None:
        check_writable_file(output, "--output")
    classes = load_classnames(Path(args.classnames), f"--classnames {args.classnames}") if args.classnames else None
    if args.imagenet_val is not None:
        imagenet_folder(args.imagenet_val)
    pretrained, model_name = checkpoint_to_evaluate(args.pretrained, args.model, args.logs)
    model = load_model(model_name, pretrained)
    val = args.val_data or embedded_val_data(args.cache_dir)
    preprocess, tokenizer = models.get_preprocess(model), models.get_tokenizer(model_name)
    metrics = evaluate(model, preprocess, tokenizer, val, args.batch_size, classes=classes)
    if args.imagenet_val is not None:
        metrics.update(imagenet_zero_shot(model, preprocess, tokenizer, args.imagenet_val, args.batch_size))
    print(json.dumps(metrics, indent=1))
    if output is not None:
        atomic_write_json(output, metrics, "--output")


def main(argv=None) -> None:
    run_command(evaluate_command, argv)


if __name__ == "__main__":
    main()
