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

    A teacher ensemble: ``teacher_dim`` a list of the K teachers' widths, forward given lists of K teacher features
    and scales, ``ensemble`` the mode (kernels/README.md, "Teacher ensembles"). Under "average-after-softmax" hrd and
    intra hold the student's own embeddings against the mean of the teachers' softmaxes (logits only: no
    projection). Under "average-losses" every teacher term is the mean over teachers of its single-teacher value,
    teacher k's computed as for one teacher: with the student projected to that teacher's width by a projection pair
    of its own (``image_projections[k]``, ``text_projections[k]``; ``nn.Identity`` for a teacher of the student's
    width). afd takes one teacher only.
    """

    def __init__(
        self,
        weights: spec.WeightsArg = "clip-rd",
        student_dim: Optional[int] = None,
        teacher_dim: Union[None, int, Sequence[int]] = None,
        exp_multipliers: bool = False,
        init_multiplier: float = spec.DEFAULT_MULTIPLIER,
        backend: str = "auto",
        gd_convention: str = "paper",
        ensemble: str = spec.AVERAGE_AFTER_SOFTMAX,
    ):
        super().__init__()
        if backend not in spec.BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {list(spec.BACKENDS)}")
        if ensemble not in spec.ENSEMBLE_MODES:
            raise ValueError(f"ensemble: unknown mode {ensemble!r}; expected one of {list(spec.ENSEMBLE_MODES)}")
        self.weights = spec.resolve_weights(weights)
        self.backend, self.gd_convention, self.ensemble = backend, gd_convention, ensemble
        self.exp_multipliers = exp_multipliers
        init = torch.tensor(float(init_multiplier))
        if exp_multipliers:
            if init_multiplier <= 0:
                raise ValueError(f"init_multiplier: must be > 0 with exp_multipliers, got {init_multiplier}")
            init = init.log()
        self.lam_img = nn.Parameter(init.clone())
        self.lam_txt = nn.Parameter(init.clone())
        self.kappa = nn.Parameter(init.clone())
        # An ensemble's widths (None: one teacher, of width teacher_dim); a list of one is one teacher.
        self.teacher_dims = None
        if isinstance(teacher_dim, (list, tuple)):
            if not teacher_dim:
                raise ValueError("teacher_dim: an empty list; pass a width, or one width per teacher of an ensemble")
            if len(teacher_dim) == 1:
                teacher_dim = teacher_dim[0]
            else:
                self.teacher_dims = tuple(int(width) for width in teacher_dim)
                teacher_dim = None
                refusal = spec.ensemble_refusal(self.weights, len(self.teacher_dims), ensemble)
                if refusal:
                    raise ValueError(refusal)
        projected = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.image_projection = nn.Linear(student_dim, teacher_dim, bias=False) if projected else None
        self.text_projection = nn.Linear(student_dim, teacher_dim, bias=False) if projected else None
        # Average-losses: one projection pair per teacher, created only when a teacher term reads them (DDP must not
        # wait for gradients of unused layers).
        self.image_projections = self.text_projections = None
        teacher_terms = any(self.weights[key] != 0.0 for key in spec.TEACHER_TERMS)
        if (self.teacher_dims is not None and ensemble == spec.AVERAGE_LOSSES and student_dim is not None
                and teacher_terms and any(width != student_dim for width in self.teacher_dims)):
            def pair():
                return nn.ModuleList([nn.Identity() if width == student_dim else
                                      nn.Linear(student_dim, width, bias=False) for width in self.teacher_dims])
            self.image_projections, self.text_projections = pair(), pair()
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
        dist_image_features: Union[torch.Tensor, Sequence[torch.Tensor]],
        dist_text_features: Union[torch.Tensor, Sequence[torch.Tensor]],
        dist_logit_scale: Union[torch.Tensor, Sequence[torch.Tensor]],
        row_start: int = 0,
        row_stop: Optional[int] = None,
        group=None,
        logit_bias: Optional[torch.Tensor] = None,
        dist_logit_bias: Union[None, float, torch.Tensor, Sequence] = None,
    ) -> dict[str, torch.Tensor]:
        """Student (N, D_s) and teacher (N, D_t) features, exponentiated logit scales -> {"total", terms...}.

        ``group``: the process group of a local loss (exact gd across ranks). ``logit_bias``: the student's logit
        bias (siglip, sigmoid_kd). For a teacher ensemble the teacher features, ``dist_logit_scale`` and
        ``dist_logit_bias`` are lists, one entry per member (a scale or bias may also be one value for all)."""
        s_img, s_txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        t_img, t_txt = _normalized(dist_image_features), _normalized(dist_text_features)
        teachers = len(t_img) if isinstance(t_img, list) else 1
        if self.teacher_dims is not None and teachers != len(self.teacher_dims):
            raise ValueError(f"dist_image_features: {teachers} teacher(s) but the loss was built for "
                             f"{len(self.teacher_dims)} (teacher_dim={list(self.teacher_dims)})")
        common = dict(row_start=row_start, row_stop=row_stop, backend=self.backend)
        relational = dict(teacher_scale=dist_logit_scale, teacher_bias=dist_logit_bias, student_bias=logit_bias,
                          group=group, gd_convention=self.gd_convention, ensemble=self.ensemble, **common,
                          **self.multipliers())
        weights = dict(self.weights, afd=0.0)
        own = {key: (weights[key] if key in spec.STUDENT_WIDTH_TERMS else 0.0) for key in spec.WEIGHT_KEYS}
        rest = {key: (0.0 if key in spec.STUDENT_WIDTH_TERMS else value) for key, value in weights.items()}
        if self.image_projections is not None:  # average-losses: teacher k's terms with the student projected for it
            if not isinstance(t_txt, list) or len(t_txt) != teachers:
                raise ValueError(f"dist_text_features: expected a list of {teachers} teachers, as dist_image_features")
            out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=logit_scale, weights=own, **relational)
            per_teacher = []
            for k in range(teachers):
                p_img = F.normalize(self.image_projections[k](image_features), dim=-1)
                p_txt = F.normalize(self.text_projections[k](text_features), dim=-1)
                member = dict(relational, teacher_scale=_member(dist_logit_scale, k),
                              teacher_bias=_member(dist_logit_bias, k))
                per_teacher.append(clip_rd_loss(p_img, p_txt, t_img[k], t_txt[k], student_scale=logit_scale,
                                                weights=rest, **member))
            mean = {key: sum(o[key] for o in per_teacher) / teachers for key in per_teacher[0]}
            parts = {**out, **mean}
            out = {"total": out["total"] + mean["total"], **{key: parts[key] for key in spec.TERM_KEYS if key in parts}}
            p_img, p_txt = s_img, s_txt
        elif self.image_projection is None:
            out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=logit_scale, weights=weights, **relational)
            p_img, p_txt = s_img, s_txt
        else:  # widths differ: task and sigmoid terms on the student's own embeddings, the others on projected ones
            own_out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=logit_scale, weights=own, **relational)
            p_img = F.normalize(self.image_projection(image_features), dim=-1)
            p_txt = F.normalize(self.text_projection(text_features), dim=-1)
            rest_out = clip_rd_loss(p_img, p_txt, t_img, t_txt, student_scale=logit_scale, weights=rest, **relational)
            parts = {k: v for k, v in {**own_out, **rest_out}.items() if k != "total"}
            out = {"total": own_out["total"] + rest_out["total"], **parts}
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
    """L2-normalised rows of a teacher's features, or of each member's for an ensemble (a list or tuple; a list of
    one is one teacher)."""
    if isinstance(features, (list, tuple)):
        if len(features) == 1:
            return F.normalize(features[0], dim=-1)
        return [F.normalize(member, dim=-1) for member in features]
    return F.normalize(features, dim=-1)


def _member(value, k: int):
    """Teacher k's entry of a per-teacher argument (a list or tuple), or the one value given for all."""
    return value[k] if isinstance(value, (list, tuple)) else value
