"""``python -m engine.train``: distil a student CLIP from precomputed (or online) teacher embeddings.

Read top to bottom: resolve data/teacher/store, build student + loss + optimizer, restore a checkpoint, loop,
evaluate. Data streaming is engine.data, the store engine.store, the loss kernels.ClipRDLoss.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from kernels import ClipRDLoss

from . import checkpoint as ckpt_lib
from .config import TrainConfig, parse_args
from .data import Codec, ShardStream, expand_urls, make_loader
from .defaults import resolve_sources
from .distributed import (all_ranks_true, close_distributed, gather_rows, init_distributed, is_collective_failure,
                          mean_over_ranks, wrap)
from .eval import evaluate
from .logger import MetricsWriter, plot_metrics, setup_logging, write_params
from .schedule import cosine_lr
from .store import TeacherStore

LOGIT_SCALE_MAX = math.log(100)


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


class Distiller(nn.Module):
    """Student forward, all-gather across ranks and loss in one module: DDP averages the gradients of the student
    and of the loss module's multipliers/projections together (engine.distributed explains the semantics)."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module, env, local_loss: bool, gather_with_grad: bool,
                 autocast_dtype=None):
        super().__init__()
        self.student, self.loss_fn, self.env = student, loss_fn, env
        self.local_loss, self.gather_with_grad, self.autocast_dtype = local_loss, gather_with_grad, autocast_dtype

    def forward(self, images, texts, t_img, t_txt, teacher_scale, poison: bool = False) -> dict:
        """Local (B, ...) inputs and teacher (B, D_t) rows (None: no teacher term) -> loss terms of this rank."""
        with torch.autocast(images.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.student(images, texts)
        s_img, s_txt = out["image_features"].float(), out["text_features"].float()
        if t_img is None:  # baseline: no teacher term; the loss ignores these placeholders
            t_img, t_txt, teacher_scale = s_img.detach(), s_txt.detach(), torch.ones_like(teacher_scale)
        if poison:
            s_img = s_img * float("nan")
        local, env = s_img.shape[0], self.env
        rows = (env.rank * local, (env.rank + 1) * local) if self.local_loss else (0, None)
        s_img, s_txt = (gather_rows(x, env, self.gather_with_grad) for x in (s_img, s_txt))
        t_img, t_txt = (gather_rows(x.float(), env, False) for x in (t_img, t_txt))
        return self.loss_fn(s_img, s_txt, out["logit_scale"].float(), t_img, t_txt, teacher_scale,
                            row_start=rows[0], row_stop=rows[1])


def dump_step(out_dir: Path, env, terms: dict, model: nn.Module) -> None:
    """For tests: this rank's view of a step (terms averaged over ranks, averaged unclipped gradients)."""
    module = getattr(model, "module", model)  # unwrap DDP
    grads = {name: p.grad.detach().cpu().clone() for name, p in module.named_parameters() if p.grad is not None}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.atomic_save({"terms": {k: v.item() for k, v in terms.items()}, "grads": grads},
                         out_dir / f"rank{env.rank}.pt")


def run(cfg: TrainConfig) -> dict:
    cfg.validate()
    env, device = init_distributed()
    name = cfg.name or f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{cfg.model}-{cfg.preset}"
    run_dir = Path(cfg.logs) / name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.resume is None and (ckpt_dir / ckpt_lib.LATEST).exists():
        raise ValueError(f"run {run_dir} already exists; pass --resume latest to continue it or another --name")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir / "out.log" if env.is_main else None, env.is_main)
    if env.is_main:
        write_params(run_dir / "params.txt", cfg)
    log.info(f"run {name}: {asdict(cfg)}")
    if env.world_size > 1:
        log.info(f"{env.world_size} processes ({device.type}): global batch {env.world_size * cfg.batch_size}, "
                 f"local loss {cfg.local_loss}, gather with grad {cfg.gather_with_grad}")

    # --- data, teacher targets, student, loss -------------------------------------------------------------------
    src = resolve_sources(cfg, log)  # may train the default teacher: seed after it, so every run starts alike
    torch.manual_seed(cfg.seed + env.rank), random.seed(cfg.seed + env.rank), np.random.seed(cfg.seed + env.rank)
    weights = cfg.loss_weights()
    needs_teacher = any(v != 0 for k, v in weights.items() if k != "task")
    student = models.create_model(cfg.model, device=device)
    if cfg.mfd_mask_ratio > 0:  # CLIP-KD's masked feature distillation: student sees a share of patches dropped
        from open_clip.transformer import PatchDropout

        student.visual.patch_dropout = PatchDropout(cfg.mfd_mask_ratio)
    images, texts = {"image": models.get_preprocess(student)}, {"text": models.get_tokenizer(cfg.model)}
    teacher = store = None
    teacher_dim, teacher_scale = None, 1.0
    if needs_teacher and cfg.online_teacher:
        with torch.random.fork_rng():  # the teacher's (overwritten) random init must not shift the student's RNG
            teacher = models.create_teacher(cfg.teacher, src.teacher_pretrained, device=device)
        teacher_scale, teacher_dim = teacher.logit_scale.exp().item(), models.embed_dim(cfg.teacher)
        if teacher.visual.preprocess_cfg != student.visual.preprocess_cfg:
            images["teacher_image"] = models.get_preprocess(teacher)
        tokenizer_kind = lambda tok: (type(tok), getattr(tok, "context_length", None))
        if tokenizer_kind(models.get_tokenizer(cfg.teacher)) != tokenizer_kind(texts["text"]):
            texts["teacher_text"] = models.get_tokenizer(cfg.teacher)
    elif needs_teacher:
        store = TeacherStore(src.store_dir, expand_urls(src.train), expected_teacher=src.teacher_fingerprint)
        teacher_scale, teacher_dim = store.logit_scale, store.embed_dim
        log.info(f"teacher store {src.store_dir}: {store.teacher['fingerprint']}, {len(store.sorted_hashes)} samples")
    loss_fn = ClipRDLoss(weights, student_dim=models.embed_dim(cfg.model), teacher_dim=teacher_dim,
                         backend=cfg.backend).to(device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    stream = ShardStream(src.train, Codec(images, texts), cfg.batch_size, cfg.seed, env.rank, env.world_size,
                         cfg.workers, shuffle_buffer=cfg.shuffle_buffer)
    loader = make_loader(stream)
    # a single process runs the Distiller itself; under torchrun DDP broadcasts rank 0's initial weights
    model = wrap(Distiller(student, loss_fn, env, cfg.local_loss, cfg.gather_with_grad, autocast_dtype), env, device)
    total_steps = sum(stream.steps_per_epoch(e) for e in range(cfg.epochs))
    optimizer = torch.optim.AdamW(param_groups([student, loss_fn], cfg.wd), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    log.info(f"model {cfg.model}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; "
             f"loss weights {loss_fn.weights}; backend {cfg.backend}; {total_steps} steps")

    # --- resume -----------------------------------------------------------------------------------------------
    epoch, batches_done, step = 0, 0, 0
    resume_path = ckpt_lib.resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        state = ckpt_lib.load(resume_path)
        student.load_state_dict(state["state_dict"])
        loss_fn.load_state_dict(state["loss_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rank_rngs = state.get("rank_rng", [state["rng"]])
        ckpt_lib.set_rng_state(rank_rngs[env.rank] if len(rank_rngs) == env.world_size else state["rng"])
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        if state.get("world_size", 1) != env.world_size:  # data is dealt to ranks by world size
            log.warning(f"checkpoint from {state.get('world_size', 1)} process(es), now {env.world_size}: the "
                        f"epoch continues at batch {batches_done} of the new split, not at the exact sample")
            random.seed(f"{cfg.seed}-{env.rank}-{step}")  # ranks must not share rank 0's restored streams
            torch.manual_seed(random.getrandbits(63)), np.random.seed(random.getrandbits(32))
        log.info(f"resumed from {resume_path}: epoch {epoch}, batch {batches_done} of the epoch, step {step}")

    def save(path_names: list[str]) -> None:  # called by every rank at the same step; rank 0 writes
        rank_rngs = [None] * env.world_size
        if env.world_size > 1:
            torch.distributed.all_gather_object(rank_rngs, ckpt_lib.rng_state())
        if not env.is_main:
            return
        # student/loss_fn are the unwrapped modules: the state dicts load in any world size
        state = {"config": asdict(cfg), "epoch": epoch, "batches_done": batches_done, "step": step, "name": name,
                 "model": cfg.model, "state_dict": student.state_dict(), "loss_state_dict": loss_fn.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": ckpt_lib.rng_state(),
                 "world_size": env.world_size, **({"rank_rng": rank_rngs} if env.world_size > 1 else {})}
        for path_name in path_names:
            ckpt_lib.atomic_save(state, ckpt_dir / path_name)

    # --- loop -------------------------------------------------------------------------------------------------
    metrics_out = MetricsWriter(run_dir, enabled=env.is_main)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and env.is_main), desc="train")
    step_times, t_data = [], time.perf_counter()
    model.train()
    while epoch < cfg.epochs:
        stream.set_epoch(epoch, batches_done)
        for batch in loader:
            t_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
            t_img = t_txt = None
            if teacher is not None:  # the teacher rows of this rank's own samples
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                                     enabled=autocast_dtype is not None):
                    t_out = teacher(batch.get("teacher_image", batch["image"]).to(device),
                                    batch.get("teacher_text", batch["text"]).to(device))
                t_img, t_txt = t_out["image_features"], t_out["text_features"]
            elif store is not None:
                t_img, t_txt = (t.to(device) for t in store.lookup(batch["key"], batch["digest"].tolist(), batch["url"]))
            terms = model(batch["image"].to(device), batch["text"].to(device), t_img, t_txt,
                          torch.tensor(float(teacher_scale), device=device), poison=cfg.inject_nan_step == step)
            optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.tensor(0.0)
            finite = all_ranks_true(bool(torch.isfinite(terms["total"])), env, device)  # skip backward together
            if finite:
                scaler.scale(terms["total"]).backward()  # DDP averages the gradients across ranks here
                scaler.unscale_(optimizer)
                if cfg.dump_first_step and step == 0:
                    dump_step(Path(cfg.dump_first_step), env, mean_over_ranks(terms, env), model)
                params = list(student.parameters()) + list(loss_fn.parameters())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or float("inf"))
            if not (finite and (torch.isfinite(grad_norm) or cfg.precision == "fp16")):
                save([ckpt_lib.LATEST])
                values = {k: round(v.item(), 5) for k, v in terms.items()}
                message = (f"non-finite loss or gradient at step {step} (epoch {epoch}, batch {batches_done}): "
                           f"terms {values}, grad norm {grad_norm.item()}. Stopped before applying this step; "
                           f"the last good state is in {ckpt_dir / ckpt_lib.LATEST}")
                log.error(message)
                bar.close()
                metrics_out.close()
                raise NonFiniteLossError(message)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            step, batches_done = step + 1, batches_done + 1
            step_times.append((time.perf_counter() - t_start, t_start - t_data))
            bar.update(1)
            if step % cfg.log_every_n_steps == 0 or step == total_steps:
                terms = mean_over_ranks(terms, env)
                recent = step_times[-cfg.log_every_n_steps:]
                step_s, data_s = (sum(t[i] for t in recent) / len(recent) for i in (0, 1))
                row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "logit_scale": student.logit_scale.exp().item(), "step_s": step_s, "data_s": data_s,
                       "samples_per_s": cfg.batch_size * env.world_size / (step_s + data_s),
                       **{k: v.item() for k, v in terms.items()}}
                metrics_out.write("train", step, row)
                bar.set_postfix(loss=f"{row['total']:.3f}")
                log.info(f"epoch {epoch} step {step}/{total_steps} " + " ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                save([ckpt_lib.LATEST])
                log.info(f"stopped after {step} steps (--stop-after-steps); resume with --resume latest")
                bar.close()
                metrics_out.close()
                return {"stopped_at_step": step, "run_dir": str(run_dir)}
            t_data = time.perf_counter()
        epoch, batches_done = epoch + 1, 0
        names = [ckpt_lib.LATEST] + ([f"epoch_{epoch}.pt"] if epoch % cfg.save_frequency == 0 or epoch == cfg.epochs else [])
        save(names)
    bar.close()

    # --- evaluate, summarise ------------------------------------------------------------------------------------
    result = {"run_dir": str(run_dir), "steps": step}
    if step_times:
        result["mean_step_s"] = sum(t[0] for t in step_times[1:] or step_times) / max(len(step_times) - 1, 1)
        result["mean_data_s"] = sum(t[1] for t in step_times[1:] or step_times) / max(len(step_times) - 1, 1)
    if env.is_main and cfg.eval and src.val:
        metrics = evaluate(student, images["image"], texts["text"], src.val, device=device)
        metrics_out.write("eval", step, {"epoch": epoch, **metrics})
        log.info("eval " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        result["metrics"] = metrics
        teacher_metrics = Path(str(src.teacher_pretrained)).with_name(f"{Path(str(src.teacher_pretrained)).stem}_metrics.json")
        if src.teacher_pretrained and teacher_metrics.exists():  # the default teacher's own evaluation
            result["teacher_metrics"] = json.loads(teacher_metrics.read_text())
            log.info("teacher " + " ".join(f"{k} {v:.4f}" for k, v in result["teacher_metrics"].items()))
    metrics_out.close()
    if env.is_main:
        result["plot"] = str(plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png"))
        (run_dir / "results.json").write_text(json.dumps(result, indent=1))
        log.info(f"results: {run_dir / 'results.json'}; plot: {result['plot']}; "
                 f"checkpoints: {ckpt_dir}; metrics: {run_dir / 'metrics.jsonl'}")
    return result


def main(argv=None) -> None:
    from .data import ShardError
    from .store import StoreError

    try:
        run(parse_args(argv))
    except (ShardError, StoreError, NonFiniteLossError, ValueError, FileNotFoundError) as exc:
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
