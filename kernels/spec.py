"""The distillation objective as data: presets, weights, input checks, and the table of logit views.

Every backend but the reference reads this module, so the objective is written down once (kernels/README.md).
A *view* is one
logit matrix ``scale * X[rows] @ Y^T`` (anchors X, candidates Y); a *use* is one CE or KD of a view that
contributes to a named term with a fixed share (the 1/2 and 1/4 factors of kernels/README.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Union

import torch

# ln(1/0.07): CLIP's initial logit scale, and CLIP-RD's initial raw multiplier.
DEFAULT_MULTIPLIER = math.log(1 / 0.07)

WEIGHT_KEYS = ("task", "fd", "icl", "hrd", "vrd", "xrd", "intra", "gd", "cross_kd", "afd", "siglip", "sigmoid_kd")
# Output keys in reporting order; "vrd" weight also scales vrd_ce_img and vrd_ce_txt.
TERM_KEYS = ("task", "fd", "icl", "hrd", "vrd", "vrd_ce_img", "vrd_ce_txt", "xrd", "intra", "gd", "cross_kd", "afd",
             "siglip", "sigmoid_kd")
TERM_WEIGHT = {key: ("vrd" if key.startswith("vrd") else key) for key in TERM_KEYS}
# The pairwise sigmoid terms (SigLIP's loss and MobileCLIP2's distillation): elementwise in the logits, no row
# softmax, so every backend computes them in a pass of their own. sigmoid_kd compares the student's logits with
# teacher logits, never teacher and student embeddings, so its teachers may have any width and form an ensemble.
SIGMOID_TERMS = ("siglip", "sigmoid_kd")
# Terms that read the student's own embeddings alone: ClipRDLoss never projects the student for them.
STUDENT_WIDTH_TERMS = ("task", "siglip", "sigmoid_kd")
# Every term that reads the teacher arguments but sigmoid_kd (which reads them as SigmoidTeacher members).
TEACHER_TERMS = ("fd", "icl", "hrd", "vrd", "xrd", "intra", "gd", "cross_kd", "afd")
# Teacher terms whose student views read the student alone and whose KD targets are a teacher's own logit views:
# they compare logits, never embeddings, so their teachers may have any width, and a teacher ensemble's targets can be
# averaged after the softmax (one student distribution against the mean of the teachers').
LOGIT_TARGET_TERMS = ("hrd", "intra")
# Teacher terms that put teacher and student embeddings side by side (in one product, or one difference): each
# teacher must be of the student's width, and an ensemble feeds them as the mean over teachers of the single-teacher
# term (ensemble="average-losses"; ClipRDLoss projects the student to each teacher's width). afd is refused with an
# ensemble: its fusion layers are sized for one teacher.
EMBEDDING_TEACHER_TERMS = ("fd", "icl", "vrd", "xrd", "gd", "cross_kd", "afd")
# How a teacher ensemble forms the softmax terms' targets (kernels/README.md, "Teacher ensembles"):
# "average-after-softmax": KD(A ; mean_k softmax(G_k)), MobileCLIP's --distill-average-after-softmax (the default);
# "average-losses": the mean over teachers k of the single-teacher term.
AVERAGE_AFTER_SOFTMAX, AVERAGE_LOSSES = "average-after-softmax", "average-losses"
ENSEMBLE_MODES = (AVERAGE_AFTER_SOFTMAX, AVERAGE_LOSSES)

PRESETS: dict[str, dict[str, float]] = {
    "clip-rd": {"task": 1.0, "fd": 2000.0, "icl": 1.0, "hrd": 1.0, "vrd": 1.0, "xrd": 1.0},
    "clip-kd": {"task": 1.0, "fd": 2000.0, "icl": 1.0, "hrd": 1.0},
    "intra-kd": {"task": 1.0, "fd": 2000.0, "icl": 1.0, "hrd": 1.0, "intra": 1.0},
    "baseline": {"task": 1.0},
}

BACKENDS = ("reference", "chunked", "triton", "auto")

# Input names as used in views: student/teacher x image/text.
INPUTS = ("s_img", "s_txt", "t_img", "t_txt")
STUDENT_INPUTS = ("s_img", "s_txt")
# Scale names: student tau_s, teacher tau_t, the learnable multipliers, and gd's student / teacher logit scales
# (tau_s and tau_t in the paper's convention, their inverses in the published CLIP-KD code's).
SCALES = ("student", "teacher", "lam_img", "lam_txt", "kappa", "gd_student", "gd_teacher")

WeightsArg = Union[str, Mapping[str, float], None]


def resolve_weights(weights: WeightsArg) -> dict[str, float]:
    """A preset name or a partial mapping -> every weight key as a float ("task" defaults to 1, others to 0)."""
    if weights is None:
        weights = "clip-rd"
    if isinstance(weights, str):
        if weights not in PRESETS:
            raise ValueError(f"weights: unknown preset {weights!r}; expected one of {sorted(PRESETS)}")
        weights = PRESETS[weights]
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights: expected a preset name or a mapping, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"weights: unknown key(s) {unknown}; expected a subset of {list(WEIGHT_KEYS)}")
    resolved = {key: 0.0 for key in WEIGHT_KEYS}
    resolved["task"] = 1.0
    for key, value in weights.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"weights[{key!r}] must be finite, got {value}")
        resolved[key] = value
    return resolved


@dataclass(frozen=True)
class View:
    """The logit matrix ``scale * anchor[rows] @ candidate^T`` (rows x N); ``masked`` sets column pos(i) to -inf."""

    anchor: str
    candidate: str
    scale: str
    masked: bool = False


@dataclass(frozen=True)
class Use:
    """``share * CE(view)`` (target None) or ``share * KD(view ; target)`` inside term ``term``."""

    term: str
    share: float
    view: View
    target: Optional[View] = None


def _v(anchor: str, candidate: str, scale: str, masked: bool = False) -> View:
    return View(anchor, candidate, scale, masked)


# Every row-softmax use of kernels/README.md, term by term. fd and gd are not row-softmax uses: backends handle them
# apart.
_USES: dict[str, tuple[Use, ...]] = {
    "task": (
        Use("task", 0.5, _v("s_img", "s_txt", "student")),
        Use("task", 0.5, _v("s_txt", "s_img", "student")),
    ),
    "icl": (
        Use("icl", 0.5, _v("s_img", "t_txt", "kappa")),
        Use("icl", 0.5, _v("s_txt", "t_img", "kappa")),
    ),
    "hrd": (
        Use("hrd", 0.5, _v("s_img", "s_txt", "student"), _v("t_img", "t_txt", "teacher")),
        Use("hrd", 0.5, _v("s_txt", "s_img", "student"), _v("t_txt", "t_img", "teacher")),
    ),
    "vrd": (
        Use("vrd", 0.5, _v("t_img", "s_img", "lam_img"), _v("t_txt", "s_txt", "lam_txt")),
        Use("vrd", 0.5, _v("s_img", "t_img", "lam_img"), _v("s_txt", "t_txt", "lam_txt")),
        Use("vrd_ce_img", 0.5, _v("t_img", "s_img", "lam_img")),
        Use("vrd_ce_img", 0.5, _v("s_img", "t_img", "lam_img")),
        Use("vrd_ce_txt", 0.5, _v("t_txt", "s_txt", "lam_txt")),
        Use("vrd_ce_txt", 0.5, _v("s_txt", "t_txt", "lam_txt")),
    ),
    "xrd": (
        Use("xrd", 0.25, _v("t_img", "s_txt", "kappa"), _v("t_txt", "s_img", "kappa")),
        Use("xrd", 0.25, _v("t_txt", "s_img", "kappa"), _v("t_img", "s_txt", "kappa")),
        Use("xrd", 0.25, _v("s_txt", "t_img", "kappa"), _v("s_img", "t_txt", "kappa")),
        Use("xrd", 0.25, _v("s_img", "t_txt", "kappa"), _v("s_txt", "t_img", "kappa")),
    ),
    "intra": (
        Use("intra", 0.5, _v("s_img", "s_img", "student", True), _v("t_img", "t_img", "teacher", True)),
        Use("intra", 0.5, _v("s_txt", "s_txt", "student", True), _v("t_txt", "t_txt", "teacher", True)),
    ),
    "cross_kd": (
        Use("cross_kd", 0.5, _v("s_img", "t_txt", "kappa"), _v("t_img", "t_txt", "teacher")),
        Use("cross_kd", 0.5, _v("s_txt", "t_img", "kappa"), _v("t_txt", "t_img", "teacher")),
    ),
}


def teacher_inputs(k: int) -> tuple[str, str]:
    """Input names of teacher k's image and text embeddings: t_img, t_txt for the first, t_img1, t_txt1, ... after."""
    return ("t_img", "t_txt") if k == 0 else (f"t_img{k}", f"t_txt{k}")


