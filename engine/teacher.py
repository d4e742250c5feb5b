"""``python -m engine.teacher``: train the default teacher (tiny-vit-teacher) on the embedded dataset, once.

Plain CLIP training (the ``baseline`` preset) through the same loop as the student; the run lives in
<cache>/teachers/runs/ and resumes if interrupted; the final weights go to <cache>/teachers/tiny-vit-teacher.pt
(open_clip-loadable: a dict with ``state_dict``) together with the teacher's evaluation metrics.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .config import TrainConfig

# Sized from measured CPU throughput (README): ~8x the student's compute per sample, ~4 minutes on 2 idle cores.
TEACHER_EPOCHS = 3
TEACHER_LR = 2e-3


def teacher_config(cache: Path, epochs: int = TEACHER_EPOCHS, progress: bool = True) -> TrainConfig:
    from .defaults import DEFAULT_TEACHER, ensure_default_data

    patterns = ensure_default_data(cache)
    return TrainConfig(train_data=patterns["train"], val_data=patterns["val"], cache_dir=str(cache),
                       model=DEFAULT_TEACHER, preset="baseline", epochs=epochs, lr=TEACHER_LR, batch_size=128,
                       logs=str(cache / "teachers" / "runs"), name=DEFAULT_TEACHER, resume="latest",
                       progress=progress)


def train_default_teacher(cache: Path, epochs: int = TEACHER_EPOCHS, progress: bool = True) -> Path:
    from .defaults import default_teacher_path
    from .train import run

    print(f"training the default teacher once ({epochs} epochs); cached afterwards in {default_teacher_path(cache)}")
    result = run(teacher_config(cache, epochs, progress))
    final = torch.load(Path(result["run_dir"]) / "checkpoints" / "epoch_latest.pt", map_location="cpu",
                       weights_only=False)
    path = default_teacher_path(cache)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": final["state_dict"], "model": final["model"], "metrics": result.get("metrics")}, tmp)
    os.replace(tmp, path)
    (path.parent / f"{path.stem}_metrics.json").write_text(json.dumps(result.get("metrics"), indent=1))
    return path


def main(argv=None) -> None:
    from .defaults import cache_root

    parser = argparse.ArgumentParser(prog="python -m engine.teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--epochs", type=int, default=TEACHER_EPOCHS)
    args = parser.parse_args(argv)
    path = train_default_teacher(cache_root(args.cache_dir), args.epochs)
    print(f"default teacher: {path}")


if __name__ == "__main__":
    main()
