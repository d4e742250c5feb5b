import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import train as train_lib
from engine.core import checkpoint as ckpt_lib
from engine.core.errors import CheckpointError, NonFiniteLossError, ShardError, StoreError
from engine.core.io import atomic_torch_save
from engine.train import parse_args
from engine.training import config as training_config
from engine.training import loop as training_loop
from engine.training.config import TrainConfig
from engine.training.prepare import resolve
from engine.training.schedule import cosine_lr
from tests.helpers import assert_refused_before_any_step, dead_pid, train_cli


def run(cfg):
    """What ``python -m engine.train`` does in one process: prepare the inputs, then train."""
    cfg.validate()
    return training_loop.run(cfg, resolve(cfg, progress=False))


def _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, **overrides):
    base = dict(train_data=synth_data["train"], val_data=synth_data["val"], teacher_pretrained=str(teacher_ckpt),
                teacher_store=str(store_dir) if store_dir else None, batch_size=16, epochs=2, lr=1e-3, warmup=2,
                logs=str(tmp_path / "logs"),
                name="run", progress=False, log_every_n_steps=2, loss_backend="auto", cache_dir=str(tmp_path / "cache"))
    base.update(overrides)
    return TrainConfig(**base)


def _weights(run_dir):
    return torch.load(f"{run_dir}/checkpoints/epoch_latest.pt", weights_only=False)


def test_run_layout_and_outputs(tmp_path, synth_data, teacher_ckpt, store_dir):
    result = run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, epochs=1))
    run_dir = tmp_path / "logs" / "run"
    for name in ("params.txt", "out.log", "metrics.jsonl", "metrics.png", "results.json",
                 "checkpoints/epoch_1.pt", "checkpoints/epoch_latest.pt"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"total", "task", "fd", "icl", "hrd", "vrd", "xrd", "lr"} <= set(train_rows[-1])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {"acc1", "acc5", "image_retrieval_recall@1", "text_retrieval_recall@10"} <= set(evals[-1])
    state = _weights(run_dir)
    assert state["config"]["batch_size"] == 16 and state["step"] == 6 and state["epoch"] == 1
    assert result.metrics == {k: v for k, v in evals[-1].items() if k not in ("kind", "step", "epoch")}
    assert state["state_dict"]["logit_scale"].item() <= math.log(100) + 1e-6


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, synth_data, teacher_ckpt, store_dir):
    common = dict(mfd_mask_ratio=0.25, epochs=2)  # patch dropout draws from the RNG, so RNG restore is exercised
    full = run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="full", **common))
    stopped = run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="killed", stop_after_steps=4, **common))
    assert not stopped.finished and stopped.steps == 4
    assert _weights(tmp_path / "logs" / "killed")["batches_done"] == 4  # mid-epoch (6 steps per epoch)
    resumed = run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="killed", resume="latest", **common))
    a, b = _weights(tmp_path / "logs" / "full"), _weights(tmp_path / "logs" / "killed")
    assert a["step"] == b["step"] == 12
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["loss_state_dict"]:
        assert torch.equal(a["loss_state_dict"][key], b["loss_state_dict"][key]), key
    assert full.metrics == resumed.metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, synth_data, teacher_ckpt, store_dir, monkeypatch):
    from engine.training.task import DistillationTask

    forward = DistillationTask.forward
    calls = []

    def poisoned(self, batch):  # the student's embeddings turn NaN at the fourth step (step index 3)
        calls.append(1)
        terms = forward(self, batch)
        return {k: v * float("nan") for k, v in terms.items()} if len(calls) == 4 else terms

    monkeypatch.setattr(DistillationTask, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3: .*Stopped before applying"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir))
    state = _weights(tmp_path / "logs" / "run")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_online_teacher_matches_store_first_step(tmp_path, synth_data, teacher_ckpt, store_dir):
    kwargs = dict(epochs=1, stop_after_steps=1, log_every_n_steps=1)
    run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="store", **kwargs))
    run(_cfg(tmp_path, synth_data, teacher_ckpt, None, name="online", online_teacher=True, **kwargs))
    rows = {n: json.loads((tmp_path / "logs" / n / "metrics.jsonl").read_text().splitlines()[0])
            for n in ("store", "online")}
    for key in ("total", "fd", "icl", "hrd", "vrd", "xrd"):
        assert rows["store"][key] == pytest.approx(rows["online"][key], rel=5e-3, abs=1e-4), key