def teacher_scales(k: int) -> tuple[str, str]:
    """Scale names of teacher k: its logit scale and gd's teacher-side scale (teacher, gd_teacher for the first)."""
    return ("teacher", "gd_teacher") if k == 0 else (f"teacher{k}", f"gd_teacher{k}")


def ensemble_inputs(teachers: int) -> tuple[str, ...]:
    """Input names of a call with ``teachers`` teachers: INPUTS, then t_img1, t_txt1, ... (students first)."""
    return INPUTS + tuple(name for k in range(1, teachers) for name in teacher_inputs(k))


def ensemble_scales(teachers: int) -> tuple[str, ...]:
    """Scale names of a call with ``teachers`` teachers: SCALES, then teacher1, gd_teacher1, ..."""
    return SCALES + tuple(name for k in range(1, teachers) for name in teacher_scales(k))


def _of_teacher(view: Optional[View], k: int) -> Optional[View]:
    """``view`` with the first teacher's inputs and scale replaced by teacher k's."""
    if view is None or k == 0:
        return view
    rename = dict(zip(teacher_inputs(0) + teacher_scales(0), teacher_inputs(k) + teacher_scales(k)))
    return View(rename.get(view.anchor, view.anchor), rename.get(view.candidate, view.candidate),
                rename.get(view.scale, view.scale), view.masked)


