"""``python -m engine.ablate``: does relational distillation help, and does dataset reinforcement? One student
under each loss preset or each source of the teacher's targets, several seeds.

The runs, the table (logs/<name>/table.md, .csv), the chart (ablation.png) and the fused-vs-reference check are
engine.training.ablation's; this is their command line.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from .cli import HelpFormatter, run_command
from .training.ablation import (
    REINFORCEMENT_EPOCHS,
    REINFORCEMENT_SHARDS,
    REINFORCEMENT_VAL_FREQUENCY,
    SECOND_TEACHER_SEED,
    STUDIES,
    AblationSettings,
    ablate,
)
from .training.config import TrainConfig


def parse_args(argv=None) -> tuple[AblationSettings, bool]:
    p = argparse.ArgumentParser(prog="python -m engine.ablate", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--study", default="losses", choices=list(STUDIES),
      help="losses: one student per loss preset (does relational distillation help?); reinforcement: the clip-rd "
      "student from a store of the evaluation view alone, reinforced stores of 4 and 16 views, the online teacher "
      "on a new view every epoch (the same augmentation), and 4-view stores of a second teacher and of the two "
      "teachers' ensemble (does MobileCLIP's dataset reinforcement help?)")
    a("--quick", action="store_true",
      help="CI-sized: small data and teacher(s), 1 seed, batch 32, 2 epochs; the losses study: presets baseline and "
      "clip-rd (each default below can still be overridden)")
    a("--presets", nargs="+", default=None,
      help="the study's presets (default: all of them; losses: " + " ".join(STUDIES["losses"]) + "; reinforcement: "
      + " ".join(STUDIES["reinforcement"]) + ")")
    a("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2)")
    a("--epochs", type=int, default=None,
      help=f"epochs per run (default: losses, the engine's 4; reinforcement, {REINFORCEMENT_EPOCHS}: every sample "
      f"seen {REINFORCEMENT_EPOCHS} times)")
    a("--batch-size", type=int, default=None, help="batch size per run (default: the engine's, 256)")
    a("--lr", type=float, default=None, help="learning rate per run (default: the engine's, 0.002)")
    a("--workers", type=int, default=0, help="data-loading worker processes per run (0: a background thread)")
    a("--equivalence-steps", type=int, default=None,
      help="losses study: steps of the fused-vs-reference check (0: skip it) (default: 200; reinforcement: 0)")
    a("--train-data", default=None,
      help=f"webdataset shards (default: the embedded procedural dataset; reinforcement, its first "
      f"{REINFORCEMENT_SHARDS} shards, {REINFORCEMENT_SHARDS * 1000} samples)")
    a("--val-data", default=None, help="validation shards (default: the embedded validation split)")
    a("--cache-dir", default=None, help="cache of the embedded data/teacher/store (default: $CLIP_RD_CACHE or "
                                        "~/.cache/clip_rd)")
    a("--model", default=TrainConfig.model, help="student model")
    a("--teacher", default=TrainConfig.teacher, help="teacher open_clip model name")
    a("--teacher-pretrained", default=None, help="teacher weights (default: the shipped default teacher; with --quick, "
                                                 "a small teacher trained in the cache)")
    a("--second-teacher-pretrained", default=None,
      help=f"reinforcement study: the second teacher's checkpoint, a --teacher model (default: trained once into the "
      f"cache with the first teacher's recipe and seed {SECOND_TEACHER_SEED}: about 5 minutes on 2 idle cores)")
    a("--logs", default="./logs", help="where the ablation folder goes: <logs>/<name>/")
    a("--name", default=None, help="logs/<name>/ (default: 'ablation' or 'ablation-reinforcement', with --quick "
                                   "followed by '-quick'); a rerun with the same name resumes")
    a("--verbose", action="store_true", help="show the engine's own log lines and per-step bars")
    args = p.parse_args(argv)
    quick, reinforcement = args.quick, args.study == "reinforcement"
    base = TrainConfig(train_data=args.train_data, val_data=args.val_data, cache_dir=args.cache_dir,
                       workers=args.workers, model=args.model, teacher=args.teacher,
                       teacher_pretrained=args.teacher_pretrained,
                       grad_clip_norm=1.0)  # the recipe of the committed results (bench/results/ablation)
    default_epochs = 2 if quick else REINFORCEMENT_EPOCHS if reinforcement else None
    overrides = {"epochs": default_epochs if args.epochs is None else args.epochs,
                 "batch_size": (32 if quick else None) if args.batch_size is None else args.batch_size,
                 "lr": args.lr}
    base = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if reinforcement:  # 16 epochs of 4 000 samples: the student's metrics after every 4th (and the last)
        base = replace(base, val_frequency=REINFORCEMENT_VAL_FREQUENCY)
    name = ("ablation" if not reinforcement else "ablation-reinforcement") + ("-quick" if quick else "")
    quick_presets = ["baseline", "clip-rd"] if quick and not reinforcement else None
    equivalence_steps = (0 if reinforcement else 200) if args.equivalence_steps is None else args.equivalence_steps
    settings = AblationSettings(
        base=base, study=args.study, second_teacher=args.second_teacher_pretrained, logs=args.logs,
        name=args.name or name, presets=args.presets or quick_presets or list(STUDIES[args.study]),
        seeds=args.seeds or ([0] if quick else [0, 1, 2]), equivalence_steps=equivalence_steps, verbose=args.verbose)
    return settings, quick


def ablate_command(argv=None) -> None:
    settings, quick = parse_args(argv)
    ablate(settings, quick)


def main(argv=None) -> None:
    run_command(ablate_command, argv)


if __name__ == "__main__":
    main()
