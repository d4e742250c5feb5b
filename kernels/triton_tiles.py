"""Tile-level Triton helpers shared by the fused relational kernels and the gradient-distillation kernels.

A *tile* is BLOCK_M anchor rows against BLOCK_N candidate columns of one logit view. The backward passes (and gd's
product passes) own either a block of rows and stream the columns (ROWS = 1), or own a block of columns and stream
the rows (ROWS = 0); ``_tile_axes`` and ``_add_tile_product`` give one body for both directions.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once: Triton decides at import time whether @triton.jit kernels run on the interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Stacked embedding order: slab k of the (slabs, N, D) tensor is spec.ensemble_inputs(K)[k]; slabs 0 and 1 (students)
# take gradients.
STUDENT_SLABS = tl.constexpr(2)


def kernel_options(cfg, dtype: torch.dtype) -> dict:
    """Constexprs shared by every kernel: tile sizes and how tl.dot treats this dtype."""
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        # The Triton 3.x interpreter returns garbage from tl.dot on bf16 operands: upcast them there only.
        DOT_FP32=INTERPRETING and dtype == torch.bfloat16,
        # fp32 inputs: 3-pass TF32 keeps fp32 accuracy on tensor cores (plain TF32 loses 3 digits of the logits).
        PRECISION="tf32x3" if dtype == torch.float32 else "ieee",
    )


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_FP32 upcasts bf16 operands (Triton 3.x interpreter bf16 dot bug)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def slab_rows(emb_ptr, slab, first_row, n_cols, width):
    """Scalar pointer to row ``first_row`` of slab ``slab`` of a (slabs, N, D) tensor; int64 so slabs N D may
    exceed 2^31, while offsets inside a tile (< BLOCK x D) stay int32."""
    return emb_ptr + (slab.to(tl.int64) * n_cols + first_row) * width


@triton.jit
def logit_tile(x_ptr, y_ptr, row_ok, col_ok, width,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Unscaled logits X @ Y^T, (BLOCK_M, BLOCK_N) fp32, for the BLOCK_M rows at x_ptr and BLOCK_N rows at y_ptr.

    D is walked in BLOCK_K chunks, so any width fits the same registers. X and Y share one dtype."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < width
        x = tl.load(x_ptr + r[:, None] * width + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y_t = tl.load(y_ptr + c[None, :] * width + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += dot(x, y_t, DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N)
    return acc


@triton.jit
def positive_logit(x_ptr, y_ptr, row_ok, width, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unscaled <x_i, y_i> for the BLOCK_M rows at x_ptr and at y_ptr (row i's positive column), (BLOCK_M,) fp32."""
    r = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (k < width)[None, :]
        x = tl.load(x_ptr + r[:, None] * width + k[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r[:, None] * width + k[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)
    return acc


@triton.jit
def on_positive(row0, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the positive pair: tile entry (i, j) is slab row row0 + i against column col0 + j."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    return (c[None, :] - r[:, None]) == (row0 - col0)


@triton.jit
def online_softmax_step(m, total, logits):
    """One column tile of an online log-sum-exp: (running max m, running sum of e^(logit - m)) -> (new max, new
    sum, rescale of the old sums, e^(logits - new max)); logits (BLOCK_M, BLOCK_N) fp32, -inf where excluded."""
    m_new = tl.maximum(m, tl.max(logits, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(logits - m_new[:, None])
    return m_new, total * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def tile_axes(owned0, streamed0, row_start, n_rows, n_cols, ROWS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Coordinates of the tile at (owned block start, streamed position): ROWS = 1 owns rows and streams columns,
    ROWS = 0 owns columns and streams rows. Returns local anchor rows (BLOCK_M,) in [0, rows), their mask, the
    slab row of the first anchor (= its positive column), the first column and the column mask (BLOCK_N,)."""
    if ROWS:
        first_local = owned0
        col0 = streamed0
    else:
        first_local = streamed0
        col0 = owned0
    local = first_local + tl.arange(0, BLOCK_M)
    col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
    return local, local < n_rows, row_start + first_local, col0, col_ok


@triton.jit
def stream_range(block, split, split_len, n_rows, n_cols, ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first owned index, streamed begin, streamed end) of program (block, split): a row pass owns rows
    [block BLOCK_M, ...) and streams columns, a column pass owns columns and streams the owned rows."""
    begin = split * split_len
    if ROWS:
        owned0 = block * BLOCK_M
        end = tl.minimum(begin + split_len, n_cols)
    else:
        owned0 = block * BLOCK_N
        end = tl.minimum(begin + split_len, n_rows)
    return owned0, begin, end


@triton.jit
def add_product(out_ptr, grad_logits, operand_ptr, factor, out_ok, operand_ok, width,
                OUT_ROWS: tl.constexpr, INNER: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out[:, :D] += factor * grad_logits @ operand[:, :D], D walked in BLOCK_D chunks (one tile, any width).

    out_ptr: OUT_ROWS fp32 rows of width D owned by this program alone (read-modify-write without atomics);
    grad_logits: (OUT_ROWS, INNER) fp32; operand_ptr: INNER rows of width D; out_ok / operand_ok mask rows."""
    o = tl.arange(0, OUT_ROWS)
    i = tl.arange(0, INNER)
    a = grad_logits.to(operand_ptr.dtype.element_ty)  # tensor-core operand in the operand's dtype
    for d0 in range(0, width, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < width
        operand = tl.load(operand_ptr + i[:, None] * width + dims[None, :],
                          mask=operand_ok[:, None] & dim_ok[None, :], other=0.0)  # (INNER, BLOCK_D)
        out = out_ptr + o[:, None] * width + dims[None, :]
        out_mask = out_ok[:, None] & dim_ok[None, :]
        partial = tl.load(out, mask=out_mask, other=0.0)  # (OUT_ROWS, BLOCK_D) fp32
        tl.store(out, partial + factor * dot(a, operand, DOT_FP32, PRECISION), mask=out_mask)
    # The next call re-reads these rows, possibly on other threads: order the stores before those loads.
    tl.debug_barrier()


@triton.jit
def add_tile_product(out_ptr, tile, x_ptr, y_ptr, factor, row_ok, col_ok, width, ROWS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """The owned side's product of a (BLOCK_M, BLOCK_N) tile: rows out += factor * tile @ Y[cols] (ROWS = 1), or
    columns out += factor * tile^T @ X[rows] (ROWS = 0); x_ptr / y_ptr: the tile's BLOCK_M / BLOCK_N operand rows."""
    if ROWS:
        add_product(out_ptr, tile, y_ptr, factor, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_D,
                    DOT_FP32, PRECISION)
    else:
        add_product(out_ptr, tl.trans(tile), x_ptr, factor, col_ok, row_ok, width, BLOCK_N, BLOCK_M, BLOCK_D,
                    DOT_FP32, PRECISION)