@pytest.mark.parametrize("precision", ["amp", "amp_bf16", "bf16"])
def test_autocast_precisions_run(tmp_path, synth_data, teacher_ckpt, store_dir, precision):
    result = run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, precision=precision, stop_after_steps=2,
                      preset="clip-kd"))
    assert not result.finished and result.steps == 2


def test_bad_inputs_have_clear_errors(tmp_path, synth_data, teacher_ckpt, store_dir):
    with pytest.raises(ValueError, match="unknown model 'tiny-vit-nope'"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, model="tiny-vit-nope"))
    with pytest.raises(ValueError, match="larger than the dataset"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, batch_size=200))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {k: v + 1 for k, v in torch.load(teacher_ckpt)["state_dict"].items()}}, other)
    with pytest.raises(StoreError, match="store was built by other teachers than this run's"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, teacher_pretrained=str(other)))
    with pytest.raises(ValueError, match="unknown term"):
        TrainConfig(weights={"xyz": 1.0}).validate()


BAD_FLAGS = [
    (["--grad-clip-norm", "-1"], "--grad-clip-norm: must be > 0"),
    (["--save-frequency", "-1"], "--save-frequency: must be >= 0"),
    (["--log-every-n-steps", "0"], "--log-every-n-steps: must be >= 1"),
    (["--shuffle-buffer", "0"], "--shuffle-buffer: must be >= 1"),
    (["--shuffle-buffer", "-5"], "--shuffle-buffer: must be >= 1"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--wd", "-0.1"], "--wd: must be >= 0"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--lr", "inf"], "--lr: must be > 0 and at most 10, got inf"),
    (["--lr", "1e30"], "--lr: must be > 0 and at most 10, got 1e+30"),
    (["--lr", "nan"], "--lr: must be > 0 and at most 10, got nan"),
    (["--wd", "nan"], "--wd: must be >= 0 and finite, got nan"),
    (["--wd", "inf"], "--wd: must be >= 0 and finite, got inf"),
    (["--eps", "inf"], "--eps: must be > 0 and at most 1, got inf"),
    (["--eps", "0"], "--eps: must be > 0 and at most 1, got 0"),
    (["--beta1", "nan"], "--beta1: must be in [0, 1), got nan"),
    (["--beta2", "1"], "--beta2: must be in [0, 1), got 1"),
    (["--fd-weight", "-5"], "--fd-weight: must be >= 0 and finite, got -5"),
    (["--cross-kd-weight", "inf"], "--cross-kd-weight: must be >= 0 and finite, got inf"),
    (["--grad-clip-norm", "inf"], "--grad-clip-norm: must be > 0 and finite"),
    (["--mfd-mask-ratio", "nan"], "--mfd-mask-ratio: must be in [0, 1), got nan"),
    (["--prepare-timeout", "inf"], "--prepare-timeout: must be > 0 and finite, got inf"),
    (["--epochs", "100000000"], "--epochs: must be at most 10000"),
    (["--preset", "baseline", "--task-weight", "0"], "every term's weight is zero"),
    (["--val-data", "/nowhere/val-{0..1}.tar"], "--val-data: missing shard"),
    (["--train-data", "/nowhere/train-0.tar"], "missing shard"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_stops_before_any_step(tmp_path, synth_data, store_dir, flags, message):
    assert_refused_before_any_step(tmp_path, message, train_cli(tmp_path, synth_data, store_dir, *flags))


def test_more_steps_than_the_bound_are_refused_before_any_step(tmp_path, synth_data, store_dir, monkeypatch):
    monkeypatch.setattr(training_config, "MAX_STEPS", 10)  # the real bound needs a dataset of 10^9 / 10^4 batches
    got = train_cli(tmp_path, synth_data, store_dir, "--epochs", "2")
    assert_refused_before_any_step(tmp_path, "--epochs 2: the run would take 12 optimizer steps, more than 10", got)


def test_resume_with_an_infinite_lr_leaves_the_good_checkpoint_intact(tmp_path, synth_data, store_dir):
    assert train_cli(tmp_path, synth_data, store_dir, "--no-eval") is None
    latest = tmp_path / "logs" / "bad" / "checkpoints" / "epoch_latest.pt"
    good = latest.read_bytes()
    got = train_cli(tmp_path, synth_data, store_dir, "--no-eval", "--resume", "latest", "--epochs", "4", "--lr", "inf")
    assert got == "error: --lr: must be > 0 and at most 10, got inf"
    assert latest.read_bytes() == good


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path, synth_data, teacher_ckpt, store_dir):
    """A step whose update is Inf (a finite loss and gradient): the previous checkpoint stays, byte for byte."""
    before = {}

    def infinite_lr_at(step):
        def after_backward(state, terms):
            if state.step == step:
                latest = Path(state.cfg.logs) / state.cfg.name / "checkpoints" / "epoch_latest.pt"
                before["latest"] = latest.read_bytes() if latest.exists() else None
                for group in state.optimizer.param_groups:
                    group["lr"] = math.inf
        return after_backward

    for name, step, where in (("later", 7, "is in .*later/checkpoints/epoch_latest.pt"),
                              ("first", 1, "is none: this run has not written a checkpoint yet")):
        cfg = _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name=name, eval=False)
        with pytest.raises(NonFiniteLossError, match=rf"is not finite after step {step} .*Its weights are not finite "
                                                     rf"and were not saved; the last good state {where}"):
            training_loop.run(cfg, resolve(cfg, progress=False), after_backward=infinite_lr_at(step))
        checkpoints = tmp_path / "logs" / name / "checkpoints"
        latest = checkpoints / "epoch_latest.pt"
        assert (latest.read_bytes() if latest.exists() else None) == before["latest"]
        assert sorted(p.name for p in checkpoints.iterdir()) == (["epoch_1.pt", "epoch_latest.pt"] if step > 6 else [])


