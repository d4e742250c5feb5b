"""The sigmoid terms (siglip, sigmoid_kd) in fused Triton kernels, never holding a rows x N matrix (kernels/README.md).

Student logits z = s S_I[rows] S_T^T + b (image anchors against every text), labels y = +1 on each row's own pair
and -1 elsewhere, and sigmoid_kd's soft labels from K teachers of widths D_k,
    G = 2 mean_k sigmoid(s_k T_I^k[rows] (T_T^k)^T + b_k) - 1,
    siglip = sum_ij softplus(-y z) / rows,  sigmoid_kd = sum_ij softplus(-G z) / rows,
    d total / dz = -(w_siglip y sigmoid(-y z) + w_kd G sigmoid(-G z)) / rows.
Both terms are elementwise in the logits: no row statistic links the tiles, so the forward needs no online rescaling
and the backward no saved state beyond the inputs.

Kernels:
- ``_sigmoid_fwd_kernel``, grid (row blocks,): each program streams the column tiles of its rows; per tile one
  student logit tile and one logit tile per teacher (its own width, read through the teacher table) feed both
  terms, summed into per-row losses that the host averages.
- ``_sigmoid_bwd_kernel``, one body for two passes (constexpr ROWS, as in triton_fused.py): the row pass owns image
  rows and streams the columns, dS_I[rows] += s dz @ S_T, plus the partial sums of dz * (S_I S_T^T) and of dz for
  the scale and bias gradients; the column pass owns text rows and streams the anchor rows, dS_T[cols] += s dz^T @ S_I.
  Each pass recomputes its tiles (student and teachers) and adds to fp32 gradient rows it alone owns, without
  atomics; a pass with few owned blocks splits its streamed axis, one fp32 slab per split, summed on the host.
dz is formed in units of the larger weight (coefficients in [-1, 1]), so an fp16 gradient tile does not underflow
at large batches (dz ~ 1 / rows); the unit comes back as a factor of the product.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import spec
from .triton_config import BlockConfig, block_config, stream_split
from .triton_tiles import (
    INTERPRETING,
    add_tile_product,
    kernel_options,
    logit_tile,
    on_positive,
    stream_range,
    tile_axes,
)

# Teacher table columns (int64): element offsets of T_I^k and T_T^k in the packed teacher buffer, and the width D_k.
TEACHER_COLUMNS = tl.constexpr(3)
# Per-row loss slots and the backward coefficients: siglip, sigmoid_kd; then the unit of dz.
SIGMOID_SLOTS = tl.constexpr(2)


@triton.jit
def _softplus(x):
    """log(1 + e^x) elementwise, fp32, without overflow: max(x, 0) + log1p(e^-|x|), log1p by Kahan's rescaling
    (exact where e^-|x| is below fp32 epsilon; log(1 + u) alone loses every digit there). NaN stays NaN."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _row(ptr, first_row, width):
    """Pointer to row ``first_row`` of an (N, width) matrix at ``ptr``; int64, so N D may exceed 2^31."""
    return ptr + tl.cast(first_row, tl.int64) * width


