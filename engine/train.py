"""``python -m engine.train``: distil a student CLIP from a teacher's precomputed (or online) embeddings.

The command line (open_clip_train's flag names and meanings) over engine.training: ``parse_args`` builds the
TrainConfig, engine.training.prepare resolves the inputs (building the embedded default when no data is given),
engine.training.loop.run trains.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Optional

import torch

from kernels import PRESETS, WEIGHT_KEYS

from .cli import HelpFormatter, run_command
from .core.errors import UserError
from .data.augment import SAMPLINGS, parse_pairs
from .training.config import (
    DEFAULT_AUG_CFG,
    DEFAULT_AUGMENTATIONS,
    DEFAULT_CAPTIONS,
    LOSS_BACKENDS,
    MAX_EPOCHS,
    MAX_EPS,
    MAX_LR,
    MAX_STEPS,
    PRECISIONS,
    REPEATED_FLAGS,
    TrainConfig,
)
from .training.datacompdr import resolve_datacompdr
from .training.distributed import close_distributed, init_distributed, is_collective_failure
from .training.loop import run
from .training.prepare import prepare
from .training.resume import check_resume
from .training.step import AfterBackward


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
    a("--dataset-type", default="auto", choices=("webdataset", "auto"),
      help="open_clip_train's data format: this engine reads webdataset shards, so 'webdataset' and 'auto' are the "
      "same here (open_clip's csv and synthetic formats are not supported)")
    a("--dataset-resampled", action="store_true",
      help="open_clip_train's: each worker reads whole shards drawn at random with replacement (seeded by --seed, "
      "the epoch, the rank and the worker: the same after --resume) instead of a permutation of the shards, and an "
      "epoch is --train-num-samples (else the shards' sizes) over the global batch")
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
    a("--teacher", "--distill-model", dest="teacher", action="append", default=None, metavar="MODEL",
      help=f"teacher open_clip model name (open_clip_train's --distill-model); repeat it for a teacher ensemble, one "
      f"--teacher-pretrained per --teacher in the same order: its store holds every member's rows side by side "
      f"(default: {d.teacher})")
    a("--teacher-pretrained", "--distill-pretrained", dest="teacher_pretrained", action="append", default=None,
      metavar="TAG_OR_FILE",
      help="teacher weights: open_clip pretrained tag or checkpoint file (open_clip_train's --distill-pretrained); "
      "once per --teacher for an ensemble (default: the shipped default teacher's)")
    a("--teacher-store", default=None, help="teacher embedding store directory built by engine.precompute, of one "
      "teacher or an ensemble (default: the cache's store for these teachers and data, built when missing)")
    a("--online-teacher", action="store_true", help="run the teacher on every batch instead of reading a store "
      "(one teacher only: an ensemble is refused, its rows come from a store)")
    a("--online-augment", action="store_true",
      help="train on a new augmented view of every sample at every epoch, drawn under --aug-cfg (seeded: the same "
      "after --resume); with --online-teacher the teacher embeds that same view (open_clip_train --distill's "
      "recipe); also without a teacher term (--preset baseline). A store's views are --augmentations K instead")
    add_reinforcement_flags(a, d)
    add_dataset_reinforcement_flags(p)
    a("--preset", default=d.preset, choices=sorted(PRESETS),
      help="loss preset (the per-term weights below override it)")
    for key in WEIGHT_KEYS:
        a(f"--{key.replace('_', '-')}-weight", type=float, default=None,
          help=f"weight of the {key} term, >= 0 (default: the preset's)")
    a("--siglip", action="store_true",
      help="as open_clip_train: the student's own term is SigLIP's sigmoid loss instead of CLIP's softmax loss "
           "(its weight is --task-weight), with a learnable logit bias; logit scale and bias start at log(10) and "
           "-10")
    a("--distill-logit-bias", type=float, default=None,
      help="the teacher's logit bias in the sigmoid_kd targets (default: the teacher's own, recorded for SigLIP "
           "teachers; a CLIP teacher has none and needs this flag)")
    a("--mfd-mask-ratio", type=float, default=d.mfd_mask_ratio,
      help="masked feature distillation: share of student image patches dropped (the teacher saw the full image)")
    a("--loss-backend", default=d.loss_backend, choices=LOSS_BACKENDS,
      help="how the loss is computed (kernels/): 'auto' = the fused Triton kernels on a CUDA GPU, else the streamed "
      "'chunked' PyTorch path; 'triton' = the Triton kernels only (CUDA, or a CPU under TRITON_INTERPRET=1); "
      "'chunked' = streamed row blocks, never a B x B matrix; 'reference' = plain PyTorch with full B x B "
      "matrices (the ground truth: simplest, most memory)")
    a("--fused", dest="loss_backend", action="store_const", const="auto",
      help="short for --loss-backend auto (default: off, that is --loss-backend's default)")
    a("--batch-size", type=int, default=d.batch_size, help="batch size per process (the micro-batch with "
      "--accum-freq)")
    a("--accum-freq", type=int, default=d.accum_freq, help="micro-batches per optimizer step: a step sees "
      "batch-size x accum-freq samples per process, with the whole batch's exact contrastive gradient at the "
      "activation memory of one micro-batch (GradCache: one loss evaluation, a second forward per micro-batch)")
    a("--grad-checkpointing", action="store_true", help="recompute the student towers' activations in backward "
      "(open_clip's set_grad_checkpointing): less memory, more time")
    a("--epochs", type=int, default=d.epochs, help=f"passes over the training data (at most {MAX_EPOCHS}, and "
      f"{MAX_STEPS:,} optimizer steps in all: bounds no real run reaches)")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (AdamW); at most {MAX_LR:g}, a bound no real run "
      f"reaches (a larger value is refused as a typo)")
    a("--wd", type=float, default=d.wd, help="weight decay (not on gains, biases, logit scale and multipliers); "
      ">= 0")
    a("--beta1", type=float, default=d.beta1, help="AdamW beta1, in [0, 1)")
    a("--beta2", type=float, default=d.beta2, help="AdamW beta2, in [0, 1)")
    a("--eps", type=float, default=d.eps, help=f"AdamW epsilon, > 0 and at most {MAX_EPS:g}")
    a("--warmup", type=int, default=d.warmup, help="linear warmup steps before the cosine decay")
    a("--precision", default=d.precision, choices=PRECISIONS,
      help="open_clip's meanings: amp = fp16 autocast with loss scaling, amp_bf16/amp_bfloat16 = bf16 autocast, "
      "bf16/fp16 = OpenAI-style low precision (linear, convolution and attention weights and the projections in that "
      "dtype, LayerNorms in fp32), pure_bf16/pure_fp16 = every weight of the student in that dtype, fp32 = no "
      "autocast; the loss always runs in fp32")
    a("--grad-clip-norm", type=float, default=d.grad_clip_norm, help="clip the gradient norm to this (default: no "
      "clipping)")
    a("--seed", type=int, default=d.seed, help="seed of the initialisation and the data order")
    a("--local-loss", action="store_true", help="torchrun: each rank's loss over its own anchor rows against all "
      "gathered columns (N / ranks rows per rank); the whole batch's exact gradient with --gather-with-grad")
    a("--gather-with-grad", action="store_true", help="torchrun: all-gather embeddings with their gradient")
    a("--ddp-static-graph", action="store_true", help="open_clip_train's DistributedDataParallel(static_graph=True): "
      "always on here (the set of parameters with a gradient is the same every step), accepted so that open_clip "
      "and MobileCLIP command lines run unchanged")
    a("--logs", default=d.logs, help="where run folders go: <logs>/<name>/")
    a("--name", default=None, help="run name (default: time, model and preset)")
    a("--resume", default=None, help="'latest' (this run's epoch_latest.pt) or a checkpoint path")
    a("--save-frequency", type=int, default=d.save_frequency,
      help="keep epoch_K.pt every this many epochs, and after the last (0: after the last only, as open_clip_train); "
           "epoch_latest.pt is always written, for --resume")
    a("--save-most-recent", action="store_true", help="open_clip_train's: keep the most recent state in "
      "epoch_latest.pt; always on here (--resume latest reads it), accepted so that open_clip and MobileCLIP command "
      "lines run unchanged")
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
      help="seconds to wait for data, teacher and store being prepared by rank 0 (torchrun) or built by another "
      "run (the same cache or --teacher-store)")
    return p


def add_reinforcement_flags(a, d: TrainConfig) -> None:
    """The reinforced store's flags (engine.teachers.reinforced): its views and captions, and how a step draws them."""
    a("--augmentations", type=int, default=None, metavar="K",
      help="the teacher store's views per sample (MobileCLIP's dataset reinforcement): each step trains every sample "
      "on one stored view, replayed exactly at the student's size, against the teacher's embedding of that view; "
      "view 0 is the evaluation view; 0: the evaluation view alone, not replayed (default: a given --teacher-store's "
      f"own; the cache's store: {DEFAULT_AUGMENTATIONS})")
    a("--aug-cfg", nargs="*", default=[], metavar="KEY=VALUE",
      help="how the store's views (and --online-augment's) are drawn: open_clip_train's --aug-cfg keys scale and "
      "ratio (RandomResizedCrop), "
      "hflip (the flip's probability), and torchvision's RandAugment num_ops (0: none) and magnitude (of 31 bins) "
      "(default: a given --teacher-store's own; else scale=0.9,1.0 ratio=0.75,1.333 hflip=0 num_ops=2 magnitude=9"
      + (f" with the cache's store's {DEFAULT_AUG_CFG}" if DEFAULT_AUG_CFG else "") + ")")
    a("--captions", type=int, default=None, metavar="C",
      help="the teacher store's captions per sample: the .txt, then the first C-1 synthetic captions of its "
      f"syn.json (default: a given --teacher-store's own; the cache's store: {DEFAULT_CAPTIONS})")
    a("--view-sampling", default=d.view_sampling, choices=SAMPLINGS,
      help="which stored view and synthetic caption a sample gets at each step: 'random' (drawn from seed, epoch "
      "and sample key: the same after --resume) or 'sequential' (view epoch mod K, MobileCLIP's sample-sequential)")
    a("--mix-synthetic-ratio", type=float, default=d.mix_synthetic_ratio,
      help="with stored synthetic captions (--captions > 1): the probability that a sample's caption at a step is "
      "one of them rather than its .txt (MobileCLIP's mix-synthetic ratio)")


