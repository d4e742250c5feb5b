"""``ClipRDLoss``: the loss as an ``nn.Module`` owning the learnable multipliers and student->teacher projections."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import spec
from .functional import clip_rd_loss


class ClipRDLoss(nn.Module):
    """CLIP-KD / CLIP-RD distillation loss returning a dict of named terms, like open_clip's losses.

    Owns lam_img, lam_txt, kappa (raw multipliers initialised at ln(1/0.07), as the published CLIP-RD code; with
    ``exp_multipliers`` the parameters hold logs and the multiplier is their exp); when ``student_dim`` differs
    from ``teacher_dim``, two bias-free linear maps from the student to the teacher width used by every
    teacher-student term; and with an afd weight, CLIP-KD's fusion layers ``image_fusion`` / ``text_fusion``
    (``nn.Linear(2 D_t, D_t)``) and their raw multiplier ``fusion_scale``. The task, siglip and sigmoid_kd terms
    always use the student's own normalised embeddings (sigmoid_kd compares logits, not embeddings: its teachers,
    an ensemble among them, may have any width). The student's logit scale and logit bias belong to the student
    model, as in open_clip: forward receives them.
    """

    def __init__(
        self,
        weights: spec.WeightsArg = "clip-rd",
        student_dim: Optional[int] = None,
        teacher_dim: Optional[int] = None,
        exp_multipliers: bool = False,
        init_multiplier: float = spec.DEFAULT_MULTIPLIER,
        backend: str = "auto",
        gd_convention: str = "paper",
    ):
        super().__init__()
        if backend not in spec.BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {list(spec.BACKENDS)}")
        self.weights = spec.resolve_weights(weights)
        self.backend, self.gd_convention = backend, gd_convention
        self.exp_multipliers = exp_multipliers
        init = torch.tensor(float(init_multiplier))
        if exp_multipliers:
            if init_multiplier <= 0:
                raise ValueError(f"init_multiplier: must be > 0 with exp_multipliers, got {init_multiplier}")
            init = init.log()
        self.lam_img = nn.Parameter(init.clone())
        self.lam_txt = nn.Parameter(init.clone())
        self.kappa = nn.Parameter(init.clone())
        projected = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.image_projection = nn.Linear(student_dim, teacher_dim, bias=False) if projected else None
        self.text_projection = nn.Linear(student_dim, teacher_dim, bias=False) if projected else None
        self.image_fusion = self.text_fusion = self.fusion_scale = None
        if self.weights["afd"] != 0.0:  # created only when used: DDP must not wait for gradients of unused layers
            width = teacher_dim or student_dim
            if width is None:
                raise ValueError("weights['afd']: the fusion layers need the embedding width: pass teacher_dim")
            self.image_fusion, self.text_fusion = nn.Linear(2 * width, width), nn.Linear(2 * width, width)
            self.fusion_scale = nn.Parameter(torch.tensor(float(spec.DEFAULT_MULTIPLIER)))

    def multipliers(self) -> dict[str, torch.Tensor]:
        """The effective multipliers (exp of the parameters when exp-parametrised)."""
        values = {"lam_img": self.lam_img, "lam_txt": self.lam_txt, "kappa": self.kappa}
        return {key: value.exp() if self.exp_multipliers else value for key, value in values.items()}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        dist_image_features: torch.Tensor,
        dist_text_features: torch.Tensor,
        dist_logit_scale: torch.Tensor,
        row_start: int = 0,
        row_stop: Optional[int] = None,
        group=None,
        logit_bias: Optional[torch.Tensor] = None,
        dist_logit_bias: Union[None, float, torch.Tensor, Sequence] = None,
    ) -> dict[str, torch.Tensor]:
        """Student (N, D_s) and teacher (N, D_t) features, exponentiated logit scales -> {"total", terms...}.

        ``group``: the process group of a local loss (exact gd across ranks). ``logit_bias``: the student's logit
        bias (siglip, sigmoid_kd). For sigmoid_kd alone, the teacher features, ``dist_logit_scale`` and
        ``dist_logit_bias`` may be lists, one entry per member of a teacher ensemble (MobileCLIP2's)."""
        s_img, s_txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        t_img, t_txt = _normalized(dist_image_features), _normalized(dist_text_features)
        common = dict(row_start=row_start, row_stop=row_stop, backend=self.backend)
        relational = dict(teacher_scale=dist_logit_scale, teacher_bias=dist_logit_bias, student_bias=logit_bias,
                          group=group, gd_convention=self.gd_convention, **common, **self.multipliers())
        weights = dict(self.weights, afd=0.0)
        if self.image_projection is None:
            out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=logit_scale, weights=weights, **relational)
            p_img, p_txt = s_img, s_txt
        else:  # widths differ: task and sigmoid terms on the student's own embeddings, the others on projected ones
            own = {key: (weights[key] if key in spec.STUDENT_WIDTH_TERMS else 0.0) for key in spec.WEIGHT_KEYS}
            own_out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=logit_scale, weights=own, **relational)
            p_img = F.normalize(self.image_projection(image_features), dim=-1)
            p_txt = F.normalize(self.text_projection(text_features), dim=-1)
            projected = {key: (0.0 if key in spec.STUDENT_WIDTH_TERMS else value) for key, value in weights.items()}
            rest = clip_rd_loss(p_img, p_txt, t_img, t_txt, student_scale=logit_scale, weights=projected,
                                **relational)
            parts = {k: v for k, v in {**own_out, **rest}.items() if k != "total"}
            out = {"total": own_out["total"] + rest["total"], **parts}
        if self.image_fusion is not None:  # afd: a task-like CE pair over the fused embeddings, streamed alike
            if not isinstance(t_img, torch.Tensor):
                raise ValueError("dist_image_features: afd fuses the student with one teacher, not an ensemble")
            f_img = F.normalize(self.image_fusion(torch.cat([p_img, t_img.detach()], dim=-1)), dim=-1)
            f_txt = F.normalize(self.text_fusion(torch.cat([p_txt, t_txt.detach()], dim=-1)), dim=-1)
            afd = clip_rd_loss(f_img, f_txt, f_img, f_txt, student_scale=self.fusion_scale, weights="baseline",
                               **common)["total"]
            out = {**out, "total": out["total"] + self.weights["afd"] * afd, "afd": afd.detach()}
        return out


def _normalized(features):
    """L2-normalised rows of a teacher's features, or of each member's for an ensemble (a list or tuple)."""
    if isinstance(features, (list, tuple)):
        return [F.normalize(member, dim=-1) for member in features]
    return F.normalize(features, dim=-1)
