"""The run configuration: one dataclass, saved in every checkpoint, and its checks (engine.train is its command
line, with open_clip_train's flag names and meanings)."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Optional

from kernels import PRESETS, WEIGHT_KEYS

from ..core.errors import ConfigError

# open_clip_train's choices and meanings
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
AUTOCAST = {"amp": "float16", "amp_bf16": "bfloat16", "amp_bfloat16": "bfloat16"}
# open_clip's OpenAI-style low precision: it builds the model with its linear, convolution and attention weights and
# the projections in bf16 / fp16, LayerNorms computing in fp32, other parameters fp32
MIXED = ("bf16", "fp16")
PURE = {"pure_bf16": "bfloat16", "pure_fp16": "float16"}  # every weight of the student in this dtype
# kernels' backends: auto = triton on a CUDA device (chunked where it cannot run), else chunked
LOSS_BACKENDS = ("auto", "chunked", "triton", "reference")


@dataclass
class TrainConfig:
    # data (None: the embedded procedural dataset, generated once into the cache)
    train_data: Optional[str] = None
    val_data: Optional[str] = None
    cache_dir: Optional[str] = None
    workers: int = 0
    shuffle_buffer: int = 1000
    train_num_samples: Optional[int] = None  # samples in an epoch (open_clip); needed for remote shards
    val_num_samples: Optional[int] = None  # samples in the validation data (open_clip); checked when read
    imagenet_val: Optional[str] = None  # ImageFolder of ImageNet's 1000 classes for zero-shot evaluation
    # models
    model: str = "tiny-vit-student"
    pretrained: Optional[str] = None  # the student's initial weights: open_clip tag or checkpoint file
    lock_image: bool = False  # open_clip's LiT locking, applied before the optimizer is built
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    teacher: str = "tiny-vit-teacher"
    teacher_pretrained: Optional[str] = None  # open_clip tag or checkpoint file; None: the shipped default teacher
    teacher_store: Optional[str] = None  # None: the cache's store for (teacher, data)
    online_teacher: bool = False
    # loss
    preset: str = "clip-rd"
    weights: dict = field(default_factory=dict)  # per-term overrides of the preset
    mfd_mask_ratio: float = 0.0
    siglip: bool = False  # open_clip_train's --siglip: the task term is SigLIP's sigmoid loss, with a logit bias
    distill_logit_bias: Optional[float] = None  # the teacher's logit bias for sigmoid_kd (default: its own)
    loss_backend: str = "reference"  # kernels' backend: auto (--fused), chunked, triton or reference
    # optimisation (open_clip names)
    batch_size: int = 256
    accum_freq: int = 1  # micro-batches per optimizer step (GradCache: the exact gradient of the whole batch)
    grad_checkpointing: bool = False
    epochs: int = 4
    lr: float = 2e-3
    wd: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 30
    precision: str = "fp32"
    grad_clip_norm: Optional[float] = None  # open_clip's default: no clipping
    seed: int = 0
    # distributed (open_clip names; see engine.distributed)
    local_loss: bool = False
    gather_with_grad: bool = False
    # logging and checkpoints
    logs: str = "./logs"
    name: Optional[str] = None
    resume: Optional[str] = None
    save_frequency: int = 1
    log_every_n_steps: int = 10
    eval: bool = True
    val_frequency: int = 1  # evaluate on the validation data every this many epochs (0: never)
    zeroshot_frequency: int = 2  # zero-shot on --imagenet-val every this many epochs (0: never)
    report_to: Optional[str] = None  # "tensorboard": also write TensorBoard event files
    progress: bool = True
    stop_after_steps: Optional[int] = None  # checkpoint and stop after this many optimizer steps (resumable)
    allow_config_change: bool = False  # --resume with other settings than the checkpoint's
    max_skipped_steps: int = 25  # fp16: consecutive steps skipped for non-finite gradients before the run stops
    prepare_timeout: float = 3600.0  # torchrun: how long ranks wait for rank 0 to prepare data, teacher and store

    def loss_weights(self) -> dict:
        """The preset's weights with the per-term overrides; with --siglip the task weight is the siglip term's."""
        weights = dict(PRESETS[self.preset])
        weights.update(self.weights)
        if self.siglip:
            weights["siglip"] = weights.pop("task", 1.0)
        return weights

    def validate(self) -> None:
        """Every setting that can be wrong, checked before anything runs: one line naming the flag."""
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        unknown = sorted(set(self.weights) - set(WEIGHT_KEYS))
        if unknown:
            raise ConfigError(f"weights: unknown term(s) {unknown}; expected {list(WEIGHT_KEYS)}")
        if not any(v != 0 for v in self.loss_weights().values()):
            raise ConfigError("loss weights: every term's weight is zero (preset and --*-weight flags): "
                              "nothing to train")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ConfigError(f"--loss-backend: {self.loss_backend!r} is not one of {LOSS_BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0.0 <= self.mfd_mask_ratio < 1.0:
            raise ConfigError(f"--mfd-mask-ratio: must be in [0, 1), got {self.mfd_mask_ratio}")
        at_least_one = ("batch_size", "accum_freq", "epochs", "log_every_n_steps", "shuffle_buffer",
                        "max_skipped_steps")
        for name in at_least_one + ("stop_after_steps",):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        for name in ("warmup", "wd", "workers", "save_frequency"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "eps", "prepare_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ConfigError(f"--grad-clip-norm: must be > 0 (leave it out for no clipping), "
                              f"got {self.grad_clip_norm}")
        self._validate_open_clip_flags()
        if self.name is not None and (not self.name.strip() or self.name in (".", "..") or "/" in self.name
                                      or os.sep in self.name or self.name.startswith("~")):
            raise ConfigError(f"--name {self.name!r}: a run name is one folder name inside --logs (no '/', '.' or "
                              f"'..')")
        if self.teacher_store is not None and self.online_teacher:
            raise ConfigError("--teacher-store and --online-teacher exclude each other: "
                              "the online teacher needs no store")

    def _validate_open_clip_flags(self) -> None:
        for name in ("val_frequency", "zeroshot_frequency", "lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        for name in ("train_num_samples", "val_num_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for tower, companions in (("image", ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats")),
                                  ("text", ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"))):
            given = [name for name in companions if getattr(self, name)]
            if given and not getattr(self, f"lock_{tower}"):
                raise ConfigError(f"--{given[0].replace('_', '-')} only applies with --lock-{tower}")
        report_to(self.report_to)


def report_to(value: Optional[str]) -> set:
    """The logging backends of open_clip's comma-separated --report-to that this engine writes: tensorboard."""
    backends = {part.strip() for part in (value or "").split(",") if part.strip()}
    unsupported = sorted(backends & {"wandb", "trackio", "all"})
    if unsupported:
        raise ConfigError(f"--report-to {value}: {unsupported[0]!r} is not supported here (only 'tensorboard'; every "
                          f"metric is also in logs/<name>/metrics.jsonl)")
    unknown = sorted(backends - {"tensorboard"})
    if unknown:
        raise ConfigError(f"--report-to {value}: unknown backend {unknown[0]!r}; expected 'tensorboard'")
    return backends


# Switches whose flag turns the field off (--no-eval) rather than on.
NEGATED_SWITCHES = {"eval": "--no-eval", "progress": "--no-progress"}


def command_line(cfg: TrainConfig) -> str:
    """The engine.train command that runs ``cfg``: every setting that differs from the default, as its flag."""
    default, words = TrainConfig(), ["python", "-m", "engine.train"]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        if f.name == "weights":
            for key, weight in value.items():
                words += [f"--{key.replace('_', '-')}-weight", repr(float(weight))]
        elif f.name in NEGATED_SWITCHES:
            words.append(NEGATED_SWITCHES[f.name])
        elif isinstance(value, bool):
            words.append(f"--{f.name.replace('_', '-')}")
        elif f.name == "loss_backend" and value == "auto":
            words.append("--fused")
        else:
            words += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(words)
