"""Learning-rate schedule as a pure function of the step (nanoGPT style)."""
import math


def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from base_lr/warmup to base_lr over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(total_steps - warmup, 1)
    progress = min(step - warmup, decay_steps) / decay_steps
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
