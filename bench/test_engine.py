"""Engine benchmark: one training step (``engine.training.step.train_step``) with stored teacher rows vs the
teacher online.

The step is the engine's own ``train_step`` at the engine's default sizes (``engine.training.config.TrainConfig``:
student and teacher models, batch size, AdamW, gradient clipping, logit-scale clamp, ``ClipRDLoss`` with the fused
backend as ``--fused`` selects it). ``precomputed``: the teacher rows are fp16 rows gathered by sample index from an
in-memory table (the store's memory-mapped lookup is measured apart by ``python -m bench.store_lookup``);
``online``: the shipped default teacher runs forward under no_grad on the batch, as ``--online-teacher`` does.
Data loading and decoding are not part of the step in either case.
"""
from __future__ import annotations

import pytest
import torch

from .config import profile

PROFILE = profile()

try:
    import models
    from engine.teachers.default import default_teacher_path
    from engine.teachers.sources import OnlineTeacher
    from engine.training.config import TrainConfig
    from engine.training.state import build_optimizer_state
    from engine.training.step import train_step

    ENGINE_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means the engine is not usable here
    ENGINE_ERROR = (f"engine not importable ({type(exc).__name__}: {exc}); "
                    "the engine benchmark needs engine/ and models/")


class TableTeacher:
    """Stored teacher rows stand-in (a TeacherSource): fp16 normalised rows for a dataset 8 batches long, gathered by
    sample index."""

    def __init__(self, embed_dim: int, batch_size: int):
        table = torch.nn.functional.normalize(torch.randn(2, 8 * batch_size, embed_dim), dim=-1).half()
        self.image, self.text, self.embed_dim = table[0], table[1], embed_dim
        self.scale, self.images, self.texts = 100.0, {}, {}

    def rows(self, batch: dict, device: torch.device):
        return self.image[batch["index"]].to(device), self.text[batch["index"]].to(device)


def make_step(teacher_mode: str, batch_size: int, seed: int = 0):
    """(state, batch) of one engine training step at the default configuration."""
    cfg = TrainConfig(loss_backend="auto", batch_size=batch_size)
    torch.manual_seed(seed)
    device = torch.device(PROFILE.device)
    student = models.create_model(cfg.model, device=device)
    if teacher_mode == "online":
        teacher = OnlineTeacher(cfg.teacher, str(default_teacher_path()), student, cfg.model, device, None)
    else:
        teacher = TableTeacher(models.embed_dim(cfg.teacher), batch_size)
    state = build_optimizer_state(cfg, student, teacher, device, total_steps=10**6)
    image_size = models.model_config(cfg.model)["vision_cfg"]["image_size"]
    text_cfg = models.model_config(cfg.model)["text_cfg"]
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, device=device),
             "text": torch.randint(1, text_cfg["vocab_size"], (batch_size, text_cfg["context_length"]), device=device),
             "index": torch.randperm(8 * batch_size)[:batch_size]}
    return state, batch


@pytest.mark.parametrize("teacher_mode", ["precomputed", "online"])
def test_engine_step(benchmark, teacher_mode):
    if ENGINE_ERROR:
        pytest.skip(ENGINE_ERROR)
    batch_size = 32 if PROFILE.name == "quick" else TrainConfig().batch_size
    benchmark.group = f"engine | train step | batch {batch_size}"
    state, batch = make_step(teacher_mode, batch_size)

    def step():
        terms = train_step(state, batch)
        if state.student.logit_scale.device.type == "cuda":
            torch.cuda.synchronize()
        return terms["total"].detach()

    for _ in range(2):  # warm-up: allocator, thread pools, optimizer state
        loss = step()
    assert torch.isfinite(loss), f"engine step produced a non-finite loss ({loss.item()})"
    rounds = 2 if PROFILE.name == "quick" else 6
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    cfg = TrainConfig()
    benchmark.extra_info.update({
        "kind": "engine", "teacher": teacher_mode, "batch_size": batch_size, "student": cfg.model,
        "teacher_model": cfg.teacher, "loss_backend": "auto", "device": PROFILE.device, "profile": PROFILE.name,
        "samples_per_s": batch_size / median if median == median else None,
        "notes": f"{cfg.model} student, {cfg.teacher} teacher " + (
            "run forward on the batch (--online-teacher)" if teacher_mode == "online"
            else "embeddings gathered from an fp16 store table"),
    })
