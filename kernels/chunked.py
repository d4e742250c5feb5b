"""Streamed PyTorch backend: the whole objective over blocks of anchor rows, never holding an N x N matrix.

Each block holds complete rows (``block_rows x N``), so per-row statistics are exact without online rescaling,
and the gradient of the scalar loss is computed in the same pass and only scaled by ``grad_output`` in backward
(as Liger-Kernel does for cross-entropy). That is one product per view plus one per student side of each view:
the matmul floor. Recomputing tiles in backward from saved log-sum-exps (flash-attention style) would cost one
extra product per view; measured on CPU it is slower (see the README), so it is not used here.

Peak extra memory: O((N + rows) * D) for fp32 copies and gradients, plus O(block_rows * N * views) for a block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from .reference import upcast
from .spec import (
    AVERAGE_AFTER_SOFTMAX,
    SIGMOID_TERMS,
    STUDENT_INPUTS,
    TERM_WEIGHT,
    EnsembleCorrection,
    Use,
    View,
    active_terms,
    active_uses,
    ensemble_corrections,
    ensemble_inputs,
    ensemble_scales,
    refuse_double_backward,
    teacher_inputs,
    teacher_scales,
)

# Bytes of the per-block buffers (log-softmax and softmax of every view, fp32): the block's rows follow from it,
# between MIN_BLOCK_ROWS and MAX_BLOCK_ROWS, so memory stays flat in N. More rows feed the GEMMs better (M = rows
# in the logits, K = rows in the candidate gradients, which also re-reads the whole (N, D) gradient per block).
# Measured forward + backward, D = 512, 2 threads, rows 64 / 128 / 256: N = 4096 clip-rd 3.68 / 3.14 / 3.26 s;
# N = 8192 clip-rd 15.6 / 13.3 / 14.3 s, clip-kd 8.9 / 7.5 / 6.8 s.
BLOCK_BYTES = 64 << 20
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 16, 512


def block_rows_for(n_columns: int, n_rows: int, views: int = 1, block_bytes: int = BLOCK_BYTES) -> int:
    """Anchor rows per block: two fp32 (rows, N) buffers per view within ``block_bytes``, a multiple of 16 within
    [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS], at most the number of rows."""
    rows = block_bytes // (8 * max(views, 1) * max(n_columns, 1))
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows - rows % 16))
    return min(rows, n_rows)


@dataclass
class _Plan:
    """What one call computes: the uses, the distinct views grouped by candidate, and which views feed gradients.

    With a teacher ensemble the uses read every teacher's inputs (spec.ensemble_inputs) and scales, and under
    average-after-softmax ``corrections`` add each KD's ensemble term (spec.EnsembleCorrection) to its value."""

    uses: list[Use]
    terms: list[str]
    weights: Mapping[str, float]
    gd: bool
    teachers: int = 1
    corrections: list[EnsembleCorrection] = field(default_factory=list)
    block_bytes: int = BLOCK_BYTES  # the per-block buffers' budget (block_rows_for)
    inputs: tuple[str, ...] = field(init=False)  # input names, students first, then every teacher's
    scales: tuple[str, ...] = field(init=False)  # scale names: spec.SCALES, then every further teacher's
    views: list[View] = field(init=False)
    # candidate -> the views with that candidate: their logits are one stacked (views * block, N) product, and the
    # candidate's gradient one (N, views * block) @ (views * block, D) product (K = views * block, not block).
    groups: dict[str, list[View]] = field(init=False)
    uses_by_view: dict[View, list[Use]] = field(init=False)  # graded view -> the uses it is the input of

    def __post_init__(self):
        self.inputs, self.scales = ensemble_inputs(self.teachers), ensemble_scales(self.teachers)
        seen: dict[View, None] = {}
        for use in self.uses:
            seen[use.view] = None
            if use.target is not None:
                seen[use.target] = None
        self.views = list(seen)
        self.groups = {}
        for view in self.views:
            self.groups.setdefault(view.candidate, []).append(view)
        self.uses_by_view = {}
        for use in self.uses:
            self.uses_by_view.setdefault(use.view, []).append(use)


