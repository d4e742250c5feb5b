"""Teacher sources: where a batch's teacher rows come from, behind one Protocol.

``StoreTeacher`` reads the precomputed store (each sample's key and digest checked), ``OnlineTeacher`` runs the
teacher model on the batch, ``NoTeacher`` gives none (plain CLIP training). A new source (another store format, a
teacher ensemble) implements ``TeacherSource``; the training task never branches on the kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn

import models

from ..data.augment import ViewDraw
from .store import TeacherStore

Rows = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


class TeacherSource(Protocol):
    """What the training task needs from a teacher."""

    scale: float  # the teacher's (exponentiated) logit scale
    bias: Optional[float]  # a SigLIP teacher's logit bias (None: a CLIP teacher, or no teacher)
    embed_dim: Optional[int]  # width of its embeddings (None: no teacher)
    # extra inputs a batch must carry for this teacher: batch key -> image transform / tokenizer
    images: dict[str, Callable]
    texts: dict[str, Callable]
    # a reinforced store's draw of one stored view and caption per sample and step (None: the evaluation view and
    # the .txt caption, as the student's transform and tokenizer make them)
    views: Optional[ViewDraw]

    def rows(self, batch: dict, device: torch.device) -> Rows:
        """(image, text) teacher embeddings of the batch's samples, (B, D) each, or (None, None)."""


@dataclass
class NoTeacher:
    """Plain CLIP training: no teacher term."""

    scale: float = 1.0
    bias: Optional[float] = None
    embed_dim: Optional[int] = None
    images: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    views: Optional[ViewDraw] = None

    def rows(self, batch: dict, device: torch.device) -> Rows:
        return None, None


@dataclass
class StoreTeacher:
    """Teacher rows from a verified store: every lookup checks the sample's key and digest. From a reinforced store,
    the rows of the view and caption each sample was decoded as (the batch's ``view_index``, ``caption_index``)."""

    store: TeacherStore
    images: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    views: Optional[ViewDraw] = None

    def __post_init__(self):
        self.scale, self.bias, self.embed_dim = self.store.logit_scale, self.store.logit_bias, self.store.embed_dim

    def rows(self, batch: dict, device: torch.device) -> Rows:
        image, text = self.store.lookup(batch["key"], batch["digest"].tolist(), batch["url"],
                                        batch.get("view_index"), batch.get("caption_index"))
        return image.to(device), text.to(device)


class OnlineTeacher:
    """The teacher model run on every batch (no store), with its own preprocessing and tokenizer where they differ
    from the student's. Its model is frozen and in eval mode; it is not a submodule of the task (see
    engine.training.task), so it lives on ``device`` from the start."""

    def __init__(self, name: str, pretrained: str, student: nn.Module, student_model: str, device: torch.device,
                 autocast_dtype: Optional[torch.dtype]):
        with torch.random.fork_rng():  # the teacher's (overwritten) random init must not shift the student's RNG
            self.model = models.create_teacher(name, pretrained, device=device)
        self.scale, self.embed_dim, self.views = self.model.logit_scale.exp().item(), models.embed_dim(name), None
        self.bias = None if self.model.logit_bias is None else self.model.logit_bias.item()
        self.autocast_dtype = autocast_dtype
        self.images = {"teacher_image": models.get_preprocess(self.model)} \
            if self.model.visual.preprocess_cfg != student.visual.preprocess_cfg else {}
        tokenizer, student_tokenizer = models.get_tokenizer(name), models.get_tokenizer(student_model)
        same = (type(tokenizer), getattr(tokenizer, "context_length", None)) == \
            (type(student_tokenizer), getattr(student_tokenizer, "context_length", None))
        self.texts = {} if same else {"teacher_text": tokenizer}

    @torch.no_grad()
    def rows(self, batch: dict, device: torch.device) -> Rows:
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(batch.get("teacher_image", batch["image"]).to(device),
                             batch.get("teacher_text", batch["text"]).to(device))
        return out["image_features"], out["text_features"]
