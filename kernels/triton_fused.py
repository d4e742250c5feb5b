"""Fused Triton backend of the row-softmax terms of the distillation objective (kernels/README.md, kernels/spec.py).

Every KD use couples a view with its target at the same (row, column), so the views are grouped into *pairs*
(P, Q): a view and its KD partner (e.g. S_I S_T^T with T_I T_T^T for hrd; T_I S_T^T with T_T S_I^T for xrd, each the
other's target). A CE-only view is a pair without Q. One pair table row describes both views and the uses among
them (CE on P, CE on Q, KD(P ; Q), KD(Q ; P)); the active pairs are built from ``spec.active_uses``, so a
zero-weight term has no pair and costs nothing.

Kernels (flash-attention style, no rows x N matrix is ever stored):
- forward, grid (row blocks, pairs): each program streams column tiles; both logit tiles of its pair are computed
  once per tile and feed every use (online max, sum of exp, and for KD the sum of e^(g - m_g) (g - a)); it writes
  the per-row log-sum-exps for the backward and the per-row CE / KL values that the host averages into terms.
- backward, one kernel body for two passes (constexpr ROWS, as the flash-attention tutorial reuses its inner loop
  with a constexpr MASK). Row pass, grid (row blocks, student anchor, column splits): dX[rows] = sum over views
  anchored on that student input of s * dA @ Y, plus partial sums of dA * (X Y^T) for the scale gradients. Column
  pass, grid (column blocks, student candidate, row splits): dY[cols] = sum of s * dA^T @ X, plus the scale-gradient
  partial sums of teacher-anchored views.
gd, which needs the P @ Y and P^T @ X streams rather than row statistics, has its own kernels (triton_gd.py).
Both backward passes recompute each logit tile once from the saved lse (a full-D dot), form dA, and add
dA @ Y (dA^T @ X) to the program's own fp32 gradient rows in global memory, BLOCK_D columns at a time
(read-modify-write; no atomics, as no other program touches those rows). A pass with few owned blocks (few
local-loss rows) splits its streamed axis over a third grid axis, each split into its own fp32 slab; the host sums
the slabs and the scale partial sums, and casts to the input dtype.

Why global read-modify-write rather than a gradient tile in registers. Per (row block, column tile, pair), with
U = 2 BM BN D flops: the logits of P and Q cost 2U and the gradient product U. Keeping the gradient in registers
caps its width (a (64, D) fp32 tile is D / 4 registers per thread at 256 threads: 128 at D = 512, 256 at D = 1024,
on top of ~100 for the logit tiles), so D had to be a grid axis of BLOCK_D chunks, each recomputing the logits:
(2 D / BLOCK_D + 1) U = 17 U at D = 512 bf16 (BLOCK_D 64), 33 U at D = 1024 bf16 or D = 512 fp32 (BLOCK_D 32).
Now it is 3 U (2 U for a CE-only pair): 5.7x, 11x and 22x fewer backward flops (fp32 at D = 1024). The price is
the accumulator traffic, 2 BM D x 4 bytes per tile: at bf16, 64 x 64 tiles, the tile reads 4 (BM + BN) D = 512 D
bytes of operands for the logits and 128 D for the product, and moves 512 D bytes of accumulator, 1152 D bytes in
all against 4224 D before at D = 512 (3.7x less). The accumulator rows (BM x D fp32, 128-256 KiB) are private to
one program and reused every column tile, so they stay in L2 (50 MiB on H100).
dA = P(view) - onehot(pos) for CE and P(view) - P(target) for KD, times share * weight / rows (the target and its
scale get nothing).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl

from . import spec
from .triton_config import BlockConfig, block_config, stream_split
from .triton_ensemble import MEMBER_COLUMNS, ensemble_jsd
from .triton_gd import GradientDistillation
from .triton_tiles import (
    INTERPRETING,
    STUDENT_SLABS,
    add_tile_product,
    kernel_options,
    logit_tile,
    on_positive,
    online_softmax_step,
    positive_logit,
    slab_rows,
    stream_range,
    tile_axes,
)

# Stacked embedding order: input k of spec.ensemble_inputs is slab k of the (4 + 2 (K - 1), N, D) tensor (s_img, s_txt,
# t_img, t_txt, then the other teachers' images and texts); slabs 0 and 1 take gradients.
# Pair table columns (int32): anchor/candidate slab and scale index of P and Q, has Q, masked, use flags.
_PAIR_COLUMNS = ("anchor_p", "cand_p", "scale_p", "anchor_q", "cand_q", "scale_q",
                 "has_q", "masked", "ce_p", "ce_q", "kd_pq", "kd_qp")
_USE_SLOTS = ("ce_p", "ce_q", "kd_pq", "kd_qp")  # per-row loss columns, in this order
# Table widths, shared by the kernels and the host that fills the tables.
PAIR_WIDTH = tl.constexpr(len(_PAIR_COLUMNS))  # int32 columns of a pair-table row
NUM_USES = tl.constexpr(len(_USE_SLOTS))  # per-row loss columns of a pair
COEF_WIDTH = tl.constexpr(len(_USE_SLOTS) + 1)  # backward coefficients of a pair: one per use, then its scale
PAIR_VIEWS = tl.constexpr(2)  # P and Q: saved lse rows per pair


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_pair(pair_ptr, pair):
    """One pair-table row (PAIR_WIDTH int32 scalars, in the order of _PAIR_COLUMNS)."""
    tl.static_assert(PAIR_WIDTH == 12, "the unpacking below follows _PAIR_COLUMNS")
    row = pair_ptr + pair * PAIR_WIDTH
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
            tl.load(row + 10), tl.load(row + 11))


@triton.jit
def _load_backward_scalars(coef_ptr, scale_ptr, pair, scale_p, scale_q):
    """A pair's use coefficients (CE on P, CE on Q, KD(P;Q), KD(Q;P)), grad_output g, and the scales of P and Q."""
    tl.static_assert(COEF_WIDTH == 5, "one coefficient per use slot, then the pair's gradient scale")
    coef = coef_ptr + pair * COEF_WIDTH
    return (tl.load(coef), tl.load(coef + 1), tl.load(coef + 2), tl.load(coef + 3), tl.load(coef + 4),
            tl.load(scale_ptr + scale_p), tl.load(scale_ptr + scale_q))


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows"])
def _relational_fwd_kernel(
    emb_ptr,       # (slabs, N, D) stacked s_img, s_txt, t_img, t_txt, t_img1, t_txt1, ... (student dtype)
    pair_ptr,      # (n_pairs, PAIR_WIDTH) int32 pair table
    scale_ptr,     # (len(plan.scales),) fp32 scales: spec.ensemble_scales order
    lse_ptr,       # out (n_pairs, PAIR_VIEWS, rows) fp32: lse of P and Q per anchor row
    row_loss_ptr,  # out (n_pairs, NUM_USES, rows) fp32: CE(P), CE(Q), KL(P;Q), KL(Q;P) per anchor row
    n_cols, width, row_start, n_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    pair = tl.program_id(1)
    anchor_p, cand_p, scale_p, anchor_q, cand_q, scale_q, has_q, masked, ce_p, ce_q, kd_pq, kd_qp = \
        _load_pair(pair_ptr, pair)
    s_p = tl.load(scale_ptr + scale_p)
    s_q = tl.load(scale_ptr + scale_q)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)  # anchor rows within [0, rows)
    row_ok = local < n_rows
    row0 = row_start + block * BLOCK_M  # slab row of the first anchor = its positive column
    x_p = slab_rows(emb_ptr, anchor_p, row0, n_cols, width)
    x_q = slab_rows(emb_ptr, anchor_q, row0, n_cols, width)

    # Online row statistics: running max, sum of exp, and for KD(a ; g) the sum of e^(g - m_g) (g - a).
    m_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_p = tl.zeros((BLOCK_M,), tl.float32)
    m_q = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_q = tl.zeros((BLOCK_M,), tl.float32)
    t_pq = tl.zeros((BLOCK_M,), tl.float32)  # KD(P ; Q): target Q
    t_qp = tl.zeros((BLOCK_M,), tl.float32)  # KD(Q ; P): target P
    for col0 in range(0, n_cols, BLOCK_N):
        col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
        # Padding columns, and the self pair of a masked (intra) view, are -inf in both views.
        valid = col_ok[None, :] & ~((masked != 0) & on_positive(row0, col0, BLOCK_M, BLOCK_N))
        # p, q stay finite (for the KD differences); e_p, e_q are 0 where the logit is -inf.
        p = s_p * logit_tile(x_p, slab_rows(emb_ptr, cand_p, col0, n_cols, width), row_ok, col_ok, width,
                              BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        p_for_softmax = tl.where(valid, p, float("-inf"))
        m_p_new, l_p, alpha_p, e_p = online_softmax_step(m_p, l_p, p_for_softmax)
        if has_q != 0:
            q = s_q * logit_tile(x_q, slab_rows(emb_ptr, cand_q, col0, n_cols, width), row_ok, col_ok, width,
                                  BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
            q_for_softmax = tl.where(valid, q, float("-inf"))
            m_q_new, l_q, alpha_q, e_q = online_softmax_step(m_q, l_q, q_for_softmax)
            if kd_pq != 0:
                t_pq = t_pq * alpha_q + tl.sum(e_q * (q - p), axis=1)
            if kd_qp != 0:
                t_qp = t_qp * alpha_p + tl.sum(e_p * (p - q), axis=1)
            m_q = m_q_new
        m_p = m_p_new

    lse_p = m_p + tl.log(l_p)
    lse_q = tl.zeros((BLOCK_M,), tl.float32)
    if has_q != 0:
        lse_q = m_q + tl.log(l_q)
    # KL(P(g) || P(a)) = (sum_j e^(g_j - m_g) (g_j - a_j)) / Z_g - lse(g) + lse(a); CE = lse - logit at pos.
    ce_p_row = tl.zeros((BLOCK_M,), tl.float32)
    ce_q_row = tl.zeros((BLOCK_M,), tl.float32)
    kl_pq_row = tl.zeros((BLOCK_M,), tl.float32)
    kl_qp_row = tl.zeros((BLOCK_M,), tl.float32)
    if ce_p != 0:
        y_pos = slab_rows(emb_ptr, cand_p, row0, n_cols, width)
        ce_p_row = lse_p - s_p * positive_logit(x_p, y_pos, row_ok, width, BLOCK_M, BLOCK_K)
    if ce_q != 0:
        y_pos = slab_rows(emb_ptr, cand_q, row0, n_cols, width)
        ce_q_row = lse_q - s_q * positive_logit(x_q, y_pos, row_ok, width, BLOCK_M, BLOCK_K)
    if kd_pq != 0:
        kl_pq_row = t_pq / l_q - lse_q + lse_p
    if kd_qp != 0:
        kl_qp_row = t_qp / l_p - lse_p + lse_q

    lse_row = lse_ptr + pair.to(tl.int64) * PAIR_VIEWS * n_rows + local
    tl.store(lse_row, lse_p, mask=row_ok)
    tl.store(lse_row + n_rows, lse_q, mask=row_ok & (has_q != 0))
    loss_row = row_loss_ptr + pair.to(tl.int64) * NUM_USES * n_rows + local
    tl.store(loss_row, ce_p_row, mask=row_ok)
    tl.store(loss_row + n_rows, ce_q_row, mask=row_ok)
    tl.store(loss_row + 2 * n_rows, kl_pq_row, mask=row_ok)
    tl.store(loss_row + 3 * n_rows, kl_qp_row, mask=row_ok)


@triton.jit
def _grad_logits(prob_view, prob_target, onehot, c_ce, c_kd):
    """d loss / d logits of one view, in the pair's unit: c_ce (P - onehot) + c_kd (P - P(target))."""
    return (c_ce + c_kd) * prob_view - c_ce * onehot - c_kd * prob_target


@triton.jit
def _pair_probabilities(x_p, y_p, x_q, y_q, s_p, s_q, lse_p, lse_q, has_q, masked, row0, col0, row_ok, col_ok,
                        width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed tile of a pair from the saved lse: raw logits and softmax of P and Q, and the positive one-hot.

    All (BLOCK_M, BLOCK_N) fp32; zero outside valid rows and columns and on a masked view's self pair."""
    on_pos = on_positive(row0, col0, BLOCK_M, BLOCK_N)
    valid = row_ok[:, None] & col_ok[None, :] & ~((masked != 0) & on_pos)
    onehot = tl.where(valid & on_pos, 1.0, 0.0)
    p_raw = logit_tile(x_p, y_p, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    prob_p = tl.exp(tl.where(valid, s_p * p_raw, float("-inf")) - lse_p[:, None])
    q_raw = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    prob_q = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if has_q != 0:
        q_raw = logit_tile(x_q, y_q, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        prob_q = tl.exp(tl.where(valid, s_q * q_raw, float("-inf")) - lse_q[:, None])
    return p_raw, prob_p, q_raw, prob_q, onehot


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "n_pairs", "split_len"])
def _relational_bwd_kernel(
    emb_ptr,     # (slabs, N, D) stacked embeddings
    pair_ptr,    # (n_pairs, PAIR_WIDTH) int32 pair table
    coef_ptr,    # (n_pairs, COEF_WIDTH) fp32: unit coefficients of ce_p, ce_q, kd_pq, kd_qp; gradient scale
    scale_ptr,   # (len(plan.scales),) fp32 scales
    lse_ptr,     # (n_pairs, PAIR_VIEWS, rows) fp32 from the forward
    grad_ptr,    # in/out (splits, 2, rows (ROWS) or N, D) fp32, zero-filled: gradient of the owned rows of
                 # s_img, s_txt as anchors (ROWS) or as candidates, one slab per split
    dscale_ptr,  # out (owned blocks, 2, splits, n_pairs, PAIR_VIEWS) fp32: partial sums of dA * (X Y^T)
    n_cols, width, row_start, n_rows, n_pairs, split_len,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One body for both backward passes. ROWS = 1: a program owns a block of anchor rows of student slab ``slot``
    and streams the columns, dX[rows] += s dA @ Y. ROWS = 0: it owns a block of candidate rows and streams the
    anchor rows, dY[cols] += s dA^T @ X. Split ``split`` streams [split split_len, (split + 1) split_len)."""
    block = tl.program_id(0)
    slot = tl.program_id(1)  # student slab whose rows this program owns (0 = s_img, 1 = s_txt)
    split = tl.program_id(2)
    owned0, begin, end = stream_range(block, split, split_len, n_rows, n_cols, ROWS, BLOCK_M, BLOCK_N)
    owned_len = n_rows * ROWS + n_cols * (1 - ROWS)
    out = grad_ptr + ((split.to(tl.int64) * STUDENT_SLABS + slot) * owned_len + owned0) * width
    program = (block * STUDENT_SLABS + slot) * tl.num_programs(2) + split
    for pair in range(n_pairs):
        anchor_p, cand_p, scale_p, anchor_q, cand_q, scale_q, has_q, masked, ce_p, ce_q, kd_pq, kd_qp = \
            _load_pair(pair_ptr, pair)
        # The owned side of each view: its anchor in the row pass, its candidate in the column pass.
        owner_p = anchor_p * ROWS + cand_p * (1 - ROWS)
        owner_q = anchor_q * ROWS + cand_q * (1 - ROWS)
        want_p = (ce_p + kd_pq > 0) & (owner_p == slot)
        want_q = (has_q != 0) & (ce_q + kd_qp > 0) & (owner_q == slot)
        if want_p | want_q:
            c_ce_p, c_ce_q, c_kd_pq, c_kd_qp, g, s_p, s_q = _load_backward_scalars(
                coef_ptr, scale_ptr, pair, scale_p, scale_q)
            ds_p = tl.zeros((BLOCK_M,), tl.float32)
            ds_q = tl.zeros((BLOCK_M,), tl.float32)
            for streamed0 in range(begin, end, BLOCK_N * ROWS + BLOCK_M * (1 - ROWS)):
                local, row_ok, row0, col0, col_ok = tile_axes(owned0, streamed0, row_start, n_rows, n_cols, ROWS,
                                                              BLOCK_M, BLOCK_N)
                lse_row = lse_ptr + tl.cast(pair, tl.int64) * PAIR_VIEWS * n_rows + local
                lse_p = tl.load(lse_row, mask=row_ok, other=0.0)
                lse_q = tl.load(lse_row + n_rows, mask=row_ok & (has_q != 0), other=0.0)
                x_p = slab_rows(emb_ptr, anchor_p, row0, n_cols, width)
                x_q = slab_rows(emb_ptr, anchor_q, row0, n_cols, width)
                y_p = slab_rows(emb_ptr, cand_p, col0, n_cols, width)
                y_q = slab_rows(emb_ptr, cand_q, col0, n_cols, width)
                p_raw, prob_p, q_raw, prob_q, onehot = _pair_probabilities(
                    x_p, y_p, x_q, y_q, s_p, s_q, lse_p, lse_q, has_q, masked, row0, col0, row_ok, col_ok, width,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
                if want_p:
                    d_p = _grad_logits(prob_p, prob_q, onehot, c_ce_p, c_kd_pq)  # (BLOCK_M, BLOCK_N)
                    ds_p += tl.sum(d_p * p_raw, axis=1)
                    add_tile_product(out, d_p, x_p, y_p, g * s_p, row_ok, col_ok, width, ROWS,
                                     BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
                if want_q:
                    d_q = _grad_logits(prob_q, prob_p, onehot, c_ce_q, c_kd_qp)
                    ds_q += tl.sum(d_q * q_raw, axis=1)
                    add_tile_product(out, d_q, x_q, y_q, g * s_q, row_ok, col_ok, width, ROWS,
                                     BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
            # Each view's scale gradient comes from the pass owning its anchor: the row pass for student anchors,
            # the column pass for teacher anchors (whose rows no row pass owns).
            ds_out = dscale_ptr + (tl.cast(program, tl.int64) * n_pairs + pair) * PAIR_VIEWS
            scale_p_here = (ROWS != 0) | (anchor_p >= STUDENT_SLABS)
            scale_q_here = (ROWS != 0) | (anchor_q >= STUDENT_SLABS)
            tl.store(ds_out, tl.where(want_p & scale_p_here, g * tl.sum(ds_p, axis=0), 0.0))
            tl.store(ds_out + 1, tl.where(want_q & scale_q_here, g * tl.sum(ds_q, axis=0), 0.0))


# ------------------------------------------------------------------------------------------------ pair planning


@dataclass
class _Pair:
    p: spec.View
    q: Optional[spec.View] = None
    uses: list = field(default_factory=list)  # (slot: index into _USE_SLOTS, Use)


def _build_pairs(weights: dict[str, float], teachers: int = 1) -> list[_Pair]:
    """Group the active uses into pairs: a KD view with its target, and each CE-only view on its own.

    A view with KD targets in two terms (cross_kd's S_I T_T^T also has xrd's partner) sits in one pair per partner:
    its logits are computed once per pair, and the gradients of the pairs add up. So does a student view with the
    targets of a teacher ensemble: one pair per teacher.
    """
    uses = spec.active_uses(weights, teachers)
    pairs: list[_Pair] = []
    home: dict[spec.View, tuple[int, int]] = {}  # view -> (pair index, 0 for P / 1 for Q) where its CE uses go
    placed: dict[spec.Use, tuple[int, int]] = {}  # KD use -> (pair index, side of its view)
    for use in (u for u in uses if u.target is not None):
        if use.view.masked != use.target.masked:
            raise RuntimeError(f"spec: KD view {use.view} and target {use.target} disagree on masking")
        for index, pair in enumerate(pairs):
            if (pair.p, pair.q) in ((use.view, use.target), (use.target, use.view)):
                placed[use] = (index, 0 if pair.p == use.view else 1)
                break
        else:
            placed[use] = (len(pairs), 0)
            home.setdefault(use.view, (len(pairs), 0))
            home.setdefault(use.target, (len(pairs), 1))
            pairs.append(_Pair(use.view, use.target))
    for use in uses:
        if use.target is None:
            if use.view not in home:
                home[use.view] = (len(pairs), 0)
                pairs.append(_Pair(use.view))
            index, side = home[use.view]
            slot = side  # ce_p / ce_q
        else:
            index, side = placed[use]
            slot = 2 + side  # kd_pq / kd_qp
        pairs[index].uses.append((slot, use))
    return pairs


@dataclass(frozen=True)
class _Plan:
    """Device tensors describing the active pairs, their uses, and how per-row losses combine into terms."""

    terms: tuple[str, ...]         # active row-softmax terms, reporting order
    table: torch.Tensor            # (n_pairs, PAIR_WIDTH) int32, columns _PAIR_COLUMNS
    weighted: torch.Tensor         # (n_pairs, NUM_USES) fp32: sum of weight * share of the uses in each slot
    unit: torch.Tensor             # (n_pairs, NUM_USES) fp32: weighted / norm, O(1) so fp16 gradient tiles do not
                                   # underflow
    norm: torch.Tensor             # (n_pairs,) fp32: largest |weighted| of each pair
    term_shares: torch.Tensor      # (n_terms, n_pairs * NUM_USES) fp32: share of each slot's mean in each term
    scale_index: torch.Tensor      # (n_pairs * PAIR_VIEWS,) int64: scale of P and Q, for the scale-gradient sum
    scales: tuple[str, ...]        # scale names in the order of the kernels' scale vector
    members: torch.Tensor          # (n_corrections, K, len(MEMBER_COLUMNS)) int32: average-after-softmax teachers
    correction_shares: torch.Tensor  # (n_terms, n_corrections) fp32: share of each correction's row mean per term
    correction_weighted: torch.Tensor  # (n_corrections,) fp32: weight * share of each correction in the total


@functools.lru_cache(maxsize=32)
def _plan(weight_items: tuple[tuple[str, float], ...], device: torch.device, teachers: int = 1,
          ensemble: str = spec.AVERAGE_AFTER_SOFTMAX) -> _Plan:
    """The pair plan of resolved weights (as sorted items, to be hashable) and ``teachers`` teachers on ``device``;
    cached per call site."""
    weights = dict(weight_items)
    pairs = _build_pairs(weights, teachers)
    slabs, scale_names = spec.ensemble_inputs(teachers), spec.ensemble_scales(teachers)
    terms = tuple(k for k in spec.active_terms(weights) if k not in ("fd", "gd"))
    table, weighted, shares, scale_index = [], [], {k: [] for k in terms}, []
    for pair in pairs:
        q = pair.q if pair.q is not None else pair.p  # stand-in indices; has_q = 0 keeps them unused
        flags = [0] * len(_USE_SLOTS)
        slot_weight = [0.0] * len(_USE_SLOTS)
        slot_share = {k: [0.0] * len(_USE_SLOTS) for k in terms}
        for slot, use in pair.uses:
            flags[slot] = 1
            slot_weight[slot] += weights[spec.TERM_WEIGHT[use.term]] * use.share
            slot_share[use.term][slot] += use.share
        scale_p, scale_q = scale_names.index(pair.p.scale), scale_names.index(q.scale)
        table.append([slabs.index(pair.p.anchor), slabs.index(pair.p.candidate), scale_p,
                      slabs.index(q.anchor), slabs.index(q.candidate), scale_q,
                      int(pair.q is not None), int(pair.p.masked), *flags])
        weighted.append(slot_weight)
        for k in terms:
            shares[k].extend(slot_share[k])
        scale_index += [scale_p, scale_q]
    weighted_t = torch.tensor(weighted, dtype=torch.float32).reshape(len(pairs), NUM_USES)
    norm = weighted_t.abs().amax(dim=1) if pairs else torch.zeros(0)
    # Average-after-softmax: each KD's teachers, read where the forward saved their lse (the target side of a pair).
    corrections = spec.ensemble_corrections(weights, teachers, ensemble)
    saved_at = {}  # view -> its row of the forward's lse, (n_pairs * PAIR_VIEWS, rows): the first pair holding it
    for index, pair in enumerate(pairs):
        for side, view in enumerate((pair.p, pair.q)):
            if view is not None:
                saved_at.setdefault(view, index * PAIR_VIEWS + side)
    members = [[[slabs.index(t.anchor), slabs.index(t.candidate), scale_names.index(t.scale), saved_at[t],
                 int(t.masked)] for t in correction.targets] for correction in corrections]
    return _Plan(
        terms=terms,
        table=torch.tensor(table, dtype=torch.int32, device=device).reshape(len(pairs), PAIR_WIDTH),
        weighted=weighted_t.to(device),
        unit=(weighted_t / norm[:, None]).to(device),
        norm=norm.to(device),
        term_shares=torch.tensor([shares[k] for k in terms], dtype=torch.float32, device=device),
        scale_index=torch.tensor(scale_index, dtype=torch.int64, device=device),
        scales=scale_names,
        members=torch.tensor(members, dtype=torch.int32, device=device).reshape(len(corrections), teachers,
                                                                                 len(MEMBER_COLUMNS)),
        correction_shares=torch.tensor([[c.share if c.term == k else 0.0 for c in corrections] for k in terms],
                                       dtype=torch.float32, device=device).reshape(len(terms), len(corrections)),
        correction_weighted=torch.tensor([weights[spec.TERM_WEIGHT[c.term]] * c.share for c in corrections],
                                         dtype=torch.float32, device=device),
    )


# ------------------------------------------------------------------------------------------------ host wrappers


def _relational_forward(emb: torch.Tensor, plan: _Plan, scales: torch.Tensor, row_start: int, n_rows: int,
                        tiles: Optional[BlockConfig]):
    """emb (slabs, N, D), scales fp32 -> lse (n_pairs, PAIR_VIEWS, rows), row_loss (n_pairs, NUM_USES, rows), fp32."""
    n_pairs, n_cols, width = plan.table.shape[0], emb.shape[1], emb.shape[2]
    cfg = block_config(width, emb.dtype, tiles)
    lse = torch.empty((n_pairs, PAIR_VIEWS, n_rows), dtype=torch.float32, device=emb.device)
    row_loss = torch.empty((n_pairs, NUM_USES, n_rows), dtype=torch.float32, device=emb.device)
    grid = (triton.cdiv(n_rows, cfg.block_m), n_pairs)
    _relational_fwd_kernel[grid](
        emb, plan.table, scales, lse, row_loss, n_cols, width, row_start, n_rows,
        num_warps=cfg.forward_warps, num_stages=cfg.num_stages, **kernel_options(cfg, emb.dtype),
    )
    return lse, row_loss


def _relational_backward(emb: torch.Tensor, plan: _Plan, coef: torch.Tensor, scales: torch.Tensor,
                         lse: torch.Tensor, row_start: int, n_rows: int, tiles: Optional[BlockConfig]):
    """-> grad of s_img/s_txt (2, N, D) fp32 and of the scales fp32; coef (n_pairs, COEF_WIDTH) as the kernel
    reads it."""
    n_pairs, n_cols, width = plan.table.shape[0], emb.shape[1], emb.shape[2]
    cfg = block_config(width, emb.dtype, tiles)
    options = dict(BLOCK_D=cfg.block_d, num_warps=cfg.backward_warps, num_stages=cfg.num_stages,
                   **kernel_options(cfg, emb.dtype))
    row_blocks, col_blocks = triton.cdiv(n_rows, cfg.block_m), triton.cdiv(n_cols, cfg.block_n)
    f32 = dict(dtype=torch.float32, device=emb.device)
    grads, partial_scales = [], torch.zeros(n_pairs * PAIR_VIEWS, **f32)
    for rows_pass, owned_blocks, owned_len, streamed_blocks, streamed_block in (
        (1, row_blocks, n_rows, col_blocks, cfg.block_n),
        (0, col_blocks, n_cols, row_blocks, cfg.block_m),
    ):
        # Each pass owns its output blocks and streams the other axis, split so the pass fills the GPU. The kernel
        # accumulates into its own rows (read-modify-write): start from zero, and so do the scale-gradient partial
        # sums of pairs a program skips.
        splits, split_len = stream_split(owned_blocks * STUDENT_SLABS, streamed_blocks, streamed_block,
                                         cfg.target_programs)
        grad = torch.zeros((splits, STUDENT_SLABS, owned_len, width), **f32)
        dscale = torch.zeros((owned_blocks * STUDENT_SLABS * splits, n_pairs * PAIR_VIEWS), **f32)
        _relational_bwd_kernel[(owned_blocks, STUDENT_SLABS, splits)](
            emb, plan.table, coef, scales, lse, grad, dscale, n_cols, width, row_start, n_rows, n_pairs, split_len,
            ROWS=rows_pass, **options)
        grads.append(grad.sum(0))
        partial_scales += dscale.sum(0)
    grad_rows, grad = grads
    grad[:, row_start:row_start + n_rows] += grad_rows
    grad_scales = torch.zeros(len(plan.scales), dtype=torch.float32, device=emb.device)
    grad_scales.index_add_(0, plan.scale_index, partial_scales)
    return grad, grad_scales


# ------------------------------------------------------------------------------------------------ autograd


class _RelationalLoss(torch.autograd.Function):
    """(plan, row_start, rows, tiles, scales (len(plan.scales),), s_img, s_txt, t_img, t_txt, t_img1, t_txt1, ...) ->
    total (0-dim) and the detached term values."""

    @staticmethod
    def forward(ctx, plan: _Plan, row_start: int, n_rows: int, tiles: Optional[BlockConfig], scales, *embeddings):
        emb = _stack(embeddings)
        lse, row_loss = _relational_forward(emb, plan, scales, row_start, n_rows, tiles)
        slot_mean = row_loss.sum(dim=2) / n_rows  # (n_pairs, NUM_USES): mean over the owned rows of each use
        terms = _shares_of(plan.term_shares, slot_mean.reshape(-1))
        total = (plan.weighted * slot_mean).sum()
        if plan.members.shape[0]:  # average-after-softmax: KD(A ; pbar) = mean_k KD(A ; G_k) - mean_i JSD_i
            cfg = block_config(emb.shape[2], emb.dtype, tiles)
            jsd = ensemble_jsd(emb, plan.members, scales, lse, row_start, n_rows, cfg, kernel_options(cfg, emb.dtype))
            jsd_mean = jsd.sum(dim=1) / n_rows  # (n_corrections,)
            terms = terms - _shares_of(plan.correction_shares, jsd_mean)
            total = total - (plan.correction_weighted * jsd_mean).sum()
        ctx.save_for_backward(emb, scales, lse)
        ctx.plan, ctx.row_start, ctx.n_rows, ctx.tiles = plan, row_start, n_rows, tiles
        students = len(spec.STUDENT_INPUTS)
        ctx.widths = [embedding.shape[1] for embedding in embeddings[:students]]
        ctx.n_teacher_inputs = len(embeddings) - students
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total, _grad_terms):
        spec.refuse_double_backward("triton", "whose backward kernels are not differentiable")
        emb, scales, lse = ctx.saved_tensors
        plan = ctx.plan
        # d total / d logits of a pair = gscale * (unit coefficients combination of P - onehot, P - P(target)).
        gscale = plan.norm * (grad_total.float() / ctx.n_rows)
        coef = torch.cat((plan.unit, gscale[:, None]), dim=1).contiguous()
        grad_emb, grad_scales = _relational_backward(emb, plan, coef, scales, lse, ctx.row_start, ctx.n_rows,
                                                     ctx.tiles)
        dtype = emb.dtype
        # the students' own widths: the columns past them are the zero padding of a wider teacher
        grads = [grad_emb[slab, :, :width].to(dtype) for slab, width in enumerate(ctx.widths)]
        return None, None, None, None, grad_scales, *grads, *([None] * ctx.n_teacher_inputs)


def _shares_of(shares: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(n_terms,) sums of share * mean over the entries each term has a share in: a term does not read the others'
    entries (0 * NaN would make a NaN teacher row spoil the student's own task value)."""
    return torch.where(shares != 0, shares * means, 0.0).sum(dim=1)


def _stack(embeddings) -> torch.Tensor:
    """One (slabs, N, D) tensor in the student dtype, D the widest input's: kernels address any input by its slab
    index. Narrower inputs (an ensemble's teachers of hrd and intra may differ from the student) are zero-padded,
    which leaves every product, and so every logit, as it was."""
    dtype = embeddings[0].dtype
    width = max(embedding.shape[1] for embedding in embeddings)
    if all(embedding.shape[1] == width for embedding in embeddings):
        return torch.stack([embedding.to(dtype) for embedding in embeddings])
    emb = embeddings[0].new_zeros((len(embeddings), embeddings[0].shape[0], width))
    for slab, embedding in enumerate(embeddings):
        emb[slab, :, :embedding.shape[1]] = embedding.detach()
    return emb


# ------------------------------------------------------------------------------------------------ backend entry


def triton_relational_loss(inputs, scales, weights, row_start, row_stop, group=None, teachers: int = 1,
                           ensemble: str = spec.AVERAGE_AFTER_SOFTMAX, tiles: Optional[BlockConfig] = None):
    """The row-softmax terms and gd of the objective with the fused Triton kernels (contract in kernels/README.md).

    inputs: spec.ensemble_inputs(teachers) -> (N, D) (teachers of hrd and intra alone may be (N, D_k)); scales:
    spec.ensemble_scales(teachers) -> 0-dim fp32; weights resolved. Returns (total, {term: detached 0-dim fp32}) for
    the active terms among task, icl, hrd, vrd, vrd_ce_img, vrd_ce_txt, xrd, intra, cross_kd, gd; anchors are rows
    [row_start, row_stop), columns all N. ``group`` (a torch.distributed process group or None) makes gd exact across
    the ranks of a local loss. With an ensemble, gd is the mean of one gd call per teacher. ``tiles``: the kernels'
    tile sizes (None: block_config's choice for the width and dtype)."""
    s_img = inputs["s_img"]
    if not s_img.is_cuda and not INTERPRETING:
        raise RuntimeError(
            "triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.triton_fused is imported "
            f"to run on {s_img.device} tensors; use backend='chunked' on CPU"
        )
    names = spec.ensemble_inputs(teachers)
    n_cols = s_img.shape[0]
    block_config(max(inputs[name].shape[1] for name in names), s_img.dtype, tiles)  # a clear error before any launch
    row_stop = n_cols if row_stop is None else row_stop
    n_rows = row_stop - row_start
    plan = _plan(tuple(sorted(weights.items())), s_img.device, teachers, ensemble)
    total = torch.zeros((), dtype=torch.float32, device=s_img.device)
    terms = {}
    if plan.terms:
        scale_vec = torch.stack([scales[name].reshape(()).float() for name in plan.scales])
        total, values = _RelationalLoss.apply(plan, row_start, n_rows, tiles, scale_vec,
                                              *(inputs[name] for name in names))
        terms = dict(zip(plan.terms, values.unbind(0)))
    if weights["gd"] != 0.0:
        values = []
        for k in range(teachers):
            image, text = spec.teacher_inputs(k)
            gd_scales = torch.stack([scales[name].reshape(()).float()
                                     for name in ("gd_student", spec.teacher_scales(k)[1])])
            values.append(GradientDistillation.apply(inputs["s_img"], inputs["s_txt"], inputs[image], inputs[text],
                                                     gd_scales, row_start, n_rows, group, tiles))
        gd = sum(values) / teachers
        total = total + weights["gd"] * gd
        terms["gd"] = gd.detach()
    return total, terms
