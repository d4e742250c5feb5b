"""Block sizes and warps for the fused Triton relational-loss kernels: the one place they are chosen.

They depend only on the embedding width D and the dtype, never on N or the row range, so a new batch size or a
new local-loss row range reuses the compiled kernels. Only the backward passes' split of their streamed axis
(stream_split) depends on N, and it is a runtime argument and a grid size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MAX_WIDTH = 2048  # widest embedding tested (SigLIP SO400M 1152, ViT-bigG-14 1280 and below); D is a loop, not a tile
# Programs a backward pass should launch: two per SM of an H100 (132 SMs) or A100 (108), about one resident at a time
# at ~200 registers x 256 threads. A pass owning fewer output blocks (few local-loss rows) splits its streamed axis.
TARGET_PROGRAMS = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # anchor rows per tile
    block_n: int  # candidate columns per tile
    block_k: int  # width chunk of the logit dot-product loop (D is tiled inside the loop)
    block_d: int  # width chunk of the backward's gradient read-modify-write (a loop inside the program)
    forward_warps: int
    backward_warps: int
    num_stages: int
    target_programs: int = TARGET_PROGRAMS  # programs a backward pass aims to launch (stream_split)


def _next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def block_config(width: int, dtype: torch.dtype, tiles: Optional[BlockConfig] = None) -> BlockConfig:
    """Tile sizes for embeddings of width ``width`` and ``dtype``; raises a clear error for what is unsupported.

    ``tiles`` (clip_rd_loss's ``tiles=``) replaces the choice below after the same checks: smaller tiles make small
    problems cross every block boundary in tests, and a user may tune a new GPU without editing this file."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: inputs must be float32, bfloat16 or float16, got {dtype}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"triton backend: embedding width D must be a positive int, got {width!r}")
    if width > MAX_WIDTH:
        raise ValueError(
            f"triton backend: embedding width D = {width} exceeds the supported maximum {MAX_WIDTH}; "
            "use backend='chunked'"
        )
    if tiles is not None:
        if not isinstance(tiles, BlockConfig):
            raise TypeError(f"tiles: expected a kernels.triton_config.BlockConfig, got {type(tiles).__name__}")
        return tiles
    # tl.dot needs every dimension >= 16. Sizes are the largest that compile without register spills on sm_80 and
    # sm_90 (tests/test_triton_compile.py); fp32 operands go through 3-pass TF32, which needs about twice the
    # registers, hence smaller tiles. The backward computes each dA tile once and adds dA @ Y to fp32 gradient rows
    # in global memory block_d columns at a time, so its registers do not grow with D (fp32: 16-wide chunks and
    # 8 warps, as 32-wide chunks or 4 warps spill on sm_80).
    covering = max(16, _next_power_of_2(width))
    if dtype == torch.float32:
        return BlockConfig(block_m=32, block_n=32, block_k=16, block_d=16,
                           forward_warps=4, backward_warps=8, num_stages=1)
    return BlockConfig(block_m=64, block_n=64, block_k=min(64, covering), block_d=min(64, covering),
                       forward_warps=8, backward_warps=8, num_stages=2)


def stream_split(owned_blocks: int, streamed_blocks: int, block: int,
                 target_programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """Split of a backward pass's streamed axis: (splits, elements per split, a multiple of ``block``).

    A pass launches ``owned_blocks`` x splits programs; splits grow until that reaches target_programs (at most one
    per streamed tile). Each split adds one fp32 partial-gradient slab of the owned rows, summed on the host: at most
    target_programs x (rows of an owned block) x D x 4 bytes more (64 MiB at D = 1024, 64-row blocks, the default)."""
    wanted = max(1, min(streamed_blocks, -(-target_programs // owned_blocks)))
    per_split = -(-streamed_blocks // wanted)  # whole tiles per split
    return -(-streamed_blocks // per_split), per_split * block
