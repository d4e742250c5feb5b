"""``clip_rd_loss``: the functional contract of the objective (kernels/README.md), dispatching to a backend."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import spec
from .reference import feature_distillation, reference_loss
from .triton_config import MAX_WIDTH, SUPPORTED_DTYPES, BlockConfig

Scalar = Union[float, torch.Tensor]
Teachers = Union[torch.Tensor, Sequence[torch.Tensor]]  # one teacher, or a list or tuple of them (an ensemble)
PerTeacher = Union[Scalar, Sequence[Scalar]]  # one scalar for every teacher, or one per teacher
GD_CONVENTIONS = ("paper", "clip-kd-code")


def _relational_backend(name: str):
    """The backend function ``(inputs, scales, weights, row_start, row_stop, group) -> (total, terms)``."""
    if name == "chunked":
        from .chunked import chunked_relational_loss

        return chunked_relational_loss
    from .triton_fused import triton_relational_loss  # imported lazily: triton is optional on CPU

    return triton_relational_loss


def _sigmoid_backend(name: str):
    """The sigmoid terms' function ``(s_img, s_txt, teachers, scale, bias, weights, row_start, row_stop)``."""
    if name == "chunked":
        from .chunked import chunked_sigmoid_loss

        return chunked_sigmoid_loss
    from .triton_sigmoid import triton_sigmoid_loss  # imported lazily: triton is optional on CPU

    return triton_sigmoid_loss