def add_dataset_reinforcement_flags(p: argparse.ArgumentParser) -> None:
    """MobileCLIP's flags for DataCompDR shards, with its meanings (README, "DataCompDR shards")."""
    a = p.add_argument
    a("--dataset-reinforcement", action="store_true",
      help="--train-data are DataCompDR shards: each sample carries its views (paug.json) and its teachers' "
      "embeddings (npz or pth.gz); no teacher store is read or built")
    a("--dataset-reinforcement-config", default=None, metavar="FILE",
      help="MobileCLIP's reinforcement JSON (e.g. datacompdr12m.json): its random_resized_crop size is the image "
      "size the views' operations were drawn for (default: the student's)")
    a("--dataset-reinforcement-mix-synthetic", action="store_true",
      help="mix syn.json's synthetic captions with the ground-truth .txt")
    a("--dataset-reinforcement-mix-synthetic-ratio", type=float, default=0.0,
      help="with --dataset-reinforcement-mix-synthetic: the probability that a sample's caption at a step is a "
      "synthetic one")
    a("--dataset-reinforcement-sample-sequential", action="store_true",
      help="view epoch mod K at each epoch instead of a random stored view")
    a("--dataset-reinforcement-syn-text-key-regex", default=r"^syn_text.*$",
      help="the syn.json keys whose captions are the synthetic ones (matched from the key's start, as re.match)")
    a("--dataset-reinforcement-verify-sha256", action="store_true",
      help="check each image's sha256 against its json's; a mismatch stops the run with the count and first keys")
    a("--dataset-reinforcement-drop-mismatched", action="store_true",
      help="with --dataset-reinforcement-verify-sha256: drop such samples instead, logging their count per epoch")
    a("--distill-logit-scale", type=float, nargs="+", default=None,
      help="the teachers' exponentiated logit scale: one for all, or one per teacher (default: 100)")
    a("--distill-loss-weights", type=float, nargs=2, default=None, metavar=("W_CONTRASTIVE", "W_DISTILL"),
      help="MobileCLIP's DRClipLoss weights: W_CONTRASTIVE is --task-weight and W_DISTILL --hrd-weight (the KD of "
      "the student's image-text logits towards the teachers'); every other term is 0 unless given")
    a("--distill-teacher-dimension", type=int, nargs="+", default=None,
      help="the ensemble members' widths, in their stored order; they must sum to the stored width (default: one "
      "teacher)")
    a("--distill-average-after-softmax", action="store_true",
      help="a teacher ensemble's (these shards' members, or a store's several --teacher) softmax terms against the "
      "mean of the teachers' softmaxes, MobileCLIP's mode: hrd and intra only, terms that compare embeddings "
      "(fd, icl, vrd, xrd, gd, cross_kd) are refused; no effect with one teacher (default: the mean of the "
      "per-teacher losses)")


