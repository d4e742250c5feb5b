"""``python -m engine.train``: distil a student CLIP from precomputed (or online) teacher embeddings.

Read top to bottom: ``TrainState`` (what a checkpoint holds), ``train_step`` (one optimizer step),
``train_one_epoch``, ``run`` (set up, resume, loop, evaluate) and ``main`` (the command line: prepare the inputs
with engine.prepare, then run). Data streaming is engine.data, the store engine.store, the teacher source and the
forward engine.task, the loss kernels.ClipRDLoss.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from kernels import ClipRDLoss
from models.factory import load_failure, one_line

from . import checkpoint as ckpt_lib
from .config import AUTOCAST, PURE, TrainConfig, parse_args, report_to
from .data import Codec, ShardError, ShardStream, expand_urls, make_loader
from .distributed import (
    DistEnv,
    all_ranks_true,
    close_distributed,
    init_distributed,
    is_collective_failure,
    mean_over_ranks,
    wrap,
)
from .eval import evaluate, imagenet_zero_shot
from .logger import MetricsWriter, plot_metrics, setup_logging, write_params
from .prepare import Sources, needs_teacher, prepare
from .schedule import cosine_lr
from .store import StoreError, TeacherStore
from .task import DistillationTask, NoTeacher, OnlineTeacher, StoreTeacher

LOGIT_SCALE_MAX = math.log(100)
# Settings a resumed run must share with its checkpoint (else --allow-config-change).
RESUME_INVARIANTS = ("model", "teacher", "teacher_pretrained", "teacher_store", "online_teacher", "train_data",
                     "preset", "weights", "batch_size", "accum_freq", "seed", "mfd_mask_ratio", "local_loss",
                     "pretrained", "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats",
                     "lock_text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm", "train_num_samples")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


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


def train_step(state: TrainState, batch: dict) -> dict:
    """Forward, backward, unscale, clip, finiteness check, optimizer step, logit-scale clamp; returns the terms.

    Raises NonFiniteLossError (before changing any weight) on a non-finite loss or gradient, except where amp's
    GradScaler skips the step itself; ``cfg.max_skipped_steps`` such skips in a row raise as well.
    """
    cfg = state.cfg
    for group in state.optimizer.param_groups:
        group["lr"] = cosine_lr(state.step, cfg.lr, cfg.warmup, state.total_steps)
    state.optimizer.zero_grad(set_to_none=True)
    terms = backward(state, batch) if cfg.accum_freq == 1 else backward_accumulated(state, batch)
    state.scaler.unscale_(state.optimizer)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or float("inf"))
    if not torch.isfinite(grad_norm) and not state.scaler.is_enabled():
        raise NonFiniteLossError(f"non-finite gradient at step {state.step} (norm {grad_norm.item()}): "
                                 f"terms {_rounded(terms)}")
    scale_before = state.scaler.get_scale() if state.scaler.is_enabled() else None
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if scale_before is not None and state.scaler.get_scale() < scale_before:  # GradScaler skipped this step
        state.skipped_in_a_row += 1
        if state.skipped_in_a_row >= cfg.max_skipped_steps:
            raise NonFiniteLossError(f"amp: {state.skipped_in_a_row} consecutive steps up to step {state.step} had "
                                     f"non-finite gradients and were skipped (loss scale now "
                                     f"{state.scaler.get_scale():g}); the run is not learning: try --precision "
                                     f"amp_bf16 or fp32, or a lower --lr")
    else:
        state.skipped_in_a_row = 0
    with torch.no_grad():
        state.student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    state.step, state.batches_done = state.step + 1, state.batches_done + 1
    return terms


def _check_finite(state: TrainState, terms: dict) -> None:
    device = terms["total"].device
    if not all_ranks_true(bool(torch.isfinite(terms["total"])), state.env, device):  # every rank stops together
        raise NonFiniteLossError(f"non-finite loss at step {state.step}: terms {_rounded(terms)}")


def backward(state: TrainState, batch: dict) -> dict:
    """Forward and backward of the whole batch at once (DDP averages the gradients across ranks here)."""
    terms = state.model(batch)
    _check_finite(state, terms)
    state.scaler.scale(terms["total"]).backward()
    return terms


def backward_accumulated(state: TrainState, batch: dict) -> dict:
    """The whole batch's exact gradient at the activation memory of one micro-batch (GradCache, --accum-freq K).

    1. Embed each of the K micro-batches without a graph (their RNG states kept: MFD masks replay identically).
    2. One loss over the whole batch of embeddings (gathered across ranks once), and its gradient with respect to
       the embeddings, the logit scale and the loss module's parameters.
    3. Re-run each micro-batch with a graph and backpropagate its slice of that gradient (DDP averages each pass's
       gradient across ranks; the sum of the averages is the average of the sums. Its static graph does not allow
       skipping the synchronisation of all but the last pass with no_sync).
    """
    k = state.cfg.accum_freq
    task = getattr(state.model, "module", state.model)  # unwrapped: passes 1 and 2 are outside DDP's forward
    micro = split_batch(batch, k)
    rng_states, outs = [], []
    with torch.no_grad():
        for part in micro:
            rng_states.append(ckpt_lib.rng_state())
            outs.append(task.embed(part))
    rng_after = ckpt_lib.rng_state()
    image = torch.cat([o["image_features"].float() for o in outs]).requires_grad_()
    text = torch.cat([o["text_features"].float() for o in outs]).requires_grad_()
    scale = outs[0]["logit_scale"].float().detach().requires_grad_()
    t_img, t_txt = task.teacher.rows(batch, image.device)
    terms = task.loss({"image_features": image, "text_features": text, "logit_scale": scale}, t_img, t_txt)
    _check_finite(state, terms)
    params = list(task.loss_fn.parameters())
    grads = torch.autograd.grad(terms["total"], [image, text, scale, *params], allow_unused=True)
    grad_params = [torch.zeros_like(p) if g is None else g / k for p, g in zip(params, grads[3:])]
    rows = torch.tensor([len(o["image_features"]) for o in outs]).cumsum(0).tolist()
    for i, part in enumerate(micro):
        ckpt_lib.set_rng_state(rng_states[i])
        rows_i = slice(rows[i - 1] if i else 0, rows[i])
        surrogate = state.model(part, replay=(grads[0][rows_i], grads[1][rows_i], grads[2] / k, grad_params))
        state.scaler.scale(surrogate).backward()
    ckpt_lib.set_rng_state(rng_after)
    return {name: value.detach() for name, value in terms.items()}


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``parts`` consecutive micro-batches of a batch (tensors and lists alike)."""
    size = len(batch["key"] if "key" in batch else batch["image"])
    bounds = [size * i // parts for i in range(parts + 1)]
    return [{name: value[lo:hi] for name, value in batch.items()} for lo, hi in zip(bounds, bounds[1:])]


def _rounded(terms: dict) -> dict:
    return {k: round(v.item(), 5) for k, v in terms.items()}


def save_checkpoint(state: TrainState, ckpt_dir: Path, names: list[str]) -> None:
    """Called by every rank at the same step (the RNG states are gathered); rank 0 writes, atomically."""
    rank_rngs = [None] * state.env.world_size
    if state.env.world_size > 1:
        torch.distributed.all_gather_object(rank_rngs, ckpt_lib.rng_state())
    if not state.env.is_main:
        return
    cfg = state.cfg
    content = {"config": asdict(cfg), "name": ckpt_dir.parent.name, "model": cfg.model, "rng": ckpt_lib.rng_state(),
               "world_size": state.env.world_size, **state.state_dict(),
               **({"rank_rng": rank_rngs} if state.env.world_size > 1 else {})}
    for name in names:
        ckpt_lib.atomic_save(content, ckpt_dir / name)


def train_one_epoch(state: TrainState, loader, ckpt_dir: Path, metrics: MetricsWriter, bar, log) -> bool:
    """Steps over the rest of this epoch's batches; True if --stop-after-steps was reached (checkpointed)."""
    cfg, step_times, t_data = state.cfg, [], time.perf_counter()
    for batch in loader:
        t_start = time.perf_counter()
        try:
            terms = train_step(state, batch)
        except NonFiniteLossError as exc:
            save_checkpoint(state, ckpt_dir, [ckpt_lib.LATEST])
            raise NonFiniteLossError(f"{exc} (epoch {state.epoch}, batch {state.batches_done}). Stopped before "
                                     f"applying this step; the last good state is in {ckpt_dir / ckpt_lib.LATEST}")
        step_times.append((time.perf_counter() - t_start, t_start - t_data))
        bar.update(1)
        if state.step % cfg.log_every_n_steps == 0 or state.step == state.total_steps:
            recent = step_times[-cfg.log_every_n_steps:]
            step_s, data_s = (sum(t[i] for t in recent) / len(recent) for i in (0, 1))
            row = {"epoch": state.epoch, "lr": state.optimizer.param_groups[0]["lr"],
                   "logit_scale": state.student.logit_scale.exp().item(), "step_s": step_s, "data_s": data_s,
                   "samples_per_s": cfg.batch_size * cfg.accum_freq * state.env.world_size / (step_s + data_s),
                   **{k: v.item() for k, v in mean_over_ranks(terms, state.env).items()}}
            metrics.write("train", state.step, row)
            bar.set_postfix(loss=f"{row['total']:.3f}")
            log.info(f"epoch {state.epoch} step {state.step}/{state.total_steps} "
                     + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        if cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps:
            save_checkpoint(state, ckpt_dir, [ckpt_lib.LATEST])
            log.info(f"stopped after {state.step} steps (--stop-after-steps); continue with --resume latest")
            return True
        t_data = time.perf_counter()
    return False


def autocast_dtype(cfg: TrainConfig):
    return getattr(torch, AUTOCAST[cfg.precision]) if cfg.precision in AUTOCAST else None


def build_optimizer_state(cfg: TrainConfig, student: nn.Module, teacher, device: torch.device, total_steps: int,
                          env: DistEnv = DistEnv()) -> TrainState:
    """Around a student and a teacher source: the loss module, the task (DDP under torchrun), AdamW, GradScaler."""
    loss_fn = ClipRDLoss(cfg.loss_weights(), student_dim=models.embed_dim(cfg.model), teacher_dim=teacher.embed_dim,
                         backend=cfg.backend).to(device)
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
    try:
        return models.create_model(cfg.model, cfg.pretrained, device=device)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as exc:
        if not cfg.pretrained:
            raise
        # AssertionError: open_clip's checks of the checkpoint's shapes; a file that is no checkpoint is described
        reason = load_failure(cfg.pretrained, exc) if os.path.isfile(cfg.pretrained) else one_line(exc)
        raise ValueError(f"--pretrained {cfg.pretrained}: cannot load it into {cfg.model}: {reason}") from exc


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
            raise ValueError(f"--lock-text: {cfg.model}: {exc} Add --lock-text-freeze-layer-norm") from exc


def build_state(cfg: TrainConfig, sources: Sources, env: DistEnv, device: torch.device):
    """Student, teacher source, loss, optimizer and the data stream of a run (nothing trained yet)."""
    student = create_student(cfg, device)
    lock_towers(student, cfg)
    if cfg.precision in PURE:  # open_clip's pure bf16 / fp16: the student's weights themselves in that dtype
        student.to(getattr(torch, PURE[cfg.precision]))
    student.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.mfd_mask_ratio > 0:  # CLIP-KD's masked feature distillation: student sees a share of patches dropped
        from open_clip.transformer import PatchDropout

        student.visual.patch_dropout = PatchDropout(cfg.mfd_mask_ratio)
    if not needs_teacher(cfg):
        teacher = NoTeacher()
    elif cfg.online_teacher:
        teacher = OnlineTeacher(cfg.teacher, sources.teacher_pretrained, student, cfg.model, device,
                                autocast_dtype(cfg))
    else:
        teacher = StoreTeacher(TeacherStore(sources.store_dir, expand_urls(sources.train), sources.teacher_fingerprint))
    codec = Codec({"image": models.get_preprocess(student), **teacher.images},
                  {"text": models.get_tokenizer(cfg.model), **teacher.texts})
    # a step's batch holds its --accum-freq micro-batches: the same samples as one batch of batch-size x accum-freq
    stream = ShardStream(sources.train, codec, cfg.batch_size * cfg.accum_freq, cfg.seed, env.rank, env.world_size,
                         cfg.workers, shuffle_buffer=cfg.shuffle_buffer, num_samples=cfg.train_num_samples)
    total_steps = sum(stream.steps_per_epoch(e) for e in range(cfg.epochs))
    return build_optimizer_state(cfg, student, teacher, device, total_steps, env), stream


def changed_settings(path: Path, saved_config: dict, cfg: TrainConfig) -> list[str]:
    """The settings this run changes from the checkpoint's; a ValueError naming them unless --allow-config-change."""
    changed = [f"{k} {saved_config.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_INVARIANTS
               if saved_config.get(k) != getattr(cfg, k)]
    if changed and not cfg.allow_config_change:
        raise ValueError(f"--resume {path}: this run's settings differ from the checkpoint's ({'; '.join(changed)}); "
                         f"pass --allow-config-change if that is meant, or another --name")
    return changed


def check_resume(cfg: TrainConfig) -> None:
    """Refuse a --resume file that is no training checkpoint, or one with other settings, before data, teacher and
    store are prepared (hours, on real data)."""
    if cfg.resume is None or (cfg.resume == "latest" and not cfg.name):  # no --name: a new run, nothing to resume
        return
    path = ckpt_lib.resolve_resume(cfg.resume, Path(cfg.logs) / (cfg.name or "") / "checkpoints")
    if path is not None:
        changed_settings(path, ckpt_lib.load(path, mmap=True)["config"], cfg)  # resume() reads the tensors


def resume(state: TrainState, path: Path, log) -> None:
    """Load a checkpoint into ``state`` and this rank's RNG streams; refuse other settings unless allowed."""
    saved = ckpt_lib.load(path)
    cfg, env = state.cfg, state.env
    changed = changed_settings(path, saved["config"], cfg)
    if changed:
        log.warning(f"resuming with changed settings: {'; '.join(changed)}")
    state.load_state_dict(saved)
    rank_rngs = saved.get("rank_rng", [saved["rng"]])
    ckpt_lib.set_rng_state(rank_rngs[env.rank] if len(rank_rngs) == env.world_size else saved["rng"])
    if saved.get("world_size", 1) != env.world_size:  # data is dealt to ranks by world size
        log.warning(f"checkpoint from {saved.get('world_size', 1)} process(es), now {env.world_size}: the epoch "
                    f"continues at batch {state.batches_done} of the new split, not at the exact sample")
        random.seed(f"{cfg.seed}-{env.rank}-{state.step}")  # ranks must not share rank 0's restored streams
        torch.manual_seed(random.getrandbits(63)), np.random.seed(random.getrandbits(32))
    log.info(f"resumed from {path}: epoch {state.epoch}, batch {state.batches_done} of the epoch, step {state.step}")


def run_directory(cfg: TrainConfig, env: DistEnv) -> Path:
    """logs/<name>/checkpoints, created and writable (else a one-line error naming --logs); stale temps removed."""
    name = cfg.name or f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{cfg.model}-{cfg.preset}"
    run_dir = Path(cfg.logs) / name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.resume is None and (ckpt_dir / ckpt_lib.LATEST).exists():
        raise ValueError(f"run {run_dir} already exists; pass --resume latest to continue it or another --name")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-probe.tmp{env.rank}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # rank 0 may have swept it away with the stale temporaries
    except OSError as exc:
        raise ValueError(f"--logs {cfg.logs}: cannot write the run directory {run_dir} "
                         f"({exc.strerror or exc})") from exc
    if env.is_main:
        ckpt_lib.remove_stale_temporaries(ckpt_dir)
    return run_dir


def run(cfg: TrainConfig, sources: Sources, env: DistEnv = DistEnv(), device=torch.device("cpu")) -> dict:
    cfg.validate()
    run_dir = run_directory(cfg, env)
    ckpt_dir = run_dir / "checkpoints"
    log = setup_logging(run_dir / "out.log" if env.is_main else None, env.is_main)
    if env.is_main:
        write_params(run_dir / "params.txt", cfg)
    log.info(f"run {run_dir.name}: {asdict(cfg)}; inputs {asdict(sources)}")
    torch.manual_seed(cfg.seed + env.rank), random.seed(cfg.seed + env.rank), np.random.seed(cfg.seed + env.rank)
    state, stream = build_state(cfg, sources, env, device)
    log.info(f"model {cfg.model}: {sum(p.numel() for p in state.student.parameters()) / 1e6:.2f}M params; loss "
             f"weights {state.loss_fn.weights}; backend {cfg.backend}; {state.total_steps} steps; "
             f"{env.world_size} process(es) on {device.type}, "
             f"global batch {env.world_size * cfg.batch_size * cfg.accum_freq}"
             + (f" in {cfg.accum_freq} micro-batches" if cfg.accum_freq > 1 else ""))
    resume_path = ckpt_lib.resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        resume(state, resume_path, log)
    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=state.step,
                            tensorboard="tensorboard" in report_to(cfg.report_to))
    from tqdm import tqdm

    bar = tqdm(total=state.total_steps, initial=state.step, disable=not (cfg.progress and env.is_main), desc="train")
    loader = make_loader(stream)
    state.model.train()
    last_eval = {}
    try:
        while state.epoch < cfg.epochs:
            stream.set_epoch(state.epoch, state.batches_done)
            if train_one_epoch(state, loader, ckpt_dir, metrics, bar, log):
                return {"stopped_at_step": state.step, "run_dir": str(run_dir)}
            state.epoch, state.batches_done = state.epoch + 1, 0
            last_eval = evaluate_epoch(state, sources, metrics, log)  # before the checkpoint: a resume redoes it
            last = state.epoch == cfg.epochs
            save_checkpoint(state, ckpt_dir, [ckpt_lib.LATEST] + (
                [f"epoch_{state.epoch}.pt"] if state.epoch % cfg.save_frequency == 0 or last else []))
    finally:
        bar.close()
        metrics.close()
    return summarise(state, sources, run_dir, log, last_eval)


def due(frequency: int, epoch: int, epochs: int) -> bool:
    """open_clip_train's schedule: after every ``frequency``-th epoch and after the last one; 0: never."""
    return frequency > 0 and (epoch % frequency == 0 or epoch == epochs)


def student_metrics(state: TrainState, sources: Sources, val: bool, zeroshot: bool) -> dict:
    """The student's metrics on --val-data (``val``) and --imagenet-val (``zeroshot``), where given; the training
    random streams are left as they were."""
    cfg, student = state.cfg, state.student
    device = next(student.parameters()).device
    preprocess, tokenizer = models.get_preprocess(student), models.get_tokenizer(cfg.model)
    scores = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if val and sources.val:
            scores.update(evaluate(student, preprocess, tokenizer, sources.val, device=device,
                                   num_samples=cfg.val_num_samples))
        if zeroshot and cfg.imagenet_val:
            scores.update(imagenet_zero_shot(student, preprocess, tokenizer, cfg.imagenet_val, workers=cfg.workers,
                                             device=device))
    return scores


def evaluate_epoch(state: TrainState, sources: Sources, metrics: MetricsWriter, log) -> dict:
    """After an epoch (rank 0, as open_clip_train): --val-data when --val-frequency is due, --imagenet-val when
    --zeroshot-frequency is; one 'val' row of metrics.jsonl. Returns the scores ({} when none was due)."""
    cfg = state.cfg
    if not (cfg.eval and state.env.is_main):
        return {}
    scores = student_metrics(state, sources, due(cfg.val_frequency, state.epoch, cfg.epochs),
                             due(cfg.zeroshot_frequency, state.epoch, cfg.epochs))
    if scores:
        metrics.write("val", state.step, {"epoch": state.epoch, **scores})
        log.info(f"val epoch {state.epoch} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def summarise(state: TrainState, sources: Sources, run_dir: Path, log, last_eval: dict) -> dict:
    """Evaluate the student (rank 0; the last epoch's evaluation when it covered everything), write results.json
    and the metrics plot."""
    result = {"run_dir": str(run_dir), "steps": state.step}
    if not state.env.is_main:
        return result
    cfg = state.cfg
    metrics = MetricsWriter(run_dir, enabled=True, tensorboard="tensorboard" in report_to(cfg.report_to))
    if cfg.eval and (sources.val or cfg.imagenet_val):
        covered = (cfg.val_frequency or not sources.val) and (cfg.zeroshot_frequency or not cfg.imagenet_val)
        scores = last_eval if last_eval and covered else student_metrics(state, sources, True, True)
        metrics.write("eval", state.step, {"epoch": state.epoch, **scores})
        log.info("eval " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        result["metrics"] = scores
    if sources.teacher_metrics:
        result["teacher_metrics"] = sources.teacher_metrics
        log.info("teacher " + " ".join(f"{k} {v:.4f}" for k, v in sources.teacher_metrics.items()))
    metrics.close()
    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    result["plot"] = str(plot) if plot else None
    (run_dir / "results.json").write_text(json.dumps(result, indent=1))
    log.info(f"results: {run_dir / 'results.json'}; plot: {result['plot']}; checkpoints: {run_dir / 'checkpoints'}; "
             f"metrics: {run_dir / 'metrics.jsonl'}")
    return result


def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
        check_resume(cfg)
        env, device = init_distributed()
        run(cfg, prepare(cfg, env), env, device)
    except (ShardError, StoreError, NonFiniteLossError, ValueError, FileNotFoundError, TimeoutError) as exc:
        sys.exit(f"error: {exc}")
    except OSError as exc:  # a checkpoint or log write failed (full disk, read-only): its message names the file
        sys.exit(f"error: {exc}")
    except RuntimeError as exc:  # a peer died or hung: a collective failed or timed out on this rank
        if not is_collective_failure(exc):
            raise
        sys.exit(f"error: rank {torch.distributed.get_rank()}: collective communication failed, another rank has "
                 f"probably crashed or hung (torchrun's summary names it; resume with --resume latest): {exc}")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