def triton_unsupported(weights: dict, s_img: torch.Tensor, group, teachers: Sequence = ()) -> Optional[str]:
    """Why the Triton kernels cannot run this call (None if they can): ``auto`` then takes the chunked backend.

    ``teachers``: the call's teacher members (Teacher or SigmoidTeacher, an ensemble among them), whose widths the
    kernels walk too. Every term, teacher ensembles in both modes included, has kernels: only widths and dtypes
    send a call to the chunked backend."""
    widest = max([s_img.shape[1], *(teacher.image.shape[1] for teacher in teachers)])
    if widest > MAX_WIDTH:
        return f"embedding width {widest} exceeds the Triton kernels' maximum {MAX_WIDTH}"
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
    t_img: Teachers,
    t_txt: Teachers,
    *,
    student_scale: Scalar,
    teacher_scale: Optional[PerTeacher] = None,
    student_bias: Optional[Scalar] = None,
    teacher_bias: Optional[PerTeacher] = None,
    lam_img: Scalar = spec.DEFAULT_MULTIPLIER,
    lam_txt: Scalar = spec.DEFAULT_MULTIPLIER,
    kappa: Scalar = spec.DEFAULT_MULTIPLIER,
    weights: spec.WeightsArg = "clip-rd",
    row_start: int = 0,
    row_stop: Optional[int] = None,
    backend: str = "auto",
    group=None,
    gd_convention: str = "paper",
    ensemble: str = spec.AVERAGE_AFTER_SOFTMAX,
    block_bytes: Optional[int] = None,
    tiles: Optional[BlockConfig] = None,
) -> dict[str, torch.Tensor]:
    """The distillation objective; returns {"total", <one key per computed term>} as 0-dim fp32 tensors.

    s_* / t_*: (N, D) L2-normalised student / teacher embeddings (t_* never differentiated); mixed dtypes are
    computed in the widest one. Scales are already exponentiated; lam_img, lam_txt, kappa are raw multipliers.
    student_bias: the student's logit bias (siglip, sigmoid_kd; None: none). t_img and t_txt may be lists of K
    teachers (N, D_k) (a teacher ensemble), with teacher_scale and teacher_bias one scalar for all or a list of K.
    ``ensemble`` says how the softmax terms use an ensemble: "average-after-softmax" (hrd and intra distil from the
    mean of the teachers' softmaxes; terms that put teacher and student embeddings side by side are refused) or
    "average-losses" (every teacher term is the mean of its per-teacher values; those terms need every teacher at the
    student's width D). hrd, intra and sigmoid_kd take teachers of any width; sigmoid_kd always averages after the
    sigmoid. ``weights`` is a preset name or a partial mapping. Anchors are rows [row_start, row_stop) (open_clip's
    local loss), candidates all N; ``group`` (a torch.distributed process group) makes gd exact across the ranks of a
    local loss. ``gd_convention``: "paper" (logits s X Y^T) or "clip-kd-code" (the published CLIP-KD code's X Y^T / s).
    With backend "chunked" or "triton" only "total" carries a gradient; the per-term values are detached, for logging.
    ``block_bytes`` (chunked backend: the budget of a block's (rows, N) buffers, default chunked.BLOCK_BYTES) and
    ``tiles`` (Triton backend: a triton_config.BlockConfig, default block_config's for the width and dtype) change
    speed and memory, never a result beyond rounding; each is ignored by the other backends.
    """
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {list(spec.BACKENDS)}")
    if gd_convention not in GD_CONVENTIONS:
        raise ValueError(f"gd_convention: unknown convention {gd_convention!r}; expected one of {GD_CONVENTIONS}")
    resolved = spec.resolve_weights(weights)
    if resolved["afd"] != 0.0:
        raise ValueError("weights['afd']: afd needs the fusion layers of ClipRDLoss (kernels.ClipRDLoss), not the "
                         "functional form")
    if block_bytes is not None and (isinstance(block_bytes, bool) or not isinstance(block_bytes, int)
                                    or block_bytes < 1):
        raise ValueError(f"block_bytes: expected a positive int, got {block_bytes!r}")
    row_start, row_stop = spec.validate_inputs(s_img, s_txt, t_img, t_txt, row_start, row_stop, resolved, ensemble)
    images, texts = spec.teacher_members(t_img, t_txt)
    device = s_img.device
    needs_teacher_scale = any(resolved[key] != 0.0 for key in ("hrd", "intra", "gd", "cross_kd", "sigmoid_kd"))
    if teacher_scale is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias: given without teacher_scale; a teacher's logits are scale T_I T_T^T + bias")
        if needs_teacher_scale:
            raise ValueError("teacher_scale: required by the hrd, intra, gd, cross_kd and sigmoid_kd terms (weights "
                             "select them)")
        teacher_scale = 1.0
    teacher_scales = spec.per_teacher(teacher_scale, "teacher_scale", len(images), device)
    no_bias = teacher_bias is None
    teacher_biases = spec.per_teacher(0.0 if no_bias else teacher_bias, "teacher_bias", len(images), device)
    bias = None if student_bias is None else spec.as_scale(student_bias, "student_bias", device)
    scales = {
        "student": spec.as_scale(student_scale, "student_scale", device),
        "teacher": teacher_scales[0],
        "lam_img": spec.as_scale(lam_img, "lam_img", device),
        "lam_txt": spec.as_scale(lam_txt, "lam_txt", device),
        "kappa": spec.as_scale(kappa, "kappa", device),
    }
    # gd's logit scale: the paper's s, or the published code's 1 / s (autograd carries the chain rule to tau_s).
    code = gd_convention == "clip-kd-code"
    scales["gd_student"] = 1.0 / scales["student"] if code else scales["student"]
    gd_teachers = [1.0 / scale if code else scale for scale in teacher_scales]
    scales["gd_teacher"] = gd_teachers[0]
    dtype = _common_dtype(s_img, s_txt, *images, *texts)
    s_img, s_txt = s_img.to(dtype), s_txt.to(dtype)
    images, texts = [x.to(dtype).detach() for x in images], [x.to(dtype).detach() for x in texts]
    sigmoid_teachers = ()
    if resolved["sigmoid_kd"] != 0.0:
        sigmoid_teachers = tuple(spec.SigmoidTeacher(*member)
                                 for member in zip(images, texts, teacher_scales, teacher_biases))
    # The softmax teacher terms read every teacher (validated for them); where none is active (the student's own and
    # the sigmoid terms alone), the one teacher slot holds the student, unread.
    teachers = ()
    if any(resolved[key] != 0.0 for key in spec.TEACHER_TERMS):
        teachers = tuple(spec.Teacher(*member) for member in zip(images, texts, teacher_scales, gd_teachers))
    t_img, t_txt = (images[0], texts[0]) if teachers else (s_img.detach(), s_txt.detach())
    if backend == "auto":
        on_gpu = device.type == "cuda" and triton_unsupported(resolved, s_img, group,
                                                              teachers + sigmoid_teachers) is None
        backend = "triton" if on_gpu else "chunked"
    if backend == "reference":
        return reference_loss(s_img, s_txt, t_img, t_txt, *scales.values(), weights=resolved, row_start=row_start,
                              row_stop=row_stop, group=group, student_bias=bias, sigmoid_teachers=sigmoid_teachers,
                              teachers=teachers, ensemble=ensemble)
    if backend == "triton":
        reason = triton_unsupported(resolved, s_img, group, teachers + sigmoid_teachers)
        if reason:
            raise ValueError(f"backend='triton': {reason}; use backend='auto' or 'chunked'")

    # Teacher k >= 1 as t_img{k}, t_txt{k} with scales teacher{k}, gd_teacher{k} (spec.ensemble_inputs / _scales).
    inputs = {"s_img": s_img, "s_txt": s_txt, "t_img": t_img, "t_txt": t_txt}
    for k, teacher in enumerate(teachers[1:], start=1):
        inputs.update(zip(spec.teacher_inputs(k), (teacher.image, teacher.text)))
        scales.update(zip(spec.teacher_scales(k), (teacher.scale, teacher.gd_scale)))
    # the backend's blocking: rows per block (chunked) or tile sizes (triton)
    if backend == "chunked":
        blocking = {} if block_bytes is None else {"block_bytes": block_bytes}
    else:
        blocking = {"tiles": tiles}
    total, terms = _relational_backend(backend)(inputs, scales, resolved, row_start, row_stop, group,
                                                teachers=max(len(teachers), 1), ensemble=ensemble, **blocking)
    if any(resolved[key] != 0.0 for key in spec.SIGMOID_TERMS):
        sigmoid_total, sigmoid_terms = _sigmoid_backend(backend)(s_img, s_txt, sigmoid_teachers, scales["student"],
                                                                 bias, resolved, row_start, row_stop, **blocking)
        total = total + sigmoid_total
        terms.update(sigmoid_terms)
    if resolved["fd"] != 0.0:  # the mean over teachers (one teacher: its own), each of the student's width
        fd = sum(feature_distillation(s_img, s_txt, t.image, t.text, row_start, row_stop) for t in teachers)
        fd = fd / len(teachers)
        total = total + resolved["fd"] * fd
        terms["fd"] = fd.detach()
    return {"total": total, **{key: terms[key] for key in spec.TERM_KEYS if key in terms}}
