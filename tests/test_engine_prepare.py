"""Preparing a run: the shipped default teacher, and rank 0 preparing alone under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from engine.data import synthetic
from engine.evaluation.metrics import evaluate
from engine.teachers import default as defaults
from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def test_shipped_teacher_reproduces_its_recorded_accuracy(tmp_path):
    """The packaged checkpoint loads and scores its recorded zero-shot acc1 on the embedded validation split."""
    record = defaults.default_teacher_record()
    assert record["command"].startswith("python -m engine.teacher")
    spec = synthetic.SyntheticSpec()
    synthetic.write_shard(tmp_path / "val-00000.tar", 2, 0, spec.val_samples, spec.seed)  # build()'s val shard
    (tmp_path / "classnames.json").write_text(json.dumps({"classnames": list(synthetic.CLASSNAMES),
                                                          "templates": list(synthetic.PROMPT_TEMPLATES)}))
    teacher = models.create_teacher(defaults.DEFAULT_TEACHER, str(defaults.default_teacher_path()))
    metrics = evaluate(teacher, models.get_preprocess(teacher), models.get_tokenizer(defaults.DEFAULT_TEACHER),
                       str(tmp_path / "val-00000.tar"))
    assert metrics["acc1"] == pytest.approx(record["metrics"]["acc1"], abs=0.01)


def _torchrun(args, cache, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "engine.train", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIP_RD_CACHE": str(cache)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_first_run_rank0_prepares_while_the_other_waits(tmp_path, synth_data, teacher_ckpt):
    """From an empty cache, 2 ranks: rank 0 alone builds the store, rank 1 waits, both train on it."""
    cache = tmp_path / "cache"
    common = ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--batch-size", "8",
              "--epochs", "1", "--stop-after-steps", "1", "--no-progress", "--logs", str(tmp_path / "logs"),
              "--cache-dir", str(cache), "--fused", "--local-loss", "--gather-with-grad"]
    proc = _torchrun(common + ["--teacher-pretrained", str(teacher_ckpt), "--name", "first"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: waiting for rank 0 to prepare data, teacher and store" in proc.stdout + proc.stderr
    stores = list((cache / "stores").iterdir())
    assert len(stores) == 1 and json.loads((stores[0] / "manifest.json").read_text())["complete"]
    assert not list((stores[0] / "parts").glob(".*"))  # no half-written part of a second builder

    # rank 0 failing to prepare stops every rank with its message
    proc = _torchrun(common + ["--teacher-pretrained", str(tmp_path / "missing.pt"), "--name", "fail"], cache)
    assert proc.returncode != 0
    assert f"--teacher-pretrained: checkpoint file {tmp_path / 'missing.pt'} does not exist" in proc.stderr
    assert "rank 0 could not prepare the run" in proc.stderr


def test_store_folder_follows_a_moved_cache(tmp_path):
    """The default store's folder is named by the data's place inside the cache, so a copied or moved cache keeps
    its store, while other data (outside the cache, or remote) gets a store of its own."""
    default_store_dir = defaults.default_store_dir
    first, moved = tmp_path / "cache", tmp_path / "elsewhere" / "cache"
    name = default_store_dir(first, ["teacher"], f"{first}/data/train-{{00000..00015}}.tar").name
    assert default_store_dir(moved, ["teacher"], f"{moved}/data/train-{{00000..00015}}.tar").name == name
    assert default_store_dir(moved, ["teacher"], f"{first}/data/train-{{00000..00015}}.tar").name != name
    assert default_store_dir(first, ["teacher"], f"{first}/data/train-{{00000..00014}}.tar").name != name
    assert default_store_dir(first, ["other-teacher"], f"{first}/data/train-{{00000..00015}}.tar").name != name
    assert default_store_dir(first, ["teacher"], "pipe:cat data/train-{00000..00015}.tar").name != name
