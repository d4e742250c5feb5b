"""The process ``python -m bench.peer`` starts for each measurement: ``python -m bench.peer_launch TOOL [ARGS...]``.

TOOL is ``open_clip`` (``open_clip_train.main.main(ARGS)``, exactly what ``python -m open_clip_train.main ARGS``
runs), ``engine`` (``engine.train.main(ARGS)``, the same as ``python -m engine.train ARGS``), ``precompute``
(``engine.precompute.main(ARGS)``), or ``open_clip-loader`` / ``engine-loader`` (that tool's training data loader
alone, built from the same ARGS, timed over ``$CLIP_RD_PEER_LOADER_BATCHES`` batches).

Before the tool starts, open_clip_train's tar reader is made to work with webdataset 1.x
(``open_clip_webdataset_compat``), and the project's model configs (``ViT-T-16`` and the tiny ones) are registered
with open_clip, and those of the folder ``$CLIP_RD_PEER_CONFIGS`` when set (the smoke test's small models), so that
open_clip_train knows them too. Measurements go to the JSON-lines file ``$CLIP_RD_PEER_EVENTS`` (nothing is written
without it):

- ``{"kind": "step", ...}`` once per optimizer step, from torch's global optimizer hooks (both tools use AdamW):
  ``end``, the step's end (``time.perf_counter``, seconds), ``total``, the time since the previous step's end, and
  with ``$CLIP_RD_PEER_PHASES=1`` the seconds in each phase: ``wait`` (from the previous step's end to the step's
  first phase: waiting for the batch, moving it to the device, the tool's logging and bookkeeping), ``student_forward``
  (open_clip's ``CLIP.forward`` with gradients), ``teacher`` (``CLIP.forward`` without gradients: the teacher run
  online; the engine's store lookup), ``loss`` (open_clip's loss module; the engine's ``DistillationTask.loss``),
  ``backward`` (``Tensor.backward``) and ``optimizer`` (the optimizer's step); whatever is left (the engine's
  gradient-norm check, open_clip's logit-scale clamp) is ``total`` minus their sum. ``$CLIP_RD_PEER_SYNC=1``
  synchronises CUDA around every timed phase (for a breakdown on a GPU; it slows the step, so throughput is measured
  without it).
- ``{"kind": "first_loss", ...}``: open_clip_train's loss terms at its first step, as floats (what it logs rounded to
  5 digits), with ``teacher_entropy``, the mean entropy of the teacher's row distributions over both directions
  (the difference between a soft cross-entropy and a KL divergence with the same target).
- ``{"kind": "loader", ...}`` for the loader modes; ``{"kind": "exit", ...}`` with the CUDA peak memory.

``$CLIP_RD_PEER_CUDA_CAP`` (bytes) limits the process's share of the GPU's memory (the batch search on a GPU).
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Callable, Optional

import torch

import models

PHASES = ("wait", "student_forward", "teacher", "loss", "backward", "optimizer")


class Recorder:
    """Step rows and phase times of this process, appended to the events file as they happen."""

    def __init__(self, path: Optional[str], phases: bool, sync: bool):
        self.file = open(path, "a", buffering=1) if path else None
        self.phases_on, self.sync = phases, sync and torch.cuda.is_available()
        self.phases: dict[str, float] = {}
        self.first_start: Optional[float] = None
        self.last_end = time.perf_counter()
        self.steps = 0
        self.optimizer_start = 0.0

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(self, phase: str | Callable[[], str], fn: Callable) -> Callable:
        """``fn`` with its duration added to ``phase`` (a name, or a function naming it at call time)."""
        recorder = self

        def wrapper(*args, **kwargs):
            if not recorder.phases_on:
                return fn(*args, **kwargs)
            name = phase() if callable(phase) else phase
            start = recorder._now()
            if recorder.first_start is None:
                recorder.first_start = start
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.phases[name] = recorder.phases.get(name, 0.0) + recorder._now() - start

        wrapper.__wrapped__ = fn
        return wrapper

    def optimizer_pre(self, optimizer, args, kwargs) -> None:
        if self.phases_on:
            self.optimizer_start = self._now()
            if self.first_start is None:
                self.first_start = self.optimizer_start

    def optimizer_post(self, optimizer, args, kwargs) -> None:
        end = self._now() if self.phases_on else time.perf_counter()
        self.steps += 1
        row = {"kind": "step", "step": self.steps, "end": end, "total": end - self.last_end}
        if self.phases_on:
            self.phases["optimizer"] = self.phases.get("optimizer", 0.0) + end - self.optimizer_start
            self.phases["wait"] = (self.first_start or end) - self.last_end
            row.update({name: self.phases.get(name, 0.0) for name in PHASES})
        self.write(row)
        self.phases, self.first_start, self.last_end = {}, None, end


RECORDER = Recorder(os.environ.get("CLIP_RD_PEER_EVENTS"), os.environ.get("CLIP_RD_PEER_PHASES") == "1",
                    os.environ.get("CLIP_RD_PEER_SYNC") == "1")


def teacher_entropy(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> float:
    """Mean entropy of softmax(scale * image @ text^T) over rows, averaged over both directions (fp64)."""
    logits = float(scale) * image.double() @ text.double().T

    def entropy(rows: torch.Tensor) -> torch.Tensor:
        logp = rows.log_softmax(dim=1)
        return -(logp.exp() * logp).sum(dim=1).mean()

    return float((entropy(logits) + entropy(logits.T)) / 2)


def instrument() -> None:
    """Timing wrappers and hooks shared by both tools (see the module's docstring)."""
    import open_clip.model
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def model_phase() -> str:
        return "student_forward" if torch.is_grad_enabled() else "teacher"

    for cls in (open_clip.model.CLIP, open_clip.model.CustomTextCLIP):
        cls.forward = RECORDER.timed(model_phase, cls.forward)
    torch.Tensor.backward = RECORDER.timed("backward", torch.Tensor.backward)
    register_optimizer_step_pre_hook(RECORDER.optimizer_pre)
    register_optimizer_step_post_hook(RECORDER.optimizer_post)


def instrument_open_clip() -> None:
    """open_clip_train's loss module: timed, and its first output recorded in full precision."""
    import open_clip_train.main

    create_loss = open_clip_train.main.create_loss

    def recording_create_loss(args):
        loss = create_loss(args)
        forward = RECORDER.timed("loss", loss.forward)
        state = {"first": True}

        def recorded(*a, **kw):
            out = forward(*a, **kw)
            if state["first"] and isinstance(out, dict):
                state["first"] = False
                row = {"kind": "first_loss", **{k: float(v) for k, v in out.items()},
                       "loss": float(sum(out.values())), "batch": int(kw["image_features"].shape[0])}
                if "dist_image_features" in kw:
                    row["teacher_entropy"] = teacher_entropy(kw["dist_image_features"], kw["dist_text_features"],
                                                             kw["dist_logit_scale"])
                RECORDER.write(row)
            return out

        loss.forward = recorded
        return loss

    open_clip_train.main.create_loss = recording_create_loss


def open_clip_webdataset_compat() -> None:
    """open_clip_train 3.3 groups tar members itself and does not expect the empty sample that webdataset 1.x's
    tar reader yields at the end of every shard (open_clip_torch's training extra pins webdataset <= 0.2.86, this
    project needs >= 0.2.86): with webdataset 1.x, its reader gets webdataset 0.2's behaviour (no end marker). The
    samples are unchanged."""
    import inspect
    from functools import partial

    import open_clip_train.data
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        open_clip_train.data.tar_file_expander = partial(tar_file_expander, eof_value=None)


def instrument_engine() -> None:
    from engine.teachers.sources import StoreTeacher
    from engine.training.task import DistillationTask

    DistillationTask.loss = RECORDER.timed("loss", DistillationTask.loss)
    StoreTeacher.rows = RECORDER.timed("teacher", StoreTeacher.rows)


def time_loader(loader, batches: int, batch_size: int) -> None:
    """Iterate ``loader`` for ``batches`` batches; the rate between the first and the last is the loader's own."""
    start, stamps = time.perf_counter(), []
    for batch in loader:
        stamps.append(time.perf_counter())
        if len(stamps) == batches:
            break
    rate = (len(stamps) - 1) * batch_size / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    RECORDER.write({"kind": "loader", "batches": len(stamps), "batch_size": batch_size,
                    "first_batch_s": stamps[0] - start if stamps else None, "samples_per_s": rate})


def open_clip_loader(argv: list[str], batches: int) -> None:
    import open_clip
    from open_clip_train.data import get_data
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    args.world_size, args.rank, args.local_rank, args.distributed, args.horovod = 1, 0, 0, False, False
    args.device, args.distill = "cpu", False
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(args.model, aug_cfg=args.aug_cfg)
    data = get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=open_clip.get_tokenizer(args.model))
    data["train"].set_epoch(0)
    time_loader(data["train"].dataloader, batches, args.batch_size)