class Killed(BaseException):
    """A kill -9: nothing after it runs in the process (not an Exception: no handler catches it)."""


def test_killed_between_the_epoch_checkpoints_then_resumed_writes_every_epoch_checkpoint(
        tmp_path, synth_data, teacher_ckpt, store_dir, monkeypatch):
    """Killed after the first of the last epoch's two checkpoint files, whichever it is: the resumed run still
    writes epoch_1.pt (a run resumed from an epoch_latest.pt of that epoch's end has nothing left to do)."""
    common = dict(epochs=1, eval=False)
    assert not run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, stop_after_steps=4, **common)).finished
    real_save = ckpt_lib.Checkpoint.save

    def killed_after_the_first_file(content, path):
        real_save(content, path)
        if content["epoch"] == 1:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_lib.Checkpoint, "save", staticmethod(killed_after_the_first_file))
        with pytest.raises(Killed):
            run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, resume="latest", **common))
    assert run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, resume="latest", **common)).finished
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    steps = {p.name: torch.load(p, weights_only=True)["step"] for p in checkpoints.iterdir()}
    assert steps == {"epoch_1.pt": 6, "epoch_latest.pt": 6}  # and no temporary left


def test_bad_files_stop_before_any_step(tmp_path, synth_data, store_dir, teacher_ckpt):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    shard = synth_data["root"] / "train-00000.tar"
    arrays, array, image, photo = (tmp_path / name for name in ("weights.npz", "weights.npy", "plot.png", "cat.jpg"))
    np.savez(arrays, w=np.zeros(3))
    np.save(array, np.zeros(3))
    Image.new("RGB", (4, 4)).save(image)
    Image.new("RGB", (4, 4)).save(photo)
    cases = [(["--resume", str(text)], f"--resume {text}: not a checkpoint file (it is a text file)"),
             (["--resume", str(image)], f"--resume {image}: not a checkpoint file (it is a PNG image)"),
             (["--resume", str(arrays)], f"--resume {arrays}: not a checkpoint file (it is a NumPy .npz archive"),
             (["--pretrained", str(arrays)], f"--pretrained {arrays}: cannot load it into tiny-vit-student: it is a "
                                             f"NumPy .npz archive"),
             (["--pretrained", str(array)], f"--pretrained {array}: cannot load it into tiny-vit-student: it is a "
                                            f"NumPy .npy array"),
             (["--pretrained", str(photo)], f"--pretrained {photo}: cannot load it into tiny-vit-student: it is a "
                                            f"JPEG image"),
             (["--resume", str(shard)], f"--resume {shard}: not a checkpoint file (it is a tar archive"),
             (["--resume", str(teacher_ckpt)], f"--resume {teacher_ckpt}: not a training checkpoint"),
             (["--teacher-store", str(text)], f"{text}: is a file"),
             (["--logs", str(text)], f"--logs {text}: cannot write the run directory")]
    for flags, message in cases:
        got = train_cli(tmp_path, synth_data, store_dir, *flags)
        assert got is not None and message in got and "\n" not in got, (flags, got)


