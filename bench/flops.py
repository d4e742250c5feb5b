"""Explicit work counts of the objective, from the View/Use table of ``kernels.spec``.

Each distinct logit view ``X[rows] @ Y^T`` is one (rows x D) @ (D x N) product, 2 * rows * N * D FLOPs, in the
forward pass; in the backward pass a view that is the student side of some use (not only a KD target) needs one
more product of the same size per student operand: dX[rows] = G @ Y (anchor) and dY = G^T @ X[rows] (candidate).
For ``clip-rd`` that is 12 forward + 12 gradient products, for ``clip-kd`` 6 + 6. Gradient distillation adds, per
direction and side, ``R Y`` and ``R^T X`` in the forward (8), and per student direction ``EX Y^T`` and ``X EY^T``
(its upstream gradient through the logits) and four gradient products ``dA Y``, ``R EY``, ``dA^T X``, ``R^T EX`` in
the backward (12). The sigmoid terms (siglip, sigmoid_kd) add S_I S_T^T and its two gradient products, and
sigmoid_kd the teacher's T_I T_T^T (one per ensemble member; the benchmark has one teacher). A weight set with a
softmax teacher ensemble (``config.ENSEMBLES``) counts every teacher's views (``spec.active_uses`` over its members);
average-after-softmax's value pass needs the teachers' logits again only where rows are streamed in tiles (Triton),
so it is not counted. Elementwise work (exp,
softmax, sigmoid, the O(N D) fd term) is not counted: GFLOP/s here is useful matmul throughput, the same count for
every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

from kernels import spec

from .config import ensemble_of, weights_of

STUDENT = set(spec.STUDENT_INPUTS)
# Product kinds by the shape of their result: rows x N logits, anchor rows (rows x D) or candidate rows (N x D).
LOGITS_KINDS = ("forward", "gd_logits")
ANCHOR_KINDS = ("grad_anchor", "gd_rows")  # G @ candidates -> anchor rows
CANDIDATE_KINDS = ("grad_candidate", "gd_cols")  # G^T @ anchors -> candidate rows
FORWARD_KINDS = ("forward", "gd_rows", "gd_cols")  # the forward pass's products; the others are the backward's
GD_DIRECTIONS = (("s_img", "s_txt"), ("s_txt", "s_img"), ("t_img", "t_txt"), ("t_txt", "t_img"))


@dataclass(frozen=True)
class Product:
    """One (rows x D) @ (D x N)-sized product: a view's forward logits or one of its gradient products."""

    anchor: str
    candidate: str
    kind: str  # "forward" (logits), "grad_anchor" / "grad_candidate", gd's "gd_rows" / "gd_cols" / "gd_logits"


def products(preset: str) -> list[Product]:
    """The products the objective cannot avoid for this weight set (views deduplicated by operands, scale ignored)."""
    weights = spec.resolve_weights(weights_of(preset))
    uses = spec.active_uses(weights, ensemble_of(preset)[0])
    views, graded = {}, {}
    for use in uses:
        key = (use.view.anchor, use.view.candidate)
        views[key] = graded[key] = None
        if use.target is not None:
            views.setdefault((use.target.anchor, use.target.candidate), None)
    # The sigmoid terms: the student's S_I S_T^T (graded) and, for sigmoid_kd, the teacher's T_I T_T^T (a target).
    if any(weights[term] for term in spec.SIGMOID_TERMS):
        views[("s_img", "s_txt")] = graded[("s_img", "s_txt")] = None
    if weights["sigmoid_kd"]:
        views.setdefault(("t_img", "t_txt"), None)
    out = [Product(a, c, "forward") for a, c in views]
    for a, c in graded:
        if a in STUDENT:
            out.append(Product(a, c, "grad_anchor"))
        if c in STUDENT:
            out.append(Product(a, c, "grad_candidate"))
    if weights.get("gd"):
        for a, c in GD_DIRECTIONS:
            if (a, c) not in views:
                out.append(Product(a, c, "forward"))
            out += [Product(a, c, "gd_rows"), Product(a, c, "gd_cols")]
        for a, c in GD_DIRECTIONS[:2]:  # the student side's backward
            out += [Product(a, c, kind) for kind in ("gd_logits",) * 2 + ("grad_anchor",) * 2 + ("grad_candidate",) * 2]
    return out


def mode_products(preset: str, mode: str) -> list[Product]:
    """Products timed by a mode: forward -> forward products, backward -> gradient products, both -> all."""
    every = products(preset)
    if mode == "forward":
        return [p for p in every if p.kind in FORWARD_KINDS]
    if mode == "backward":
        return [p for p in every if p.kind not in FORWARD_KINDS]
    if mode == "forward+backward":
        return every
    raise ValueError(f"mode: unknown mode {mode!r}; expected forward, backward or forward+backward")


def flop_count(preset: str, mode: str, rows: int, n: int, d: int) -> int:
    """Matmul FLOPs of the objective in this mode: 2 * rows * N * D per product."""
    return 2 * rows * n * d * len(mode_products(preset, mode))


def bytes_min(mode: str, rows: int, n: int, d: int, itemsize: int) -> int:
    """Compulsory memory traffic of a streaming implementation: every input read once, every gradient written once.

    forward reads the four (N, D) inputs (anchor rows included); backward reads them again and writes the two
    student gradients. A backend that stores logits moves ``bytes_logits`` more.
    """
    inputs = 4 * n * d * itemsize
    if mode == "forward":
        return inputs
    backward = inputs + 2 * n * d * itemsize
    return backward if mode == "backward" else inputs + backward


def bytes_logits(preset: str, mode: str, rows: int, n: int) -> int:
    """Traffic a materialising backend adds at the very least: each rows x N fp32 matrix written once, read once.

    One logit matrix per forward product and one gradient matrix per graded view in backward.
    """
    forward_views = sum(1 for p in products(preset) if p.kind == "forward")
    graded_views = len({(p.anchor, p.candidate) for p in products(preset) if p.kind != "forward"})
    per_matrix = 2 * 4 * rows * n
    count = {"forward": forward_views, "backward": graded_views, "forward+backward": forward_views + graded_views}
    return per_matrix * count[mode]
