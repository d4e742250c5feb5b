"""Gradient distillation (gd) in fused Triton kernels, never holding a rows x N matrix (kernels/README.md).

Per direction (image anchors X = S_I with candidates Y = S_T, and text anchors) and side (student S, scale
gd_student; teacher T, scale gd_teacher), with R = P(s X Y^T) - I_pos and B the anchor rows (over the whole process
group under ``group``):
    gX = s R Y / B (rows x D),  gY = s R^T X / B (N x D),
    gd = sum over directions of 1/2 [ mean (gX_S - gX_T)^2 + mean (gY_S - gY_T)^2 ].

Kernels, each streaming one axis of the rows x N logits tile by tile:
- ``_gd_lse_kernel``, grid (row blocks, 4 views): the row log-sum-exps of the four views (2 sides x 2 directions).
- ``_gd_products_kernel``, one body for both passes: ROWS = 1 owns a row block and streams the columns to add
  R Y / B to its rows; ROWS = 0 owns a column block and streams the rows to add R^T X / B. No atomics: each program
  writes its own rows of its own split slab.
- backward (student side only): with EX = d loss / d gX and EY = d loss / d gY (O(rows D) and O(N D), on the host),
  H = (s / B)(EX Y^T + X EY^T) is d loss / d R; softmax backward gives dA = P * (H - rowsum(P * H)).
  ``_gd_delta_kernel`` streams the columns for rowsum(P * H); ``_gd_backward_kernel`` (ROWS = 1 / 0) adds
  s dA Y + (s / B) R EY to the anchor rows, and s dA^T X + (s / B) R^T EX to the candidate rows, plus the
  scale-gradient partial sums of dA * (X Y^T).
Under a process group the R^T X sums are all-reduced in the forward, and the part of the gradient through them is
scaled in backward by the sum of every rank's upstream gradient (the all-reduce's backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import spec
from .triton_config import BlockConfig, block_config, stream_split
from .triton_tiles import (
    STUDENT_SLABS,
    add_tile_product,
    kernel_options,
    logit_tile,
    on_positive,
    online_softmax_step,
    slab_rows,
    stream_range,
    tile_axes,
)

# Views: index side * 2 + direction; side 0 = student (slabs 0, 1; scale gd_student), 1 = teacher (slabs 2, 3).
GD_VIEWS = tl.constexpr(4)
# Per-direction backward coefficients (see _gd_backward_coefficients): H = cx EX_u Y^T + cy X EY_u^T in units of u.
GD_COEFS = tl.constexpr(3)


@triton.jit
def _gd_view(view):
    """(anchor slab, candidate slab, side) of gd view ``view``."""
    direction = view % 2
    side = view // 2
    return 2 * side + direction, 2 * side + 1 - direction, side


@triton.jit
def _residual_tile(x_ptr, y_ptr, scale, lse, row0, col0, row_ok, col_ok, width,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed tile from the saved lse: raw logits X Y^T, P = softmax(scale X Y^T) and R = P - onehot(pos), all
    (BLOCK_M, BLOCK_N) fp32 and zero outside valid rows and columns."""
    z = logit_tile(x_ptr, y_ptr, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    valid = row_ok[:, None] & col_ok[None, :]
    prob = tl.exp(tl.where(valid, scale * z, float("-inf")) - lse[:, None])
    return z, prob, prob - tl.where(valid & on_positive(row0, col0, BLOCK_M, BLOCK_N), 1.0, 0.0)


@triton.jit
def _upstream_tile(ex_ptr, x_ptr, y_ptr, ey_ptr, cx, cy, row_ok, col_ok, width,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """H = cx EX Y^T + cy X EY^T, (BLOCK_M, BLOCK_N) fp32: d loss / d R in the direction's unit."""
    return (cx * logit_tile(ex_ptr, y_ptr, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
            + cy * logit_tile(x_ptr, ey_ptr, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION))


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows"])
def _gd_lse_kernel(
    emb_ptr,    # (4, N, D) stacked s_img, s_txt, t_img, t_txt
    scale_ptr,  # (2,) fp32: gd_student, gd_teacher
    lse_ptr,    # out (4 views, rows) fp32
    n_cols, width, row_start, n_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    view = tl.program_id(1)
    anchor, candidate, side = _gd_view(view)
    scale = tl.load(scale_ptr + side)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < n_rows
    x = slab_rows(emb_ptr, anchor, row_start + block * BLOCK_M, n_cols, width)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    exp_sum = tl.zeros((BLOCK_M,), tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
        z = logit_tile(x, slab_rows(emb_ptr, candidate, col0, n_cols, width), row_ok, col_ok, width,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        m, exp_sum, _, _ = online_softmax_step(m, exp_sum, tl.where(col_ok[None, :], scale * z, float("-inf")))
    tl.store(lse_ptr + view * n_rows + local, m + tl.log(exp_sum), mask=row_ok)


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "split_len"])
def _gd_products_kernel(
    emb_ptr,    # (4, N, D) stacked embeddings
    scale_ptr,  # (2,) fp32: gd_student, gd_teacher
    lse_ptr,    # (4 views, rows) fp32
    out_ptr,    # in/out (splits, 4 views, rows (ROWS) or N, D) fp32, zero-filled: R Y / B, or R^T X / B
    inv_rows,   # 1 / B
    n_cols, width, row_start, n_rows, split_len,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    view = tl.program_id(1)
    split = tl.program_id(2)
    anchor, candidate, side = _gd_view(view)
    scale = tl.load(scale_ptr + side)
    owned0, begin, end = stream_range(block, split, split_len, n_rows, n_cols, ROWS, BLOCK_M, BLOCK_N)
    owned_len = n_rows * ROWS + n_cols * (1 - ROWS)
    out = out_ptr + ((split.to(tl.int64) * GD_VIEWS + view) * owned_len + owned0) * width
    for streamed0 in range(begin, end, BLOCK_N * ROWS + BLOCK_M * (1 - ROWS)):
        local, row_ok, row0, col0, col_ok = tile_axes(owned0, streamed0, row_start, n_rows, n_cols, ROWS,
                                                      BLOCK_M, BLOCK_N)
        lse = tl.load(lse_ptr + view * n_rows + local, mask=row_ok, other=0.0)
        x = slab_rows(emb_ptr, anchor, row0, n_cols, width)
        y = slab_rows(emb_ptr, candidate, col0, n_cols, width)
        _, _, residual = _residual_tile(x, y, scale, lse, row0, col0, row_ok, col_ok, width,
                                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        add_tile_product(out, residual, x, y, inv_rows, row_ok, col_ok, width, ROWS,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows"])
def _gd_delta_kernel(
    emb_ptr,    # (4, N, D) stacked embeddings
    scale_ptr,  # (2,) fp32: gd_student, gd_teacher
    lse_ptr,    # (4 views, rows) fp32: the student views are 0 and 1
    ex_ptr,     # (2, rows, D) EX per direction, in units (embedding dtype)
    ey_ptr,     # (2, N, D) EY per direction, in units
    coef_ptr,   # (2, GD_COEFS) fp32: cx, cy, unit per direction
    delta_ptr,  # out (2, rows) fp32: rowsum(P * H) per direction
    n_cols, width, row_start, n_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    direction = tl.program_id(1)
    scale = tl.load(scale_ptr)
    cx = tl.load(coef_ptr + direction * GD_COEFS)
    cy = tl.load(coef_ptr + direction * GD_COEFS + 1)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < n_rows
    row0 = row_start + block * BLOCK_M
    lse = tl.load(lse_ptr + direction * n_rows + local, mask=row_ok, other=0.0)
    x = slab_rows(emb_ptr, direction, row0, n_cols, width)
    ex = slab_rows(ex_ptr, direction, block * BLOCK_M, n_rows, width)
    delta = tl.zeros((BLOCK_M,), tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
        y = slab_rows(emb_ptr, 1 - direction, col0, n_cols, width)
        _, prob, _ = _residual_tile(x, y, scale, lse, row0, col0, row_ok, col_ok, width,
                                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        upstream = _upstream_tile(ex, x, y, slab_rows(ey_ptr, direction, col0, n_cols, width), cx, cy, row_ok,
                                  col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        delta += tl.sum(prob * upstream, axis=1)
    tl.store(delta_ptr + direction * n_rows + local, delta, mask=row_ok)


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "split_len"])
def _gd_backward_kernel(
    emb_ptr,     # (4, N, D) stacked embeddings
    scale_ptr,   # (2,) fp32: gd_student, gd_teacher
    lse_ptr,     # (4 views, rows) fp32
    ex_ptr,      # (2, rows, D) EX in units
    ey_ptr,      # (2, N, D) EY in units
    coef_ptr,    # (2, GD_COEFS) fp32
    delta_ptr,   # (2, rows) fp32 from _gd_delta_kernel
    grad_ptr,    # in/out (splits, 2, rows (ROWS) or N, D) fp32, zero-filled: gradient of the anchor / candidate
    dscale_ptr,  # out (row blocks, 2, splits) fp32: partial sums of dA * (X Y^T) (row pass only)
    n_cols, width, row_start, n_rows, split_len,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    direction = tl.program_id(1)  # student anchor slab; the candidate slab is the other one
    split = tl.program_id(2)
    scale = tl.load(scale_ptr)
    coef = coef_ptr + direction * GD_COEFS
    cx, cy, unit = tl.load(coef), tl.load(coef + 1), tl.load(coef + 2)
    # The R product: anchor rows get (s / B) R EY, candidate rows (s / B) R^T EX.
    residual_factor = unit * (cy * ROWS + cx * (1 - ROWS))
    owned0, begin, end = stream_range(block, split, split_len, n_rows, n_cols, ROWS, BLOCK_M, BLOCK_N)
    owned_len = n_rows * ROWS + n_cols * (1 - ROWS)
    out = grad_ptr + ((split.to(tl.int64) * STUDENT_SLABS + direction) * owned_len + owned0) * width
    ds = tl.zeros((BLOCK_M,), tl.float32)
    for streamed0 in range(begin, end, BLOCK_N * ROWS + BLOCK_M * (1 - ROWS)):
        local, row_ok, row0, col0, col_ok = tile_axes(owned0, streamed0, row_start, n_rows, n_cols, ROWS,
                                                      BLOCK_M, BLOCK_N)
        lse = tl.load(lse_ptr + direction * n_rows + local, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + direction * n_rows + local, mask=row_ok, other=0.0)
        x = slab_rows(emb_ptr, direction, row0, n_cols, width)
        y = slab_rows(emb_ptr, 1 - direction, col0, n_cols, width)
        ex = slab_rows(ex_ptr, direction, row0 - row_start, n_rows, width)
        ey = slab_rows(ey_ptr, direction, col0, n_cols, width)
        z, prob, residual = _residual_tile(x, y, scale, lse, row0, col0, row_ok, col_ok, width,
                                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        upstream = _upstream_tile(ex, x, y, ey, cx, cy, row_ok, col_ok, width,
                                  BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        grad_logits = prob * (upstream - delta[:, None])  # softmax backward, in units
        ds += tl.sum(grad_logits * z, axis=1)
        add_tile_product(out, grad_logits, x, y, unit * scale, row_ok, col_ok, width, ROWS,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
        add_tile_product(out, residual, ex, ey, residual_factor, row_ok, col_ok, width, ROWS,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
    if ROWS:  # every (row, column) entry is in exactly one row-pass program: the scale gradient is summed here
        program = (block * STUDENT_SLABS + direction) * tl.num_programs(2) + split
        tl.store(dscale_ptr + program, unit * tl.sum(ds, axis=0))


# ------------------------------------------------------------------------------------------------ host wrappers


def _launch_passes(kernel, emb, n_rows: int, views: int, make_args, tiles: Optional[BlockConfig]):
    """Launch ``kernel`` as a row pass and a column pass, each split over its streamed axis to fill the GPU.

    make_args(ROWS, out) -> positional arguments before split_len; returns the two outputs summed over splits,
    (views, rows, D) and (views, N, D) fp32, and the row pass's scale partial sums."""
    cfg = block_config(emb.shape[2], emb.dtype, tiles)
    n_cols, width = emb.shape[1], emb.shape[2]
    row_blocks, col_blocks = triton.cdiv(n_rows, cfg.block_m), triton.cdiv(n_cols, cfg.block_n)
    results = []
    for rows_pass, owned_blocks, owned_len, streamed_blocks, streamed_block in (
        (1, row_blocks, n_rows, col_blocks, cfg.block_n),
        (0, col_blocks, n_cols, row_blocks, cfg.block_m),
    ):
        splits, split_len = stream_split(owned_blocks * views, streamed_blocks, streamed_block,
                                         cfg.target_programs)
        out = torch.zeros((splits, views, owned_len, width), dtype=torch.float32, device=emb.device)
        dscale = torch.zeros(owned_blocks * views * splits, dtype=torch.float32, device=emb.device)
        kernel[(owned_blocks, views, splits)](
            *make_args(out, dscale), split_len, ROWS=rows_pass, BLOCK_D=cfg.block_d,
            num_warps=cfg.backward_warps, num_stages=cfg.num_stages, **kernel_options(cfg, emb.dtype))
        results.append((out.sum(0), dscale.sum()))
    (rows_out, dscale), (cols_out, _) = results
    return rows_out, cols_out, dscale


def _gd_forward(emb, scales, row_start: int, n_rows: int, total_rows: int, tiles: Optional[BlockConfig]):
    """emb (4, N, D), scales (2,) -> lse (4, rows), R Y / B (4, rows, D), R^T X / B (4, N, D); fp32, views
    side * 2 + direction; R^T X sums only this program's anchor rows."""
    n_cols, width = emb.shape[1], emb.shape[2]
    cfg = block_config(width, emb.dtype, tiles)
    lse = torch.empty((GD_VIEWS, n_rows), dtype=torch.float32, device=emb.device)
    _gd_lse_kernel[(triton.cdiv(n_rows, cfg.block_m), GD_VIEWS)](
        emb, scales, lse, n_cols, width, row_start, n_rows,
        num_warps=cfg.forward_warps, num_stages=cfg.num_stages, **kernel_options(cfg, emb.dtype))
    rows_out, cols_out, _ = _launch_passes(
        _gd_products_kernel, emb, n_rows, GD_VIEWS,
        lambda out, _dscale: (emb, scales, lse, out, 1.0 / total_rows, n_cols, width, row_start, n_rows), tiles)
    return lse, rows_out, cols_out


def _units(tensor: torch.Tensor, dtype: torch.dtype):
    """(tensor / max |tensor|) in ``dtype`` and that max (1 where all zero): O(1) operands, so a small fp16
    gradient does not underflow."""
    norm = tensor.abs().amax(dim=(1, 2))
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return (tensor / norm[:, None, None]).to(dtype).contiguous(), norm


def _gd_backward(emb, scales, lse, upstream_x, upstream_y, row_start: int, n_rows: int, total_rows: int,
                 tiles: Optional[BlockConfig]):
    """EX (2, rows, D), EY (2, N, D) fp32 -> gradient of the student slabs (2, N, D) fp32 and the part of d loss /
    d gd_student that goes through the softmax."""
    n_cols, width = emb.shape[1], emb.shape[2]
    cfg = block_config(width, emb.dtype, tiles)
    ex, ex_norm = _units(upstream_x, emb.dtype)
    ey, ey_norm = _units(upstream_y, emb.dtype)
    # H = (s / B)(EX Y^T + X EY^T) = unit (cx EX_u Y^T + cy X EY_u^T), unit the larger factor so both are <= 1.
    factors = torch.stack((ex_norm, ey_norm), dim=1) * (scales[0] / total_rows)  # (2 directions, 2)
    unit = factors.amax(dim=1)
    unit = torch.where(unit == 0, torch.ones_like(unit), unit)
    coef = torch.cat((factors / unit[:, None], unit[:, None]), dim=1).contiguous()  # (2, GD_COEFS)
    delta = torch.empty((STUDENT_SLABS, n_rows), dtype=torch.float32, device=emb.device)
    options = kernel_options(cfg, emb.dtype)
    _gd_delta_kernel[(triton.cdiv(n_rows, cfg.block_m), STUDENT_SLABS)](
        emb, scales, lse, ex, ey, coef, delta, n_cols, width, row_start, n_rows,
        num_warps=cfg.backward_warps, num_stages=cfg.num_stages, **options)
    rows_out, cols_out, dscale = _launch_passes(
        _gd_backward_kernel, emb, n_rows, STUDENT_SLABS,
        lambda out, ds: (emb, scales, lse, ex, ey, coef, delta, out, ds, n_cols, width, row_start, n_rows), tiles)
    grad = cols_out.flip(0)  # direction d's candidates are slab 1 - d
    grad[:, row_start:row_start + n_rows] += rows_out
    return grad, dscale


class GradientDistillation(torch.autograd.Function):
    """(s_img, s_txt, t_img, t_txt, scales (2,) = gd_student, gd_teacher, row_start, rows, group, tiles) -> gd
    (0-dim fp32); the teacher side and gd_teacher get no gradient."""

    @staticmethod
    def forward(ctx, s_img, s_txt, t_img, t_txt, scales, row_start: int, n_rows: int, group,
                tiles: Optional[BlockConfig]):
        emb = torch.stack((s_img, s_txt, t_img.to(s_img.dtype), t_txt.to(s_img.dtype)))
        total_rows = n_rows
        if group is not None:
            import torch.distributed as dist  # optional: only under a process group

            count = torch.tensor([n_rows], dtype=torch.int64, device=emb.device)
            dist.all_reduce(count, group=group)
            total_rows = int(count.item())
        lse, row_products, col_products = _gd_forward(emb, scales, row_start, n_rows, total_rows, tiles)
        if group is not None:  # gY sums over every rank's anchors
            dist.all_reduce(col_products, group=group)
        student, teacher = scales[0], scales[1]
        diff_x = student * row_products[:2] - teacher * row_products[2:]  # (2 directions, rows, D): gX_S - gX_T
        diff_y = student * col_products[:2] - teacher * col_products[2:]  # (2 directions, N, D): gY_S - gY_T
        value = 0.5 * (diff_x.pow(2).mean(dim=(1, 2)) + diff_y.pow(2).mean(dim=(1, 2))).sum()
        ctx.save_for_backward(emb, scales, lse, row_products[:2], col_products[:2], diff_x, diff_y)
        ctx.row_start, ctx.n_rows, ctx.total_rows, ctx.group, ctx.tiles = row_start, n_rows, total_rows, group, tiles
        return value

    @staticmethod
    def backward(ctx, grad_value):
        spec.refuse_double_backward("triton", "whose backward kernels are not differentiable")
        emb, scales, lse, row_products, col_products, diff_x, diff_y = ctx.saved_tensors
        own = grad_value.float()
        everyone = own
        if ctx.group is not None:  # the all-reduce's backward: the gY part takes every rank's upstream gradient
            import torch.distributed as dist

            everyone = own.detach().clone().reshape(1)
            dist.all_reduce(everyone, group=ctx.group)
            everyone = everyone.reshape(())
        n_cols, width = emb.shape[1], emb.shape[2]
        loss_x = diff_x / (ctx.n_rows * width)  # d gd / d gX_S
        loss_y = diff_y / (n_cols * width)      # d gd / d gY_S
        # gX = s R Y / B, gY = s R^T X / B: the explicit dependence on s, this rank's own
        explicit = own * ((loss_x * row_products).sum() + (loss_y * col_products).sum())
        grad, through_softmax = _gd_backward(emb, scales, lse, loss_x * own, loss_y * everyone, ctx.row_start,
                                             ctx.n_rows, ctx.total_rows, ctx.tiles)
        grad_scales = torch.stack((explicit + through_softmax, torch.zeros_like(explicit)))
        dtype = emb.dtype
        return grad[0].to(dtype), grad[1].to(dtype), None, None, grad_scales, None, None, None, None
