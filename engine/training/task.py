"""The distillation task: the forward from a batch to the loss terms, as one module.

Its forward is the student, the all-gather across ranks and the loss in one module, so DDP averages the gradients
of the student and of the loss module's multipliers and projections together (engine.training.distributed explains
the semantics). The teacher source (engine.teachers.sources) is a plain attribute, deliberately not a submodule:
the teacher is frozen, so DDP must neither synchronise it nor expect gradients for it, ``.to()`` and ``train()``
must not touch it (an online teacher is created on its device, in eval mode) and checkpoints hold the student
only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import models

from ..teachers.sources import TeacherSource
from .distributed import DistEnv, gather_rows
from .gradcache import ReplayGradients, surrogate


class DistillationTask(nn.Module):
    """``forward(batch) -> loss terms`` of this rank: teacher rows, student forward, all-gather, loss."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module, teacher: TeacherSource, env: DistEnv,
                 local_loss: bool, gather_with_grad: bool, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.student, self.loss_fn, self.env = student, loss_fn, env
        self.teacher = teacher  # not an nn.Module: a plain attribute (see the module's docstring)
        self.local_loss, self.gather_with_grad, self.autocast_dtype = local_loss, gather_with_grad, autocast_dtype

    def embed(self, batch: dict) -> dict:
        """The student's forward on this rank's batch (autocast as configured)."""
        device = next(self.student.parameters()).device
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            # fp32, or bf16 / fp16 for a student built in low precision (--precision bf16, pure_bf16, ...)
            return self.student(batch["image"].to(device, models.input_dtype(self.student)),
                                batch["text"].to(device))

    def forward(self, batch: dict, replay: Optional[ReplayGradients] = None):
        """The loss terms of this rank's batch; with ``replay``, GradCache's surrogate scalar for this micro-batch
        (engine.training.gradcache), run through this forward so that DDP synchronises its gradients."""
        if replay is not None:
            return surrogate(self.embed(batch), self.loss_fn, replay)
        device = next(self.student.parameters()).device
        t_img, t_txt = self.teacher.rows(batch, device)
        out = self.embed(batch)
        terms = self.loss(out, t_img, t_txt)
        if "syn_text" not in batch:
            return terms
        # DataCompDR without mix-synthetic (MobileCLIP's DRClipLoss): the same images against a synthetic caption
        # each, a second loss added term by term
        t_syn = self.teacher.synthetic_rows(batch, device) if t_img is not None else None
        syn = self.loss({**out, "text_features": self.embed_text(batch["syn_text"])}, t_img, t_syn)
        return {name: terms[name] + syn[name] for name in terms}

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The student's normalised text embeddings (B, D) of ``tokens`` (autocast as configured)."""
        weight = next(self.student.parameters())
        with torch.autocast(weight.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.student(None, tokens.to(weight.device))["text_features"]

    def loss(self, out: dict, t_img, t_txt) -> dict:
        """Loss terms from the student's outputs on this rank's batch and their teacher rows (None: no teacher)."""
        s_img, s_txt = out["image_features"].float(), out["text_features"].float()
        device = s_img.device
        if t_img is None:  # no teacher term: the loss ignores these placeholders
            t_img, t_txt = s_img.detach(), s_txt.detach()
        local, env = s_img.shape[0], self.env
        rows = (env.rank * local, (env.rank + 1) * local) if self.local_loss else (0, None)
        s_img, s_txt = (gather_rows(x, env, self.gather_with_grad) for x in (s_img, s_txt))
        t_img, t_txt = (gather_members(x, env) for x in (t_img, t_txt))
        scale = [torch.tensor(float(s), device=device) for s in self.teacher.scale] \
            if isinstance(self.teacher.scale, (list, tuple)) else torch.tensor(float(self.teacher.scale), device=device)
        bias = out.get("logit_bias")  # a SigLIP student's (--siglip)
        group = torch.distributed.group.WORLD if self.local_loss and env.world_size > 1 else None  # exact gd
        return self.loss_fn(s_img, s_txt, out["logit_scale"].float(), t_img, t_txt, scale,
                            row_start=rows[0], row_stop=rows[1], group=group,
                            logit_bias=None if bias is None else bias.float(), dist_logit_bias=self.teacher.bias)


def gather_members(rows, env: DistEnv):
    """A teacher's (B, D) rows gathered across ranks in fp32, or each member's for an ensemble (a list)."""
    if isinstance(rows, (list, tuple)):
        return [gather_rows(member.float(), env, False) for member in rows]
    return gather_rows(rows.float(), env, False)
