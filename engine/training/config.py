"""The run configuration: one dataclass, saved in every checkpoint, and its checks (engine.train is its command
line, with open_clip_train's flag names and meanings)."""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from kernels import PRESETS, WEIGHT_KEYS
from kernels.spec import AVERAGE_AFTER_SOFTMAX, EMBEDDING_TEACHER_TERMS

from ..core.errors import ConfigError
from ..data.augment import SAMPLINGS, AugmentCfg
from ..teachers.default import pair_teachers
from ..teachers.reinforced import Reinforcement

# open_clip_train's choices and meanings
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
AUTOCAST = {"amp": "float16", "amp_bf16": "bfloat16", "amp_bfloat16": "bfloat16"}
# open_clip's OpenAI-style low precision: it builds the model with its linear, convolution and attention weights and
# the projections in bf16 / fp16, LayerNorms computing in fp32, other parameters fp32
MIXED = ("bf16", "fp16")
PURE = {"pure_bf16": "bfloat16", "pure_fp16": "float16"}  # every weight of the student in this dtype
# The default run's store (engine.teachers.reinforced): stored views per sample (0: the evaluation view alone), how
# they are drawn (--aug-cfg), captions per sample.
DEFAULT_AUGMENTATIONS = 0
DEFAULT_AUG_CFG: dict = {}
DEFAULT_CAPTIONS = 1
# the flags that only apply with --dataset-reinforcement
DATASET_REINFORCEMENT_ONLY = ("dataset_reinforcement_config", "dataset_reinforcement_mix_synthetic",
                              "dataset_reinforcement_mix_synthetic_ratio", "dataset_reinforcement_sample_sequential",
                              "dataset_reinforcement_syn_text_key_regex", "dataset_reinforcement_verify_sha256",
                              "dataset_reinforcement_drop_mismatched", "distill_logit_scale",
                              "distill_teacher_dimension")
# kernels' backends: auto = triton on a CUDA device (chunked where it cannot run), else chunked
LOSS_BACKENDS = ("auto", "chunked", "triton", "reference")
# Bounds no real run reaches, so that a typo (--lr 1e30, --epochs 100000000) is refused at start instead of
# diverging at the first step or counting the steps of every epoch for hours.
MAX_LR = 10.0  # real peak learning rates are 1e-5 .. 1e-2
MAX_EPS = 1.0  # AdamW's epsilon is 1e-8 .. 1e-6; above 1 it swamps the update's denominator
MAX_EPOCHS = 10_000
MAX_STEPS = 10**9  # optimizer steps of the whole run: 115 days at 100 steps a second


