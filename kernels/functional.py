"""``clip_rd_loss``: the functional contract of shared LOSSES.md, dispatching to one of three backends."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import spec
from .reference import feature_distillation, reference_loss

Scalar = Union[float, torch.Tensor]


def _relational_backend(name: str):
    """The backend function ``(inputs, scales, weights, row_start, row_stop) -> (total, terms)``."""
    if name == "chunked":
        from .chunked import chunked_relational_loss

        return chunked_relational_loss
    from .triton_fused import triton_relational_loss  # imported lazily: triton is optional on CPU

    return triton_relational_loss


def clip_rd_loss(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    *,
    student_scale: Scalar,
    teacher_scale: Optional[Scalar] = None,
    lam_img: Scalar = spec.DEFAULT_MULTIPLIER,
    lam_txt: Scalar = spec.DEFAULT_MULTIPLIER,
    kappa: Scalar = spec.DEFAULT_MULTIPLIER,
    weights: spec.WeightsArg = "clip-rd",
    row_start: int = 0,
    row_stop: Optional[int] = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """The distillation objective; returns {"total", <one key per computed term>} as 0-dim fp32 tensors.

    s_* / t_*: (N, D) L2-normalised student / teacher embeddings (t_* never differentiated). Scales are already
    exponentiated; lam_img, lam_txt, kappa are raw multipliers. ``weights`` is a preset name or a partial mapping.
    Anchors are rows [row_start, row_stop) (open_clip's local loss), candidates all N. With backend "chunked" or
    "triton" only "total" carries a gradient; the per-term values are detached, for logging.
    """
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {list(spec.BACKENDS)}")
    resolved = spec.resolve_weights(weights)
    row_start, row_stop = spec.validate_inputs(s_img, s_txt, t_img, t_txt, row_start, row_stop, resolved)
    device = s_img.device
    needs_teacher_scale = any(resolved[key] != 0.0 for key in ("hrd", "intra", "gd", "cross_kd"))
    if teacher_scale is None:
        if needs_teacher_scale:
            raise ValueError("teacher_scale: required by the hrd, intra, gd and cross_kd terms (weights select them)")
        teacher_scale = 1.0
    scales = {
        "student": spec.as_scale(student_scale, "student_scale", device),
        "teacher": spec.as_scale(teacher_scale, "teacher_scale", device).detach(),
        "lam_img": spec.as_scale(lam_img, "lam_img", device),
        "lam_txt": spec.as_scale(lam_txt, "lam_txt", device),
        "kappa": spec.as_scale(kappa, "kappa", device),
    }
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend == "reference":
        return reference_loss(
            s_img, s_txt, t_img, t_txt, *scales.values(), weights=resolved, row_start=row_start, row_stop=row_stop
        )
    if backend == "triton" and resolved["gd"] != 0.0:
        raise ValueError("gd is not implemented in the triton backend; use backend='chunked' or 'reference'")

    inputs = {"s_img": s_img, "s_txt": s_txt, "t_img": t_img.detach(), "t_txt": t_txt.detach()}
    total, terms = _relational_backend(backend)(inputs, scales, resolved, row_start, row_stop)
    if resolved["fd"] != 0.0:
        fd = feature_distillation(s_img, s_txt, t_img, t_txt, row_start, row_stop)
        total = total + resolved["fd"] * fd
        terms["fd"] = fd.detach()
    return {"total": total, **{key: terms[key] for key in spec.TERM_KEYS if key in terms}}
