"""What a user sees of a run: the resume hint that resumes, refusals of a resume with nothing to resume, a
finished run left alone, params.txt with the values used, one epoch numbering, the teacher scored on the run's own
validation data, a warning for validation on training data, run folders that belong to one run."""
import json
import shlex

import pytest

import models
from engine import train as train_lib
from engine.core.lock import exclusive
from engine.evaluation.metrics import evaluate
from engine.train import parse_args
from engine.training.loop import RUN_LOCK
from tests.helpers import command_error, train_cli


def _log(tmp_path, name="bad") -> str:
    return (tmp_path / "logs" / name / "out.log").read_text()


def _rows(tmp_path, name="bad") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "logs" / name / "metrics.jsonl").read_text().splitlines()]


def test_the_printed_resume_command_resumes_the_run(tmp_path, synth_data, store_dir):
    assert train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "2", "--no-eval", "--epochs", "2") is None
    hint = [line for line in _log(tmp_path).splitlines() if "continue with: " in line][-1]
    command = shlex.split(hint.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "engine.train"] and "--resume" in command and "--name" in command
    assert "--stop-after-steps" not in command
    assert command_error(train_lib.main, command[3:]) is None
    assert "resumed from" in _log(tmp_path) and [r["step"] for r in _rows(tmp_path) if r["kind"] == "train"][-1] == 12


def test_resume_latest_with_nothing_to_resume_is_refused(tmp_path, synth_data, store_dir):
    assert train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "1", "--no-eval", name="earlier") is None
    base = ["--train-data", synth_data["train"], "--teacher-store", store_dir, "--logs", tmp_path / "logs", "--fused"]
    message = command_error(train_lib.main, base + ["--resume", "latest"])  # no --name: the default is a new name
    assert message.startswith("error: --resume latest: pass --name NAME") and "earlier" in message, message
    message = command_error(train_lib.main, base + ["--resume", "latest", "--name", "other"])
    assert f"no epoch_latest.pt in {tmp_path / 'logs' / 'other' / 'checkpoints'}" in message and "earlier" in message
    assert not (tmp_path / "logs" / "other").exists()


def test_a_finished_run_is_not_evaluated_again(tmp_path, synth_data, store_dir, capsys):
    assert train_cli(tmp_path, synth_data, store_dir) is None
    rows = _rows(tmp_path)
    assert train_cli(tmp_path, synth_data, store_dir, "--resume", "latest") is None
    assert "has finished: it trained 1 of --epochs 1" in capsys.readouterr().out
    assert _rows(tmp_path) == rows


def test_params_record_the_values_used_and_epochs_are_numbered_alike(tmp_path, synth_data, store_dir):
    argv = ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--teacher-store", store_dir,
            "--batch-size", 16, "--epochs", 2, "--logs", tmp_path / "logs", "--no-progress", "--fused",
            "--cache-dir", tmp_path / "cache", "--log-every-n-steps", 1]
    assert command_error(train_lib.main, argv) is None
    (run_dir,) = (tmp_path / "logs").iterdir()
    params = dict(line.split(": ", 1) for line in (run_dir / "params.txt").read_text().splitlines())
    assert params["name"] == run_dir.name and params["cache_dir"] == str(tmp_path / "cache")
    rows = _rows(tmp_path, run_dir.name)
    for val in (r for r in rows if r["kind"] == "val"):  # the train rows of epoch k have epoch k, as its val row
        steps = [r["epoch"] for r in rows if r["kind"] == "train" and val["step"] - 6 < r["step"] <= val["step"]]
        assert steps == [val["epoch"]] * 6, (val, steps)
    assert "initialized randomly" not in (run_dir / "out.log").read_text()


def test_the_teacher_is_scored_on_the_runs_validation_data(tmp_path, synth_data, store_dir, teacher_ckpt):
    assert train_cli(tmp_path, synth_data, store_dir, "--teacher-pretrained", teacher_ckpt) is None
    results = json.loads((tmp_path / "logs" / "bad" / "results.json").read_text())
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    expected = evaluate(teacher, models.get_preprocess(teacher), models.get_tokenizer("tiny-vit-teacher"),
                        synth_data["val"])
    assert results["teacher_metrics"] == pytest.approx(expected)


def test_validation_on_training_shards_is_warned_about(tmp_path, synth_data, store_dir):
    train_shard = synth_data["train"].replace("{00000..00002}", "00001")
    assert train_cli(tmp_path, synth_data, store_dir, "--val-data", train_shard, "--stop-after-steps", "1") is None
    assert "are training shards" in _log(tmp_path)


def test_a_run_folder_belongs_to_one_run(tmp_path, synth_data, store_dir):
    run_dir = tmp_path / "logs" / "bad"
    run_dir.mkdir(parents=True)
    with exclusive(run_dir / RUN_LOCK, "test"):  # another process training in the folder
        message = train_cli(tmp_path, synth_data, store_dir, "--stop-after-steps", "1")
    assert message.startswith(f"error: run {run_dir} is in use by another process (pid"), message
    for name in ("../../x", "a/b", "..", "."):
        with pytest.raises(ValueError, match="a run name is one folder name inside --logs"):
            parse_args(["--name", name])


def test_sigmoid_distillation_from_a_clip_teacher_needs_a_bias(tmp_path, synth_data, store_dir):
    message = train_cli(tmp_path, synth_data, store_dir, "--siglip", "--sigmoid-kd-weight", "1", "--preset",
                        "baseline")
    assert "--sigmoid-kd-weight: the teacher tiny-vit-teacher has no logit bias" in message, message


def test_save_frequency_zero_keeps_only_the_final_epoch(tmp_path, synth_data, store_dir):
    """open_clip_train's --save-frequency 0: epoch_K.pt after the last epoch only (epoch_latest.pt always)."""
    assert train_cli(tmp_path, synth_data, store_dir, "--save-frequency", "0", "--epochs", "2", "--no-eval") is None
    names = sorted(p.name for p in (tmp_path / "logs" / "bad" / "checkpoints").iterdir())
    assert names == ["epoch_2.pt", "epoch_latest.pt"]