def active_uses(weights: Mapping[str, float], teachers: int = 1) -> list[Use]:
    """The row-softmax uses of every term whose weight is non-zero (a zero-weight term costs nothing).

    With an ensemble of ``teachers``, every use that reads a teacher is repeated once per teacher k, on teacher k's
    inputs and scale, with its share divided by the number of teachers: the mean over teachers of the single-teacher
    term (average-losses). It is also every gradient of average-after-softmax, whose KD(A ; mean_k P(G_k)) has
    d/dA = P(A) - mean_k P(G_k) = mean_k (P(A) - P(G_k)); that mode's value adds ``ensemble_corrections``."""
    out = []
    for key, uses in _USES.items():
        if weights[key] == 0.0:
            continue
        for use in uses:
            reads_teacher = any(name not in STUDENT_INPUTS for name in _use_inputs(use))
            if teachers == 1 or not reads_teacher:
                out.append(use)
                continue
            out += [Use(use.term, use.share / teachers, _of_teacher(use.view, k), _of_teacher(use.target, k))
                    for k in range(teachers)]
    return out


def _use_inputs(use: Use) -> tuple[str, ...]:
    views = (use.view,) if use.target is None else (use.view, use.target)
    return tuple(name for view in views for name in (view.anchor, view.candidate))


@dataclass(frozen=True)
class EnsembleCorrection:
    """``-share * mean_i JSD_i`` added to term ``term`` under average-after-softmax: per anchor row i, with p_k the
    softmax of target view ``targets[k]`` (teacher k's) and pbar = mean_k p_k,
        JSD_i = mean_k sum_j p_kj log p_kj - sum_j pbar_j log pbar_j   (>= 0, the teachers' Jensen-Shannon divergence),
    and KD(A ; pbar) = mean_k KD(A ; G_k) - mean_i JSD_i: teachers only, so no gradient (kernels/README.md)."""

    term: str
    share: float
    targets: tuple[View, ...]


