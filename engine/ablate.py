"""``python -m engine.ablate``: does relational distillation help? One student under each loss preset, several seeds.

The runs, the table (logs/<name>/table.md, .csv), the chart (ablation.png) and the fused-vs-reference check are
engine.training.ablation's; this is their command line.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from .cli import HelpFormatter, run_command
from .training.ablation import ABLATION_PRESETS, AblationSettings, ablate
from .training.config import TrainConfig


def parse_args(argv=None) -> tuple[AblationSettings, bool]:
    p = argparse.ArgumentParser(prog="python -m engine.ablate", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="CI-sized: small data and teacher, presets baseline and clip-rd, 1 seed, "
                                           "batch 32, 2 epochs (each default below can still be overridden)")
    a("--presets", nargs="+", default=None, help=f"ablation presets (default: all of {list(ABLATION_PRESETS)})")
    a("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2)")
    a("--epochs", type=int, default=None, help="epochs per run (default: the engine's, 4)")
    a("--batch-size", type=int, default=None, help="batch size per run (default: the engine's, 256)")
    a("--lr", type=float, default=None, help="learning rate per run (default: the engine's, 0.002)")
    a("--workers", type=int, default=0, help="data-loading worker processes per run (0: a background thread)")
    a("--equivalence-steps", type=int, default=200, help="steps of the fused-vs-reference check (0: skip it)")
    a("--train-data", default=None, help="webdataset shards (default: the embedded procedural dataset)")
    a("--val-data", default=None, help="validation shards (default: the embedded validation split)")
    a("--cache-dir", default=None, help="cache of the embedded data/teacher/store (default: $CLIP_RD_CACHE or "
                                        "~/.cache/clip_rd)")
    a("--model", default=TrainConfig.model, help="student model")
    a("--teacher", default=TrainConfig.teacher, help="teacher open_clip model name")
    a("--teacher-pretrained", default=None, help="teacher weights (default: the shipped default teacher; with --quick, "
                                                 "a small teacher trained in the cache)")
    a("--logs", default="./logs", help="where the ablation folder goes: <logs>/<name>/")
    a("--name", default=None, help="logs/<name>/ (default: 'ablation', with --quick 'ablation-quick'); "
                                   "a rerun with the same name resumes")
    a("--verbose", action="store_true", help="show the engine's own log lines and per-step bars")
    args = p.parse_args(argv)
    quick = args.quick
    base = TrainConfig(train_data=args.train_data, val_data=args.val_data, cache_dir=args.cache_dir,
                       workers=args.workers, model=args.model, teacher=args.teacher,
                       teacher_pretrained=args.teacher_pretrained,
                       grad_clip_norm=1.0)  # the recipe of the committed results (bench/results/ablation)
    overrides = {"epochs": (2 if quick else None) if args.epochs is None else args.epochs,
                 "batch_size": (32 if quick else None) if args.batch_size is None else args.batch_size,
                 "lr": args.lr}
    base = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    settings = AblationSettings(
        base=base, logs=args.logs, name=args.name or ("ablation-quick" if quick else "ablation"),
        presets=args.presets or (["baseline", "clip-rd"] if quick else list(ABLATION_PRESETS)),
        seeds=args.seeds or ([0] if quick else [0, 1, 2]), equivalence_steps=args.equivalence_steps,
        verbose=args.verbose)
    return settings, quick


def ablate_command(argv=None) -> None:
    settings, quick = parse_args(argv)
    ablate(settings, quick)


def main(argv=None) -> None:
    run_command(ablate_command, argv)


if __name__ == "__main__":
    main()