def engine_loader(argv: list[str], batches: int) -> None:
    from engine.data.shards import make_loader
    from engine.train import parse_args
    from engine.training.distributed import DistEnv
    from engine.training.prepare import prepare
    from engine.training.state import build_state

    cfg = parse_args(argv)
    _, stream = build_state(cfg, prepare(cfg, DistEnv()), DistEnv(), torch.device("cpu"))
    stream.set_epoch(0, 0)
    time_loader(make_loader(stream), batches, cfg.batch_size * cfg.accum_freq)


def at_exit() -> None:
    row = {"kind": "exit", "steps": RECORDER.steps}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["cuda_peak_bytes"] = torch.cuda.max_memory_reserved()
    RECORDER.write(row)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m bench.peer_launch open_clip|engine|precompute|open_clip-loader|"
                         "engine-loader [ARGS...]")
    tool, args = argv[0], argv[1:]
    models.register_model_configs()
    extra = os.environ.get("CLIP_RD_PEER_CONFIGS")
    if extra:
        import open_clip

        open_clip.add_model_config(extra)
    cap = os.environ.get("CLIP_RD_PEER_CUDA_CAP")
    if cap and torch.cuda.is_available():  # the batch search's cap: an allocation past it fails as out of memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / torch.cuda.get_device_properties(0)
                                                       .total_memory), 0)
    atexit.register(at_exit)
    batches = int(os.environ.get("CLIP_RD_PEER_LOADER_BATCHES", "8"))
    if tool.startswith("open_clip"):
        open_clip_webdataset_compat()
    if tool == "open_clip":
        instrument()
        instrument_open_clip()
        import open_clip_train.main

        code = open_clip_train.main.main(args)
        sys.exit(code if isinstance(code, int) and code > 0 else 1 if code else 0)
    elif tool == "engine":
        instrument()
        instrument_engine()
        import engine.train

        engine.train.main(args)
    elif tool == "precompute":
        import engine.precompute

        engine.precompute.main(args)
    elif tool == "open_clip-loader":
        open_clip_loader(args, batches)
    elif tool == "engine-loader":
        engine_loader(args, batches)
    else:
        raise SystemExit(f"bench.peer_launch: unknown tool {tool!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
