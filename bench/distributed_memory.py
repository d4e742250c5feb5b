"""Per-rank peak memory of the distributed loss step (open_clip's --local-loss --gather-with-grad), under torchrun.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --nnodes 1 --nproc-per-node 2 \\
        --master-addr 127.0.0.1 --master-port 29533 -m bench.distributed_memory -- --backend chunked \\
        --global-batch 4096 8192 16384 --dim 512
    (reference: --backend reference --global-batch 2048 4096 8192 16384 --mem-fraction 0.95)

Every rank holds its own (B_local, D) embeddings (student ones require grad), then, measured: all-gather of the
student rows with gradient and of the teacher rows without, ``clip_rd_loss`` over the rank's own anchor rows against
the W * B_local gathered columns, and the backward through the gather. Peak memory is the growth of the rank's peak
RSS over its RSS before the step (``/proc/self/clear_refs`` resets the high-water mark, as tests/memory_probe.py;
the glibc threshold above returns freed blocks to the OS so RSS follows live tensors). On CUDA it is
max_memory_allocated growth. A size whose a-priori estimate (bench.memory.first_estimate, about 6 fp32 B_local x N
matrices per logit view for the materialising reference) exceeds this rank's share of the available memory is
skipped with the estimate instead of running the machine out of memory.

Writes bench/results/distributed/<backend>-<preset>-d<D>-w<W>.json (rank 0): one record per (global batch, rank).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.cli import HelpFormatter
from kernels import PRESETS, clip_rd_loss

from .memory import available_bytes, first_estimate, reset_peak_rss, status_bytes

OUT_DIR = Path(__file__).resolve().parent / "results" / "distributed"


def local_inputs(rows: int, d: int, rank: int, device: torch.device) -> list[torch.Tensor]:
    """This rank's (rows, D) unit-norm student/teacher embeddings; teacher rows correlated with the student's."""
    gen = torch.Generator().manual_seed(1000 + rank)
    s_img = torch.randn(rows, d, generator=gen)
    s_txt = s_img + 0.8 * torch.randn(rows, d, generator=gen)
    t_img, t_txt = s_img + 0.5 * torch.randn(rows, d, generator=gen), s_txt + 0.5 * torch.randn(rows, d, generator=gen)
    out = [F.normalize(x, dim=1).to(device) for x in (s_img, s_txt, t_img, t_txt)]
    return [x.requires_grad_(i < 2) for i, x in enumerate(out)]


def loss_step(inputs, backend: str, preset: str, rank: int, world: int) -> float:
    """Gather (student with grad, teacher without), local-row loss, backward; returns the local loss."""
    import torch.distributed.nn

    s_img, s_txt, t_img, t_txt = inputs
    rows = s_img.shape[0]
    gathered = [torch.cat(torch.distributed.nn.all_gather(x), dim=0) for x in (s_img, s_txt)]
    for x in (t_img, t_txt):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach())
        gathered.append(torch.cat(parts, dim=0))
    scale = lambda v, grad: torch.tensor(v, device=s_img.device, requires_grad=grad)  # noqa: E731
    out = clip_rd_loss(*gathered, student_scale=scale(1 / 0.07, True), teacher_scale=100.0,
                       lam_img=scale(2.66, True), lam_txt=scale(2.66, True), kappa=scale(2.66, True),
                       weights=preset, row_start=rank * rows, row_stop=(rank + 1) * rows, backend=backend)
    out["total"].backward()
    return out["total"].item()


def measure(rows: int, d: int, backend: str, preset: str, rank: int, world: int, device: torch.device) -> dict:
    inputs = local_inputs(rows, d, rank, device)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = status_bytes("VmRSS")
        reset_peak_rss()
    start = time.perf_counter()
    loss = loss_step(inputs, backend, preset, rank, world)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else status_bytes("VmHWM")) - baseline
    return {"status": "ok", "peak_extra_bytes": int(peak), "seconds": seconds, "local_loss": loss,
            "baseline_bytes": int(baseline)}


def main() -> None:
    p = argparse.ArgumentParser(prog="torchrun ... -m bench.distributed_memory --",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--backend", default="chunked", help="loss backend: reference, chunked, triton, or auto "
                   "(Triton on CUDA, chunked otherwise: what engine.train --fused selects)")
    p.add_argument("--preset", default="clip-rd", choices=sorted(PRESETS), help="loss weight preset")
    p.add_argument("--global-batch", type=int, nargs="+", default=[16384],
                   help="global batch sizes to measure, split evenly over the ranks "
                   "(default: 16384)")
    p.add_argument("--dim", type=int, default=512, help="embedding width D of student and teacher")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="share of available memory the ranks may use")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where the per-rank JSON results go")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("run under torchrun with --nproc-per-node >= 2 (see the module docstring)")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank()
    loss_step(local_inputs(8, args.dim, rank, device), args.backend, args.preset, rank, world)  # warm-up
    records = []
    for global_batch in sorted(args.global_batch):
        if global_batch % world:
            raise SystemExit(f"--global-batch {global_batch} is not divisible by the world size {world}")
        rows = global_batch // world
        estimate = first_estimate(args.backend, args.preset, "backward", rows, global_batch, args.dim, 4)
        # every rank of this machine draws on the same memory: each gets a 1/world share
        budget = available_bytes(device.type) * args.mem_fraction / (1 if device.type == "cuda" else world)
        allowed = torch.tensor(float(estimate <= budget))
        dist.all_reduce(allowed, op=dist.ReduceOp.MIN)  # all ranks skip together (collectives must match)
        if allowed.item():
            record = measure(rows, args.dim, args.backend, args.preset, rank, world, device)
        else:
            record = {"status": "skipped", "estimate_bytes": int(estimate), "budget_bytes": int(budget),
                      "reason": f"estimated {estimate / 2**30:.1f} GiB per rank > {budget / 2**30:.1f} GiB share"}
        record.update(global_batch=global_batch, local_batch=rows, rank=rank)
        gathered = [None] * world
        dist.all_gather_object(gathered, record)
        records += gathered
        if rank == 0:
            for r in gathered:
                shown = (f"peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB in {r['seconds']:.1f} s"
                         if r["status"] == "ok" else r["reason"])
                print(f"{args.backend} global {global_batch} (local {rows}) D {args.dim} rank {r['rank']}: {shown}",
                      flush=True)
    if rank == 0:
        out = Path(args.out_dir) / f"{args.backend}-{args.preset}-d{args.dim}-w{world}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"backend": args.backend, "preset": args.preset, "dim": args.dim, "world_size": world,
                "device": device.type, "dtype": "float32", "torch": torch.__version__, "host": platform.node(),
                "threads_per_rank": torch.get_num_threads(),
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                "measured": "peak RSS growth (CUDA: max_memory_allocated growth) of gather + loss forward + backward"}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        os.replace(tmp, out)
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