def parse_args(argv=None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    weights = {key: args.pop(f"{key}_weight") for key in WEIGHT_KEYS}
    for name in REPEATED_FLAGS:  # not given: the default; once: that value; repeated: the list (an ensemble)
        given = args.pop(name)
        if given is not None:
            args[name] = given[0] if len(given) == 1 else given
    args["aug_cfg"] = parse_pairs(args["aug_cfg"])
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in names},
                      weights={k: v for k, v in weights.items() if v is not None})
    cfg.validate()
    return cfg


def train(argv=None, after_backward: Optional[AfterBackward] = None) -> None:
    """The command as a function; ``after_backward`` as in engine.training.step (for instance to dump gradients)."""
    cfg = parse_args(argv)
    finished = check_resume(cfg)
    if finished:
        print(finished)
        return
    env, device = init_distributed()
    try:
        sources = resolve_datacompdr(cfg) if cfg.dataset_reinforcement else prepare(cfg, env)
        run(cfg, sources, env, device, after_backward)
    except RuntimeError as exc:  # a peer died or hung: a collective failed or timed out on this rank
        if not is_collective_failure(exc):
            raise
        raise UserError(f"rank {torch.distributed.get_rank()}: collective communication failed, another rank has "
                        f"probably crashed or hung (torchrun's summary names it; resume with --resume latest): "
                        f"{exc}") from exc
    finally:
        close_distributed()


def main(argv=None) -> None:
    run_command(train, argv)


if __name__ == "__main__":
    main()
