"""What a run trains and how: the student, its teacher source, the loss module, the optimizer (``TrainState``),
and the data stream, built from a TrainConfig and the resolved inputs (``build_state``)."""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from open_clip.transformer import PatchDropout
from torch import nn

import models
from kernels import ClipRDLoss
from models.factory import load_failure, one_line

from ..core.errors import ConfigError
from ..data.augment import AugmentCfg, FreshViews, ViewDraw
from ..data.shards import Codec, ShardStream, expand_urls
from ..teachers.reinforced import Reinforcement, image_hw
from ..teachers.sources import NoTeacher, OnlineTeacher, StoreTeacher, TeacherSource
from ..teachers.store import TeacherStore
from .config import AUTOCAST, MIXED, PURE, TrainConfig
from .datacompdr import datacompdr_codec, datacompdr_teacher
from .distributed import DistEnv, wrap
from .prepare import Sources, needs_teacher
from .task import DistillationTask


def param_groups(modules, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, logit scale, multipliers (every < 2-D parameter)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    """Everything a step changes: the task (student + loss, DDP-wrapped under torchrun), optimizer, scaler, counters."""

    model: nn.Module
    student: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    env: DistEnv = field(default_factory=DistEnv)
    total_steps: int = 1
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # of the current epoch
    skipped_in_a_row: int = 0  # fp16 steps skipped for non-finite gradients
    last_good: Optional[Path] = None  # the checkpoint this run last wrote or resumed from (not saved in one)

    def state_dict(self) -> dict:
        # the unwrapped modules' state dicts: they load in any world size
        return {"state_dict": self.student.state_dict(), "loss_state_dict": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "batches_done": self.batches_done, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["state_dict"])
        self.loss_fn.load_state_dict(state["loss_state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)


def autocast_dtype(cfg: TrainConfig):
    return getattr(torch, AUTOCAST[cfg.precision]) if cfg.precision in AUTOCAST else None


def build_optimizer_state(cfg: TrainConfig, student: nn.Module, teacher: TeacherSource, device: torch.device,
                          total_steps: int, env: DistEnv = DistEnv()) -> TrainState:
    """Around a student and a teacher source: the loss module, the task (DDP under torchrun), AdamW, GradScaler."""
    # a teacher ensemble (DataCompDR's --distill-teacher-dimension D1 D2 ...): one width per member, the mode
    ensemble = {"ensemble": cfg.ensemble()} if isinstance(teacher.embed_dim, list) else {}
    loss_fn = ClipRDLoss(cfg.loss_weights(), student_dim=models.embed_dim(cfg.model), teacher_dim=teacher.embed_dim,
                         backend=cfg.loss_backend, **ensemble).to(device)
    # a single process runs the task itself; under torchrun DDP broadcasts rank 0's initial weights
    task = wrap(DistillationTask(student, loss_fn, teacher, env, cfg.local_loss, cfg.gather_with_grad,
                                 autocast_dtype(cfg)), env, device)
    optimizer = torch.optim.AdamW(param_groups([student, loss_fn], cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp")
    return TrainState(task, student, loss_fn, optimizer, scaler, cfg, env, total_steps=total_steps)


def create_student(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The student, from --pretrained when given (one line naming the file when it does not load into the model)."""
    models.model_config(cfg.model)  # an unknown model name is not the weights' fault
    # open_clip_train's --siglip initialisation: logit scale log(10), logit bias -10
    siglip = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if cfg.siglip else {}
    precision = cfg.precision if cfg.precision in MIXED else "fp32"  # open_clip applies its bf16 / fp16 itself
    try:
        return models.create_model(cfg.model, cfg.pretrained, device=device, precision=precision, **siglip)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as exc:
        if not cfg.pretrained:
            raise
        # AssertionError: open_clip's checks of the checkpoint's shapes; a file that is no checkpoint is described
        reason = load_failure(cfg.pretrained, exc) if os.path.isfile(cfg.pretrained) else one_line(exc)
        raise ConfigError(f"--pretrained {cfg.pretrained}: cannot load it into {cfg.model}: {reason}") from exc


def lock_towers(student: nn.Module, cfg: TrainConfig) -> None:
    """open_clip_train's --lock-image / --lock-text (requires_grad off), before the optimizer collects parameters."""
    if cfg.lock_image:
        student.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                 freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        try:
            student.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers,
                                    freeze_layer_norm=cfg.lock_text_freeze_layer_norm)
        except AssertionError as exc:  # open_clip's CLIP text tower cannot leave its LayerNorms unlocked
            raise ConfigError(f"--lock-text: {cfg.model}: {exc} Add --lock-text-freeze-layer-norm") from exc


def teacher_source(cfg: TrainConfig, sources: Sources, student: nn.Module, device: torch.device) -> TeacherSource:
    if not needs_teacher(cfg):
        return NoTeacher()
    if cfg.dataset_reinforcement:  # the shards carry the teachers' rows
        return datacompdr_teacher(cfg, sources.train)
    if cfg.online_teacher:  # one teacher (TrainConfig refuses an ensemble)
        model, pretrained, _ = sources.teachers[0]
        teacher = OnlineTeacher(model, pretrained, student, cfg.model, device, autocast_dtype(cfg))
    else:  # the run's teachers, in order, must be the store's (a given store without --teacher-pretrained: its own)
        store = TeacherStore(sources.store_dir, expand_urls(sources.train),
                             [teacher.fingerprint for teacher in sources.teachers] or None)
        teacher = StoreTeacher(store, views=view_draw(cfg, store, student))
    if cfg.distill_logit_bias is not None:
        teacher.bias = cfg.distill_logit_bias
    if cfg.loss_weights().get("sigmoid_kd", 0) and teacher.bias is None:
        raise ConfigError(f"--sigmoid-kd-weight: the teacher {cfg.teacher} has no logit bias (a CLIP teacher, not a "
                          f"SigLIP one; in an ensemble, every member needs one): pass --distill-logit-bias B, the "
                          f"bias of its sigmoid targets")
    return teacher


def view_draw(cfg: TrainConfig, store: TeacherStore, student: nn.Module) -> Optional[ViewDraw]:
    """How a reinforced store's views and captions are drawn for this run (None: a store of the evaluation view and
    the .txt caption)."""
    settings = store.reinforcement
    if settings == Reinforcement():
        return None
    record = store.manifest["augmentation"]
    reference_hw = tuple(record["reference_hw"]) if settings.views else image_hw(student)
    return ViewDraw(store.view_rows, settings.views, settings.captions, reference_hw, image_hw(student), cfg.seed,
                    cfg.view_sampling, cfg.mix_synthetic_ratio)


def fresh_views(cfg: TrainConfig, student: nn.Module, teacher: TeacherSource) -> Optional[FreshViews]:
    """--online-augment's draw: operations drawn for the online teacher's image size (the student's without one),
    the view replayed at the student's size and, where its preprocessing differs, at the teacher's."""
    if not cfg.online_augment:
        return None
    teacher_model = getattr(teacher, "model", None)
    sizes = {"image": image_hw(student)}
    if "teacher_image" in teacher.images:
        sizes["teacher_image"] = image_hw(teacher_model)
    reference_hw = image_hw(teacher_model) if teacher_model is not None else image_hw(student)
    return FreshViews(AugmentCfg.from_dict(cfg.aug_cfg), reference_hw, tuple(sizes.items()), cfg.seed)


def build_state(cfg: TrainConfig, sources: Sources, env: DistEnv, device: torch.device
                ) -> tuple[TrainState, ShardStream]:
    """Student, teacher source, loss, optimizer and the data stream of a run (nothing trained yet)."""
    student = create_student(cfg, device)
    lock_towers(student, cfg)
    if cfg.precision in PURE:  # open_clip's pure_bf16 / pure_fp16: every weight of the student in that dtype
        student.to(getattr(torch, PURE[cfg.precision]))
    student.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.mfd_mask_ratio > 0:  # CLIP-KD's masked feature distillation: student sees a share of patches dropped
        student.visual.patch_dropout = PatchDropout(cfg.mfd_mask_ratio)
    teacher = teacher_source(cfg, sources, student, device)
    codec = datacompdr_codec(cfg, student) if cfg.dataset_reinforcement else \
        Codec({"image": models.get_preprocess(student), **teacher.images},
              {"text": models.get_tokenizer(cfg.model), **teacher.texts}, teacher.views,
              fresh_views(cfg, student, teacher))
    # a step's batch holds its --accum-freq micro-batches: the same samples as one batch of batch-size x accum-freq
    stream = ShardStream(sources.train, codec, cfg.batch_size * cfg.accum_freq, cfg.seed, env.rank, env.world_size,
                         cfg.workers, shuffle_buffer=cfg.shuffle_buffer, num_samples=cfg.train_num_samples,
                         resampled=cfg.dataset_resampled)
    total_steps = sum(stream.steps_per_epoch(e) for e in range(cfg.epochs))  # --epochs is bounded: seconds at most
    cfg.check_total_steps(total_steps)
    return build_optimizer_state(cfg, student, teacher, device, total_steps, env), stream
