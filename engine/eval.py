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
import pickle
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import models
from models.factory import describe_unloadable, load_failure, one_line

from . import data as data_lib
from .cli import HelpFormatter


def _weight_dtype(model) -> torch.dtype:
    """fp32, or bf16 / fp16 for a student trained in pure low precision (--precision bf16 / fp16)."""
    return next(model.parameters()).dtype


class Classnames(NamedTuple):
    """A classnames JSON's class names (label i: names[i]) and prompt templates; ``source`` names it in messages."""
    names: list[str]
    templates: list[str]
    source: str


def load_classnames(path: Path, source: str) -> Classnames:
    """``path`` as Classnames; ValueError naming ``source`` unless it is a JSON object whose "classnames" and
    "templates" are non-empty lists of strings, each template formatting the class name as {c}."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, a folder, not UTF-8, not JSON
        raise ValueError(f"{source}: cannot read it as JSON ({one_line(exc)})") from exc
    lists = [content.get(key) if isinstance(content, dict) else None for key in ("classnames", "templates")]
    if not all(isinstance(items, list) and items and all(isinstance(item, str) for item in items) for items in lists):
        raise ValueError(f'{source}: expected a JSON object with "classnames" and "templates", each a non-empty list '
                         f"of strings")
    for template in lists[1]:
        try:
            template.format(c="")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"{source}: template {template!r} does not format ({type(exc).__name__}: {exc}); "
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
        raise ValueError(f"{classes.source}: {len(classes.names)} class names, but {pattern!r} holds label "
                         f"{outside[0].item()} (labels 0..N-1 need N class names, in label order)")


@torch.no_grad()
def encode_shards(model, preprocess, tokenizer, pattern: str, batch_size: int = 500,
                  device: str | torch.device = "cpu", num_samples: Optional[int] = None,
                  classes: Optional[Classnames] = None) -> dict:
    """Normalised image/text embeddings and labels (or None) of every sample, in shard order; ``num_samples``: the
    count to expect (ShardError naming --val-num-samples otherwise); ``classes``: labels must name one of them
    (ValueError before the first batch that does not)."""
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


def _require_finite(embeddings: dict[str, torch.Tensor]) -> None:
    """NaN compares false, so a NaN score would rank its own pair first: refuse instead of a perfect score."""
    for name, tensor in embeddings.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"the model's {name} hold NaN or inf: its weights are not finite (or overflow in its "
                             f"precision)")


def zero_shot_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks=(1, 5)) -> dict[str, float]:
    """``acc{k}`` for each k up to the number of classes (as clip_benchmark, which has no acc5 below 5 classes)."""
    _require_finite({"image embeddings": image_features, "class embeddings": classifier})
    num_classes = classifier.shape[1]
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (one per class), got {labels.min().item()}.."
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


def checkpoint_to_evaluate(pretrained: Optional[str], model_name: Optional[str], logs: str) -> tuple[str, str]:
    """(--pretrained, --model) with their defaults: the shipped teacher for 'default-teacher', the latest run's student
    under ``logs`` without --pretrained, the model an engine checkpoint names, else tiny-vit-student."""
    from .defaults import DEFAULT_TEACHER_TAG, default_teacher_path

    if pretrained == DEFAULT_TEACHER_TAG:
        pretrained, model_name = str(default_teacher_path()), model_name or "tiny-vit-teacher"
    elif pretrained is None:
        latest = latest_checkpoint(logs)
        if latest is None:
            raise ValueError(f"no --pretrained given and no run under --logs {logs}: pass a checkpoint with "
                             f"--pretrained (e.g. logs/<name>/checkpoints/epoch_latest.pt) or 'default-teacher'")
        pretrained = str(latest)
        print(f"evaluating the latest run's student: {latest}", file=sys.stderr)
    if Path(pretrained).is_file():  # else an open_clip tag
        saved_model = _saved_model_name(pretrained)
        model_name = model_name or saved_model
    return pretrained, model_name or "tiny-vit-student"


def _saved_model_name(pretrained: str) -> Optional[str]:
    """The model an engine checkpoint names (None in open_clip's weight files); ValueError for a file that is not a
    checkpoint or names its model with something other than a string."""
    try:
        saved = torch.load(pretrained, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several types for files that are not checkpoints
        raise ValueError(f"--pretrained {pretrained}: not a checkpoint file ({describe_unloadable(pretrained, exc)})") \
            from exc
    name = saved.get("model") if isinstance(saved, dict) else None
    if name is not None and not isinstance(name, str):
        raise ValueError(f'--pretrained {pretrained}: its "model" entry is {name!r}, not a model name (pass --model)')
    return name


def load_model(model_name: str, pretrained: str):
    """The model with ``pretrained``'s weights; ValueError in one line naming --pretrained when they do not load into
    it or are not finite (NaN scores would rank every pair first)."""
    models.model_config(model_name)  # an unknown model name is not the weights' fault
    try:
        model = models.create_model(model_name, pretrained)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as exc:
        if not Path(pretrained).is_file():  # an unknown tag: models' message says so
            raise
        # AssertionError: open_clip's checks of the checkpoint's shapes
        raise ValueError(f"--pretrained {pretrained}: cannot load it into {model_name}: "
                         f"{load_failure(pretrained, exc)}") from exc
    for name, weight in model.state_dict().items():
        if weight.is_floating_point() and not torch.isfinite(weight).all():
            raise ValueError(f"--pretrained {pretrained}: weight {name} holds NaN or inf: the checkpoint's weights are "
                             f"not finite (from a diverged run?)")
    return model


def embedded_val_data(cache_dir: Optional[str]) -> str:
    """The embedded validation shards, generated into the cache when missing; ValueError naming the cache."""
    from .defaults import ensure_default_data
    from .paths import default_cache_dir

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        return ensure_default_data(cache)["val"]
    except (OSError, ValueError) as exc:
        raise ValueError(f"--cache-dir {cache}: cannot prepare the embedded validation data there: "
                         f"{one_line(exc)}") from exc


def check_output(output: Path) -> None:
    """Refuse an --output that could not be written, before the evaluation (a folder, a missing or read-only folder,
    a read-only file)."""
    if output.is_dir():
        raise ValueError(f"--output {output}: is a folder; name a file, e.g. {output / 'metrics.json'}")
    folder = output.parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--output {output}: {folder} {state}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{output.name}."):  # removed on closing
            pass
    except OSError as exc:
        raise ValueError(f"--output {output}: cannot write in {folder} ({exc.strerror})") from exc
    if output.exists() and not os.access(output, os.W_OK):
        raise ValueError(f"--output {output}: the file is read-only")


def write_metrics(metrics: dict, output: Path) -> None:
    """Write to a temporary file, then rename: ``output`` is always either the old or the new complete file."""
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
        os.replace(tmp, output)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def main(argv=None) -> None:
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
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size: must be >= 1, got {args.batch_size}")
    output = Path(args.output) if args.output else None
    classes = None
    try:  # the cheap checks first: a bad input stops the command before the model, the data and the evaluation
        if output is not None:
            check_output(output)
        if args.classnames:
            classes = load_classnames(Path(args.classnames), f"--classnames {args.classnames}")
        if args.imagenet_val is not None:
            imagenet_folder(args.imagenet_val)
        pretrained, model_name = checkpoint_to_evaluate(args.pretrained, args.model, args.logs)
        model = load_model(model_name, pretrained)
        val = args.val_data or embedded_val_data(args.cache_dir)
        preprocess, tokenizer = models.get_preprocess(model), models.get_tokenizer(model_name)
        metrics = evaluate(model, preprocess, tokenizer, val, args.batch_size, classes=classes)
        if args.imagenet_val is not None:
            metrics.update(imagenet_zero_shot(model, preprocess, tokenizer, args.imagenet_val, args.batch_size))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {one_line(exc)}")
    print(json.dumps(metrics, indent=1))
    if output is not None:
        try:
            write_metrics(metrics, output)
        except OSError as exc:  # a full disk, or the folder changed during the evaluation
            sys.exit(f"error: --output {output}: could not write the metrics ({exc.strerror or exc})")


if __name__ == "__main__":
    main()
