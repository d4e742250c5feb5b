"""Teacher sources: where a batch's teacher rows come from, behind one Protocol.

``StoreTeacher`` reads the precomputed store (each sample's key and digest checked; a store of a teacher ensemble
gives each member's rows, as engine.teachers.datacompdr's ``DataCompDRTeacher`` does), ``OnlineTeacher`` runs the
teacher model on the batch, ``NoTeacher`` gives none (plain CLIP training). A new source (another store format)
implements ``TeacherSource``; the training task never branches on the kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Union

import torch
from torch import nn

import models

from ..data.augment import ViewDraw
from ..data.datacompdr import split_members
from .store import TeacherStore

Member = Union[None, torch.Tensor, list]  # one teacher's (B, D) rows, an ensemble's list of (B, D_k), or None
Rows = tuple[Member, Member]


class TeacherSource(Protocol):
    """What the training task needs from a teacher (an ensemble: one entry per member in ``scale``, ``embed_dim``, a
    list ``bias`` where every member has one, and lists of rows)."""

    scale: Union[float, list[float]]  # the teacher's (exponentiated) logit scale
    bias: Union[None, float, list[float]]  # a SigLIP teacher's logit bias (None: a CLIP teacher, or no teacher)
    embed_dim: Union[None, int, list[int]]  # width of its embeddings (None: no teacher)
    # extra inputs a batch must carry for this teacher: batch key -> image transform / tokenizer
    images: dict[str, Callable]
    texts: dict[str, Callable]
    # a reinforced store's draw of one stored view and caption per sample and step (None: the evaluation view and
    # the .txt caption, as the student's transform and tokenizer make them)
    views: Optional[ViewDraw]

    def rows(self, batch: dict, device: torch.device) -> Rows:
        """(image, text) teacher embeddings of the batch's samples, (B, D) each (an ensemble: lists of (B, D_k)), or
        (None, None)."""


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
    the rows of the view and caption each sample was decoded as (the batch's ``view_index``, ``caption_index``).
    From a store of a teacher ensemble: a list of each member's (B, D_k) rows, its scales as a list, its biases as a
    list where every member has one (else None)."""

    store: TeacherStore
    images: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    views: Optional[ViewDraw] = None

    def __post_init__(self):
        store = self.store
        self.dims = store.member_dims if len(store.member_dims) > 1 else None  # None: one teacher
        if self.dims is None:
            self.scale, self.bias, self.embed_dim = store.logit_scales[0], store.logit_biases[0], store.embed_dim
        else:
            self.scale, self.embed_dim = list(store.logit_scales), list(self.dims)
            self.bias = None if None in store.logit_biases else list(store.logit_biases)

    def rows(self, batch: dict, device: torch.device) -> Rows:
        image, text = self.store.lookup(batch["key"], batch["digest"].tolist(), batch["url"],
                                        batch.get("view_index"), batch.get("caption_index"))
        return split_members(image.to(device), self.dims), split_members(text.to(device), self.dims)


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