@triton.jit
def _soft_labels(teacher_ptr, table_ptr, teacher_scale_ptr, n_teachers, row0, col0, row_ok, col_ok,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """G = 2 mean_k sigmoid(s_k T_I^k T_T^k^T + b_k) - 1 of the tile at slab row row0, column col0, (BLOCK_M,
    BLOCK_N) fp32; teacher k's rows are read at its own width from the packed buffer."""
    probability = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(n_teachers):
        row = table_ptr + k * TEACHER_COLUMNS
        image_offset = tl.load(row)
        text_offset = tl.load(row + 1)
        width = tl.load(row + 2).to(tl.int32)
        scale = tl.load(teacher_scale_ptr + 2 * k)
        bias = tl.load(teacher_scale_ptr + 2 * k + 1)
        x = _row(teacher_ptr + image_offset, row0, width)
        y = _row(teacher_ptr + text_offset, col0, width)
        t_raw = logit_tile(x, y, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        probability += tl.sigmoid(scale * t_raw + bias)
    return 2.0 * probability / n_teachers - 1.0


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "siglip", "n_teachers"])
def _sigmoid_fwd_kernel(
    s_img_ptr,          # (N, D) student image embeddings
    s_txt_ptr,          # (N, D) student text embeddings
    teacher_ptr,        # packed T_I^k, T_T^k (N, D_k) each, student dtype
    table_ptr,          # (K, TEACHER_COLUMNS) int64 teacher table
    teacher_scale_ptr,  # (K, 2) fp32: scale and bias of each teacher
    scale_ptr,          # (2,) fp32: student scale s and bias b
    row_loss_ptr,       # out (SIGMOID_SLOTS, rows) fp32: siglip and sigmoid_kd per anchor row
    n_cols, width, row_start, n_rows,
    siglip,             # 1: siglip is computed (its weight is not zero)
    n_teachers,         # K: sigmoid_kd is computed when K > 0
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    s = tl.load(scale_ptr)
    b = tl.load(scale_ptr + 1)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)  # anchor rows within [0, rows)
    row_ok = local < n_rows
    row0 = row_start + block * BLOCK_M  # slab row of the first anchor = its positive column
    x = _row(s_img_ptr, row0, width)
    siglip_row = tl.zeros((BLOCK_M,), tl.float32)
    kd_row = tl.zeros((BLOCK_M,), tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        col_ok = col0 + tl.arange(0, BLOCK_N) < n_cols
        valid = row_ok[:, None] & col_ok[None, :]
        # The soft labels before the student tile: one tile fewer alive through the teachers' loop (fp32 tiles
        # spilled on sm_80 the other way round).
        soft = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if n_teachers > 0:
            soft = _soft_labels(teacher_ptr, table_ptr, teacher_scale_ptr, n_teachers, row0, col0, row_ok, col_ok,
                                BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        y = _row(s_txt_ptr, col0, width)
        z = s * logit_tile(x, y, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION) + b
        if siglip != 0:
            label = tl.where(on_positive(row0, col0, BLOCK_M, BLOCK_N), 1.0, -1.0)  # y: +1 on the own pair
            siglip_row += tl.sum(tl.where(valid, _softplus(-label * z), 0.0), axis=1)
        if n_teachers > 0:
            kd_row += tl.sum(tl.where(valid, _softplus(-soft * z), 0.0), axis=1)
    tl.store(row_loss_ptr + local, siglip_row, mask=row_ok)
    tl.store(row_loss_ptr + n_rows + local, kd_row, mask=row_ok)


@triton.jit(do_not_specialize=["n_cols", "row_start", "n_rows", "n_teachers", "split_len"])
def _sigmoid_bwd_kernel(
    s_img_ptr,          # (N, D) student image embeddings
    s_txt_ptr,          # (N, D) student text embeddings
    teacher_ptr,        # packed teacher embeddings
    table_ptr,          # (K, TEACHER_COLUMNS) int64
    teacher_scale_ptr,  # (K, 2) fp32
    scale_ptr,          # (2,) fp32: s, b
    coef_ptr,           # (SIGMOID_SLOTS + 1,) fp32: siglip and sigmoid_kd weights in units, then g * unit / rows
    grad_ptr,           # in/out (splits, rows (ROWS) or N, D) fp32, zero-filled: gradient of the owned rows of
                        # s_img (ROWS) or s_txt, one slab per split
    dscale_ptr,         # out (row blocks, splits, 2) fp32: partial sums of dz * (S_I S_T^T) and of dz (row pass)
    n_cols, width, row_start, n_rows, n_teachers, split_len,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One body for both passes. ROWS = 1: a program owns a block of image anchor rows and streams the columns,
    dS_I[rows] += s dz @ S_T; ROWS = 0: it owns a block of text rows and streams the anchor rows,
    dS_T[cols] += s dz^T @ S_I. Split ``split`` streams [split split_len, (split + 1) split_len)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.load(scale_ptr)
    b = tl.load(scale_ptr + 1)
    c_siglip = tl.load(coef_ptr)
    c_kd = tl.load(coef_ptr + 1)
    # dz = g unit / rows * (unit dz), and dS_I = s dz S_T (dS_T = s dz^T S_I): the products' factor
    factor = tl.load(coef_ptr + 2) * s
    owned0, begin, end = stream_range(block, split, split_len, n_rows, n_cols, ROWS, BLOCK_M, BLOCK_N)
    owned_len = n_rows * ROWS + n_cols * (1 - ROWS)
    out = grad_ptr + (split.to(tl.int64) * owned_len + owned0) * width
    ds = tl.zeros((BLOCK_M,), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    for streamed0 in range(begin, end, BLOCK_N * ROWS + BLOCK_M * (1 - ROWS)):
        local, row_ok, row0, col0, col_ok = tile_axes(owned0, streamed0, row_start, n_rows, n_cols, ROWS,
                                                      BLOCK_M, BLOCK_N)
        valid = row_ok[:, None] & col_ok[None, :]
        x = _row(s_img_ptr, row0, width)
        y = _row(s_txt_ptr, col0, width)
        z_raw = logit_tile(x, y, row_ok, col_ok, width, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        z = s * z_raw + b
        # Unit dz = -(c_siglip y sigmoid(-y z) + c_kd G sigmoid(-G z)), (BLOCK_M, BLOCK_N), zero off the valid tile.
        # (Here the student tile comes first: with the soft labels first, half-precision tiles need ~30 more
        # registers on sm_80.)
        label = tl.where(on_positive(row0, col0, BLOCK_M, BLOCK_N), 1.0, -1.0)
        grad = -c_siglip * label * tl.sigmoid(-label * z)
        if n_teachers > 0:
            soft = _soft_labels(teacher_ptr, table_ptr, teacher_scale_ptr, n_teachers, row0, col0, row_ok, col_ok,
                                BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
            grad -= c_kd * soft * tl.sigmoid(-soft * z)
        grad = tl.where(valid, grad, 0.0)
        if ROWS:
            ds += tl.sum(grad * z_raw, axis=1)
            db += tl.sum(grad, axis=1)
        add_tile_product(out, grad, x, y, factor, row_ok, col_ok, width, ROWS,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
    if ROWS:  # every (row, column) entry is in exactly one row-pass program: scale and bias gradients summed here
        partial = dscale_ptr + (block * tl.num_programs(1) + split) * 2
        tl.store(partial, tl.sum(ds, axis=0))
        tl.store(partial + 1, tl.sum(db, axis=0))


# ------------------------------------------------------------------------------------------------ host wrappers


def _pack_teachers(teachers, dtype: torch.dtype, device: torch.device):
    """-> (flat buffer of every T_I^k and T_T^k in ``dtype``, (K, TEACHER_COLUMNS) int64 table, (K, 2) fp32 scale
    and bias); one zero row each, never read, when sigmoid_kd is off (K = 0: kernels get no empty tensor)."""
    if not teachers:
        return (torch.zeros(1, dtype=dtype, device=device),
                torch.zeros((1, TEACHER_COLUMNS), dtype=torch.int64, device=device),
                torch.zeros((1, 2), dtype=torch.float32, device=device))
    parts, table, offset = [], [], 0
    for teacher in teachers:
        size = teacher.image.numel()
        parts += [teacher.image.reshape(-1), teacher.text.reshape(-1)]
        table.append([offset, offset + size, teacher.image.shape[1]])
        offset += 2 * size
    buffer = torch.cat([part.to(dtype) for part in parts])
    scales = torch.stack([torch.stack((t.scale.float(), t.bias.float())) for t in teachers])
    return buffer, torch.tensor(table, dtype=torch.int64, device=device), scales.contiguous()


def _config(s_img: torch.Tensor, teacher_widths: list[int], tiles: Optional[BlockConfig]):
    """Tiles for the widest of the student's and the teachers' widths (D is a loop: one config serves them all)."""
    return block_config(max([s_img.shape[1], *teacher_widths]), s_img.dtype, tiles)


class _SigmoidLoss(torch.autograd.Function):
    """(s_img, s_txt, scales (2,) = s, b) -> total (0-dim fp32) and the term values (SIGMOID_SLOTS,) detached."""

    @staticmethod
    def forward(ctx, s_img, s_txt, scales, teachers, term_weights, row_start: int, n_rows: int,
                tiles: Optional[BlockConfig]):
        s_txt = s_txt.contiguous()
        s_img = s_img.contiguous()
        buffer, table, teacher_scales = _pack_teachers(teachers, s_img.dtype, s_img.device)
        cfg = _config(s_img, [t.image.shape[1] for t in teachers], tiles)
        n_cols, width = s_img.shape
        row_loss = torch.empty((SIGMOID_SLOTS, n_rows), dtype=torch.float32, device=s_img.device)
        _sigmoid_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m),)](
            s_img, s_txt, buffer, table, teacher_scales, scales, row_loss, n_cols, width, row_start, n_rows,
            int(term_weights[0] != 0.0), len(teachers),
            num_warps=cfg.forward_warps, num_stages=cfg.num_stages, **kernel_options(cfg, s_img.dtype))
        values = row_loss.sum(dim=1) / n_rows  # (SIGMOID_SLOTS,): mean over the owned rows
        total = (values * values.new_tensor(term_weights)).sum()
        ctx.save_for_backward(s_img, s_txt, scales, buffer, table, teacher_scales)
        ctx.cfg, ctx.term_weights, ctx.n_teachers = cfg, term_weights, len(teachers)
        ctx.row_start, ctx.n_rows = row_start, n_rows
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):
        spec.refuse_double_backward("triton", "whose backward kernels are not differentiable")
        s_img, s_txt, scales, buffer, table, teacher_scales = ctx.saved_tensors
        cfg, n_rows, row_start = ctx.cfg, ctx.n_rows, ctx.row_start
        n_cols, width = s_img.shape
        unit = max(abs(w) for w in ctx.term_weights)
        coef = torch.cat((torch.tensor([w / unit for w in ctx.term_weights], device=s_img.device),
                          (grad_total.float() * (unit / n_rows)).reshape(1))).contiguous()
        options = dict(BLOCK_D=cfg.block_d, num_warps=cfg.backward_warps, num_stages=cfg.num_stages,
                       **kernel_options(cfg, s_img.dtype))
        row_blocks, col_blocks = triton.cdiv(n_rows, cfg.block_m), triton.cdiv(n_cols, cfg.block_n)
        f32 = dict(dtype=torch.float32, device=s_img.device)
        grads, partial_scales = [], None
        for rows_pass, owned_blocks, owned_len, streamed_blocks, streamed_block in (
            (1, row_blocks, n_rows, col_blocks, cfg.block_n),
            (0, col_blocks, n_cols, row_blocks, cfg.block_m),
        ):
            splits, split_len = stream_split(owned_blocks, streamed_blocks, streamed_block,
                                             cfg.target_programs)
            grad = torch.zeros((splits, owned_len, width), **f32)
            dscale = torch.zeros((owned_blocks * splits, 2), **f32)
            _sigmoid_bwd_kernel[(owned_blocks, splits)](
                s_img, s_txt, buffer, table, teacher_scales, scales, coef, grad, dscale, n_cols, width, row_start,
                n_rows, ctx.n_teachers, split_len, ROWS=rows_pass, **options)
            grads.append(grad.sum(0))
            if rows_pass:
                partial_scales = dscale.sum(0)
        grad_rows, grad_txt = grads
        grad_img = torch.zeros((n_cols, width), **f32)
        grad_img[row_start:row_start + n_rows] = grad_rows
        # dz = coef[2] * unit dz: d total / ds = sum(dz * Z), d total / db = sum(dz).
        grad_scales = partial_scales * coef[2]
        dtype = s_img.dtype
        return grad_img.to(dtype), grad_txt.to(dtype), grad_scales, None, None, None, None, None


def triton_sigmoid_loss(s_img, s_txt, teachers, student_scale, student_bias, weights, row_start: int, row_stop: int,
                        tiles: Optional[BlockConfig] = None):
    """siglip and sigmoid_kd with the fused Triton kernels: (total, {term: detached 0-dim fp32}).

    s_img, s_txt (N, D); teachers: the SigmoidTeacher members of sigmoid_kd's soft labels (any widths up to the
    kernels' maximum); student_scale, student_bias 0-dim tensors (bias None: no bias). Anchors are image rows
    [row_start, row_stop), columns all N texts. ``tiles``: as in triton_relational_loss."""
    if not s_img.is_cuda and not INTERPRETING:
        raise RuntimeError(
            "triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.triton_sigmoid is imported "
            f"to run on {s_img.device} tensors; use backend='chunked' on CPU"
        )
    kd = weights["sigmoid_kd"] != 0.0
    _config(s_img, [t.image.shape[1] for t in teachers] if kd else [], tiles)  # a clear error before any launch
    bias = student_bias if student_bias is not None else student_scale.new_zeros(())
    scales = torch.stack((student_scale.reshape(()).float(), bias.reshape(()).float()))
    term_weights = tuple(weights[term] for term in spec.SIGMOID_TERMS)
    total, values = _SigmoidLoss.apply(s_img, s_txt, scales, tuple(teachers) if kd else (), term_weights, row_start,
                                       row_stop - row_start, tiles)
    return total, {term: values[i] for i, term in enumerate(spec.SIGMOID_TERMS) if weights[term] != 0.0}
