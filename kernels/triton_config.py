"""Block sizes and warps for the fused Triton relational-loss kernels: the one place they are chosen.

They depend only on the embedding width D and the dtype, never on N or the row range, so a new batch size or a
new local-loss row range reuses the compiled kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_WIDTH = 1024  # widest embedding the kernels are tuned and tested for (ViT-H/14 and smaller CLIPs)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # anchor rows per tile
    block_n: int  # candidate columns per tile
    block_k: int  # width chunk of the logit dot-product loop (D is tiled inside the loop)
    block_d: int  # width chunk of one gradient output tile (a backward grid axis)
    forward_warps: int
    backward_warps: int
    num_stages: int


def _next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def block_config(width: int, dtype: torch.dtype) -> BlockConfig:
    """Tile sizes for embeddings of width ``width`` and ``dtype``; raises a clear error for what is unsupported."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: inputs must be float32, bfloat16 or float16, got {dtype}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"triton backend: embedding width D must be a positive int, got {width!r}")
    if width > MAX_WIDTH:
        raise ValueError(
            f"triton backend: embedding width D = {width} exceeds the supported maximum {MAX_WIDTH}; "
            "use backend='chunked'"
        )
    # tl.dot needs every dimension >= 16; fp32 operands are twice as wide, so their K chunk is half as long.
    max_k = 32 if dtype == torch.float32 else 64
    block_k = min(max_k, max(16, _next_power_of_2(width)))
    # The gradient tile (block_m x block_d fp32, 64 registers a thread at 8 warps) stays in registers; a wider D is
    # split over a backward grid axis, each split recomputing the logit tiles.
    block_d = min(256, max(16, _next_power_of_2(width)))
    return BlockConfig(
        block_m=64, block_n=64, block_k=block_k, block_d=block_d, forward_warps=4, backward_warps=8, num_stages=2
    )