def test_damaged_classnames_beside_the_validation_shards_stop_the_run_at_start(tmp_path, synth_data, store_dir):
    """Found at start, not at the first evaluation after a whole epoch."""
    val = tmp_path / "val"
    val.mkdir()
    for shard in synth_data["root"].glob("val-*.tar"):
        shutil.copy(shard, val / shard.name)
    (val / "classnames.json").write_text('{"classnames": ["red square", "blue ')  # a copy cut short
    pattern = str(val / Path(synth_data["val"]).name)
    got = train_cli(tmp_path, synth_data, store_dir, "--val-data", pattern)
    assert_refused_before_any_step(tmp_path, f"--val-data: {val / 'classnames.json'}: cannot read it as JSON", got)


def test_resume_with_other_settings_refused_unless_allowed(tmp_path, synth_data, store_dir, monkeypatch):
    assert train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "2", "--no-eval") is None
    prepared = []  # the refusal comes before data, teacher and store are prepared (hours, on real data)
    with monkeypatch.context() as patch:
        patch.setattr(train_lib, "prepare", lambda *args: prepared.append(args))
        got = train_cli(tmp_path, synth_data, store_dir, "--resume", "latest", "--batch-size", "8", "--preset",
                        "clip-kd", "--no-eval")
    assert not prepared
    assert got is not None and "settings differ from the checkpoint's" in got
    assert "batch_size 16 -> 8" in got and "preset 'clip-rd' -> 'clip-kd'" in got and "--allow-config-change" in got
    assert train_cli(tmp_path, synth_data, store_dir, "--resume", "latest", "--batch-size", "8", "--no-eval",
                "--allow-config-change") is None


def test_metrics_after_resume_hold_each_step_once(tmp_path, synth_data, store_dir):
    """A run killed after its checkpoint but past further logged steps, then resumed: every step logged once."""
    common = ["--log-every-n-steps", "1", "--no-eval", "--epochs", "2"]
    assert train_cli(tmp_path, synth_data, store_dir, *common, "--stop-after-steps", "2") is None
    metrics = tmp_path / "logs" / "bad" / "metrics.jsonl"
    with open(metrics, "a") as handle:  # rows of steps 3 and 4 that the killed run logged after its checkpoint
        for step in (3, 4):
            handle.write(json.dumps({"kind": "train", "step": step, "total": 1.0}) + "\n")
    assert train_cli(tmp_path, synth_data, store_dir, *common, "--resume", "latest") is None
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, synth_data, store_dir, monkeypatch):
    assert train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "2", "--no-eval") is None
    latest = tmp_path / "logs" / "bad" / "checkpoints" / "epoch_latest.pt"
    good = torch.load(latest, weights_only=True)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):  # writes part of the file, then the disk is full
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    got = train_cli(tmp_path, synth_data, store_dir, "--resume", "latest", "--stop-after-steps", "4", "--no-eval")
    monkeypatch.setattr(torch, "save", real_save)
    assert got is not None and f"could not write checkpoint {latest}: no space left on the device" in got
    assert torch.load(latest, weights_only=True)["step"] == good["step"] == 2  # still loadable, still step 2
    assert [p.name for p in latest.parent.iterdir()] == ["epoch_latest.pt"]  # no partial temporary file


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, synth_data, store_dir):
    assert train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "2", "--no-eval") is None
    checkpoints = tmp_path / "logs" / "bad" / "checkpoints"
    (checkpoints / f".epoch_latest.pt.tmp{dead_pid()}").write_bytes(b"half a checkpoint")  # a kill during a write
    live = checkpoints / f".epoch_2.pt.tmp{os.getpid()}"  # a live process's write in progress: never swept
    live.write_bytes(b"being written")
    assert train_cli(tmp_path, synth_data, store_dir, "--resume", "latest", "--stop-after-steps", "3",
                     "--no-eval") is None
    assert sorted(p.name for p in checkpoints.iterdir()) == [live.name, "epoch_latest.pt"]


