"""Test helper: run engine.train's command line and dump its first step to ``<dir>/rank<R>.pt``.

The dump holds the first step's loss terms averaged over ranks and the DDP-averaged gradients before clipping,
named as in the (unwrapped) distillation task, taken by engine.training.step's ``after_backward`` hook:
``python -m tests.first_step_dump DIR ARGS...`` (under torchrun too), or ``FirstStepDump(DIR)`` passed to
``engine.train.train(argv, after_backward=...)`` in process.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.core.io import atomic_torch_save
from engine.train import train
from engine.training.distributed import mean_over_ranks


class FirstStepDump:
    """An ``after_backward`` hook that writes the first step's terms and gradients once."""

    def __init__(self, out_dir):
        self.out_dir, self.done = Path(out_dir), False

    def __call__(self, state, terms: dict) -> None:
        if self.done:
            return
        module = getattr(state.model, "module", state.model)
        dump = {"grads": {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None},
                "terms": {k: v.item() for k, v in mean_over_ranks(terms, state.env).items()}}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(dump, self.out_dir / f"rank{state.env.rank}.pt")
        self.done = True


if __name__ == "__main__":
    out, *argv = [arg for arg in sys.argv[1:] if arg != "--"]  # "--" ends torchrun's own options
    train(argv, after_backward=FirstStepDump(out))