@dataclass
class TrainConfig:
    # data (None: the embedded procedural dataset, generated once into the cache)
    train_data: Optional[str] = None
    val_data: Optional[str] = None
    cache_dir: Optional[str] = None
    workers: int = 0
    shuffle_buffer: int = 1000
    train_num_samples: Optional[int] = None  # samples in an epoch (open_clip); needed for remote shards
    dataset_resampled: bool = False  # open_clip's: shards drawn with replacement, num_samples per epoch
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
    # the teacher: open_clip model, and its open_clip tag or checkpoint file (None: the shipped default teacher); a
    # teacher ensemble: a list of each, paired in order (--teacher and --teacher-pretrained repeated)
    teacher: Union[str, list] = "tiny-vit-teacher"
    teacher_pretrained: Union[None, str, list] = None
    teacher_store: Optional[str] = None  # None: the cache's store for (teachers, data)
    online_teacher: bool = False
    online_augment: bool = False  # a new view per sample and epoch under --aug-cfg (no store: online teacher or none)
    # the reinforced store (engine.teachers.reinforced): stored views and captions per sample; None / {}: a given
    # --teacher-store's own, and for the cache's store the defaults below
    augmentations: Optional[int] = None
    aug_cfg: dict = field(default_factory=dict)
    captions: Optional[int] = None
    view_sampling: str = "random"  # MobileCLIP's: a random stored view per step, or "sequential" (epoch modulo K)
    mix_synthetic_ratio: float = 0.5  # MobileCLIP's: probability of a synthetic caption instead of the ground truth
    # DataCompDR shards (MobileCLIP's --dataset-reinforcement flags): each sample carries its views and its teacher
    # embeddings, no store is read or built (engine.data.datacompdr)
    dataset_reinforcement: bool = False
    dataset_reinforcement_config: Optional[str] = None  # its JSON: the size the views were drawn for
    dataset_reinforcement_mix_synthetic: bool = False
    dataset_reinforcement_mix_synthetic_ratio: float = 0.0
    dataset_reinforcement_sample_sequential: bool = False
    dataset_reinforcement_syn_text_key_regex: str = r"^syn_text.*$"  # MobileCLIP's, matched from the start
    dataset_reinforcement_verify_sha256: bool = False
    dataset_reinforcement_drop_mismatched: bool = False  # with verify: drop, count and log instead of stopping
    distill_logit_scale: Optional[list] = None  # per teacher (or one for all); None: 100
    distill_loss_weights: Optional[list] = None  # MobileCLIP's [contrastive, distillation] = the task and hrd weights
    distill_teacher_dimension: Optional[list] = None  # the ensemble members' widths, in their stored order
    # the kernels' ensemble mode (else average-losses), for DataCompDR's members and a store's teacher ensemble
    distill_average_after_softmax: bool = False
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
        if self.distill_loss_weights is not None:  # MobileCLIP's DRClipLoss: contrastive + KD of the logits (hrd)
            weights = {key: 0.0 for key in WEIGHT_KEYS}
            weights["task"], weights["hrd"] = (float(w) for w in self.distill_loss_weights)
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
        for key, value in self.weights.items():
            require(f"--{key.replace('_', '-')}-weight", value, ">= 0 and finite", 0 <= value < math.inf)
        if not any(v != 0 for v in self.loss_weights().values()):
            raise ConfigError("loss weights: every term's weight is zero (preset and --*-weight flags): "
                              "nothing to train")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ConfigError(f"--loss-backend: {self.loss_backend!r} is not one of {LOSS_BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: {self.precision!r} is not one of {PRECISIONS}")
        require("--mfd-mask-ratio", self.mfd_mask_ratio, "in [0, 1)", 0.0 <= self.mfd_mask_ratio < 1.0)
        at_least_one = ("batch_size", "accum_freq", "epochs", "log_every_n_steps", "shuffle_buffer",
                        "max_skipped_steps")
        for name in at_least_one + ("stop_after_steps",):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        require("--epochs", self.epochs, f"at most {MAX_EPOCHS} (a bound no real run reaches)",
                self.epochs <= MAX_EPOCHS)
        for name in ("warmup", "workers", "save_frequency"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        self._validate_optimizer()
        self._validate_open_clip_flags()
        if self.name is not None and (not self.name.strip() or self.name in (".", "..") or "/" in self.name
                                      or os.sep in self.name or self.name.startswith("~")):
            raise ConfigError(f"--name {self.name!r}: a run name is one folder name inside --logs (no '/', '.' or "
                              f"'..')")
        if self.teacher_store is not None and self.online_teacher:
            raise ConfigError("--teacher-store and --online-teacher exclude each other: "
                              "the online teacher needs no store")
        members = self.teacher_members()  # --teacher and --teacher-pretrained paired: one line when they are not
        if self.online_teacher and len(members) > 1:
            raise ConfigError(f"--online-teacher: runs one teacher, and {len(members)} are given; a teacher "
                              f"ensemble's rows come from its store (leave out --online-teacher)")
        if not self.dataset_reinforcement:
            self.check_ensemble(len(members), "--teacher")
        self._validate_reinforcement()
        self._validate_dataset_reinforcement()

    def teacher_members(self) -> list[tuple[str, Optional[str]]]:
        """(open_clip model, pretrained or None) per teacher, in order; a ConfigError when --teacher and
        --teacher-pretrained do not pair up."""
        return pair_teachers(as_list(self.teacher), as_list(self.teacher_pretrained))

    def ensemble(self) -> str:
        """The kernels' ensemble mode of --distill-average-after-softmax."""
        return "average-after-softmax" if self.distill_average_after_softmax else "average-losses"

    def check_ensemble(self, members: int, where: str) -> None:
        """Refuse, in one line, loss weights that an ensemble of ``members`` teachers (given by ``where``) cannot
        feed in this run's mode: afd (its fusion layers are one teacher's), and under --distill-average-after-softmax
        every term that puts teacher and student embeddings side by side (kernels/README.md, "Teacher
        ensembles"). One teacher feeds every term."""
        if members < 2:
            return
        weights = self.loss_weights()
        if weights.get("afd", 0):
            raise ConfigError(f"--afd-weight: afd fuses the student with one teacher, and {where} gives an ensemble "
                              f"of {members}; set --afd-weight 0 or train from one teacher")
        embedding = [key for key in EMBEDDING_TEACHER_TERMS if weights.get(key, 0)]
        if self.ensemble() == AVERAGE_AFTER_SOFTMAX and embedding:
            flags = " ".join(f"--{key.replace('_', '-')}-weight 0" for key in embedding)
            raise ConfigError(f"--distill-average-after-softmax: the terms {embedding} of this run put teacher and "
                              f"student embeddings side by side, so the {members} teachers of {where} have no "
                              f"softmax to average for them; leave out --distill-average-after-softmax (the mean of "
                              f"the per-teacher losses) or pass {flags} (e.g. --preset baseline --hrd-weight 1)")

    def _validate_dataset_reinforcement(self) -> None:
        default = TrainConfig()
        given = [name for name in DATASET_REINFORCEMENT_ONLY if getattr(self, name) != getattr(default, name)]
        if given and not self.dataset_reinforcement:
            raise ConfigError(f"--{given[0].replace('_', '-')} only applies with --dataset-reinforcement")
        if not 0.0 <= self.dataset_reinforcement_mix_synthetic_ratio <= 1.0:
            raise ConfigError(f"--dataset-reinforcement-mix-synthetic-ratio: must be in [0, 1], got "
                              f"{self.dataset_reinforcement_mix_synthetic_ratio}")
        if self.dataset_reinforcement_drop_mismatched and not self.dataset_reinforcement_verify_sha256:
            raise ConfigError("--dataset-reinforcement-drop-mismatched only applies with "
                              "--dataset-reinforcement-verify-sha256")
        dims, scales = self.distill_teacher_dimension, self.distill_logit_scale
        if dims is not None and (not dims or any(d < 1 for d in dims)):
            raise ConfigError(f"--distill-teacher-dimension: widths must be >= 1, got {dims}")
        if scales is not None and (any(not s > 0 for s in scales) or len(scales) not in (1, len(dims or [0]))):
            raise ConfigError(f"--distill-logit-scale {scales}: one positive scale, or one per teacher "
                              f"({len(dims or [0])} by --distill-teacher-dimension)")
        if self.dataset_reinforcement and dims:
            self.check_ensemble(len(dims), "--distill-teacher-dimension")
        if self.distill_loss_weights is not None and len(self.distill_loss_weights) != 2:
            raise ConfigError(f"--distill-loss-weights: two weights (contrastive, distillation), got "
                              f"{self.distill_loss_weights}")
        if self.dataset_reinforcement and not self.dataset_reinforcement_mix_synthetic and self.accum_freq > 1:
            raise ConfigError("--accum-freq: with --dataset-reinforcement, only with --dataset-reinforcement-mix-"
                              "synthetic (one caption per sample; without it each step has a second, synthetic one)")
        if self.dataset_reinforcement and (self.online_teacher or self.teacher_store):
            raise ConfigError("--dataset-reinforcement: the shards carry the teacher embeddings; leave out "
                              "--online-teacher and --teacher-store")

    def _validate_reinforcement(self) -> None:
        if self.view_sampling not in SAMPLINGS:
            raise ConfigError(f"--view-sampling: {self.view_sampling!r} is not one of {SAMPLINGS}")
        if not 0.0 <= self.mix_synthetic_ratio <= 1.0:
            raise ConfigError(f"--mix-synthetic-ratio: must be in [0, 1], got {self.mix_synthetic_ratio}")
        asked = [flag for flag, value in (("--augmentations", self.augmentations), ("--captions", self.captions),
                                          ("--aug-cfg", self.aug_cfg and not self.online_augment)) if value]
        if self.online_teacher and asked:
            raise ConfigError(f"{asked[0]}: stored views and captions come from a teacher store; --online-teacher "
                              f"runs the teacher on the .txt caption and on the evaluation view (with "
                              f"--online-augment: on a new view under --aug-cfg at every epoch)")
        distils = any(v != 0 for k, v in self.loss_weights().items() if k != "task")
        if self.online_augment and (self.dataset_reinforcement or (distils and not self.online_teacher)):
            raise ConfigError("--online-augment: a new view per step needs the teacher run on the batch "
                              "(--online-teacher) or no teacher term; a store's views are --augmentations K")
        # K < 0, C < 1, unknown --aug-cfg keys, bad values: one line each (the store's own fill in what is not given)
        Reinforcement.from_flags(self.augmentations, self.aug_cfg if self.augmentations is not None else {},
                                 self.captions)
        AugmentCfg.from_dict(self.aug_cfg)

    def store_settings(self) -> Reinforcement:
        """The views and captions of the store this run builds (the cache's, or a --teacher-store not built yet):
        the flags given, the defaults for the others."""
        views = DEFAULT_AUGMENTATIONS if self.augmentations is None else self.augmentations
        aug_cfg = self.aug_cfg or (DEFAULT_AUG_CFG if views and self.augmentations is None else {})
        return Reinforcement.from_flags(views, aug_cfg, DEFAULT_CAPTIONS if self.captions is None else self.captions)

    def store_mismatch(self, settings: Reinforcement) -> Optional[str]:
        """What this run asks for (each of --augmentations, --aug-cfg, --captions given) that a store holding
        ``settings`` does not have; None when it has everything asked for."""
        asked = {"views": self.augmentations, "captions": self.captions,
                 "aug_cfg": AugmentCfg.from_dict(self.aug_cfg).to_dict() if self.aug_cfg else None}
        have = settings.settings()
        differ = [f"{key} {have[key]} (the run asks for {value})" for key, value in asked.items()
                  if value is not None and have[key] != value]
        return "; ".join(differ) or None

    def _validate_optimizer(self) -> None:
        """AdamW's settings, finite and in range (a NaN compares false, so every check refuses it)."""
        require("--lr", self.lr, f"> 0 and at most {MAX_LR:g}", 0 < self.lr <= MAX_LR)
        require("--wd", self.wd, ">= 0 and finite", 0 <= self.wd < math.inf)
        require("--eps", self.eps, f"> 0 and at most {MAX_EPS:g}", 0 < self.eps <= MAX_EPS)
        for name in ("beta1", "beta2"):
            require(f"--{name}", getattr(self, name), "in [0, 1)", 0.0 <= getattr(self, name) < 1.0)
        if self.grad_clip_norm is not None:
            require("--grad-clip-norm", self.grad_clip_norm, "> 0 and finite (leave it out for no clipping)",
                    0 < self.grad_clip_norm < math.inf)
        require("--prepare-timeout", self.prepare_timeout, "> 0 and finite", 0 < self.prepare_timeout < math.inf)
        if self.distill_logit_bias is not None:
            require("--distill-logit-bias", self.distill_logit_bias, "finite", math.isfinite(self.distill_logit_bias))

    def check_total_steps(self, total_steps: int) -> None:
        """The run's optimizer steps (``--epochs`` epochs of the data's steps) within MAX_STEPS."""
        if total_steps > MAX_STEPS:
            raise ConfigError(f"--epochs {self.epochs}: the run would take {total_steps} optimizer steps, more than "
                              f"{MAX_STEPS:,} (a bound no real run reaches)")

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


def as_list(value) -> list:
    """A flag's value that may be repeated: None -> [], one value -> [it], a list as it is."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def require(flag: str, value, expected: str, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"{flag}: must be {expected}, got {value}")


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


# Flags given once per teacher of an ensemble (argparse's action="append").
REPEATED_FLAGS = ("teacher", "teacher_pretrained")
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
        elif f.name == "aug_cfg":
            words += ["--aug-cfg", *(f"{key}={item!r}" for key, item in value.items())]
        elif f.name in NEGATED_SWITCHES:
            words.append(NEGATED_SWITCHES[f.name])
        elif isinstance(value, bool):
            words.append(f"--{f.name.replace('_', '-')}")
        elif f.name == "loss_backend" and value == "auto":
            words.append("--fused")
        elif f.name in REPEATED_FLAGS:  # one flag per member: --teacher A --teacher B
            words += [word for item in as_list(value) for word in (f"--{f.name.replace('_', '-')}", str(item))]
        elif isinstance(value, list):  # nargs="+" flags (--distill-teacher-dimension 768 768)
            words += [f"--{f.name.replace('_', '-')}", *(str(item) for item in value)]
        else:
            words += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(words)