def test_fp16_that_keeps_skipping_steps_stops(tmp_path, synth_data, teacher_ckpt, store_dir, monkeypatch):
    from engine.training.task import DistillationTask

    class InfiniteGradient(torch.autograd.Function):  # adds 0 to the loss, inf to a parameter's gradient
        @staticmethod
        def forward(ctx, x):
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return torch.full((), float("inf"))

    forward = DistillationTask.forward

    def overflowing(self, batch):  # a finite loss whose gradient overflows at every step
        terms = forward(self, batch)
        return {**terms, "total": terms["total"] + InfiniteGradient.apply(self.student.logit_scale)}

    monkeypatch.setattr(DistillationTask, "forward", overflowing)
    with pytest.raises(NonFiniteLossError, match=r"amp: 3 consecutive steps .* non-finite gradients"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, precision="amp", max_skipped_steps=3))


def test_corrupt_shard_during_training(tmp_path, synth_data, teacher_ckpt):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data["root"], data)
    shard = data / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(ShardError, match="corrupt shard .*train-00001.tar"):
        run(_cfg(tmp_path, synth_data, teacher_ckpt, None, train_data=str(data / "train-{00000..00002}.tar"),
                 online_teacher=True, epochs=1))


def test_cli_flags_map_to_config():
    cfg = parse_args(["--train-data", "a-{0..1}.tar", "--batch-size", "8", "--epochs", "3", "--lr", "0.01",
                      "--wd", "0.2", "--warmup", "5", "--precision", "bf16", "--resume", "latest", "--logs", "L",
                      "--name", "n", "--seed", "3", "--local-loss", "--gather-with-grad", "--preset", "clip-kd",
                      "--fd-weight", "100", "--intra-weight", "1", "--mfd-mask-ratio", "0.5", "--fused",
                      "--online-teacher"])
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.wd, cfg.warmup, cfg.precision) == (8, 3, 0.01, 0.2, 5, "bf16")
    assert parse_args(["--distill-model", "ViT-B-16", "--distill-pretrained", "openai"]).teacher == "ViT-B-16"
    assert parse_args(["--distill-pretrained", "x.pt"]).teacher_pretrained == "x.pt"
    assert parse_args([]).grad_clip_norm is None  # open_clip's default: no clipping
    assert cfg.local_loss and cfg.gather_with_grad and cfg.online_teacher and cfg.loss_backend == "auto"
    assert cfg.loss_weights()["fd"] == 100 and cfg.loss_weights()["intra"] == 1 and cfg.loss_weights()["hrd"] == 1
    assert parse_args([]).loss_backend == "reference" and parse_args([]).preset == "clip-rd"


def test_cosine_schedule_is_pure_and_shaped():
    lrs = [cosine_lr(s, 1.0, warmup=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert cosine_lr(7, 1.0, 4, 20) == lrs[7]


def test_atomic_checkpoint_leaves_no_temp(tmp_path):
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    with pytest.raises(CheckpointError, match=f"--resume latest: no epoch_latest.pt in {tmp_path}"):
        ckpt_lib.resolve_resume("latest", tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_lib.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_cli_reports_bad_input_without_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        train_lib.main(["--preset", "nope"])
    assert exc.value.code == 2  # argparse's own refusal of a value outside --preset's choices
    assert "argument --preset: invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset: unknown preset 'clip-xx'"):
        TrainConfig(preset="clip-xx").validate()
