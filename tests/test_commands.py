"""engine.synthetic and engine.teacher refuse bad flags and output locations in one line, before any work."""
import json

import pytest

from engine import synthetic as synthetic_cmd
from engine import teacher as teacher_cmd
from engine.data import synthetic
from engine.training import default_teacher as teacher_lib
from tests.helpers import command_error

SMALL = ["--train-samples", "4", "--val-samples", "2", "--shard-size", "2"]


def _refused(main, argv) -> str:
    message = command_error(main, argv)
    assert message is not None, "not refused"
    return message


def _build(root):
    synthetic_cmd.main(["--data-dir", str(root), *SMALL])


@pytest.mark.parametrize("flag, value, expected", [
    ("--train-samples", "0", "--train-samples: must be >= 1, got 0"),
    ("--val-samples", "-5", "--val-samples: must be >= 1, got -5"),
    ("--shard-size", "0", "--shard-size: must be >= 1, got 0"),
    ("--shard-size", "-3", "--shard-size: must be >= 1, got -3"),
    ("--seed", "-1", "--seed: must be >= 0, got -1"),
])
def test_synthetic_refuses_bad_numbers_before_writing(tmp_path, flag, value, expected):
    assert expected in _refused(synthetic_cmd.main, ["--data-dir", tmp_path / "data", *SMALL, flag, value])
    assert not (tmp_path / "data").exists()


def test_synthetic_refuses_bad_data_dirs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "afile/x: cannot create the data folder (Not a directory)" in _refused(
        synthetic_cmd.main, ["--data-dir", afile / "x", *SMALL])
    assert "afile: exists and is not a folder" in _refused(synthetic_cmd.main, ["--data-dir", afile, *SMALL])
    done = tmp_path / "done"
    _build(done)
    message = _refused(synthetic_cmd.main, ["--data-dir", done, *SMALL, "--seed", "1"])
    assert "holds a procedural dataset made with" in message
    (done / "dataset.json").write_text('{"train_sam')
    message = _refused(synthetic_cmd.main, ["--data-dir", done, *SMALL])
    assert f"{done / 'dataset.json'}: unreadable or damaged" in message


def test_synthetic_resume_keeps_only_its_own_intact_shards(tmp_path):
    root = tmp_path / "data"
    _build(root)
    original = (root / "train-00001.tar").read_bytes()
    # an interrupted build of another spec, or shards of unknown origin: refused, nothing changed
    (root / "dataset.json").unlink()
    for argv in (["--seed", "5"], ["--shard-size", "1"], []):
        assert f"{root}: holds an unfinished procedural dataset" in _refused(synthetic_cmd.main,
                                                                             ["--data-dir", root, *SMALL, *argv])
    assert (root / "train-00001.tar").read_bytes() == original and not (root / "dataset.json").exists()
    # an interrupted build of this spec resumes, and writes a damaged shard again
    (root / "building.json").write_text(json.dumps({"train_samples": 4, "val_samples": 2, "shard_size": 2, "seed": 0,
                                                    "version": synthetic.FORMAT_VERSION}))
    (root / "train-00001.tar").write_bytes(original[:1000])
    _build(root)
    assert (root / "train-00001.tar").read_bytes() == original
    assert (root / "dataset.json").exists() and not (root / "building.json").exists()


def test_teacher_refuses_bad_flags_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(teacher_lib, "run", no_training)
    afile = tmp_path / "afile"
    afile.write_text("")
    cache = ["--cache-dir", tmp_path / "cache"]
    cases = {
        ("--epochs", "0"): "--epochs: must be >= 1, got 0",
        ("--epochs", "-2"): "--epochs: must be >= 1, got -2",
        ("--cache-dir", afile): f"--cache-dir {afile}: exists and is not a folder",
        ("--output", tmp_path / "t.json"): "a .json name is the record's",
        ("--output", tmp_path): "it or its .json record is a folder",
        ("--output", afile / "t.pt"): f"cannot create its folder {afile} (a file has that name)",
    }
    for argv, expected in cases.items():
        assert expected in _refused(teacher_cmd.main, [*cache, *argv])
    assert not (tmp_path / "cache").exists()
