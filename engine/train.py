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

import models
from kernels import ClipRDLoss

from . import checkpoint as ckpt_lib
from .config import TrainConfig, parse_args
from .data import Codec, ShardStream, expand_urls, make_loader
from .defaults import resolve_sources
from .distributed import average_gradients, gather_rows, init_distributed
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


def run(cfg: TrainConfig) -> dict:
    cfg.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = init_distributed(device)
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
    teacher_dim = None
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
        log.info(f"teacher store {src.store_dir}: {store.teacher['fingerprint']}, {len(store.index)} keys")
    loss_fn = ClipRDLoss(weights, student_dim=models.embed_dim(cfg.model), teacher_dim=teacher_dim,
                         backend=cfg.backend).to(device)
    stream = ShardStream(src.train, Codec(images, texts), cfg.batch_size, cfg.seed, env.rank, env.world_size,
                         cfg.workers, shuffle_buffer=cfg.shuffle_buffer)
    loader = make_loader(stream)
    total_steps = sum(stream.steps_per_epoch(e) for e in range(cfg.epochs))
    optimizer = torch.optim.AdamW(param_groups([student, loss_fn], cfg.wd), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
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
        ckpt_lib.set_rng_state(state["rng"])
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        log.info(f"resumed from {resume_path}: epoch {epoch}, batch {batches_done} of the epoch, step {step}")

    def save(path_names: list[str]) -> None:
        if not env.is_main:
            return
        state = {"config": asdict(cfg), "epoch": epoch, "batches_done": batches_done, "step": step, "name": name,
                 "model": cfg.model, "state_dict": student.state_dict(), "loss_state_dict": loss_fn.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": ckpt_lib.rng_state()}
        for path_name in path_names:
            ckpt_lib.atomic_save(state, ckpt_dir / path_name)

    # --- loop -------------------------------------------------------------------------------------------------
    metrics_out = MetricsWriter(run_dir, enabled=env.is_main)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and env.is_main), desc="train")
    step_times, t_data = [], time.perf_counter()
    student.train()
    while epoch < cfg.epochs:
        stream.set_epoch(epoch, batches_done)
        for batch in loader:
            t_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = student(batch["image"].to(device), batch["text"].to(device))
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(batch.get("teacher_image", batch["image"]).to(device),
                                        batch.get("teacher_text", batch["text"]).to(device))
                    t_img, t_txt = t_out["image_features"], t_out["text_features"]
            s_img, s_txt = out["image_features"].float(), out["text_features"].float()
            if store is not None:
                t_img, t_txt = (t.to(device) for t in store.lookup(batch["key"]))
            elif teacher is None:  # baseline: no teacher term; the loss ignores these placeholders
                t_img, t_txt, teacher_scale = s_img.detach(), s_txt.detach(), 1.0
            if cfg.inject_nan_step == step:
                s_img = s_img * float("nan")
            local = s_img.shape[0]
            rows = (env.rank * local, (env.rank + 1) * local) if cfg.local_loss else (0, None)
            s_img, s_txt = (gather_rows(x, env, cfg.gather_with_grad) for x in (s_img, s_txt))
            t_img, t_txt = (gather_rows(x.float(), env, False) for x in (t_img, t_txt))
            terms = loss_fn(s_img, s_txt, out["logit_scale"].float(), t_img, t_txt,
                            torch.tensor(float(teacher_scale), device=device), row_start=rows[0], row_stop=rows[1])
            optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.tensor(0.0)
            if torch.isfinite(terms["total"]):
                scaler.scale(terms["total"]).backward()
                scaler.unscale_(optimizer)
                params = list(student.parameters()) + list(loss_fn.parameters())
                average_gradients(params, env)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or float("inf"))
            if not (torch.isfinite(terms["total"]) and (torch.isfinite(grad_norm) or cfg.precision == "fp16")):
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


if __name__ == "__main__":
    main()
