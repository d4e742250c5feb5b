"""Evaluation with clip_benchmark's metric names: zero-shot ``acc1``/``acc5`` (prompt-template ensembles) and
``image_retrieval_recall@k`` (text query -> its image) / ``text_retrieval_recall@k`` (image query -> its text).

Zero-shot needs labels (``label`` in each sample's .json) and a ``classnames.json`` (classnames + templates)
next to the validation shards; retrieval works on any image-caption shards.

``imagenet_zero_shot`` is open_clip_train's ImageNet zero-shot evaluation (``--imagenet-val``): an ImageFolder of
ImageNet's 1000 class folders, open_clip's class names and OpenAI templates, metrics ``imagenet-zeroshot-val-top1``
and ``-top5``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as data_lib
from .checkpoint import describe_unloadable
from .cli import HelpFormatter


def _weight_dtype(model) -> torch.dtype:
    """fp32, or bf16 / fp16 for a student trained in pure low precision (--precision bf16 / fp16)."""
    return next(model.parameters()).dtype


@torch.no_grad()
def encode_shards(model, preprocess, tokenizer, pattern: str, batch_size: int = 500,
                  device: str | torch.device = "cpu", num_samples: Optional[int] = None) -> dict:
    """Normalised image/text embeddings and labels (or None) of every sample, in shard order; ``num_samples``: the
    count to expect (ShardError naming --val-num-samples otherwise)."""
    codec = data_lib.Codec(images={"image": preprocess}, texts={"text": tokenizer})
    urls = data_lib.expand_urls(pattern)
    sizes = data_lib.shard_sizes(urls)
    images, texts, labels = [], [], []
    model.eval()
    samples = (codec(raw) for url in urls for raw in data_lib.read_shard(url, sizes[url]))
    # decoded as they stream: memory independent of shard size
    for batch in data_lib.batched(samples, batch_size, codec.collate):
        out = model(batch["image"].to(device, _weight_dtype(model)), batch["text"].to(device))
        images.append(F.normalize(out["image_features"].float(), dim=-1).cpu())
        texts.append(F.normalize(out["text_features"].float(), dim=-1).cpu())
        labels.append(batch.get("label"))
    read = sum(len(part) for part in images)
    if num_samples is not None and read != num_samples:
        raise data_lib.ShardError(f"--val-num-samples {num_samples}: read {read} samples from {pattern!r}")
    has_labels = all(label is not None for label in labels)
    return {"image": torch.cat(images), "text": torch.cat(texts),
            "labels": torch.cat(labels) if has_labels else None}


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str],
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """(D, C): per class, the normalised mean of its normalised prompt embeddings."""
    weights = []
    for classname in classnames:
        tokens = tokenizer([t.format(c=classname) for t in templates]).to(device)
        embedding = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(dim=0)
        weights.append(F.normalize(embedding, dim=0))
    return torch.stack(weights, dim=1).cpu()


def zero_shot_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks=(1, 5)) -> dict[str, float]:
    logits = image_features @ classifier  # (N, C)
    top = logits.topk(max(ks), dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {f"acc{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Pair i = (image i, text i). Recall@k: share of queries whose own pair ranks in the top k."""
    scores = text_features @ image_features.T  # (texts, images)
    target = torch.arange(scores.shape[0])
    out = {}
    for name, matrix in (("image_retrieval", scores), ("text_retrieval", scores.T)):
        # rank of the positive = number of candidates scoring strictly higher
        positive = matrix[target, target][:, None]
        rank = (matrix > positive).sum(dim=1)
        for k in ks:
            out[f"{name}_recall@{k}"] = (rank < k).float().mean().item()
    return out


def load_classnames(pattern: str, classnames_file: Optional[str] = None) -> Optional[dict]:
    beside_shards = Path(data_lib.expand_urls(pattern)[0]).parent / "classnames.json"
    path = Path(classnames_file) if classnames_file else beside_shards
    return json.loads(path.read_text()) if path.exists() else None


def evaluate(model, preprocess, tokenizer, pattern: str, batch_size: int = 500,
             device: str | torch.device = "cpu", classnames_file: Optional[str] = None,
             num_samples: Optional[int] = None) -> dict[str, float]:
    was_training = model.training
    features = encode_shards(model, preprocess, tokenizer, pattern, batch_size, device, num_samples)
    metrics = retrieval_recall(features["image"], features["text"])
    names = load_classnames(pattern, classnames_file)
    if names is not None and features["labels"] is not None:
        classifier = zero_shot_classifier(model, tokenizer, names["classnames"], names["templates"], device)
        metrics = {**zero_shot_accuracy(features["image"], classifier, features["labels"]), **metrics}
    model.train(was_training)
    return metrics


