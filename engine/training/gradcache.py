"""GradCache (--accum-freq K): the whole batch's exact gradient at the activation memory of one micro-batch.

1. Embed each of the K micro-batches without a graph (their RNG states kept: MFD masks replay identically).
2. One loss over the whole batch of embeddings (gathered across ranks once), and its gradient with respect to
   the embeddings, the logit scale and the loss module's parameters: ``ReplayGradients``.
3. Re-run each micro-batch with a graph and backpropagate its slice of that gradient through a surrogate scalar
   (DDP averages each pass's gradient across ranks; the sum of the averages is the average of the sums. Its
   static graph does not allow skipping the synchronisation of all but the last pass with no_sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..core.checkpoint import rng_state, set_rng_state


@dataclass
class ReplayGradients:
    """d total / d (one micro-batch's inputs to the loss): its embeddings' rows (B_k, D), and the logit scale's and
    each loss parameter's gradient already divided by K, so that every pass uses every parameter (DDP's static
    graph) and the K passes add up to the whole batch's gradient."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    loss_params: list[torch.Tensor]
    bias: Optional[torch.Tensor] = None  # a SigLIP student's logit bias, as the scale


def surrogate(out: dict, loss_fn: nn.Module, grads: ReplayGradients) -> torch.Tensor:
    """A scalar whose gradient is the micro-batch's share of the whole batch's gradient."""
    total = (out["image_features"].float() * grads.image).sum()
    total = total + (out["text_features"].float() * grads.text).sum()
    total = total + out["logit_scale"].float() * grads.scale
    if grads.bias is not None:
        total = total + out["logit_bias"].float() * grads.bias
    for parameter, grad in zip(loss_fn.parameters(), grads.loss_params):
        total = total + (parameter * grad).sum()
    return total


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``parts`` consecutive micro-batches of a batch (tensors and lists alike)."""
    size = len(batch["key"] if "key" in batch else batch["image"])
    bounds = [size * i // parts for i in range(parts + 1)]
    return [{name: value[lo:hi] for name, value in batch.items()} for lo, hi in zip(bounds, bounds[1:])]


def accumulated_backward(model: nn.Module, batch: dict, parts: int, scale_loss: Callable[[torch.Tensor], torch.Tensor],
                         check_finite: Callable[[dict], None]) -> dict:
    """Steps 1-3 on ``model`` (the task, DDP-wrapped or not); ``scale_loss`` is amp's loss scaling, ``check_finite``
    refuses a non-finite loss before any gradient is accumulated. Returns the whole batch's terms (detached)."""
    task = getattr(model, "module", model)  # unwrapped: passes 1 and 2 are outside DDP's forward
    micro = split_batch(batch, parts)
    rng_states, outs = [], []
    with torch.no_grad():
        for part in micro:
            rng_states.append(rng_state())
            outs.append(task.embed(part))
    rng_after = rng_state()
    image = torch.cat([o["image_features"].float() for o in outs]).requires_grad_()
    text = torch.cat([o["text_features"].float() for o in outs]).requires_grad_()
    scale = outs[0]["logit_scale"].float().detach().requires_grad_()
    heads = {"logit_scale": scale}
    if outs[0].get("logit_bias") is not None:
        heads["logit_bias"] = outs[0]["logit_bias"].float().detach().requires_grad_()
    t_img, t_txt = task.teacher.rows(batch, image.device)
    terms = task.loss({"image_features": image, "text_features": text, **heads}, t_img, t_txt)
    check_finite(terms)
    params = list(task.loss_fn.parameters())
    grads = torch.autograd.grad(terms["total"], [image, text, *heads.values(), *params], allow_unused=True)
    grad_heads = [torch.zeros_like(h) if g is None else g / parts for h, g in zip(heads.values(), grads[2:])]
    grad_params = [torch.zeros_like(p) if g is None else g / parts
                   for p, g in zip(params, grads[2 + len(heads):])]
    rows = torch.tensor([len(o["image_features"]) for o in outs]).cumsum(0).tolist()
    for i, part in enumerate(micro):
        set_rng_state(rng_states[i])
        rows_i = slice(rows[i - 1] if i else 0, rows[i])
        replay = ReplayGradients(grads[0][rows_i], grads[1][rows_i], grad_heads[0], grad_params,
                                 grad_heads[1] if len(grad_heads) > 1 else None)
        scale_loss(model(part, replay=replay)).backward()
    set_rng_state(rng_after)
    return {name: value.detach() for name, value in terms.items()}
