"""The training loop: ``run(cfg, sources)`` sets a run up, resumes it, trains epoch by epoch, evaluates and
checkpoints, and returns a ``RunResult``. Read top to bottom: ``RunResult``, ``run``, ``train_one_epoch``,
checkpoints, evaluation, the summary. One step is engine.training.step; what a step changes is
engine.training.state; the inputs come resolved from engine.training.prepare.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import models

from ..core.checkpoint import LATEST, Checkpoint, resolve_resume, rng_state
from ..core.errors import ConfigError, NonFiniteLossError, WriteError
from ..core.io import atomic_write_json, sweep_temporaries, temp_path
from ..core.lock import exclusive
from ..data.embedded import cache_root
from ..data.shards import expand_urls, is_remote, make_loader, shard_keys
from ..evaluation.metrics import evaluate, imagenet_zero_shot
from ..teachers.sources import StoreTeacher
from .config import TrainConfig, command_line, report_to
from .distributed import DistEnv, mean_over_ranks
from .logger import MetricsWriter, plot_metrics, setup_logging, write_params
from .prepare import Sources
from .resume import resume
from .state import TrainState, build_state
from .step import AfterBackward, non_finite_parameter, train_step

RUN_LOCK = ".run.lock"  # held by the run training in the folder (rank 0's process)


@dataclass
class RunResult:
    """What a run leaves: its folder, how far it got, the final evaluation and the mean step time of this process."""

    run_dir: Path
    steps: int
    finished: bool = True  # False: stopped by --stop-after-steps (continue with --resume latest)
    metrics: dict = field(default_factory=dict)  # clip_benchmark names; empty without evaluation
    teacher_metrics: Optional[dict] = None
    plot: Optional[Path] = None
    mean_step_s: Optional[float] = None  # forward, backward and optimizer, per step
    mean_data_s: Optional[float] = None  # waiting for the next batch, per step

    def to_json(self) -> dict:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def run(cfg: TrainConfig, sources: Sources, env: DistEnv = DistEnv(), device=torch.device("cpu"),
        after_backward: Optional[AfterBackward] = None) -> RunResult:
    """Train ``cfg`` on ``sources`` (this rank of ``env``); ``after_backward``: see engine.training.step. The run's
    folder belongs to this run while it trains: a second run of the same name is refused."""
    cfg.validate()
    run_dir = run_directory(cfg, env)
    owned = exclusive(run_dir / RUN_LOCK, f"run {run_dir}") if env.is_main else nullcontext()
    with owned:
        return train_run(replace(cfg, name=run_dir.name, cache_dir=str(cache_root(cfg.cache_dir))), sources, env,
                         device, run_dir, after_backward)


def train_run(cfg: TrainConfig, sources: Sources, env: DistEnv, device: torch.device, run_dir: Path,
              after_backward: Optional[AfterBackward]) -> RunResult:
    """``run`` in its folder: ``cfg`` names the folder and the cache actually used (params.txt records them)."""
    ckpt_dir = run_dir / "checkpoints"
    log = setup_logging(run_dir / "out.log" if env.is_main else None, env.is_main)
    if env.is_main:
        write_params(run_dir / "params.txt", cfg)
    log.info(f"run {run_dir.name}: {asdict(cfg)}; inputs {asdict(sources)}")
    torch.manual_seed(cfg.seed + env.rank), random.seed(cfg.seed + env.rank), np.random.seed(cfg.seed + env.rank)
    state, stream = build_state(cfg, sources, env, device)
    start = f"weights from --pretrained {cfg.pretrained}" if cfg.pretrained else "randomly initialised"
    params = sum(p.numel() for p in state.student.parameters()) / 1e6
    log.info(f"model {cfg.model} ({start}): {params:.2f}M params; loss weights {state.loss_fn.weights}; "
             f"backend {cfg.loss_backend}; {state.total_steps} steps; {env.world_size} process(es) on {device.type}, "
             f"global batch {env.world_size * cfg.batch_size * cfg.accum_freq}"
             + (f" in {cfg.accum_freq} micro-batches" if cfg.accum_freq > 1 else ""))
    resume_path = resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        resume(state, resume_path, log)
    warn_if_validating_on_training_data(state, sources, log)
    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=state.step,
                            tensorboard="tensorboard" in report_to(cfg.report_to))
    bar = tqdm(total=state.total_steps, initial=state.step, disable=not (cfg.progress and env.is_main), desc="train")
    loader, step_times, last_eval = make_loader(stream), [], {}
    state.model.train()
    try:
        while state.epoch < cfg.epochs:
            stream.set_epoch(state.epoch, state.batches_done)
            if train_one_epoch(state, loader, ckpt_dir, metrics, bar, log, step_times, after_backward):
                log.info(f"stopped after {state.step} steps (--stop-after-steps); continue with: "
                         f"{resume_command(cfg, env)}")
                return RunResult(run_dir, state.step, finished=False, **mean_times(step_times))
            if stream.dropped:
                log.warning(f"epoch {state.epoch + 1}: dropped {stream.dropped} sample(s) whose image does not match "
                            f"its sha256 (--dataset-reinforcement-drop-mismatched)")
            state.epoch, state.batches_done = state.epoch + 1, 0
            last_eval = evaluate_epoch(state, sources, metrics, log)  # before the checkpoint: a resume redoes it
            last = state.epoch == cfg.epochs
            # epoch_K.pt before epoch_latest.pt: killed between the two, the run resumes before this epoch's end
            # and writes both again
            save_checkpoint(state, ckpt_dir, (
                [f"epoch_{state.epoch}.pt"] if last or (cfg.save_frequency and state.epoch % cfg.save_frequency == 0)
                else []) + [LATEST])
    except KeyboardInterrupt:
        saved = Checkpoint.load(ckpt_dir / LATEST, mmap=True).content["step"] if (ckpt_dir / LATEST).exists() else None
        log.warning(f"interrupted at step {state.step}; " + (
            f"the last checkpoint is {ckpt_dir / LATEST} (step {saved}); continue with: {resume_command(cfg, env)}"
            if saved is not None else "no checkpoint was written yet"))
        raise
    finally:
        bar.close()
        metrics.close()
    return summarise(state, sources, run_dir, log, last_eval, step_times)


def teacher_metrics(cfg: TrainConfig, sources: Sources, run_dir: Path, log, device: torch.device) -> Optional[dict]:
    """The teacher's scores on the run's own validation data, to compare the student with: the shipped teacher's
    record where that is the data it was recorded on, else evaluated once (kept in teacher_metrics.json). An
    ensemble has no one model to score: each member is scored, its metrics named ``teacher<k>/<metric>``."""
    if sources.teacher_metrics is not None:
        return sources.teacher_metrics
    if not (cfg.eval and sources.val and sources.teachers):
        return None
    weights = [teacher.pretrained for teacher in sources.teachers]
    cached = run_dir / "teacher_metrics.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("val") == sources.val and record.get("teacher") == (weights[0] if len(weights) == 1 else
                                                                         weights):
            return record["metrics"]
    scores = {}
    for k, (model, pretrained, _) in enumerate(sources.teachers):
        log.info(f"evaluating the teacher {model} ({pretrained}) on --val-data {sources.val} once, to compare the "
                 f"student with")
        teacher = models.create_teacher(model, pretrained, device=device)
        member = evaluate(teacher, models.get_preprocess(teacher), models.get_tokenizer(model), sources.val,
                          device=device, num_samples=cfg.val_num_samples)
        scores.update(member if len(sources.teachers) == 1 else
                      {f"teacher{k + 1}/{name}": value for name, value in member.items()})
    atomic_write_json(cached, {"val": sources.val, "teacher": weights[0] if len(weights) == 1 else weights,
                               "metrics": scores})
    return scores


def resume_command(cfg: TrainConfig, env: DistEnv) -> str:
    """The exact command that continues this run (its name, --resume latest, every other setting as given)."""
    line = command_line(replace(cfg, resume="latest", stop_after_steps=None, allow_config_change=False))
    if env.world_size > 1:
        line = line.replace("python -m engine.train", f"torchrun --nproc-per-node {env.world_size} -m engine.train --",
                            1)
    return line


def warn_if_validating_on_training_data(state: TrainState, sources: Sources, log) -> None:
    """--val-data that is (partly) the training data makes every score meaningless: say so before training."""
    if not (sources.val and state.cfg.eval and state.env.is_main):
        return
    val_urls = expand_urls(sources.val)
    shared = sorted(set(map(os.path.abspath, val_urls)) & set(map(os.path.abspath, expand_urls(sources.train))))
    if shared:
        log.warning(f"--val-data {sources.val}: {len(shared)} of its shards are training shards (e.g. {shared[0]}): "
                    f"the evaluation measures memorisation, not generalisation")
        return
    teacher = getattr(state.model, "module", state.model).teacher
    if isinstance(teacher, StoreTeacher) and not is_remote(val_urls[0]):
        keys = shard_keys(val_urls[0])
        seen = sum(teacher.store.contains(key) for key in keys)
        if seen:
            log.warning(f"--val-data {sources.val}: {seen} of the {len(keys)} samples of {val_urls[0]} are training "
                        f"samples (the teacher store holds their keys): the evaluation is not on held-out data")


def run_directory(cfg: TrainConfig, env: DistEnv) -> Path:
    """logs/<name>/checkpoints, created and writable (else a one-line error naming --logs); stale temps removed."""
    name = cfg.name or f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{cfg.model}-{cfg.preset}"
    run_dir = Path(cfg.logs) / name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.resume is None and (ckpt_dir / LATEST).exists():
        raise ConfigError(f"run {run_dir} already exists; pass --resume latest to continue it or another --name")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_path(ckpt_dir / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WriteError(f"--logs {cfg.logs}: cannot write the run directory {run_dir} "
                         f"({exc.strerror or exc})") from exc
    sweep_temporaries(ckpt_dir)  # only dead processes' temporaries: every rank may sweep
    return run_dir


def train_one_epoch(state: TrainState, loader, ckpt_dir: Path, metrics: MetricsWriter, bar, log,
                    step_times: list[tuple[float, float]], after_backward: Optional[AfterBackward] = None) -> bool:
    """Steps over the rest of this epoch's batches, appending (step, data wait) seconds to ``step_times``; True if
    --stop-after-steps was reached (checkpointed)."""
    cfg, t_data = state.cfg, time.perf_counter()
    for batch in loader:
        t_start = time.perf_counter()
        try:
            terms = train_step(state, batch, after_backward)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc} (epoch {state.epoch}, batch {state.batches_done}). "
                                     f"{keep_last_good_state(state, ckpt_dir)}") from exc
        step_times.append((time.perf_counter() - t_start, t_start - t_data))
        bar.update(1)
        if state.step % cfg.log_every_n_steps == 0 or state.step == state.total_steps:
            log_step(state, terms, step_times[-cfg.log_every_n_steps:], metrics, bar, log)
        if cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps:
            save_checkpoint(state, ckpt_dir, [LATEST])
            return True
        t_data = time.perf_counter()
    return False


def log_step(state: TrainState, terms: dict, recent: list[tuple[float, float]], metrics: MetricsWriter, bar,
             log) -> None:
    """One 'train' row of metrics.jsonl and one log line: every loss term (mean over ranks), lr, step times."""
    cfg = state.cfg
    step_s, data_s = (sum(t[i] for t in recent) / len(recent) for i in (0, 1))
    row = {"epoch": state.epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],  # 1-based, as the val rows
           "logit_scale": state.student.logit_scale.exp().item(), "step_s": step_s, "data_s": data_s,
           "samples_per_s": cfg.batch_size * cfg.accum_freq * state.env.world_size / (step_s + data_s),
           **{k: v.item() for k, v in mean_over_ranks(terms, state.env).items()}}
    metrics.write("train", state.step, row)
    bar.set_postfix(loss=f"{row['total']:.3f}")
    log.info(f"epoch {state.epoch + 1}/{cfg.epochs} step {state.step}/{state.total_steps} "
             + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))


def mean_times(step_times: list[tuple[float, float]]) -> dict:
    if not step_times:
        return {}
    return {"mean_step_s": sum(t[0] for t in step_times) / len(step_times),
            "mean_data_s": sum(t[1] for t in step_times) / len(step_times)}


def keep_last_good_state(state: TrainState, ckpt_dir: Path) -> str:
    """After a step failed: save epoch_latest.pt if the weights are still finite (a bad loss or gradient stops the
    step before the optimizer changes them), never if not; says where the last good state is."""
    if non_finite_parameter(state) is None:
        save_checkpoint(state, ckpt_dir, [LATEST])
        return f"Stopped before applying this step; the last good state is in {ckpt_dir / LATEST}"
    where = f"in {state.last_good}" if state.last_good else "none: this run has not written a checkpoint yet"
    return f"Its weights are not finite and were not saved; the last good state is {where}"


def save_checkpoint(state: TrainState, ckpt_dir: Path, names: list[str]) -> None:
    """Called by every rank at the same step (the RNG states are gathered); rank 0 writes, atomically."""
    rank_rngs = [None] * state.env.world_size
    if state.env.world_size > 1:
        torch.distributed.all_gather_object(rank_rngs, rng_state())
    if not state.env.is_main:
        return
    cfg = state.cfg
    content = {"config": asdict(cfg), "name": ckpt_dir.parent.name, "model": cfg.model, "rng": rng_state(),
               "world_size": state.env.world_size, **state.state_dict(),
               **({"rank_rng": rank_rngs} if state.env.world_size > 1 else {})}
    for name in names:
        Checkpoint.save(content, ckpt_dir / name)
    state.last_good = ckpt_dir / names[-1]


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


def summarise(state: TrainState, sources: Sources, run_dir: Path, log, last_eval: dict,
              step_times: list[tuple[float, float]]) -> RunResult:
    """Evaluate the student (rank 0; the last epoch's evaluation when it covered everything), write results.json
    and the metrics plot."""
    result = RunResult(run_dir, state.step, **mean_times(step_times))
    if not state.env.is_main:
        return result
    cfg = state.cfg
    metrics = MetricsWriter(run_dir, enabled=True, tensorboard="tensorboard" in report_to(cfg.report_to))
    if cfg.eval and (sources.val or cfg.imagenet_val):
        covered = (cfg.val_frequency or not sources.val) and (cfg.zeroshot_frequency or not cfg.imagenet_val)
        result.metrics = last_eval if last_eval and covered else student_metrics(state, sources, True, True)
        metrics.write("eval", state.step, {"epoch": state.epoch, **result.metrics})
        log.info("eval " + " ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    result.teacher_metrics = teacher_metrics(cfg, sources, run_dir, log, next(state.student.parameters()).device)
    if result.teacher_metrics:
        log.info("teacher " + " ".join(f"{k} {v:.4f}" for k, v in result.teacher_metrics.items()))
    metrics.close()
    result.plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    atomic_write_json(run_dir / "results.json", result.to_json())
    log.info(f"results: {run_dir / 'results.json'}; plot: {result.plot}; checkpoints: {run_dir / 'checkpoints'}; "
             f"metrics: {run_dir / 'metrics.jsonl'}")
    return result
