"""Evaluation with clip_benchmark's metric names: zero-shot ``acc1``/``acc5`` (prompt-template ensembles) and
``image_retrieval_recall@k`` (text query -> its image) / ``text_retrieval_recall@k`` (image query -> its text).

Zero-shot needs labels (``label`` in each sample's .json) and a ``classnames.json`` (classnames + templates)
next to the validation shards; retrieval works on any image-caption shards.

``imagenet_zero_shot`` is open_clip_train's ImageNet zero-shot evaluation (``--imagenet-val``): an ImageFolder of
ImageNet's 1000 class folders, open_clip's class names and OpenAI templates, metrics ``imagenet-zeroshot-val-top1``
and ``-top5``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip import IMAGENET_CLASSNAMES, build_zero_shot_classifier
from torchvision.datasets import ImageFolder

from models.factory import input_dtype, one_line

from ..core.errors import ShardError, UserError
from ..data import shards as data_lib


def _weight_dtype(model) -> torch.dtype:
    """fp32, or bf16 / fp16 for a student trained in low precision (--precision bf16 / fp16 / pure_bf16 / ...)."""
    return input_dtype(model)


class Classnames(NamedTuple):
    """A classnames JSON's class names (label i: names[i]) and prompt templates; ``source`` names it in messages."""
    names: list[str]
    templates: list[str]
    source: str


def load_classnames(path: Path, source: str) -> Classnames:
    """``path`` as Classnames; a UserError naming ``source`` unless it is a JSON object whose "classnames" and
    "templates" are non-empty lists of strings, each template formatting the class name as {c}."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, a folder, not UTF-8, not JSON
        raise UserError(f"{source}: cannot read it as JSON ({one_line(exc)})") from exc
    lists = [content.get(key) if isinstance(content, dict) else None for key in ("classnames", "templates")]
    if not all(isinstance(items, list) and items and all(isinstance(item, str) for item in items) for items in lists):
        raise UserError(f'{source}: expected a JSON object with "classnames" and "templates", each a non-empty list '
                        f"of strings")
    for template in lists[1]:
        try:
            template.format(c="")
        except (IndexError, KeyError, ValueError) as exc:
            raise UserError(f"{source}: template {template!r} does not format ({type(exc).__name__}: {exc}); "
                            f"write the class name as {{c}}") from exc
    return Classnames(*lists, source)


def classnames_beside(pattern: str) -> Optional[Classnames]:
    """The classnames.json next to the (first) shard of ``pattern``, if there is one."""
    path = Path(data_lib.expand_urls(pattern)[0]).parent / "classnames.json"
    return load_classnames(path, str(path)) if path.exists() else None


def _check_labels(labels: torch.Tensor, classes: Classnames, pattern: str) -> None:
    """A label without a class name would never be predicted: accuracy 0 without a word, or a topk out of range."""
    outside = labels[(labels < 0) | (labels >= len(classes.names))]
    if len(outside):
        raise UserError(f"{classes.source}: {len(classes.names)} class names, but {pattern!r} holds label "
                        f"{outside[0].item()} (labels 0..N-1 need N class names, in label order)")


@torch.no_grad()
def encode_shards(model, preprocess, tokenizer, pattern: str, batch_size: int = 500,
                  device: str | torch.device = "cpu", num_samples: Optional[int] = None,
                  classes: Optional[Classnames] = None) -> dict:
    """Normalised image/text embeddings and labels (or None) of every sample, in shard order; ``num_samples``: the
    count to expect (ShardError naming --val-num-samples otherwise); ``classes``: labels must name one of them
    (a UserError before the first batch that does not)."""
    codec = data_lib.Codec(images={"image": preprocess}, texts={"text": tokenizer})
    urls = data_lib.expand_urls(pattern)
    sizes = data_lib.shard_sizes(urls)
    images, texts, labels = [], [], []
    model.eval()
    samples = (codec(raw) for url in urls for raw in data_lib.read_shard(url, sizes[url]))
    # decoded as they stream: memory independent of shard size
    for batch in data_lib.batched(samples, batch_size, codec.collate):
        if classes is not None and batch.get("label") is not None:
            _check_labels(batch["label"], classes, pattern)
        out = model(batch["image"].to(device, _weight_dtype(model)), batch["text"].to(device))
        images.append(F.normalize(out["image_features"].float(), dim=-1).cpu())
        texts.append(F.normalize(out["text_features"].float(), dim=-1).cpu())
        labels.append(batch.get("label"))
    read = sum(len(part) for part in images)
    if num_samples is not None and read != num_samples:
        raise ShardError(f"--val-num-samples {num_samples}: read {read} samples from {pattern!r}")
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


def _require_finite(embeddings: dict[str, torch.Tensor]) -> None:
    """NaN compares false, so a NaN score would rank its own pair first: refuse instead of a perfect score."""
    for name, tensor in embeddings.items():
        if not torch.isfinite(tensor).all():
            raise UserError(f"the model's {name} hold NaN or inf: its weights are not finite (or overflow in its "
                            f"precision)")


def zero_shot_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks=(1, 5)) -> dict[str, float]:
    """``acc{k}`` for each k up to the number of classes (as clip_benchmark, which has no acc5 below 5 classes)."""
    _require_finite({"image embeddings": image_features, "class embeddings": classifier})
    num_classes = classifier.shape[1]
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise UserError(f"labels must lie in 0..{num_classes - 1} (one per class), got {labels.min().item()}.."
                        f"{labels.max().item()}")
    ks = [k for k in ks if k <= num_classes]
    logits = image_features @ classifier  # (N, C)
    top = logits.topk(max(ks), dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {f"acc{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Pair i = (image i, text i). Recall@k: share of queries whose own pair ranks in the top k."""
    _require_finite({"image embeddings": image_features, "text embeddings": text_features})
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


