"""Shared fixtures for the engine tests: a small procedural dataset and a random-weight teacher checkpoint."""
import os

import pytest
import torch

from tests.helpers import seeded_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest process per core (-n auto): one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """96 training samples in 3 shards of 32, 32 validation samples: {"root", "train", "val"}."""
    from engine.data import synthetic

    root = tmp_path_factory.mktemp("synth")
    spec = synthetic.SyntheticSpec(train_samples=96, val_samples=32, shard_size=32, seed=7)
    return {"root": root, **synthetic.build(root, spec, progress=False)}


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    return seeded_checkpoint(tmp_path_factory, "tiny-vit-teacher", 123)


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory, synth_data, teacher_ckpt):
    from engine.teachers.precompute import build_store

    root = tmp_path_factory.mktemp("store") / "store"
    return build_store(synth_data["train"], [("tiny-vit-teacher", str(teacher_ckpt))], root, batch_size=40,
                       progress=False)
