"""The run configuration: one dataclass (saved in every checkpoint) and its open_clip-style command line."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

from kernels import PRESETS, WEIGHT_KEYS

from .cli import HelpFormatter

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "fp32")  # open_clip_train's choices and meanings
AUTOCAST = {"amp": "float16", "amp_bf16": "bfloat16", "amp_bfloat16": "bfloat16"}
PURE = {"bf16": "bfloat16", "fp16": "float16"}  # the student's weights in this dtype


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
    fused: bool = False
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

    @property
    def backend(self) -> str:
        return "auto" if self.fused else "reference"

    def loss_weights(self) -> dict:
        weights = dict(PRESETS[self.preset])
        weights.update(self.weights)
        return weights

    def validate(self) -> None:
        """Every setting that can be wrong, checked before anything runs: one line naming the flag."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        unknown = sorted(set(self.weights) - set(WEIGHT_KEYS))
        if unknown:
            raise ValueError(f"weights: unknown term(s) {unknown}; expected {list(WEIGHT_KEYS)}")
        if not any(v != 0 for v in self.loss_weights().values()):
            raise ValueError("loss weights: every term's weight is zero (preset and --*-weight flags): "
                             "nothing to train")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0.0 <= self.mfd_mask_ratio < 1.0:
            raise ValueError(f"--mfd-mask-ratio: must be in [0, 1), got {self.mfd_mask_ratio}")
        at_least_one = ("batch_size", "accum_freq", "epochs", "save_frequency", "log_every_n_steps", "shuffle_buffer",
                        "max_skipped_steps")
        for name in at_least_one + ("stop_after_steps",):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        for name in ("warmup", "wd", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "eps", "prepare_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"--grad-clip-norm: must be > 0 (leave it out for no clipping), got {self.grad_clip_norm}")
        self._validate_open_clip_flags()
        if self.teacher_store is not None and self.online_teacher:
            raise ValueError("--teacher-store and --online-teacher exclude each other: "
                             "the online teacher needs no store")

    def _validate_open_clip_flags(self) -> None:
        for name in ("val_frequency", "zeroshot_frequency", "lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        for name in ("train_num_samples", "val_num_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for tower, companions in (("image", ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats")),
                                  ("text", ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"))):
            given = [name for name in companions if getattr(self, name)]
            if given and not getattr(self, f"lock_{tower}"):
                raise ValueError(f"--{given[0].replace('_', '-')} only applies with --lock-{tower}")
        report_to(self.report_to)


def report_to(value: Optional[str]) -> set:
    """The logging backends of open_clip's comma-separated --report-to that this engine writes: tensorboard."""
    backends = {part.strip() for part in (value or "").split(",") if part.strip()}
    unsupported = sorted(backends & {"wandb", "trackio", "all"})
    if unsupported:
        raise ValueError(f"--report-to {value}: {unsupported[0]!r} is not supported here (only 'tensorboard'; every "
                         f"metric is also in logs/<name>/metrics.jsonl)")
    unknown = sorted(backends - {"tensorboard"})
    if unknown:
        raise ValueError(f"--report-to {value}: unknown backend {unknown[0]!r}; expected 'tensorboard'")
    return backends


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m engine.train", formatter_class=HelpFormatter,
        description="Distil a student CLIP from a teacher's precomputed embeddings (CLIP-KD and CLIP-RD losses). "
                    "With no arguments: the embedded procedural dataset (generated once into the cache), the shipped "
                    "default teacher and its embedding store, a clip-rd student run and its evaluation; outputs go "
                    "to ./logs/<name>/.")
    a = p.add_argument
    a("--train-data", default=None, help="training webdataset shards, brace-expandable, '::'-separated "
      "(default: the embedded procedural dataset)")
    a("--val-data", default=None, help="held-out shards for evaluation (default: the embedded validation split)")
    a("--cache-dir", default=None, help="cache of the embedded data and teacher stores (default: $CLIP_RD_CACHE, "
      "else ~/.cache/clip_rd)")
    a("--workers", type=int, default=d.workers, help="DataLoader worker processes per rank (0: load in the main "
      "process, in a background thread that prepares the next batch while a step runs)")
    a("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="samples in the shuffle buffer of each worker")
    a("--train-num-samples", type=int, default=None,
      help="samples in an epoch, spread evenly over the shards (a worker starts over its shards when they hold "
           "fewer); required for remote shards, whose sizes are unknown; None: the shards' own sizes, from "
           "sizes.json or the tar listing")
    a("--val-num-samples", type=int, default=None,
      help="samples in the validation data: evaluation reads --val-data to its end and refuses another count "
           "(local shards at start, remote ones when read), so truncated remote shards do not go unnoticed")
    a("--imagenet-val", default=None,
      help="ImageNet validation folder (ImageFolder layout: 1000 class folders, sorted as ImageFolder sorts them) "
           "for zero-shot classification with open_clip's ImageNet class names and templates; None: no ImageNet")
    a("--model", default=d.model, help="student open_clip model name")
    a("--pretrained", default=None, help="the student's initial weights: open_clip pretrained tag or checkpoint "
      "file; None: random initialisation")
    a("--lock-image", action="store_true", help="lock the student's image tower (no gradients, not in the "
      "optimizer), as in LiT")
    a("--lock-image-unlocked-groups", type=int, default=d.lock_image_unlocked_groups,
      help="with --lock-image: leave the last n image tower layer groups unlocked")
    a("--lock-image-freeze-bn-stats", action="store_true",
      help="with --lock-image: freeze BatchNorm running stats in the locked layers of the image tower")
    a("--lock-text", action="store_true", help="lock the student's text tower (no gradients, not in the optimizer)")
    a("--lock-text-unlocked-layers", type=int, default=d.lock_text_unlocked_layers,
      help="with --lock-text: leave the last n text tower layer groups unlocked")
    a("--lock-text-freeze-layer-norm", action="store_true",
      help="with --lock-text: freeze the LayerNorms of the locked layers too (open_clip's CLIP text towers "
           "support only this)")
    a("--teacher", "--distill-model", dest="teacher", default=d.teacher,
      help="teacher open_clip model name (open_clip_train's --distill-model)")
    a("--teacher-pretrained", "--distill-pretrained", dest="teacher_pretrained", default=None,
      help="teacher weights: open_clip pretrained tag or checkpoint file (default: the shipped default teacher; "
           "open_clip_train's --distill-pretrained)")
    a("--teacher-store", default=None, help="teacher embedding store directory built by engine.precompute "
      "(default: the cache's store for this teacher and data, built when missing)")
    a("--online-teacher", action="store_true", help="run the teacher on every batch instead of reading a store")
    a("--preset", default=d.preset, choices=sorted(PRESETS),
      help="loss preset (the per-term weights below override it)")
    for key in WEIGHT_KEYS:
        a(f"--{key.replace('_', '-')}-weight", type=float, default=None,
          help=f"weight of the {key} term (default: the preset's)")
    a("--mfd-mask-ratio", type=float, default=d.mfd_mask_ratio,
      help="masked feature distillation: share of student image patches dropped (the teacher saw the full image)")
    a("--fused", action="store_true", help="fused loss backend 'auto' (Triton on GPU, chunked on CPU) instead of "
      "the plain 'reference'")
    a("--batch-size", type=int, default=d.batch_size, help="batch size per process (the micro-batch with "
      "--accum-freq)")
    a("--accum-freq", type=int, default=d.accum_freq, help="micro-batches per optimizer step: a step sees "
      "batch-size x accum-freq samples per process, with the whole batch's exact contrastive gradient at the "
      "activation memory of one micro-batch (GradCache: one loss evaluation, a second forward per micro-batch)")
    a("--grad-checkpointing", action="store_true", help="recompute the student towers' activations in backward "
      "(open_clip's set_grad_checkpointing): less memory, more time")
    a("--epochs", type=int, default=d.epochs, help="passes over the training data")
    a("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    a("--wd", type=float, default=d.wd, help="weight decay (not on gains, biases, logit scale and multipliers)")
    a("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    a("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    a("--eps", type=float, default=d.eps, help="AdamW epsilon")
    a("--warmup", type=int, default=d.warmup, help="linear warmup steps before the cosine decay")
    a("--precision", default=d.precision, choices=PRECISIONS,
      help="open_clip's meanings: amp = fp16 autocast with loss scaling, amp_bf16/amp_bfloat16 = bf16 autocast, "
           "bf16/fp16 = the student's weights in that dtype, fp32 = no autocast; the loss always runs in fp32")
    a("--grad-clip-norm", type=float, default=d.grad_clip_norm, help="clip the gradient norm to this (default: no "
      "clipping)")
    a("--seed", type=int, default=d.seed, help="seed of the initialisation and the data order")
    a("--local-loss", action="store_true", help="torchrun: each rank's loss over its own anchor rows against all "
      "gathered columns (N / ranks rows per rank); the whole batch's exact gradient with --gather-with-grad")
    a("--gather-with-grad", action="store_true", help="torchrun: all-gather embeddings with their gradient")
    a("--logs", default=d.logs, help="where run folders go: <logs>/<name>/")
    a("--name", default=None, help="run name (default: time, model and preset)")
    a("--resume", default=None, help="'latest' (this run's epoch_latest.pt) or a checkpoint path")
    a("--save-frequency", type=int, default=d.save_frequency, help="keep epoch_K.pt every this many epochs")
    a("--log-every-n-steps", type=int, default=d.log_every_n_steps, help="one log line and metrics row every this "
      "many steps")
    a("--no-eval", dest="eval", action="store_false", help="no evaluation: neither per epoch nor at the end")
    a("--val-frequency", type=int, default=d.val_frequency,
      help="evaluate on --val-data after every this many epochs and after the last (0: never; 'val' rows of "
           "metrics.jsonl); the evaluation at the end (results.json) is separate")
    a("--zeroshot-frequency", type=int, default=d.zeroshot_frequency,
      help="zero-shot classification on --imagenet-val after every this many epochs and after the last (0: never)")
    a("--report-to", default=None, help="'tensorboard': also write TensorBoard event files to "
      "<logs>/<name>/tensorboard/ (needs pip install -e '.[tensorboard]'); open_clip's 'wandb' is not supported; "
      "None: metrics.jsonl only")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--stop-after-steps", type=int, default=None,
      help="save epoch_latest.pt and stop after this many optimizer steps in all (continue with --resume latest)")
    a("--allow-config-change", action="store_true",
      help="--resume even if batch size, preset, weights, data, models or seed differ from the checkpoint's")
    a("--max-skipped-steps", type=int, default=d.max_skipped_steps,
      help="amp: stop when this many consecutive steps were skipped for non-finite gradients")
    a("--prepare-timeout", type=float, default=d.prepare_timeout,
      help="torchrun: seconds the other ranks wait for rank 0 to prepare data, teacher and store")
    return p


def parse_args(argv=None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    weights = {key: args.pop(f"{key}_weight") for key in WEIGHT_KEYS}
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in names},
                      weights={k: v for k, v in weights.items() if v is not None})
    cfg.validate()
    return cfg
