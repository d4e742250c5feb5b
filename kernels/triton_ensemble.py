"""The value term of a teacher ensemble averaged after the softmax, in one Triton kernel (kernels/README.md, "Teacher
ensembles").

For a student view A and the K teachers' target views G_k (each at its own teacher's scale), with p_k = softmax(G_k)
and pbar = mean_k p_k per anchor row,
    KD(A ; pbar) = mean_k KD(A ; G_k) - mean_i JSD_i,
    JSD_i = mean_k sum_j p_kj log p_kj - sum_j pbar_j log pbar_j,
and d KD(A ; pbar) / dA = P(A) - pbar = mean_k (P(A) - p_k). So the fused relational kernels compute everything that
has a gradient (each teacher's KD pair with share / K: its forward's per-row KLs and lse, its backward's row and
column passes, unchanged), and this kernel adds the one quantity they lack: JSD_i, teachers only, no gradient.

Kernel: ``_ensemble_jsd_kernel``, grid (row blocks, corrections). A program streams the column tiles of its rows;
per tile it recomputes every teacher's logit tile g_k, p_k = exp(g_k - lse_k) from the lse the relational forward
saved for that view (no pass of its own for them), and accumulates sum_j p_kj log p_kj and sum_j pbar_j log pbar_j.
The teachers are slabs of the relational kernels' stacked embeddings, read through a table (slab indices, scale,
lse row), so K is a runtime value. Cost: K teacher logit tiles per tile, forward only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tiles import logit_tile, on_positive, slab_rows

# Member table columns (int32), per teacher of a correction: anchor slab, candidate slab, scale index, the row of the
# relational forward's saved lse (pair * PAIR_VIEWS + side), masked (intra's self pair excluded).
MEMBER_COLUMNS = ("anchor", "candidate", "scale", "lse_row", "masked")
MEMBER_WIDTH = tl.constexpr(len(MEMBER_COLUMNS))
# Widest column tile of this pass. A tile holds the running sum of the teachers' probabilities across their loop next
# to each teacher's logits and probabilities: the half dtypes' 64-column tiles at 8 warps were held to 128 registers by
# ptxas on sm_80 and spilled 8 bytes; 32 columns compile without spills (at most 120 registers, sm_80 and sm_90).
MAX_BLOCK_N = 32


def block_n(cfg) -> int:
    """The column tile of this pass for the relational kernels' tile config ``cfg`` (rows and width chunks alike)."""
    return min(cfg.block_n, MAX_BLOCK_N)


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "n_teachers"])
def _ensemble_jsd_kernel(
    emb_ptr,     # (slabs, N, D) stacked students and teachers (student dtype, zero-padded to the widest D)
    member_ptr,  # (n_corrections, K, MEMBER_WIDTH) int32 member table
    scale_ptr,   # fp32 scales of the relational plan, in its order
    lse_ptr,     # (n_pairs * PAIR_VIEWS, rows) fp32: the relational forward's lse of every pair view
    jsd_ptr,     # out (n_corrections, rows) fp32: JSD_i of each correction's teachers per anchor row
    n_cols, width, row_start, n_rows, n_teachers,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    correction = tl.program_id(1)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)  # anchor rows within [0, rows)
    row_ok = local < n_rows
    row0 = row_start + block * BLOCK_M  # slab row of the first anchor = its positive column
    table = member_ptr + correction * n_teachers * MEMBER_WIDTH
    masked = tl.load(table + 4)  # alike for every member of a correction
    own = tl.zeros((BLOCK_M,), tl.float32)  # sum_k sum_j p_kj log p_kj
    mix = tl.zeros((BLOCK_M,), tl.float32)  # sum_j pbar_j log pbar_j
    for col0 in range(0, n_cols, BLOCK_N):
        col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
        pbar = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # sum_k p_k, then its mean
        for k in range(n_teachers):
            member = table + k * MEMBER_WIDTH
            # s_k T_a T_c^T, (BLOCK_M, BLOCK_N) fp32
            g = logit_tile(slab_rows(emb_ptr, tl.load(member), row0, n_cols, width),
                           slab_rows(emb_ptr, tl.load(member + 1), col0, n_cols, width),
                           row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
            g = g * tl.load(scale_ptr + tl.load(member + 2))
            lse = tl.load(lse_ptr + tl.load(member + 3).to(tl.int64) * n_rows + local, mask=row_ok, other=0.0)
            # Padding rows and columns, and a masked view's self pair, have p_k = 0 for every teacher (the mask is
            # formed after the dot: one tile fewer alive through it).
            valid = row_ok[:, None] & col_ok[None, :] & ~((masked != 0) & on_positive(row0, col0, BLOCK_M, BLOCK_N))
            log_p = g - lse[:, None]  # log p_k, finite off the valid entries too
            p = tl.where(valid, tl.exp(log_p), 0.0)
            own += tl.sum(tl.where(valid, p * log_p, 0.0), axis=1)
            pbar += p
        pbar = pbar / n_teachers
        # 0 log 0 = 0; a NaN stays a NaN (NaN == 0 is false)
        mix += tl.sum(tl.where(pbar == 0.0, 0.0, pbar * tl.log(pbar)), axis=1)
    tl.store(jsd_ptr + correction * n_rows + local, own / n_teachers - mix, mask=row_ok)


def ensemble_jsd(emb: torch.Tensor, members: torch.Tensor, scales: torch.Tensor, lse: torch.Tensor, row_start: int,
                 n_rows: int, cfg, options: dict) -> torch.Tensor:
    """JSD_i of every correction, (n_corrections, rows) fp32; members (n_corrections, K, MEMBER_WIDTH) int32, lse
    the relational forward's (n_pairs, PAIR_VIEWS, rows); ``options``: the kernels' constexprs (kernel_options), the
    column tile narrowed to ``block_n(cfg)``."""
    n_corrections, n_teachers = members.shape[0], members.shape[1]
    jsd = torch.empty((n_corrections, n_rows), dtype=torch.float32, device=emb.device)
    _ensemble_jsd_kernel[(triton.cdiv(n_rows, cfg.block_m), n_corrections)](
        emb, members, scales, lse, jsd, emb.shape[1], emb.shape[2], row_start, n_rows, n_teachers,
        num_warps=cfg.forward_warps, num_stages=cfg.num_stages, **{**options, "BLOCK_N": block_n(cfg)})
    return jsd
