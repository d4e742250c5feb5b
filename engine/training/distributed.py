"""Process-group awareness: rank/world size from torchrun's environment, DDP wrapping and the embedding all-gather.

Single process: rank 0 of 1, no process group, no DDP wrapper, gathering is the identity. Under torchrun
(WORLD_SIZE > 1) the process group is initialised with NCCL on GPUs (one GPU per local rank) and gloo on CPU, and
the student together with the loss module (its multipliers and projections are trained too) is wrapped in
DistributedDataParallel, which averages their gradients across ranks during the backward pass.

Loss semantics across ranks (open_clip's flags; B = per-rank batch, W = world size, global batch W * B):
- ``--local-loss --gather-with-grad``: each rank's loss covers its own anchor rows [rank * B, (rank + 1) * B) against
  all W * B gathered columns; the all-gather's backward sums every rank's gradient into the owner's rows and DDP
  averages, so the parameter gradients equal those of the whole global batch on one process (exact).
- ``--gather-with-grad`` alone: every rank computes the whole-batch loss (W times the same work); the all-gather's
  backward returns W x the gradient of the own rows and DDP's averaging divides it by W again: exact as well.
- without ``--gather-with-grad``: the other ranks' rows are constants and only the own slice keeps its gradient
  (open_clip's approximation): the column gradients that other ranks' anchors produce are dropped, and without
  --local-loss the student's embedding gradient is 1/W of the exact one after DDP's averaging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # differentiable collectives (all_gather with a summing backward)
from torch import nn

# Collectives that wait longer than this fail with an error naming the collective instead of hanging forever
# (a rank stuck in I/O, a dead node that left no crashed process behind). Generous enough for rank 0's checkpoint
# writes and evaluation, which the other ranks wait for. $CLIP_RD_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[DistEnv, torch.device]:
    """(rank info, this rank's device) from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("CLIP_RD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank), device


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective: NCCL and timeouts raise DistError, gloo a RuntimeError naming gloo."""
    return dist.is_initialized() and (isinstance(exc, dist.DistError) or "gloo" in str(exc))


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` under torchrun; the module itself in a single process.

    static_graph: the set of parameters that receive a gradient is the same every step, but not every parameter
    does (a preset with weight 0 on the terms that use a multiplier leaves it without gradient); DDP learns the
    set in the first step instead of searching the autograd graph every step (find_unused_parameters).
    """
    if env.world_size == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


def all_ranks_true(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (ranks must agree before skipping a DDP backward together)."""
    if env.world_size == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(values: dict[str, torch.Tensor], env: DistEnv) -> dict[str, torch.Tensor]:
    """Average 0-dim logging values across ranks (with --local-loss each rank holds its own rows' mean)."""
    if env.world_size == 1:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values, stacked / env.world_size))


def gather_rows(x: torch.Tensor, env: DistEnv, with_grad: bool) -> torch.Tensor:
    """(B, D) local rows -> (world * B, D) global rows in rank order.

    with_grad: gradients flow back to every rank's rows (torch.distributed.nn.all_gather). Without it the other
    ranks' rows are constants and only the local slice keeps its gradient (open_clip's approximation).
    """
    if env.world_size == 1:
        return x
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[env.rank] = x
    return torch.cat(parts, dim=0)
