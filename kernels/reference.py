"""Plain PyTorch distillation objective: the ground truth every other backend is tested against.

Written for clarity, term by term as in kernels/README.md: it materialises every rows x N logit matrix and lets
autograd differentiate it. It deliberately does not read the View/Use table of ``spec.py``, so the tests compare
two independent transcriptions of the maths. Everything is computed in fp32 (fp64 for fp64 inputs, which the tests
use as ground truth). A non-finite input gives a non-finite loss, never a finite one.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .spec import AVERAGE_AFTER_SOFTMAX, TERM_WEIGHT, SigmoidTeacher, Teacher, active_terms


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16/fp32 -> fp32, fp64 stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CE(A) = mean_i (lse(A)[i] - A[i, pos(i)]) for logits (rows, N) and positive columns pos (rows,)."""
    return F.cross_entropy(logits, pos)


def kl_distill(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KD(A ; G) = mean_i KL(P(G)_i || P(A)_i), G detached (scale included); masked (-inf) columns contribute 0.

    Only the masked columns are dropped (where 0 * log 0 is 0 by definition): a NaN anywhere stays a NaN.
    """
    target = target.detach()
    log_p_target = F.log_softmax(target, dim=1)
    log_p = F.log_softmax(logits, dim=1)
    pointwise = log_p_target.exp() * (log_p_target - log_p)
    masked = target == float("-inf")
    return torch.where(masked, torch.zeros_like(pointwise), pointwise).sum(dim=1).mean()


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum_ij logsigmoid(labels_ij logits_ij) / rows for logits and labels (rows, N): SigLIP's pairwise loss,
    normalised by the anchor rows as open_clip's SigLipLoss divides by its local batch."""
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def kd_average_after_softmax(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """KD(A ; mean_k P(G_k)) = mean_i sum_j pbar_ij (log pbar_ij - log P(A)_ij), pbar = mean_k softmax(G_k): the
    teachers' distributions averaged after the softmax (each G_k its own teacher's scale), all detached; masked (-inf)
    columns contribute 0, and so does a column whose pbar is 0 (xlogy(0, 0) = 0). A NaN anywhere stays a NaN."""
    pbar = torch.stack([F.softmax(target.detach(), dim=1) for target in targets]).mean(dim=0)
    log_p = F.log_softmax(logits, dim=1)
    pointwise = torch.xlogy(pbar, pbar) - pbar * log_p
    masked = targets[0].detach() == float("-inf")
    return torch.where(masked, torch.zeros_like(pointwise), pointwise).sum(dim=1).mean()


def feature_distillation(s_img, s_txt, t_img, t_txt, row_start: int, row_stop: int) -> torch.Tensor:
    """fd = MSE(S_I, T_I) + MSE(S_T, T_T) over the owned rows (mean over elements)."""
    rows = slice(row_start, row_stop)
    return F.mse_loss(upcast(s_img[rows]), upcast(t_img[rows]).detach()) + F.mse_loss(
        upcast(s_txt[rows]), upcast(t_txt[rows]).detach()
    )


def reference_loss(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    student_scale: torch.Tensor,
    teacher_scale: torch.Tensor,
    lam_img: torch.Tensor,
    lam_txt: torch.Tensor,
    kappa: torch.Tensor,
    gd_student: torch.Tensor,
    gd_teacher: torch.Tensor,
    weights: Mapping[str, float],
    row_start: int,
    row_stop: int,
    group=None,
    student_bias: Optional[torch.Tensor] = None,
    sigmoid_teachers: Sequence[SigmoidTeacher] = (),
    teachers: Sequence[Teacher] = (),
    ensemble: str = AVERAGE_AFTER_SOFTMAX,
) -> dict[str, torch.Tensor]:
    """Every term of kernels/README.md with a non-zero weight, plus "total"; all differentiable, all fp32.

    Inputs are (N, D); anchors are rows [row_start, row_stop) of each anchor matrix, candidates all N rows,
    and the positive of local row i is column row_start + i. siglip adds ``student_bias`` (None: no bias) to the
    student's logits; sigmoid_kd's soft targets come from ``sigmoid_teachers`` (one or more, any widths).
    ``teachers``: a teacher ensemble for the softmax terms (empty: the one teacher t_img, t_txt, teacher_scale,
    gd_teacher); a term reading teachers is the mean over them of its single-teacher form, but for hrd and intra under
    ``ensemble="average-after-softmax"``, where one KD holds the student's view against the mean of the teachers'
    softmaxes.
    """
    S_I, S_T = upcast(s_img), upcast(s_txt)
    if not teachers:
        teachers = (Teacher(t_img, t_txt, teacher_scale, gd_teacher),)
    # Teacher k's (T_I, T_T, tau_t, gd scale), detached.
    members = [(upcast(t.image).detach(), upcast(t.text).detach(), t.scale.detach(), t.gd_scale.detach())
               for t in teachers]
    tau_s = student_scale
    rows = slice(row_start, row_stop)
    pos = torch.arange(row_start, row_stop, device=S_I.device)  # (rows,) positive column of each anchor row
    local = torch.arange(row_stop - row_start, device=S_I.device)

    def logits(scale, anchors, candidates, mask_self=False):
        """scale * anchors[rows] @ candidates^T, (rows, N); mask_self puts -inf on each row's own pair."""
        out = scale * anchors[rows] @ candidates.T
        if mask_self:
            out = out.index_put((local, pos), out.new_tensor(float("-inf")))
        return out

    def mean_over_teachers(term):
        """The mean over the teachers of ``term(T_I, T_T, tau_t, gd_teacher)``: the single-teacher term for one."""
        return sum(term(*member) for member in members) / len(members)

    CE = lambda a: cross_entropy(a, pos)  # noqa: E731
    KD = kl_distill
    averaged_targets = len(members) > 1 and ensemble == AVERAGE_AFTER_SOFTMAX
    terms: dict[str, torch.Tensor] = {}
    wanted = set(active_terms(weights))

    if "task" in wanted:
        terms["task"] = 0.5 * (CE(logits(tau_s, S_I, S_T)) + CE(logits(tau_s, S_T, S_I)))
    if "fd" in wanted:
        terms["fd"] = mean_over_teachers(lambda T_I, T_T, *_: feature_distillation(S_I, S_T, T_I, T_T, row_start,
                                                                                     row_stop))
    if "icl" in wanted:
        terms["icl"] = mean_over_teachers(
            lambda T_I, T_T, *_: 0.5 * (CE(logits(kappa, S_I, T_T)) + CE(logits(kappa, S_T, T_I))))
    if "hrd" in wanted:
        if averaged_targets:  # one student view per direction against the mean of the teachers' softmaxes
            terms["hrd"] = 0.5 * (
                kd_average_after_softmax(logits(tau_s, S_I, S_T), [logits(t, T_I, T_T) for T_I, T_T, t, _ in members])
                + kd_average_after_softmax(logits(tau_s, S_T, S_I), [logits(t, T_T, T_I) for T_I, T_T, t, _ in members])
            )
        else:
            terms["hrd"] = mean_over_teachers(lambda T_I, T_T, tau_t, _: 0.5 * (
                KD(logits(tau_s, S_I, S_T), logits(tau_t, T_I, T_T))
                + KD(logits(tau_s, S_T, S_I), logits(tau_t, T_T, T_I))
            ))
    if "vrd" in wanted:
        terms["vrd"] = mean_over_teachers(lambda T_I, T_T, *_: 0.5 * (
            KD(logits(lam_img, T_I, S_I), logits(lam_txt, T_T, S_T))
            + KD(logits(lam_img, S_I, T_I), logits(lam_txt, S_T, T_T))
        ))
        terms["vrd_ce_img"] = mean_over_teachers(
            lambda T_I, T_T, *_: 0.5 * (CE(logits(lam_img, T_I, S_I)) + CE(logits(lam_img, S_I, T_I))))
        terms["vrd_ce_txt"] = mean_over_teachers(
            lambda T_I, T_T, *_: 0.5 * (CE(logits(lam_txt, T_T, S_T)) + CE(logits(lam_txt, S_T, T_T))))
    if "xrd" in wanted:
        terms["xrd"] = mean_over_teachers(lambda T_I, T_T, *_: 0.25 * (
            KD(logits(kappa, T_I, S_T), logits(kappa, T_T, S_I))
            + KD(logits(kappa, T_T, S_I), logits(kappa, T_I, S_T))
            + KD(logits(kappa, S_T, T_I), logits(kappa, S_I, T_T))
            + KD(logits(kappa, S_I, T_T), logits(kappa, S_T, T_I))
        ))
    if "intra" in wanted:
        if averaged_targets:
            terms["intra"] = 0.5 * (
                kd_average_after_softmax(logits(tau_s, S_I, S_I, True),
                                         [logits(t, T_I, T_I, True) for T_I, _, t, _ in members])
                + kd_average_after_softmax(logits(tau_s, S_T, S_T, True),
                                           [logits(t, T_T, T_T, True) for _, T_T, t, _ in members])
            )
        else:
            terms["intra"] = mean_over_teachers(lambda T_I, T_T, tau_t, _: 0.5 * (
                KD(logits(tau_s, S_I, S_I, True), logits(tau_t, T_I, T_I, True))
                + KD(logits(tau_s, S_T, S_T, True), logits(tau_t, T_T, T_T, True))
            ))
    if "cross_kd" in wanted:
        terms["cross_kd"] = mean_over_teachers(lambda T_I, T_T, tau_t, _: 0.5 * (
            KD(logits(kappa, S_I, T_T), logits(tau_t, T_I, T_T)) + KD(logits(kappa, S_T, T_I), logits(tau_t, T_T, T_I))
        ))
    if "gd" in wanted:
        terms["gd"] = mean_over_teachers(lambda T_I, T_T, _, gd_teacher: sum(
            gradient_distillation(X_s, Y_s, gd_student, X_t, Y_t, gd_teacher, row_start, row_stop, group)
            for X_s, Y_s, X_t, Y_t in ((S_I, S_T, T_I, T_T), (S_T, S_I, T_T, T_I))
        ))

    if "siglip" in wanted or "sigmoid_kd" in wanted:
        # Student logits z = s S_I[rows] S_T^T + b (rows, N): SigLIP's, image anchors against every text.
        student_logits = logits(tau_s, S_I, S_T)
        if student_bias is not None:
            student_logits = student_logits + student_bias
    if "siglip" in wanted:
        # Labels +1 on each row's own pair, -1 elsewhere.
        labels = 2 * F.one_hot(pos, S_I.shape[0]).to(S_I.dtype) - 1
        terms["siglip"] = sigmoid_loss(student_logits, labels)
    if "sigmoid_kd" in wanted:
        # Soft labels G = 2 mean_k sigmoid(s_k T_I^k[rows] (T_T^k)^T + b_k) - 1 in [-1, 1] (rows, N), no gradient.
        probabilities = []
        for teacher in sigmoid_teachers:
            T_I_k, T_T_k = upcast(teacher.image).detach(), upcast(teacher.text).detach()
            probabilities.append(torch.sigmoid(teacher.scale.detach() * T_I_k[rows] @ T_T_k.T + teacher.bias.detach()))
        soft_labels = 2 * torch.stack(probabilities).mean(dim=0) - 1
        terms["sigmoid_kd"] = sigmoid_loss(student_logits, soft_labels)

    total = sum(weights[TERM_WEIGHT[key]] * value for key, value in terms.items())
    if not terms:
        total = S_I.new_zeros(())
    return {"total": total, **terms}


def contrastive_gradients(X, Y, scale, row_start: int, row_stop: int, group=None):
    """Closed-form gradient of the whole batch's mean_i CE(scale X[rows] Y^T) w.r.t. the anchors and candidates.

    R = P(scale X Y^T) - I_pos (rows, N); gX = scale R Y / B (rows, D), gY = scale R^T X[rows] / B (N, D), where B
    is the number of anchor rows; with a process group, B and the sum over anchors in gY span every rank's rows
    (an all-reduce whose backward sums the ranks' gradients).
    """
    anchors = X[row_start:row_stop]
    residual = torch.softmax(scale * anchors @ Y.T, dim=1)
    residual = residual - F.one_hot(torch.arange(row_start, row_stop, device=X.device), Y.shape[0]).to(residual.dtype)
    partial_gY = residual.T @ anchors
    n_rows = torch.tensor(float(anchors.shape[0]), dtype=X.dtype, device=X.device)
    if group is not None:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        partial_gY = all_reduce(partial_gY, group=group)
        dist.all_reduce(n_rows, group=group)
    return scale * residual @ Y / n_rows, scale * partial_gY / n_rows


def gradient_distillation(X_s, Y_s, scale_s, X_t, Y_t, scale_t, row_start: int, row_stop: int, group=None):
    """One direction of gd: 1/2 [MSE(gX_s, gX_t) + MSE(gY_s, gY_t)], teacher side detached."""
    gX_s, gY_s = contrastive_gradients(X_s, Y_s, scale_s, row_start, row_stop, group)
    with torch.no_grad():
        gX_t, gY_t = contrastive_gradients(X_t, Y_t, scale_t, row_start, row_stop, group)
    return 0.5 * (F.mse_loss(gX_s, gX_t) + F.mse_loss(gY_s, gY_t))
