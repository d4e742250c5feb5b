"""Resuming a run: which checkpoint, whether its settings match this run's, and loading it (weights, optimizer,
counters and every rank's random streams), so that a resumed run continues exactly where it stopped."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.checkpoint import Checkpoint, resolve_resume, runs_beside, set_rng_state
from ..core.errors import ConfigError
from .config import TrainConfig
from .state import TrainState

# Settings a resumed run must share with its checkpoint (else --allow-config-change).
RESUME_INVARIANTS = ("model", "teacher", "teacher_pretrained", "teacher_store", "online_teacher", "online_augment",
                     "train_data",
                     "preset", "weights", "siglip", "distill_logit_bias", "distill_average_after_softmax",
                     "augmentations", "aug_cfg", "captions", "view_sampling", "mix_synthetic_ratio",
                     "batch_size", "accum_freq", "seed",
                     "mfd_mask_ratio", "local_loss",
                     "pretrained", "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats",
                     "lock_text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm", "train_num_samples",
                     "dataset_resampled")


def changed_settings(path: Path, saved_config: dict, cfg: TrainConfig) -> list[str]:
    """The settings this run changes from the checkpoint's; a ConfigError naming them unless --allow-config-change."""
    changed = [f"{k} {saved_config.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_INVARIANTS
               if saved_config.get(k) != getattr(cfg, k)]
    if changed and not cfg.allow_config_change:
        raise ConfigError(f"--resume {path}: this run's settings differ from the checkpoint's ({'; '.join(changed)}); "
                          f"pass --allow-config-change if that is meant, or another --name")
    return changed


def check_resume(cfg: TrainConfig) -> Optional[str]:
    """Refuse, before data, teacher and store are prepared (hours, on real data): ``--resume latest`` without a run
    to resume, a --resume file that is no training checkpoint, or one with other settings. Returns a message when
    the run to resume has already trained all of ``cfg.epochs`` (nothing to do), else None."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest" and not cfg.name:  # the default name is a new timestamp: it names no earlier run
        raise ConfigError(f"--resume latest: pass --name NAME, the run to continue; "
                          f"{runs_beside(Path(cfg.logs) / '-' / 'checkpoints')}")
    path = resolve_resume(cfg.resume, Path(cfg.logs) / cfg.name / "checkpoints" if cfg.name else Path(cfg.logs))
    saved = Checkpoint.load(path, mmap=True)  # resume() reads the tensors
    changed_settings(path, saved.config, cfg)
    results = path.parent.parent / "results.json"
    if saved.content.get("epoch", 0) >= cfg.epochs and not saved.content.get("batches_done") and results.exists():
        return (f"run {path.parent.parent} has finished: it trained {saved.content['epoch']} of --epochs "
                f"{cfg.epochs}; its results are in {results} (to train it longer, pass a "
                f"larger --epochs)")
    return None


def resume(state: TrainState, path: Path, log) -> None:
    """Load a checkpoint into ``state`` and this rank's RNG streams; refuse other settings unless allowed."""
    saved = Checkpoint.load(path)
    cfg, env = state.cfg, state.env
    changed = changed_settings(path, saved.config, cfg)
    if changed:
        log.warning(f"resuming with changed settings: {'; '.join(changed)}")
    state.load_state_dict(saved.content)
    state.last_good = path
    rank_rngs = saved.content.get("rank_rng", [saved.content["rng"]])
    set_rng_state(rank_rngs[env.rank] if len(rank_rngs) == env.world_size else saved.content["rng"])
    saved_world = saved.content.get("world_size", 1)
    if saved_world != env.world_size:  # data is dealt to ranks by world size
        log.warning(f"checkpoint from {saved_world} process(es), now {env.world_size}: the epoch continues at batch "
                    f"{state.batches_done} of the new split, not at the exact sample")
        random.seed(f"{cfg.seed}-{env.rank}-{state.step}")  # ranks must not share rank 0's restored streams
        torch.manual_seed(random.getrandbits(63)), np.random.seed(random.getrandbits(32))
    log.info(f"resumed from {path}: epoch {state.epoch}, batch {state.batches_done} of the epoch, step {state.step}")
