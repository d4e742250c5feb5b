"""Engine benchmark: one training step with precomputed teacher embeddings vs running the teacher online.

The step is the body of ``engine.train``'s loop at the engine's default sizes (``engine.config.TrainConfig``:
student and teacher model names, batch size, AdamW, gradient clipping, logit-scale clamp, ``ClipRDLoss`` with the
fused backend as ``--fused`` selects it). ``precomputed``: the teacher embeddings are fp16 rows gathered by sample
index from an in-memory table, as ``engine.store.TeacherStore.lookup`` serves them; ``online``: the teacher
(same architecture as the default teacher; its weights do not change the time) runs forward under no_grad on the
batch, as ``--online-teacher`` does. Data loading and decoding are not part of the step in either case.
"""
from __future__ import annotations


import pytest
import torch

from .config import profile

PROFILE = profile()

try:
    import models
    from engine.config import TrainConfig
    from engine.distributed import DistEnv
    from engine.train import LOGIT_SCALE_MAX, Distiller, param_groups
    from kernels import ClipRDLoss

    ENGINE_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means the engine is not usable here
    ENGINE_ERROR = f"engine not importable ({type(exc).__name__}: {exc}); the engine benchmark needs engine/ and models/"


class TrainStep:
    """State for one engine training step; ``__call__`` runs forward, loss, backward and the optimizer step."""

    def __init__(self, teacher_mode: str, batch_size: int, seed: int = 0):
        cfg = TrainConfig()
        torch.manual_seed(seed)
        self.device = torch.device(PROFILE.device)
        self.student = models.create_model(cfg.model, device=self.device).train()
        teacher = models.create_model(cfg.teacher, device=self.device)
        self.teacher = teacher.eval().requires_grad_(False) if teacher_mode == "online" else None
        self.teacher_scale = torch.tensor(100.0, device=self.device)
        teacher_dim = models.embed_dim(cfg.teacher)
        self.loss_fn = ClipRDLoss(cfg.loss_weights(),
                                  student_dim=models.embed_dim(cfg.model), teacher_dim=teacher_dim,
                                  backend="auto").to(self.device)
        # The engine's own forward: student, (single-process) gather and loss in one module.
        self.model = Distiller(self.student, self.loss_fn, DistEnv(), local_loss=False, gather_with_grad=False)
        self.optimizer = torch.optim.AdamW(param_groups([self.student, self.loss_fn], cfg.wd), lr=cfg.lr)
        self.grad_clip = cfg.grad_clip_norm or float("inf")
        image_size = models.model_config(cfg.model)["vision_cfg"]["image_size"]
        text_cfg = models.model_config(cfg.model)["text_cfg"]
        self.images = torch.randn(batch_size, 3, image_size, image_size, device=self.device)
        self.texts = torch.randint(1, text_cfg["vocab_size"], (batch_size, text_cfg["context_length"]),
                                   device=self.device)
        # Store stand-in: fp16 normalised rows for a dataset 8 batches long, gathered by index every step.
        table = torch.nn.functional.normalize(torch.randn(2, 8 * batch_size, teacher_dim), dim=-1).half()
        self.store_image, self.store_text = table[0], table[1]
        self.rows = torch.randperm(8 * batch_size)[:batch_size]
        self.teacher_mode = teacher_mode

    def __call__(self):
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(self.images, self.texts)
            t_img, t_txt = t_out["image_features"], t_out["text_features"]
        else:
            t_img, t_txt = (t[self.rows].to(self.device) for t in (self.store_image, self.store_text))
        terms = self.model(self.images, self.texts, t_img, t_txt, self.teacher_scale)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(list(self.student.parameters()) + list(self.loss_fn.parameters()),
                                       self.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return terms["total"].detach()


@pytest.mark.parametrize("teacher_mode", ["precomputed", "online"])
def test_engine_step(benchmark, teacher_mode):
    if ENGINE_ERROR:
        pytest.skip(ENGINE_ERROR)
    batch_size = 32 if PROFILE.name == "quick" else TrainConfig().batch_size
    benchmark.group = f"engine | train step | batch {batch_size}"
    step = TrainStep(teacher_mode, batch_size)
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
