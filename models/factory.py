"""Students and teachers through open_clip's factory, with this project's extra configs registered.

Extra configs (models/model_configs/*.json): CLIP-KD's ViT-T/16 student and the tiny 32x32 ViTs of the embedded
default (``tiny-vit-student``, ``tiny-vit-teacher``). Teachers load from an open_clip pretrained tag or a local
checkpoint file (open_clip state dict, or an engine checkpoint with a ``state_dict`` entry).
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.transform import PreprocessCfg, image_transform_v2

from .tokenizer import WordTokenizer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Configs whose text tower is sized for models.tokenizer.WordTokenizer instead of open_clip's BPE tokenizer.
WORD_TOKENIZER_MODELS = ("tiny-vit-student", "tiny-vit-teacher")
# Preprocessing of the tiny models: the procedural images are already 32x32, so no resize, and mean/std 0.5.
_TINY_PREPROCESS = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}

# What a file that is no torch checkpoint is, by its first bytes (checked in this order, after empty and tar).
SIGNATURES = ((b"\x93NUMPY", "it is a NumPy .npy array"),
              (b"\x89PNG\r\n\x1a\n", "it is a PNG image"), (b"\xff\xd8\xff", "it is a JPEG image"),
              (b"GIF8", "it is a GIF image"), (b"%PDF", "it is a PDF document"),
              (b"\x1f\x8b", "it is gzip-compressed"))
# open_clip reads a file of these suffixes as big_vision SigLIP weights, only into a timm image tower.
BIG_VISION_SUFFIXES = (".npz", ".npy")

_registered = False


class ModelError(ValueError):
    """An unknown model name, or weights that cannot be loaded into the model: a user's error, in one line."""


def register_model_configs() -> None:
    """Add models/model_configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


def model_config(name: str) -> dict:
    """The architecture config of a registered model (a ModelError naming the close matches otherwise)."""
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        raise ModelError(f"unknown model {name!r} (close matches: {close or 'none'}; see models.list_models())")
    return cfg


def _check_pretrained(name: str, pretrained: str) -> None:
    if os.path.isfile(pretrained):
        timm_tower = "timm_model_name" in model_config(name)["vision_cfg"]
        if Path(pretrained).suffix in BIG_VISION_SUFFIXES and not timm_tower:  # open_clip would fail in a traceback
            raise ModelError(f"open_clip reads a {Path(pretrained).suffix} file as big_vision SigLIP weights, only "
                             f"into a timm image tower, and {name} has none")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelError(
            f"pretrained {pretrained!r} for model {name!r} is neither an existing checkpoint file nor an "
            f"open_clip pretrained tag (tags for {name}: {tags or 'none'})"
        )


def describe_file(head: bytes) -> Optional[str]:
    """What the file whose first 4096 bytes are ``head`` is, when it is recognisably no torch checkpoint."""
    if not head:
        return "the file is empty"
    if head[257:262] == b"ustar":
        return "it is a tar archive, such as a webdataset shard"
    known = next((what for magic, what in SIGNATURES if head.startswith(magic)), None)
    if known or not head.startswith(b"PK\x03\x04"):
        return known
    first_member = head[30:30 + int.from_bytes(head[26:28], "little")]  # from the zip's first local header
    if first_member.endswith(b".npy"):
        return "it is a NumPy .npz archive"
    return None if b"/" in first_member else "it is a zip archive, not a torch.save file"  # torch: <name>/data.pkl


def describe_unloadable(path: str | os.PathLike, exc: Exception) -> str:
    """What a file that torch.load refused looks like, in a few words (torch's own message is about pickling)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    known = describe_file(head)
    if known:
        return known
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0].split('. ')[0][:160]}"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        return f"a damaged or incomplete torch.save file, {reason}"
    if head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:  # length, then a JSON header
        return "it is a safetensors file, which open_clip reads only under a .safetensors name"
    if all(byte in b"\t\n\r" or byte >= 32 for byte in head):
        return "it is a text file"
    return reason


