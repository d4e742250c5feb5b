"""Test helper: run engine.train's command line and dump its first step to ``<dir>/rank<R>.pt``.

The dump holds the first step's loss terms averaged over ranks and the DDP-averaged gradients before clipping,
named as in the (unwrapped) distillation task: ``python -m tests.first_step_dump DIR ARGS...`` (under torchrun
too), or ``dump_first_step(DIR)`` around an in-process run.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from engine import train
from engine.checkpoint import atomic_save
from engine.distributed import mean_over_ranks


@contextmanager
def dump_first_step(out_dir):
    out_dir, original_step, original_clip = Path(out_dir), train.train_step, torch.nn.utils.clip_grad_norm_
    captured = {}

    def step(state, batch):
        if captured:
            return original_step(state, batch)

        def clip(params, max_norm, *args, **kwargs):  # gradients as they are before clipping
            module = getattr(state.model, "module", state.model)
            captured["grads"] = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
            return original_clip(params, max_norm, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip
        try:
            terms = original_step(state, batch)
        finally:
            torch.nn.utils.clip_grad_norm_ = original_clip
        captured["terms"] = {k: v.item() for k, v in mean_over_ranks(terms, state.env).items()}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(captured, out_dir / f"rank{state.env.rank}.pt")
        return terms

    train.train_step = step
    try:
        yield
    finally:
        train.train_step = original_step


if __name__ == "__main__":
    out, *argv = [arg for arg in sys.argv[1:] if arg != "--"]  # "--" ends torchrun's own options
    with dump_first_step(out):
        train.main(argv)