def chunked_relational_loss(inputs, scales, weights, row_start: int, row_stop: int, group=None, teachers: int = 1,
                            ensemble: str = AVERAGE_AFTER_SOFTMAX, block_bytes: int = BLOCK_BYTES):
    """Backend entry point: (total, {term: detached value}) for the active row-softmax terms and gd.

    inputs: spec.ensemble_inputs(teachers) -> (N, D) (teachers of hrd and intra alone may be (N, D_k)); scales:
    spec.ensemble_scales(teachers) -> 0-dim fp32. Under torch.no_grad (evaluation) no gradient work is done at all.
    block_bytes: the budget of a block's (rows, N) buffers, which sets the rows per block (block_rows_for).
    """
    plan = _Plan(active_uses(weights, teachers), [t for t in active_terms(weights) if t != "fd"], weights,
                 weights["gd"] != 0, teachers, ensemble_corrections(weights, teachers, ensemble), block_bytes)
    if not plan.terms:
        return inputs["s_img"].new_zeros((), dtype=torch.float32), {}
    tensors = [inputs[name] for name in plan.inputs] + [scales[name] for name in plan.scales]
    if not torch.is_grad_enabled():
        tensors = [t.detach() for t in tensors]  # nothing will be differentiated: skip every gradient product
    total, values = _ChunkedLoss.apply(plan, row_start, row_stop, group, *tensors)
    return total, {term: values[i] for i, term in enumerate(plan.terms)}


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, row_start: int, row_stop: int, group, *tensors):
        names = plan.inputs + plan.scales
        embeddings = dict(zip(plan.inputs, tensors[:len(plan.inputs)]))
        scales = dict(zip(plan.scales, tensors[len(plan.inputs):]))
        want = dict(zip(names, ctx.needs_input_grad[4:]))
        values, grads, pending_gd = _forward_and_gradients(plan, embeddings, scales, want, row_start, row_stop, group)
        total = sum(plan.weights[TERM_WEIGHT[t]] * values[t] for t in plan.terms)
        ctx.grad_names = [name for name in names if want[name]]
        ctx.all_names = names
        ctx.save_for_backward(*[grads[name] for name in ctx.grad_names])
        ctx.pending_gd, ctx.group = pending_gd, group
        term_values = torch.stack([values[t] for t in plan.terms])
        ctx.mark_non_differentiable(term_values)
        return total, term_values

    @staticmethod
    def backward(ctx, grad_total, _grad_terms):
        refuse_double_backward("chunked", "whose gradients are computed in its forward pass")
        saved = dict(zip(ctx.grad_names, ctx.saved_tensors))
        grads = {name: saved[name] * grad_total.to(saved[name].dtype) for name in saved}
        if ctx.pending_gd is not None:  # gd under a process group: its cross-rank part waits for every rank's g
            for name, grad in _gd_group_gradients(ctx.pending_gd, grad_total, ctx.group).items():
                if name in grads:
                    grads[name] = grads[name] + grad.to(grads[name].dtype)
        return (None, None, None, None, *[grads.get(name) for name in ctx.all_names])