def one_line(exc: Exception, limit: int = 400) -> str:
    """An exception's text on one line (load_state_dict lists each key on its own), cut after ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text[:limit] + (" ..." if len(text) > limit else "")


def load_failure(path: str, exc: Exception) -> str:
    """Why a checkpoint file did not load, in one line: what the file is when it cannot be read at all (torch's
    own message is about pickling), else the loader's complaint (a checkpoint of another architecture)."""
    try:
        load_state_dict(path)
    except Exception as unreadable:  # torch.load raises many types for a file that is not a checkpoint
        described = describe_unloadable(path, unreadable)
        # a ModelError of create_model says why open_clip refused the file: kept beside what the file is
        return f"{described} ({one_line(exc)})" if isinstance(exc, ModelError) else described
    return one_line(exc)


def create_model(
    name: str,
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **model_kwargs,
) -> torch.nn.Module:
    """An open_clip CLIP model returning dicts (image_features, text_features, logit_scale); without ``pretrained``
    randomly initialised, as asked (open_clip's warning that it is random is left out: the caller said so).
    ``model_kwargs`` go to the model's constructor (open_clip's, e.g. init_logit_scale, init_logit_bias)."""
    model_config(name)  # clear error for unknown names
    if pretrained:
        _check_pretrained(name, pretrained)
    extra = {"force_preprocess_cfg": _TINY_PREPROCESS} if name in WORD_TOKENIZER_MODELS else {}
    quiet = _NoRandomInitWarning()
    if not pretrained:
        logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(
            name, pretrained=pretrained or None, device=device, precision=precision, output_dict=True, **extra,
            **model_kwargs,
        )
    except Exception as exc:  # open_clip's big_vision converter fails on other arrays with any exception type
        if not (pretrained and Path(pretrained).suffix in BIG_VISION_SUFFIXES and os.path.isfile(pretrained)):
            raise
        raise ModelError(f"not big_vision SigLIP weights of {name}: {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns that a model built without pretrained weights is random (on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def create_teacher(name: str, pretrained: Optional[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """A frozen teacher in eval mode (weights from an open_clip tag or a local checkpoint file)."""
    if not pretrained:
        raise ModelError(f"teacher {name!r}: need pretrained weights (an open_clip tag or a checkpoint file)")
    model_config(name)  # an unknown model name is not the weights' fault
    try:
        teacher = create_model(name, pretrained, device=device)
    except Exception as exc:  # torch.load and open_clip's shape checks raise many types for a file that does not fit
        if not os.path.isfile(pretrained):
            raise
        raise ModelError(f"--teacher-pretrained {pretrained}: cannot load it into {name}: "
                         f"{load_failure(pretrained, exc)}") from exc
    teacher.eval().requires_grad_(False)
    return teacher


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype to feed a model's images in, as open_clip_train's ``get_input_dtype`` gives it for the precision the
    model was built with: bf16 / fp16 when any of its weights are (``--precision bf16`` converts only some,
    ``pure_bf16`` all), else fp32."""
    dtypes = {p.dtype for p in model.parameters()}
    return next((low for low in (torch.bfloat16, torch.float16) if low in dtypes), torch.float32)


def get_tokenizer(name: str):
    """open_clip's tokenizer for the model, or the word tokenizer for the tiny configs."""
    cfg = model_config(name)
    if name in WORD_TOKENIZER_MODELS:
        return WordTokenizer(cfg["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(name)


def get_preprocess(model: torch.nn.Module):
    """The model's deterministic (evaluation) image transform: PIL image -> normalised float tensor."""
    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(cfg, is_train=False)


def embed_dim(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def describe(name: str) -> str:
    """One line with the architecture, for logs."""
    cfg = model_config(name)
    return json.dumps({k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}, sort_keys=True)
