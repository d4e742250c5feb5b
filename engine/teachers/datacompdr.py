"""The teacher rows of DataCompDR shards: each sample carries its members' embeddings, concatenated (no store).

``DataCompDRTeacher`` reads the rows the codec (engine.data.datacompdr) put in the batch, ``dr_image`` and
``dr_text`` (B, W), and splits them into the ensemble's members by ``--distill-teacher-dimension``: one (B, W)
tensor for one teacher, a list of (B, D_k) for an ensemble, with one logit scale per member
(``--distill-logit-scale``) and an optional logit bias (``--distill-logit-bias``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..data.datacompdr import split_members

Member = Union[torch.Tensor, list]  # one teacher's (B, D), or an ensemble's list of (B, D_k)


@dataclass
class DataCompDRTeacher:
    """Teacher rows from the batch itself (a TeacherSource, engine.teachers.sources)."""

    scale: Union[float, list[float]]  # exponentiated logit scale, one per member for an ensemble
    embed_dim: Union[int, list[int]]  # the stored width, or the members' widths
    bias: Optional[float] = None
    images: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    views: None = None  # the codec draws the views itself

    @classmethod
    def of(cls, dims: Optional[list[int]], scales: Optional[list[float]], bias: Optional[float],
           stored_width: int) -> "DataCompDRTeacher":
        """The source for members of widths ``dims`` (None: one teacher of ``stored_width``) and their scales (one
        for all, or one each; None: CLIP's 100)."""
        members = len(dims) if dims else 1
        scales = list(scales) if scales else [100.0]
        scales = scales * members if len(scales) == 1 else scales
        if members == 1:
            return cls(scales[0], dims[0] if dims else stored_width, bias)
        return cls(scales, list(dims), bias)

    @property
    def dims(self) -> Optional[list[int]]:
        return self.embed_dim if isinstance(self.embed_dim, list) else None

    def rows(self, batch: dict, device: torch.device) -> tuple[Member, Member]:
        image, text = batch["dr_image"].to(device), batch["dr_text"].to(device)
        return split_members(image, self.dims), split_members(text, self.dims)

    def synthetic_rows(self, batch: dict, device: torch.device) -> Member:
        """The text rows of the batch's second (synthetic) captions, split into members as ``rows``."""
        return split_members(batch["dr_syn_text"].to(device), self.dims)
