"""Export a trained student as a folder that plain open_clip loads, without this project installed.

``python -m engine.export logs/<name>/checkpoints/epoch_latest.pt --output student/`` writes what open_clip's
``local-dir:`` schema reads::

    open_clip_config.json         {"model_cfg": the architecture, "preprocess_cfg": the image transform}
    open_clip_model.safetensors   the student's weights, exactly as in the checkpoint
    tokenizer.json, tokenizer_config.json
                                  only for a model with a Hugging Face tokenizer (the tiny models' word tokenizer
                                  is written in that form; loading it needs the ``transformers`` package)

and then, in any Python with open_clip::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:student")
    tokenizer = open_clip.get_tokenizer("local-dir:student")

The loss module's parameters (student-to-teacher projections, fusion layers, learnable multipliers) are used by
the distillation loss only; the student never calls them, so they are left out.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import models

from ..core.checkpoint import STUDENT_KEYS, Checkpoint
from ..core.errors import UserError, WriteError
from ..core.io import atomic_write, atomic_write_json, temp_path

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir: loader prefers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model")
# a previous export's files, not carried into the new folder by --force (a stale tokenizer must not outlive it)
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE) + TOKENIZER_FILES


class ExportError(UserError):
    """A bad checkpoint or output folder, described in one line."""


@dataclass
class ExportResult:
    output: Path
    model: str
    files: list[Path]
    tensors: int
    left_out: list[str] = field(default_factory=list)  # the loss module's tensors (not part of the student)


def _student(checkpoint: Checkpoint) -> torch.nn.Module:
    """The student with the checkpoint's weights loaded strictly (the architecture check)."""
    name, path = checkpoint.model, checkpoint.path
    try:
        student = models.create_model(name)  # the checkpoint's weights are loaded next
    except ValueError as exc:
        raise ExportError(f"checkpoint {path}: {exc}") from exc
    weights = checkpoint.state_dict
    expected = student.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems = [f"{label}: {few(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise ExportError(f"checkpoint {path}: its state_dict does not fit model {name!r} ({'; '.join(problems)})")
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"checkpoint {path}: weight {key} holds NaN or infinite values")
    student.load_state_dict(weights)
    return student


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"--output {output}: folder exists and is not empty (pass --force to replace the files "
                          f"of a previous export there, or choose another folder)")
    parent = output.absolute().parent
    while not parent.exists():  # the folders to create: the nearest existing one must take them
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--output {output}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"--output {output}: cannot write in {parent}")


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, "export file", indent=2)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def export(checkpoint_path: str | os.PathLike, output: str | os.PathLike, force: bool = False) -> ExportResult:
    """Write the student of ``checkpoint_path`` to ``output`` in open_clip's ``local-dir:`` layout.

    Every check (checkpoint format, architecture, finite weights, output folder) runs before anything is written.
    With ``force``, the export files of a previous export in ``output`` are replaced and other files left alone.
    """
    checkpoint_path, output = Path(checkpoint_path), Path(output)
    checkpoint = Checkpoint.load(checkpoint_path, "checkpoint", required=STUDENT_KEYS)
    _check_output(output, force)
    name = checkpoint.model
    student = _student(checkpoint)

    model_cfg = models.model_config(name)
    text_cfg = model_cfg.setdefault("text_cfg", {})
    tokenizer_files: dict[str, dict] = {}
    hf_tokenizer = None
    if name in models.WORD_TOKENIZER_MODELS:
        tokenizer_files = models.get_tokenizer(name).hugging_face_files()
        # open_clip reads a local-dir: model's tokenizer from the folder itself once text_cfg names one; the name
        # is where the files are (set it to a hub repository id when uploading the folder)
        text_cfg["hf_tokenizer_name"] = str(output.resolve())
    elif text_cfg.get("hf_tokenizer_name"):
        try:
            hf_tokenizer = models.get_tokenizer(name)
        except Exception as exc:  # transformers missing, or the tokenizer not downloadable
            raise ExportError(f"model {name!r}: could not load its tokenizer {text_cfg['hf_tokenizer_name']!r} to "
                              f"copy it into the export ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                              ) from exc
    preprocess_cfg = {key: _jsonable(value) for key, value in student.visual.preprocess_cfg.items()}

    # written in a sibling folder, then swapped in: a failed export leaves the old folder as it was
    target = output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(target)
    try:
        if target.is_dir():  # --force: the other files stay, linked (not copied) into the new folder
            def previous_export(folder, names):
                return [n for n in names if n in EXPORT_FILES] if folder == str(target) else []
            shutil.copytree(target, staging, symlinks=True, ignore=previous_export, copy_function=_link_or_copy)
        else:
            staging.mkdir()
        names = _write_export(staging, checkpoint, model_cfg, preprocess_cfg, tokenizer_files, hf_tokenizer)
        _swap(staging, target, output)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (OSError, WriteError)):
            raise ExportError(f"--output {output}: could not write the export ({exc}); a previous export there is "
                              "left as it was") from exc
        raise
    return ExportResult(output=output, model=name, files=[output / n for n in names],
                        tensors=len(checkpoint.state_dict),
                        left_out=list(checkpoint.content.get("loss_state_dict") or {}))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # no hard links here (another kind of filesystem, an immutable file)
        shutil.copy2(source, destination)


def _write_export(folder: Path, checkpoint: Checkpoint, model_cfg: dict, preprocess_cfg: dict, tokenizer_files: dict,
                  hf_tokenizer) -> list[str]:
    """The export's files in ``folder``; returns their names."""
    # the checkpoint's own tensors (not the student's copies): the export holds exactly what training saved
    tensors = {key: value.contiguous() for key, value in checkpoint.state_dict.items()}
    try:
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                     "export file")
    except SafetensorError as exc:  # safetensors reports a failed write as its own error type
        raise OSError(f"{folder / WEIGHTS_FILE}: {exc}") from exc
    names = [WEIGHTS_FILE]
    for file_name, content in tokenizer_files.items():
        _write_json(folder / file_name, content)
        names.append(file_name)
    if hf_tokenizer is not None:
        before = set(folder.iterdir())
        hf_tokenizer.save_pretrained(str(folder))
        names += sorted(p.name for p in set(folder.iterdir()) - before)
    _write_json(folder / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    return names + [CONFIG_FILE]


def _swap(staging: Path, target: Path, output: Path) -> None:
    """Put ``staging`` in place of ``target`` (--output): two renames, the old folder restored if the second fails."""
    old = temp_path(target.with_name(f"{target.name}.old"))
    try:
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            if old.exists():
                os.rename(old, target)
            raise
    except OSError as exc:
        raise ExportError(f"--output {output}: could not put the export in place ({exc.strerror}); "
                          "the folder is left as it was") from exc
    shutil.rmtree(old, ignore_errors=True)  # the new export is in place; only the previous export's files are here
    if old.exists():
        print(f"warning: could not delete the previous export's files, moved to {old}", file=sys.stderr)
