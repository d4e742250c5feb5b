"""Shared fixtures for the engine tests: a small procedural dataset and a random-weight teacher checkpoint."""
import os

import pytest
import torch

from tests.helpers import seeded_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest process per core (-n auto): one thread each
    torch.set_num_threads(1)

# The files whose tests take longest (seconds of test time on 2 cores, 2026-12-03: 200, 164, 116, 70, 63, 59, 56, 56,
# 54, 46, 45, 41; the whole suite 1 150), longest first. pytest-xdist's --dist loadfile hands whole files to the
# workers in collection order, so a long file collected last (test_triton.py, alphabetically) leaves the other
# worker idle for minutes at the end; collected first, the short files fill in around it.
LONGEST_FIRST = ("test_triton.py", "test_ablate.py", "test_engine_distributed.py", "test_engine_prepare.py",
                 "test_peer.py", "test_distributed.py", "test_engine_accum.py", "test_memory.py",
                 "test_engine_store.py", "test_engine_flags.py", "test_bench.py", "test_triton_compile.py")


def pytest_collection_modifyitems(config, items):
    """Collect LONGEST_FIRST's files first, in that order; the others after them, as they were (a stable sort keeps
    each file's tests together and in order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