def ensemble_corrections(weights: Mapping[str, float], teachers: int, ensemble: str) -> list[EnsembleCorrection]:
    """What turns the mean of the per-teacher KDs of LOGIT_TARGET_TERMS into the KD against the averaged target:
    one correction per KD use, for an ensemble under average-after-softmax (none otherwise)."""
    if teachers == 1 or ensemble != AVERAGE_AFTER_SOFTMAX:
        return []
    return [EnsembleCorrection(use.term, use.share, tuple(_of_teacher(use.target, k) for k in range(teachers)))
            for key in LOGIT_TARGET_TERMS if weights[key] != 0.0 for use in _USES[key]]


def active_terms(weights: Mapping[str, float]) -> list[str]:
    """Output keys computed for these weights, in reporting order."""
    return [key for key in TERM_KEYS if weights[TERM_WEIGHT[key]] != 0.0]


class Teacher(NamedTuple):
    """One member of the softmax terms' teacher ensemble: (N, D_k) image and text embeddings, its exponentiated logit
    scale and gd's teacher-side scale (0-dim fp32); never differentiated."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    gd_scale: torch.Tensor


class SigmoidTeacher(NamedTuple):
    """One member of sigmoid_kd's teacher ensemble: (N, D_k) image and text embeddings, and its exponentiated logit
    scale and logit bias (0-dim fp32); never differentiated."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor


def teacher_members(t_img, t_txt) -> tuple[list, list]:
    """The teacher arguments as lists of K members: a tensor is one teacher, a list or tuple a teacher ensemble."""
    members = []
    for name, value in (("t_img", t_img), ("t_txt", t_txt)):
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{name}: an empty teacher ensemble; pass a tensor or a non-empty list of tensors")
            members.append(list(value))
        else:
            members.append([value])
    images, texts = members
    if len(texts) != len(images):
        raise ValueError(f"t_txt: {len(texts)} teacher(s) but t_img has {len(images)}; pass one of each per teacher")
    return images, texts


def _check_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {tensor.dtype}")


def ensemble_refusal(weights: Mapping[str, float], teachers: int, ensemble: str) -> Optional[str]:
    """Why these weights cannot take a teacher ensemble in this mode (one line), or None when they can."""
    if teachers == 1:
        return None
    if weights["afd"] != 0.0:
        return (f"weights['afd']: afd fuses the student with one teacher (fusion layers of its width); a teacher "
                f"ensemble ({teachers} teachers) cannot feed it")
    embedding = [key for key in EMBEDDING_TEACHER_TERMS if weights[key] != 0.0]
    if ensemble == AVERAGE_AFTER_SOFTMAX and embedding:
        return (f"ensemble='{AVERAGE_AFTER_SOFTMAX}': weights {embedding} put teacher and student embeddings side by "
                f"side, with no teacher softmax target to average over {teachers} teachers; pass "
                f"ensemble='{AVERAGE_LOSSES}' (the mean of the per-teacher terms), or keep to hrd, intra and the "
                "student's own and sigmoid terms")
    return None


