"""Resuming a run: which checkpoint, whether its settings match this run's, and loading it (weights, optimizer,
counters and every rank's random streams), so that a resumed run continues exactly where it stopped."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..core.checkpoint import Checkpoint, resolve_resume, set_rng_state
from ..core.errors import ConfigError
from .config import TrainConfig
from .state import TrainState

# Settings a resumed run must share with its checkpoint (else --allow-config-change).
RESUME_INVARIANTS = ("model", "teacher", "teacher_pretrained", "teacher_store", "online_teacher", "train_data",
                     "preset", "weights", "batch_size", "accum_freq", "seed", "mfd_mask_ratio", "local_loss",
                     "pretrained", "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats",
                     "lock_text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm", "train_num_samples")


def changed_settings(path: Path, saved_config: dict, cfg: TrainConfig) -> list[str]:
    """The settings this run changes from the checkpoint's; a ConfigError naming them unless --allow-config-change."""
    changed = [f"{k} {saved_config.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_INVARIANTS
               if saved_config.get(k) != getattr(cfg, k)]
    if changed and not cfg.allow_config_change:
        raise ConfigError(f"--resume {path}: this run's settings differ from the checkpoint's ({'; '.join(changed)}); "
                          f"pass --allow-config-change if that is meant, or another --name")
    return changed


def check_resume(cfg: TrainConfig) -> None:
    """Refuse a --resume file that is no training checkpoint, or one with other settings, before data, teacher and
    store are prepared (hours, on real data)."""
    if cfg.resume is None or (cfg.resume == "latest" and not cfg.name):  # no --name: a new run, nothing to resume
        return
    path = resolve_resume(cfg.resume, Path(cfg.logs) / (cfg.name or "") / "checkpoints")
    if path is not None:
        changed_settings(path, Checkpoint.load(path, mmap=True).config, cfg)  # resume() reads the tensors


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
