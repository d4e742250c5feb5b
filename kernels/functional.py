"""``clip_rd_loss``: the functional contract of the objective (kernels/README.md), dispatching to a backend."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import spec
from .reference import feature_distillation, reference_loss

Scalar = Union[float, torch.Tensor]
GD_CONVENTIONS = ("paper", "clip-kd-code")


def _relational_backend(name: str):
    """The backend function ``(inputs, scales, weights, row_start, row_stop, group) -> (total, terms)``."""
    if name == "chunked":
        from .chunked import chunked_relational_loss

        return chunked_relational_loss
    from .triton_fused import triton_relational_loss  # imported lazily: triton is optional on CPU

    return triton_relational_loss


def triton_unsupported(weights: dict, s_img: torch.Tensor, group) -> Optional[str]:
    """Why the Triton kernels cannot run this call (None if they can): ``auto`` then takes the chunked backend."""
    from .triton_config import MAX_WIDTH, SUPPORTED_DTYPES

    if s_img.shape[1] > MAX_WIDTH:
        return f"embedding width {s_img.shape[1]} exceeds the Triton kernels' maximum {MAX_WIDTH}"
    if s_img.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16 inputs, not {s_img.dtype}"
    return None


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest floating dtype among the inputs: every backend computes alike whatever the mix."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


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
    group=None,
    gd_convention: str = "paper",
) -> dict[str, torch.Tensor]:
    """The distillation objective; returns {"total", <one key per computed term>} as 0-dim fp32 tensors.

    s_* / t_*: (N, D) L2-normalised student / teacher embeddings (t_* never differentiated); mixed dtypes are
    computed in the widest one. Scales are already exponentiated; lam_img, lam_txt, kappa are raw multipliers.
    ``weights`` is a preset name or a partial mapping. Anchors are rows [row_start, row_stop) (open_clip's local
    loss), candidates all N; ``group`` (a torch.distributed process group) makes gd exact across the ranks of a
    local loss. ``gd_convention``: "paper" (logits s X Y^T) or "clip-kd-code" (the published CLIP-KD code's X Y^T / s).
    With backend "chunked" or "triton" only "total" carries a gradient; the per-term values are detached, for logging.
    """
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {list(spec.BACKENDS)}")
    if gd_convention not in GD_CONVENTIONS:
        raise ValueError(f"gd_convention: unknown convention {gd_convention!r}; expected one of {GD_CONVENTIONS}")
    resolved = spec.resolve_weights(weights)
    if resolved["afd"] != 0.0:
        raise ValueError("weights['afd']: afd needs the fusion layers of ClipRDLoss (kernels.ClipRDLoss), not the "
                         "functional form")
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
    # gd's logit scale: the paper's s, or the published code's 1 / s (autograd carries the chain rule to tau_s).
    code = gd_convention == "clip-kd-code"
    scales["gd_student"] = 1.0 / scales["student"] if code else scales["student"]
    scales["gd_teacher"] = 1.0 / scales["teacher"] if code else scales["teacher"]
    dtype = _common_dtype(s_img, s_txt, t_img, t_txt)
    s_img, s_txt, t_img, t_txt = (x.to(dtype) for x in (s_img, s_txt, t_img, t_txt))
    if backend == "auto":
        on_gpu = device.type == "cuda" and triton_unsupported(resolved, s_img, group) is None
        backend = "triton" if on_gpu else "chunked"
    if backend == "reference":
        return reference_loss(s_img, s_txt, t_img, t_txt, *scales.values(), weights=resolved, row_start=row_start,
                              row_stop=row_stop, group=group)
    if backend == "triton":
        reason = triton_unsupported(resolved, s_img, group)
        if reason:
            raise ValueError(f"backend='triton': {reason}; use backend='auto' or 'chunked'")

    inputs = {"s_img": s_img, "s_txt": s_txt, "t_img": t_img.detach(), "t_txt": t_txt.detach()}
    total, terms = _relational_backend(backend)(inputs, scales, resolved, row_start, row_stop, group)
    if resolved["fd"] != 0.0:
        fd = feature_distillation(s_img, s_txt, t_img, t_txt, row_start, row_stop)
        total = total + resolved["fd"] * fd
        terms["fd"] = fd.detach()
    return {"total": total, **{key: terms[key] for key in spec.TERM_KEYS if key in terms}}