def validate_inputs(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    t_img,
    t_txt,
    row_start: int,
    row_stop: Optional[int],
    weights: Mapping[str, float],
    ensemble: str = AVERAGE_AFTER_SOFTMAX,
) -> tuple[int, int]:
    """Check the embeddings (a teacher or a list of teachers), the ensemble mode and the owned row range; return the
    range as (start, stop).

    Every teacher is (N, D_k), its image and text embeddings of one width. The terms of EMBEDDING_TEACHER_TERMS need
    every teacher at the student's width D; the logit terms (LOGIT_TARGET_TERMS, sigmoid_kd) take any widths."""
    if ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble: unknown mode {ensemble!r}; expected one of {list(ENSEMBLE_MODES)}")
    images, texts = teacher_members(t_img, t_txt)
    is_ensemble = len(images) > 1
    teacher_names = [(f"t_img[{k}]", f"t_txt[{k}]") if is_ensemble else ("t_img", "t_txt") for k in range(len(images))]
    named = {"s_img": s_img, "s_txt": s_txt}
    for (image_name, text_name), image, text in zip(teacher_names, images, texts):
        named[image_name], named[text_name] = image, text
    for name, tensor in named.items():
        _check_tensor(name, tensor)
    shape = tuple(s_img.shape)
    refusal = ensemble_refusal(weights, len(images), ensemble)
    if refusal:
        raise ValueError(refusal)
    embedding = [key for key in EMBEDDING_TEACHER_TERMS if weights[key] != 0.0]
    for name, tensor in named.items():
        if tensor.device != s_img.device:
            raise ValueError(f"{name}: on device {tensor.device} but s_img is on {s_img.device}")
        if name == "s_txt" or (embedding and name != "s_img"):
            if tuple(tensor.shape) != shape:
                why = ("s_img and s_txt must be (N, D) alike" if name == "s_txt" else
                       f"weights {embedding} compare teacher and student embeddings, so every teacher must be (N, D) "
                       "with the student's N and width D (project the student to the teacher's width first; "
                       "ClipRDLoss does, per teacher)")
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match s_img {shape}; {why}")
        elif tensor.shape[0] != shape[0]:
            raise ValueError(f"{name}: {tensor.shape[0]} rows but s_img has {shape[0]}; row i of every input "
                             "belongs to pair i")
    for (image_name, text_name), image, text in zip(teacher_names, images, texts):
        if text.shape[1] != image.shape[1]:
            raise ValueError(f"{text_name}: width {text.shape[1]} does not match {image_name} width {image.shape[1]}; "
                             "a teacher's image and text embeddings share one width")
        if text.dtype != image.dtype:
            raise TypeError(f"{text_name}: dtype {text.dtype} differs from {image_name} {image.dtype}")
    if s_txt.dtype != s_img.dtype:
        raise TypeError(f"s_txt: dtype {s_txt.dtype} differs from s_img {s_img.dtype}")
    n = shape[0]
    if n == 0 or shape[1] == 0:
        raise ValueError(f"s_img: empty input of shape {shape}")
    if isinstance(row_start, bool) or not isinstance(row_start, int):
        raise TypeError(f"row_start: expected an int, got {type(row_start).__name__}")
    stop = n if row_stop is None else row_stop
    if isinstance(stop, bool) or not isinstance(stop, int):
        raise TypeError(f"row_stop: expected an int or None, got {type(row_stop).__name__}")
    if not 0 <= row_start < stop <= n:
        raise ValueError(f"row_start/row_stop: empty or out-of-range row range [{row_start}, {stop}) for N = {n}")
    if weights["intra"] != 0.0 and n < 2:
        raise ValueError("weights['intra']: intra-modal distillation needs N >= 2 (the self pair is masked out)")
    return row_start, stop


def refuse_double_backward(backend: str, why: str) -> None:
    """Called in a backward that is not itself differentiable: under create_graph=True, say so instead of returning
    a silently wrong second order."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"double backward (create_graph=True) is not supported by the {backend} backend, {why}; "
                           f"use backend='reference'")


def as_scale(value, name: str, device: torch.device) -> torch.Tensor:
    """A float or 0-dim tensor -> 0-dim fp32 tensor on ``device`` (gradient kept if it requires one)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name}: expected a scalar (0-dim tensor or float), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: on device {value.device} but the embeddings are on {device}")
        return value.reshape(()).float()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    raise TypeError(f"{name}: expected a float or a 0-dim tensor, got {type(value).__name__}")


def per_teacher(value, name: str, teachers: int, device: torch.device) -> list[torch.Tensor]:
    """A scale or bias for every teacher: one scalar shared by all, or a list or tuple with one per teacher; each a
    detached 0-dim fp32 tensor (teachers are never differentiated)."""
    if isinstance(value, (list, tuple)):
        if len(value) != teachers:
            raise ValueError(f"{name}: {len(value)} value(s) for {teachers} teacher(s); pass one per teacher or one "
                             "scalar for all")
        return [as_scale(v, f"{name}[{k}]", device).detach() for k, v in enumerate(value)]
    return [as_scale(value, name, device).detach()] * teachers
