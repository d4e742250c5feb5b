"""The CLIP distillation objective (CLIP-KD, CLIP-RD, intra-modal RD, gradient distillation, SigLIP's loss and
MobileCLIP2's sigmoid distillation), from one teacher or a teacher ensemble, in three backends.

``clip_rd_loss`` is the functional contract of kernels/README.md; ``ClipRDLoss`` the module owning the learnable
multipliers and projections. Backends: ``reference`` (plain PyTorch), ``chunked`` (streamed PyTorch, the CPU fast
path), ``triton`` (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1).
"""
from .functional import clip_rd_loss
from .module import ClipRDLoss
from .spec import DEFAULT_MULTIPLIER, PRESETS, TERM_KEYS, WEIGHT_KEYS, resolve_weights

__all__ = ["clip_rd_loss", "ClipRDLoss", "PRESETS", "TERM_KEYS", "WEIGHT_KEYS", "DEFAULT_MULTIPLIER", "resolve_weights"]
