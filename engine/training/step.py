"""One optimizer step: forward, backward (whole batch, or GradCache over --accum-freq micro-batches), unscale,
clip, finiteness checks, AdamW, logit-scale clamp. ``train_step`` is the step the loop, the tests and the
benchmarks call."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..core.errors import NonFiniteLossError
from .distributed import all_ranks_true
from .gradcache import accumulated_backward
from .schedule import cosine_lr
from .state import TrainState

LOGIT_SCALE_MAX = math.log(100)
# Called after the backward pass with the step's terms, the gradients unscaled and (under torchrun) averaged over
# ranks, before clipping and the optimizer: to inspect or log gradients.
AfterBackward = Callable[[TrainState, dict], None]


def train_step(state: TrainState, batch: dict, after_backward: Optional[AfterBackward] = None) -> dict:
    """Forward, backward, unscale, clip, finiteness check, optimizer step, logit-scale clamp; returns the terms.

    Raises NonFiniteLossError (before changing any weight) on a non-finite loss or gradient, except where amp's
    GradScaler skips the step itself; ``cfg.max_skipped_steps`` such skips in a row raise as well; and (after the
    step, the counters unchanged) when the step left a weight NaN or Inf.
    """
    cfg = state.cfg
    for group in state.optimizer.param_groups:
        group["lr"] = cosine_lr(state.step, cfg.lr, cfg.warmup, state.total_steps)
    state.optimizer.zero_grad(set_to_none=True)
    if cfg.accum_freq == 1:
        terms = backward(state, batch)
    else:
        terms = accumulated_backward(state.model, batch, cfg.accum_freq, state.scaler.scale,
                                     lambda terms: check_finite(state, terms))
    state.scaler.unscale_(state.optimizer)
    if after_backward is not None:
        after_backward(state, terms)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or float("inf"))
    if not torch.isfinite(grad_norm) and not state.scaler.is_enabled():
        raise NonFiniteLossError(f"non-finite gradient at step {state.step} (norm {grad_norm.item()}): "
                                 f"terms {rounded(terms)}")
    scale_before = state.scaler.get_scale() if state.scaler.is_enabled() else None
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if scale_before is not None and state.scaler.get_scale() < scale_before:  # GradScaler skipped this step
        state.skipped_in_a_row += 1
        if state.skipped_in_a_row >= cfg.max_skipped_steps:
            raise NonFiniteLossError(f"amp: {state.skipped_in_a_row} consecutive steps up to step {state.step} had "
                                     f"non-finite gradients and were skipped (loss scale now "
                                     f"{state.scaler.get_scale():g}); the run is not learning: try --precision "
                                     f"amp_bf16 or fp32, or a lower --lr")
    else:
        state.skipped_in_a_row = 0
    with torch.no_grad():
        state.student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    # a finite gradient can still take a weight to Inf (a huge learning rate): the fused check, then the exact one
    name = None if parameters_finite(params) else non_finite_parameter(state)
    if name is not None:
        raise NonFiniteLossError(f"weight {name} is not finite after step {state.step} "
                                 f"(lr {state.optimizer.param_groups[0]['lr']:g}): terms {rounded(terms)}")
    state.step, state.batches_done = state.step + 1, state.batches_done + 1
    return terms


def parameters_finite(params: list[torch.Tensor]) -> bool:
    """One fused pass: each tensor's sum of magnitudes is finite. A NaN or Inf always reaches the sum, so True means
    every weight is finite; False can also be a sum of finite weights near 1e38 (the exact check tells)."""
    return not params or bool(torch.isfinite(torch.stack(torch._foreach_norm(params, 1))).all())


def non_finite_parameter(state: TrainState) -> Optional[str]:
    """The name of the first student or loss-module parameter holding NaN or Inf, else None."""
    for prefix, module in (("", state.student), ("loss ", state.loss_fn)):
        for name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                return prefix + name
    return None


def check_finite(state: TrainState, terms: dict) -> None:
    device = terms["total"].device
    if not all_ranks_true(bool(torch.isfinite(terms["total"])), state.env, device):  # every rank stops together
        raise NonFiniteLossError(f"non-finite loss at step {state.step}: terms {rounded(terms)}")


def backward(state: TrainState, batch: dict) -> dict:
    """Forward and backward of the whole batch at once (DDP averages the gradients across ranks here)."""
    terms = state.model(batch)
    check_finite(state, terms)
    state.scaler.scale(terms["total"]).backward()
    return terms


def rounded(terms: dict) -> dict:
    return {k: round(v.item(), 5) for k, v in terms.items()}
