"""The distillation task: where a batch's teacher rows come from, and the forward from a batch to the loss terms.

A *teacher source* turns a batch into teacher rows: ``StoreTeacher`` reads the precomputed store (key and sample
digest checked), ``OnlineTeacher`` runs the teacher model on the batch, ``NoTeacher`` gives none (plain CLIP
training). ``DistillationTask`` owns its source, so the training loop never branches on it; its forward is the
student, the all-gather across ranks and the loss in one module, so DDP averages the gradients of the student and
of the loss module's multipliers and projections together (engine.distributed explains the semantics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import models

from .distributed import DistEnv, gather_rows


class NoTeacher:
    """Plain CLIP training: no teacher term."""

    scale = 1.0
    embed_dim = None
    images: dict = {}
    texts: dict = {}

    def rows(self, batch: dict, device: torch.device):
        return None, None


class StoreTeacher:
    """Teacher rows from a verified store (engine.store): every lookup checks the sample's key and digest."""

    images: dict = {}
    texts: dict = {}

    def __init__(self, store):
        self.store, self.scale, self.embed_dim = store, store.logit_scale, store.embed_dim

    def rows(self, batch: dict, device: torch.device):
        image, text = self.store.lookup(batch["key"], batch["digest"].tolist(), batch["url"])
        return image.to(device), text.to(device)


class OnlineTeacher:
    """The teacher model run on every batch (no store); its own preprocessing/tokenizer when they differ."""

    def __init__(self, name: str, pretrained: str, student: nn.Module, student_model: str, device: torch.device,
                 autocast_dtype: Optional[torch.dtype]):
        with torch.random.fork_rng():  # the teacher's (overwritten) random init must not shift the student's RNG
            self.model = models.create_teacher(name, pretrained, device=device)
        self.scale, self.embed_dim = self.model.logit_scale.exp().item(), models.embed_dim(name)
        self.autocast_dtype = autocast_dtype
        self.images = {"teacher_image": models.get_preprocess(self.model)} \
            if self.model.visual.preprocess_cfg != student.visual.preprocess_cfg else {}
        kind = lambda tok: (type(tok), getattr(tok, "context_length", None))  # noqa: E731
        tokenizer = models.get_tokenizer(name)
        self.texts = {"teacher_text": tokenizer} if kind(tokenizer) != kind(models.get_tokenizer(student_model)) else {}

    @torch.no_grad()
    def rows(self, batch: dict, device: torch.device):
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(batch.get("teacher_image", batch["image"]).to(device),
                             batch.get("teacher_text", batch["text"]).to(device))
        return out["image_features"], out["text_features"]


class DistillationTask(nn.Module):
    """``forward(batch) -> loss terms`` of this rank: teacher rows, student forward, all-gather, loss."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module, teacher, env: DistEnv, local_loss: bool,
                 gather_with_grad: bool, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.student, self.loss_fn, self.env = student, loss_fn, env
        self.__dict__["teacher"] = teacher  # not a submodule: DDP must neither sync nor expect gradients for it
        self.local_loss, self.gather_with_grad, self.autocast_dtype = local_loss, gather_with_grad, autocast_dtype

    def embed(self, batch: dict) -> dict:
        """The student's forward on this rank's batch (autocast as configured)."""
        weight = next(self.student.parameters())  # its dtype: fp32, or bf16 / fp16 for pure low precision
        with torch.autocast(weight.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.student(batch["image"].to(weight.device, weight.dtype), batch["text"].to(weight.device))

    def forward(self, batch: dict, replay: Optional[tuple] = None):
        """The loss terms of this rank's batch; with ``replay``, the surrogate of an accumulated step (see replay)."""
        if replay is not None:
            return self.replay(batch, *replay)
        t_img, t_txt = self.teacher.rows(batch, next(self.student.parameters()).device)
        return self.loss(self.embed(batch), t_img, t_txt)

    def loss(self, out: dict, t_img, t_txt) -> dict:
        """Loss terms from the student's outputs on this rank's batch and their teacher rows (None: no teacher)."""
        s_img, s_txt = out["image_features"].float(), out["text_features"].float()
        device = s_img.device
        if t_img is None:  # no teacher term: the loss ignores these placeholders
            t_img, t_txt = s_img.detach(), s_txt.detach()
        local, env = s_img.shape[0], self.env
        rows = (env.rank * local, (env.rank + 1) * local) if self.local_loss else (0, None)
        s_img, s_txt = (gather_rows(x, env, self.gather_with_grad) for x in (s_img, s_txt))
        t_img, t_txt = (gather_rows(x.float(), env, False) for x in (t_img, t_txt))
        scale = torch.tensor(float(self.teacher.scale), device=device)
        group = torch.distributed.group.WORLD if self.local_loss and env.world_size > 1 else None  # exact gd
        return self.loss_fn(s_img, s_txt, out["logit_scale"].float(), t_img, t_txt, scale,
                            row_start=rows[0], row_stop=rows[1], group=group)

    def replay(self, batch: dict, grad_image, grad_text, grad_scale, grad_loss_params) -> torch.Tensor:
        """GradCache's second pass over one micro-batch: a scalar whose gradient is the micro-batch's share of the
        whole batch's gradient. ``grad_*``: d total / d (this micro-batch's embeddings, the logit scale, each loss
        parameter), the last two already divided by the number of micro-batches, so every pass uses every
        parameter (DDP's static graph) and the passes add up to the whole batch's gradient."""
        out = self.embed(batch)
        surrogate = (out["image_features"].float() * grad_image).sum()
        surrogate = surrogate + (out["text_features"].float() * grad_text).sum()
        surrogate = surrogate + out["logit_scale"].float() * grad_scale
        for parameter, grad in zip(self.loss_fn.parameters(), grad_loss_params):
            surrogate = surrogate + (parameter * grad).sum()
        return surrogate
