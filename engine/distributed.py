"""Process-group awareness: rank/world size from torchrun's environment and the embedding all-gather.

Single process: rank 0 of 1, gathering is the identity. Under torchrun (WORLD_SIZE > 1) the process group is
initialised with NCCL on GPUs and gloo on CPU; each rank's loss covers its own anchor rows
[rank * B, (rank + 1) * B) against the gathered global columns (open_clip's --local-loss).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_rows(x: torch.Tensor, env: DistEnv, with_grad: bool) -> torch.Tensor:
    """(B, D) local rows -> (world * B, D) global rows in rank order.

    with_grad: gradients flow back to every rank's rows (torch.distributed.nn.all_gather). Without it the other
    ranks' rows are constants and only the local slice keeps its gradient (open_clip's approximation).
    """
    if env.world_size == 1:
        return x
    if with_grad:
        import torch.distributed.nn

        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(parts, x.detach())
    parts[env.rank] = x
    return torch.cat(parts, dim=0)


def average_gradients(parameters, env: DistEnv) -> None:
    """All-reduce (mean) every gradient across ranks, as DistributedDataParallel does (without its overlap)."""
    if env.world_size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(env.world_size)