def _forward_and_gradients(plan: _Plan, embeddings, scales, want, row_start: int, row_stop: int, group=None):
    """Loss values of every term and, where wanted, d(total)/d(input) for every input; all in fp32.

    Returns (values, grads, pending): ``pending`` holds what gd's gradient needs when a process group defers it
    to the backward pass (None otherwise).
    """
    X = {name: tensor.detach().float().contiguous() for name, tensor in embeddings.items()}
    s = {name: float(value) for name, value in scales.items()}
    n = X["s_img"].shape[0]
    n_rows = row_stop - row_start
    grads_on = {name for name in STUDENT_INPUTS if want[name]}
    need_grad = bool(grads_on) or any(want[name] for name in plan.scales)
    dX = {name: torch.zeros_like(X[name]) for name in grads_on}
    device = X["s_img"].device
    dscale = {name: torch.zeros((), dtype=torch.float64, device=device) for name in plan.scales}
    sums = {term: torch.zeros((), dtype=torch.float64, device=device) for term in plan.terms}
    # Coefficient of each use in the total: weight * share / rows (the row mean).
    coef = {use: plan.weights[TERM_WEIGHT[use.term]] * use.share / n_rows for use in plan.uses}

    block = block_rows_for(n, n_rows, len(plan.views), plan.block_bytes)
    for start in range(row_start, row_stop, block):
        stop = min(start + block, row_stop)
        rows = stop - start
        local = torch.arange(rows, device=device)
        pos = torch.arange(start, stop, device=device)  # (rows,) positive column of each anchor row

        # Per candidate group: stacked scaled anchors (views * rows, D), their logits' row log-softmax LP and P.
        # The self pair of masked (intra) views is -inf in the logits and 0 in LP, where P is 0, so dots stay finite.
        stacked, P, LP = {}, {}, {}
        for candidate, views in plan.groups.items():
            stacked[candidate] = torch.cat([X[v.anchor][start:stop] * s[v.scale] for v in views])
            logits = stacked[candidate] @ X[candidate].T
            masked_rows = [i * rows + local for i, v in enumerate(views) if v.masked]
            if masked_rows:
                logits[torch.cat(masked_rows), pos.repeat(len(masked_rows))] = float("-inf")
            group_LP = torch.log_softmax(logits, dim=1)
            del logits
            group_P = group_LP.exp()
            if masked_rows:
                group_LP[torch.cat(masked_rows), pos.repeat(len(masked_rows))] = 0.0
            for i, view in enumerate(views):
                LP[view], P[view] = group_LP[i * rows:(i + 1) * rows], group_P[i * rows:(i + 1) * rows]

        # Loss sums over the block. cross[use] = sum_i LP(a)[i, pos] (CE) or sum_ij P(g) LP(a) (KD); then
        # CE = -cross and KL(P(g) || P(a)) = sum_ij P(g) LP(g) - cross.
        target_entropy, cross = {}, {}  # target_entropy: sum_ij P(g) LP(g), shared by every use of target g
        for use in plan.uses:
            view, target = use.view, use.target
            if target is None:
                cross[use] = LP[view][local, pos].double().sum()
                block_sum = -cross[use]
            else:
                if target not in target_entropy:
                    target_entropy[target] = _dot(P[target], LP[target])
                cross[use] = _dot(P[target], LP[view])
                block_sum = target_entropy[target] - cross[use]
            sums[use.term] += use.share * block_sum
        # Average-after-softmax: KD(A ; pbar) = mean_k KD(A ; G_k) - JSD, summed over the block's rows as
        # JSD = mean_k sum_ij p_k log p_k - sum_ij pbar log pbar (teachers only: no gradient).
        for correction in plan.corrections:
            own = sum(target_entropy[t] if t in target_entropy else _dot(P[t], LP[t]) for t in correction.targets)
            pbar = P[correction.targets[0]].clone()  # (rows, N): mean_k p_k
            for target in correction.targets[1:]:
                pbar.add_(P[target])
            pbar.div_(len(correction.targets))
            jsd = own / len(correction.targets) - torch.xlogy(pbar, pbar).sum().double()
            sums[correction.term] -= correction.share * jsd
            del pbar
        if not need_grad:
            continue
        # Scale gradients need no product: with A = s Z, dtotal/ds = sum(dA * Z) = sum(dA * LP) / s because each row
        # of dA sums to 0 (LP = A - lse), and sum(dA * LP) = sum_uses coef * (sum P(a) LP(a) - cross[use]).
        for view, view_uses in plan.uses_by_view.items():
            if want[view.scale] and s[view.scale] != 0.0:
                entropy = target_entropy.get(view)
                entropy = _dot(P[view], LP[view]) if entropy is None else entropy
                dscale[view.scale] += sum(coef[u] * (entropy - cross[u]) for u in view_uses) / s[view.scale]
        del LP  # the gradients need only P: free a (rows, N) buffer per view before the dA buffers appear

        for candidate, views in plan.groups.items():
            graded = [v for v in views if v in plan.uses_by_view]
            if not graded:
                continue
            # dtotal/dA of each graded view, stacked like the logits:
            # the sum over its uses of coef * (P(a) - onehot or P(g)).
            dA = X[candidate].new_empty(len(views) * rows, n)
            for i, view in enumerate(views):
                dA_view = dA[i * rows:(i + 1) * rows]
                if view not in plan.uses_by_view:  # a target only: no gradient flows through it
                    dA_view.zero_()
                    continue
                view_uses = plan.uses_by_view[view]
                torch.mul(P[view], sum(coef[use] for use in view_uses), out=dA_view)
                for use in view_uses:
                    if use.target is None:
                        dA_view[local, pos] -= coef[use]
                    else:
                        dA_view.sub_(P[use.target], alpha=coef[use])
                if view.anchor in grads_on:  # dX[anchor] += s dA Y
                    dX[view.anchor][start:stop].addmm_(dA_view, X[candidate], alpha=s[view.scale])
                if want[view.scale] and s[view.scale] == 0.0:  # sum(dA * Z) cannot be read off LP at s = 0
                    dscale[view.scale] += _dot(dA_view @ X[candidate], X[view.anchor][start:stop])
            if candidate in grads_on:  # dX[candidate] += sum over views of s dA^T X[anchor], scales already in stacked
                dX[candidate].addmm_(dA.T, stacked[candidate])

    values = {term: (sums[term] / n_rows).float() for term in plan.terms if term != "gd"}
    pending = None
    if plan.gd:
        values["gd"], pending = _gradient_distillation(plan.weights["gd"], X, s, dX, dscale, need_grad, row_start,
                                                       row_stop, group, grads_on, plan.teachers, plan.block_bytes)
    grads = {name: dX[name].to(embeddings[name].dtype) for name in grads_on}
    grads.update({name: dscale[name].float() for name in plan.scales if want[name]})
    return values, grads, pending


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product of two contiguous matrices in one pass, accumulated to fp64."""
    return torch.vdot(a.reshape(-1), b.reshape(-1)).double()


def _gradient_distillation(weight, X, s, dX, dscale, need_grad, row_start, row_stop, group=None, grads_on=(),
                           teachers: int = 1, block_bytes: int = BLOCK_BYTES):
    """gd over both directions, streamed in two passes (the gY sums need every anchor block before any gradient);
    with an ensemble, the mean over the teachers of each one's gd against the same student side.

    Without a group, adds weight * d(gd)/d(input) into dX and dscale in place and returns (value, None). With a
    process group the gY sums span every rank: pass 1's sums are all-reduced here, and the gradient, whose gY part
    is scaled by the sum of every rank's grad_output, is computed in backward from the returned pending state.
    """
    device = X["s_img"].device
    value = torch.zeros((), dtype=torch.float64, device=device)
    s_student = s["gd_student"]
    local_rows = row_stop - row_start
    total_rows = local_rows
    if group is not None:
        import torch.distributed as dist

        count = torch.tensor([float(local_rows)], dtype=torch.float64, device=device)
        dist.all_reduce(count, group=group)
        total_rows = int(count.item())
    pending = []
    for anchor, candidate, t_side in (("s_img", "s_txt", 0), ("s_txt", "s_img", 1)):
        Xs, Ys = X[anchor], X[candidate]
        n, d = Ys.shape[0], Ys.shape[1]
        # Pass 1: RY = R Y / B (rows, D) and RtX = R^T X / B (N, D), so that gX = s * RY and gY = s * RtX.
        RY_s, RtX_s, lse_s = _residual_products(Xs, Ys, s_student, row_start, row_stop, total_rows, block_bytes)
        if group is not None:  # gY sums over every rank's anchors
            import torch.distributed as dist

            dist.all_reduce(RtX_s, group=group)
        # dL/dgX and dL/dgY of weight * mean_k 1/2 [MSE(gX - gX_k) + MSE(gY - gY_k)] (MSE(gX): mean over this rank's
        # rows); linear in the differences, so the teachers' sum feeds one gradient pass.
        EX, EY = torch.zeros_like(RY_s), torch.zeros_like(RtX_s)
        for k in range(teachers):
            images, texts = teacher_inputs(k)
            Xt, Yt = (X[images], X[texts]) if t_side == 0 else (X[texts], X[images])
            s_teacher = s[teacher_scales(k)[1]]
            RY_t, RtX_t, _ = _residual_products(Xt, Yt, s_teacher, row_start, row_stop, total_rows, block_bytes)
            if group is not None:
                dist.all_reduce(RtX_t, group=group)
            diff_x = s_student * RY_s - s_teacher * RY_t
            diff_y = s_student * RtX_s - s_teacher * RtX_t
            value += 0.5 * (diff_x.pow(2).mean().double() + diff_y.pow(2).mean().double()) / teachers
            if need_grad:
                EX.add_(diff_x, alpha=weight / (teachers * local_rows * d))
                EY.add_(diff_y, alpha=weight / (teachers * n * d))
        if not need_grad:
            continue
        direction = (anchor, candidate, lse_s, EX, EY, RY_s, RtX_s)
        if group is None:
            _gd_gradients(direction, X, s_student, row_start, row_stop, total_rows, dX, dscale, 1.0, 1.0, block_bytes)
        else:
            pending.append(direction)
    if group is None or not need_grad:
        return value.float(), None
    return value.float(), {"directions": pending, "X": X, "scale": s_student, "rows": (row_start, row_stop),
                           "total_rows": total_rows, "grads_on": grads_on, "block_bytes": block_bytes}


def _gd_gradients(direction, X, scale, row_start, row_stop, total_rows, dX, dscale, x_factor, y_factor,
                  block_bytes: int = BLOCK_BYTES):
    """Add one gd direction's gradient into dX / dscale["gd_student"]: the gX part (this rank's rows) times
    ``x_factor``, the part through the gY sums times ``y_factor`` (the sum of every rank's factor under a group).

    Pass 2, through R = P - I: dL/dR = (s / B)(EX Y^T + X EY^T); softmax backward gives dL/dA.
    """
    anchor, candidate, lse_s, EX, EY, RY_s, RtX_s = direction
    # explicit dependence on s (gX = s RY, gY = s RtX after the sums): this rank's own factor
    dscale["gd_student"] += x_factor * (_dot(EX, RY_s) + _dot(EY, RtX_s))
    EX, EY = EX * x_factor, EY * y_factor
    Xs, Ys = X[anchor], X[candidate]
    n_rows = row_stop - row_start
    rows_scale = scale / total_rows
    block = block_rows_for(Ys.shape[0], n_rows, block_bytes=block_bytes)
    for start in range(row_start, row_stop, block):
        stop = min(start + block, row_stop)
        local = torch.arange(stop - start, device=Xs.device)
        pos = torch.arange(start, stop, device=Xs.device)
        Xb, EXb = Xs[start:stop], EX[start - row_start : stop - row_start]
        Z = Xb @ Ys.T
        P = (Z * scale).sub_(lse_s[start - row_start : stop - row_start, None]).exp_()
        H = torch.addmm(Xb @ EY.T, EXb, Ys.T).mul_(rows_scale)
        dA = (H - (P * H).sum(dim=1, keepdim=True)).mul_(P)
        R = P
        R[local, pos] -= 1.0
        dscale["gd_student"] += _dot(dA, Z)
        if anchor in dX:
            dX[anchor][start:stop].addmm_(dA, Ys, alpha=scale).addmm_(R, EY, alpha=rows_scale)
        if candidate in dX:
            dX[candidate].addmm_(dA.T, Xb, alpha=scale).addmm_(R.T, EXb, alpha=rows_scale)


def _gd_group_gradients(pending: dict, grad_total: torch.Tensor, group) -> dict:
    """gd's gradient under a process group, in backward: the gY part is scaled by the sum of every rank's
    grad_output (the all-reduce's backward), the rest by this rank's."""
    import torch.distributed as dist

    own = grad_total.detach().double().reshape(1).clone()
    everyone = own.clone()
    dist.all_reduce(everyone, group=group)
    X = pending["X"]
    dX = {name: torch.zeros_like(X[name]) for name in pending["grads_on"]}
    dscale = {"gd_student": torch.zeros((), dtype=torch.float64, device=own.device)}
    for direction in pending["directions"]:
        _gd_gradients(direction, X, pending["scale"], *pending["rows"], pending["total_rows"], dX, dscale,
                      float(own), float(everyone), pending["block_bytes"])
    return {**dX, "gd_student": dscale["gd_student"].float()}


def _residual_products(X, Y, scale: float, row_start: int, row_stop: int, total_rows: int,
                       block_bytes: int = BLOCK_BYTES):
    """R = P(scale X[rows] Y^T) - I_pos streamed by row blocks: (R Y / B, R^T X[rows] / B, lse per row), where
    B = total_rows."""
    n_rows, n = row_stop - row_start, Y.shape[0]
    RY = Y.new_empty(n_rows, Y.shape[1])
    RtX = torch.zeros_like(Y)
    lse = Y.new_empty(n_rows)
    block = block_rows_for(n, n_rows, block_bytes=block_bytes)
    for start in range(row_start, row_stop, block):
        stop = min(start + block, row_stop)
        local = torch.arange(stop - start, device=Y.device)
        pos = torch.arange(start, stop, device=Y.device)
        rows = slice(start - row_start, stop - row_start)
        logits = (X[start:stop] @ Y.T).mul_(scale)
        lse[rows] = torch.logsumexp(logits, dim=1)
        R = logits.sub_(lse[rows, None]).exp_()
        R[local, pos] -= 1.0
        RY[rows] = (R @ Y).div_(total_rows)
        RtX.addmm_(R.T, X[start:stop], alpha=1.0 / total_rows)
    return RY, RtX, lse


def chunked_sigmoid_loss(s_img, s_txt, teachers, student_scale, student_bias, weights, row_start: int, row_stop: int,
                         block_bytes: int = BLOCK_BYTES):
    """Backend entry point of the sigmoid terms: (total, {term: detached value}) for siglip and sigmoid_kd.

    s_img, s_txt (N, D); teachers: the SigmoidTeacher members of sigmoid_kd's soft labels (detached, any widths);
    student_scale, student_bias: 0-dim tensors (bias None: logits without a bias). Blocks of image anchor rows hold
    complete rows of the logits, so the loss and its gradient come from one pass; computed in fp32 (fp64 for fp64
    inputs). Under torch.no_grad no gradient work is done. block_bytes: as in chunked_relational_loss.
    """
    terms = tuple(term for term in SIGMOID_TERMS if weights[term] != 0.0)
    bias = student_bias if student_bias is not None else student_scale.new_zeros(())
    tensors = [s_img, s_txt, student_scale, bias]
    if not torch.is_grad_enabled():
        tensors = [t.detach() for t in tensors]  # nothing will be differentiated: skip every gradient product
    term_weights = tuple(weights[term] for term in SIGMOID_TERMS)
    total, values = _ChunkedSigmoidLoss.apply(term_weights, tuple(teachers), row_start, row_stop, block_bytes,
                                              *tensors)
    return total, {term: values[i] for i, term in enumerate(terms)}


_SIGMOID_INPUTS = ("s_img", "s_txt", "scale", "bias")


class _ChunkedSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, term_weights, teachers, row_start: int, row_stop: int, block_bytes: int, *tensors):
        want = dict(zip(_SIGMOID_INPUTS, ctx.needs_input_grad[5:]))
        values, grads = _sigmoid_forward_and_gradients(dict(zip(SIGMOID_TERMS, term_weights)), teachers,
                                                       *tensors, want, row_start, row_stop, block_bytes)
        total = sum(weight * values[term] for term, weight in zip(SIGMOID_TERMS, term_weights) if weight != 0.0)
        ctx.grad_names = [name for name in _SIGMOID_INPUTS if want[name]]
        ctx.save_for_backward(*[grads[name] for name in ctx.grad_names])
        term_values = torch.stack([values[term] for term in values])
        ctx.mark_non_differentiable(term_values)
        return total, term_values

    @staticmethod
    def backward(ctx, grad_total, _grad_terms):
        refuse_double_backward("chunked", "whose gradients are computed in its forward pass")
        saved = dict(zip(ctx.grad_names, ctx.saved_tensors))
        grads = {name: saved[name] * grad_total.to(saved[name].dtype) for name in saved}
        return (None, None, None, None, None, *[grads.get(name) for name in _SIGMOID_INPUTS])


def _sigmoid_forward_and_gradients(weights, teachers, s_img, s_txt, scale, bias, want, row_start: int, row_stop: int,
                                   block_bytes: int = BLOCK_BYTES):
    """siglip and sigmoid_kd values (fp32) and, where wanted, d(total)/d(input) for s_img, s_txt, scale and bias.

    Student logits z = s S_I[rows] S_T^T + b (rows, N); with labels y (+1 on the positive, -1 elsewhere) and soft
    labels G of the teachers, the losses are sum softplus(-y z) / rows and sum softplus(-G z) / rows, and
    d(total)/dz = w_siglip (sigmoid(z) - onehot) / rows - w_kd G sigmoid(-G z) / rows.
    """
    X, Y = upcast(s_img.detach()).contiguous(), upcast(s_txt.detach()).contiguous()
    dtype, device = X.dtype, X.device
    s, b = float(scale), float(bias)
    targets = [(upcast(t.image).to(dtype), upcast(t.text).to(dtype), float(t.scale), float(t.bias)) for t in teachers]
    n, n_rows = Y.shape[0], row_stop - row_start
    w_siglip, w_kd = weights["siglip"], weights["sigmoid_kd"]
    need_grad = any(want.values())
    dX = {name: torch.zeros_like(x) for name, x in (("s_img", X), ("s_txt", Y)) if want[name]}
    sums = {term: torch.zeros((), dtype=torch.float64, device=device) for term in SIGMOID_TERMS if weights[term]}
    d_scale = torch.zeros((), dtype=torch.float64, device=device)
    d_bias = torch.zeros((), dtype=torch.float64, device=device)

    # (rows, N) buffers alive per block: the raw and biased logits, a softplus and the gradient (two views' worth);
    # sigmoid_kd adds the soft labels, a teacher's probabilities, the margins and their softplus (two more).
    block = block_rows_for(n, n_rows, views=4 if w_kd else 2, block_bytes=block_bytes)
    for start in range(row_start, row_stop, block):
        stop = min(start + block, row_stop)
        local = torch.arange(stop - start, device=device)
        pos = torch.arange(start, stop, device=device)  # (rows,) positive column of each anchor row
        raw = X[start:stop] @ Y.T  # (rows, N) S_I S_T^T, kept for the scale gradient
        logits = torch.mul(raw, s).add_(b)  # (rows, N) z
        grad = None  # (rows, N) d(total)/dz, built in place from the terms' buffers
        # Sums in the compute dtype, then fp64: converting a (rows, N) buffer to fp64 first costs a copy per sum.
        if w_siglip:
            # softplus(-y z): softplus(z) off the positive, softplus(z) - z = softplus(-z) on it
            sums["siglip"] += F.softplus(logits).sum().double() - logits[local, pos].sum().double()
            if need_grad:  # d softplus(-y z) / dz = sigmoid(z) - [j = pos(i)]
                grad = torch.sigmoid(logits)
                grad[local, pos] -= 1.0
                grad.mul_(w_siglip / n_rows)
        if w_kd:
            labels = _soft_labels(targets, start, stop)  # (rows, N) G in [-1, 1]
            margin = torch.mul(labels, logits).neg_()  # (rows, N) -G z
            sums["sigmoid_kd"] += F.softplus(margin).sum().double()
            if need_grad:  # d softplus(-G z) / dz = -G sigmoid(-G z)
                kd_grad = margin.sigmoid_().mul_(labels)
                if grad is None:
                    grad = kd_grad.mul_(-w_kd / n_rows)
                else:
                    grad.add_(kd_grad, alpha=-w_kd / n_rows)
            del labels, margin
        if not need_grad:
            continue
        # z = s Z + b: dtotal/ds = sum(dz * Z), dtotal/db = sum(dz); the embeddings' gradients are s dz Y, s dz^T X.
        if want["scale"]:
            d_scale += _dot(grad, raw)
        if want["bias"]:
            d_bias += grad.sum().double()
        if "s_img" in dX:
            dX["s_img"][start:stop].addmm_(grad, Y, alpha=s)
        if "s_txt" in dX:
            dX["s_txt"].addmm_(grad.T, X[start:stop], alpha=s)

    values = {term: (total / n_rows).float() for term, total in sums.items()}
    grads = {name: dX[name].to(tensor.dtype) for name, tensor in (("s_img", s_img), ("s_txt", s_txt)) if name in dX}
    if want["scale"]:
        grads["scale"] = d_scale.to(scale.dtype)
    if want["bias"]:
        grads["bias"] = d_bias.to(bias.dtype)
    return values, grads


def _soft_labels(targets, start: int, stop: int) -> torch.Tensor:
    """sigmoid_kd's soft labels G = 2 mean_k sigmoid(s_k T_I^k[start:stop] (T_T^k)^T + b_k) - 1, (rows, N)."""
    labels = None
    for image, text, scale, bias in targets:
        probability = (image[start:stop] @ text.T).mul_(scale).add_(bias).sigmoid_()
        labels = probability if labels is None else labels.add_(probability)
    return labels.mul_(2.0 / len(targets)).sub_(1.0)