def evaluate(model, preprocess, tokenizer, pattern: str, batch_size: int = 500,
             device: str | torch.device = "cpu", classes: Optional[Classnames] = None,
             num_samples: Optional[int] = None) -> dict[str, float]:
    """Retrieval recalls, and zero-shot accuracies where the samples have labels and there are class names
    (``classes``, else the classnames.json beside the shards)."""
    was_training = model.training
    classes = classes if classes is not None else classnames_beside(pattern)
    features = encode_shards(model, preprocess, tokenizer, pattern, batch_size, device, num_samples, classes)
    metrics = retrieval_recall(features["image"], features["text"])
    if classes is not None and features["labels"] is not None:
        classifier = zero_shot_classifier(model, tokenizer, classes.names, classes.templates, device)
        metrics = {**zero_shot_accuracy(features["image"], classifier, features["labels"]), **metrics}
    model.train(was_training)
    return metrics


def imagenet_folder(root: str, transform=None):
    """torchvision's ImageFolder of ``root`` (classes in sorted folder order, as open_clip's class names are);
    refused in one line if it is missing, has other than 1000 class folders, or no images."""
    if not os.path.isdir(root):
        raise UserError(f"--imagenet-val {root}: no such directory")
    classes = [entry for entry in os.scandir(root) if entry.is_dir()]  # ImageFolder's classes, before it refuses 0
    if len(classes) != len(IMAGENET_CLASSNAMES):
        raise UserError(f"--imagenet-val {root}: {len(classes)} class folders, expected ImageNet's "
                        f"{len(IMAGENET_CLASSNAMES)} (one folder per class, e.g. n01440764, in ImageNet's order)")
    dataset = ImageFolder(root, transform=transform, allow_empty=True)
    if len(dataset) == 0:
        raise UserError(f"--imagenet-val {root}: no images in its class folders")
    return dataset


@torch.no_grad()
def imagenet_zero_shot(model, preprocess, tokenizer, root: str, batch_size: int = 500, workers: int = 0,
                       device: str | torch.device = "cpu", templates=None) -> dict[str, float]:
    """open_clip_train's zero-shot ImageNet top-1/top-5 on the ImageFolder ``root``; ``templates``: the prompt
    templates (callables of the class name), by default open_clip's 80 OpenAI ImageNet templates."""
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES if templates is None else templates
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, IMAGENET_CLASSNAMES, templates,
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