def imagenet_folder(root: str, transform=None):
    """torchvision's ImageFolder of ``root`` (classes in sorted folder order, as open_clip's class names are);
    refused in one line if it is missing, has other than 1000 class folders, or no images."""
    from open_clip import IMAGENET_CLASSNAMES
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--imagenet-val {root}: no such directory")
    classes = [entry for entry in os.scandir(root) if entry.is_dir()]  # ImageFolder's classes, before it refuses 0
    if len(classes) != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--imagenet-val {root}: {len(classes)} class folders, expected ImageNet's "
                         f"{len(IMAGENET_CLASSNAMES)} (one folder per class, e.g. n01440764, in ImageNet's order)")
    dataset = ImageFolder(root, transform=transform, allow_empty=True)
    if len(dataset) == 0:
        raise ValueError(f"--imagenet-val {root}: no images in its class folders")
    return dataset


@torch.no_grad()
def imagenet_zero_shot(model, preprocess, tokenizer, root: str, batch_size: int = 500, workers: int = 0,
                       device: str | torch.device = "cpu") -> dict[str, float]:
    """open_clip_train's zero-shot ImageNet top-1/top-5 on the ImageFolder ``root``."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                                            num_classes_per_batch=10, device=device).float()  # (D, 1000)
    loader = torch.utils.data.DataLoader(imagenet_folder(root, preprocess), batch_size=batch_size,
                                         num_workers=workers)
    hits, count = {"acc1": 0.0, "acc5": 0.0}, 0
    for images, labels in loader:
        features = F.normalize(model.encode_image(images.to(device, _weight_dtype(model))).float(), dim=-1)
        for name, share in zero_shot_accuracy(features, classifier, labels.to(device)).items():
            hits[name] += share * len(labels)
        count += len(labels)
    model.train(was_training)
    return {"imagenet-zeroshot-val-top1": hits["acc1"] / count, "imagenet-zeroshot-val-top5": hits["acc5"] / count}


def latest_checkpoint(logs: str) -> Optional[Path]:
    """The most recently written ``<logs>/<name>/checkpoints/epoch_latest.pt``, if any."""
    found = sorted(Path(logs).glob("*/checkpoints/epoch_latest.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv=None) -> None:
    import sys

    import models

    from .defaults import DEFAULT_TEACHER_TAG, default_teacher_path, ensure_default_data
    from .paths import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help="open_clip model name (default: the checkpoint's model, else tiny-vit-student)")
    parser.add_argument("--pretrained", default=None,
                        help="checkpoint file (engine or open_clip) or open_clip tag; 'default-teacher' = the shipped "
                             "teacher; default: the latest run's student under --logs")
    parser.add_argument("--logs", default="./logs", help="where to look for the latest run without --pretrained")
    parser.add_argument("--val-data", default=None, help="validation shards (default: embedded validation split)")
    parser.add_argument("--classnames", default=None, help="JSON with classnames and templates (default: the "
                        "classnames.json beside the validation shards)")
    parser.add_argument("--imagenet-val", default=None,
                        help="also zero-shot ImageNet (open_clip_train's --imagenet-val): an ImageFolder of the 1000 "
                             "class folders; None: the validation shards only")
    parser.add_argument("--batch-size", type=int, default=500, help="samples per forward pass")
    parser.add_argument("--cache-dir", default=None,
                        help="cache of the embedded dataset (default: $CLIP_RD_CACHE or ~/.cache/clip_rd)")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    pretrained, model_name = args.pretrained, args.model
    if pretrained == DEFAULT_TEACHER_TAG:
        pretrained, model_name = str(default_teacher_path()), model_name or "tiny-vit-teacher"
    elif pretrained is None:
        latest = latest_checkpoint(args.logs)
        if latest is None:
            sys.exit(f"error: no --pretrained given and no run under --logs {args.logs}: pass a checkpoint with "
                     f"--pretrained (e.g. logs/<name>/checkpoints/epoch_latest.pt) or 'default-teacher'")
        pretrained = str(latest)
        print(f"evaluating the latest run's student: {latest}", file=sys.stderr)
    if model_name is None and Path(pretrained).is_file():  # an engine checkpoint names its model
        try:
            saved = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises several types for files that are not checkpoints
            reason = describe_unloadable(pretrained, exc)
            sys.exit(f"error: --pretrained {pretrained}: not a checkpoint file ({reason})")
        model_name = saved.get("model") if isinstance(saved, dict) else None
    model_name = model_name or "tiny-vit-student"
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    val = args.val_data or ensure_default_data(cache)["val"]
    try:
        if args.imagenet_val is not None:
            imagenet_folder(args.imagenet_val)  # refused before the model is built
        model = models.create_model(model_name, pretrained)
        preprocess, tokenizer = models.get_preprocess(model), models.get_tokenizer(model_name)
        metrics = evaluate(model, preprocess, tokenizer, val, args.batch_size, classnames_file=args.classnames)
        if args.imagenet_val is not None:
            metrics.update(imagenet_zero_shot(model, preprocess, tokenizer, args.imagenet_val, args.batch_size))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(metrics, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
