"""`torchrun --nproc_per_node 2 -m engine.train` (gloo, DDP) against one process on the same global batch.

Data: each rank reads one shard (shuffle buffer 1 keeps the tar order), so rank r's k-th batch is samples
[8k, 8k + 8) of its shard. The one-process run reads a shard that interleaves them (rank 0's batch k, then rank 1's
batch k), so its k-th batch of 16 is exactly the gathered global batch of step k (rows in rank order).
"""
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from engine.data.shards import epoch_shards, expand_urls, read_shard, sample_digest
from engine.teachers import store as store_lib
from engine.train import main, train
from tests.first_step_dump import FirstStepDump
from tests.helpers import assert_same_weights, free_port

WORLD, LOCAL_BATCH, SEED = 2, 8, 0
REPO = Path(__file__).resolve().parent.parent


def _groups(url: str) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """A shard's members grouped by sample key, in tar order."""
    groups, last = [], None
    with tarfile.open(url) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            if key != last:
                groups.append([])
                last = key
            groups[-1].append((member, tar.extractfile(member).read()))
    return groups


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory, synth_data, store_dir):
    """The 2-rank shard pattern and a one-process shard (its store: the same fp16 rows) of the same global batches."""
    two = str(synth_data["root"] / "train-{00000..00001}.tar")
    per_rank = [_groups(epoch_shards(expand_urls(two), SEED, 0, rank, WORLD)[0]) for rank in range(WORLD)]
    root = tmp_path_factory.mktemp("interleaved")
    one, keys = root / "global-00000.tar", []
    with tarfile.open(one, "w") as tar:
        for k in range(len(per_rank[0]) // LOCAL_BATCH):
            for rank in range(WORLD):
                for group in per_rank[rank][k * LOCAL_BATCH:(k + 1) * LOCAL_BATCH]:
                    keys.append(group[0][0].name.split(".", 1)[0])
                    for member, payload in group:
                        tar.addfile(member, io.BytesIO(payload))
    source = store_lib.TeacherStore(store_dir, expand_urls(two))
    manifest = store_lib.begin(root / "store", source.teachers)
    digests = [sample_digest(raw) for raw in read_shard(str(one))]  # the same bytes as in the two shards
    writer = store_lib.PartWriter(root / "store", manifest, str(one), len(keys))
    writer.append(keys, digests, *source.lookup(keys, digests, [str(one)] * len(keys)))
    writer.commit()
    store_lib.finish(root / "store", manifest)
    return {"two": two, "one": str(one), "one_store": str(root / "store")}


def _torchrun(args: list[str], timeout: int = 120, module: str = "engine.train") -> subprocess.CompletedProcess:
    # "--" ends torchrun's own options: its --logs-specs would otherwise make the script's --logs ambiguous
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _flags(tmp_path, teacher_ckpt, train: str, store: str, batch_size: int, name: str) -> list[str]:
    """Identical runs but for the data, its store, the per-process batch and the run name."""
    return ["--train-data", train, "--teacher-store", store, "--batch-size", str(batch_size), "--name", name,
            "--teacher-pretrained", str(teacher_ckpt), "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
            "--seed", str(SEED), "--shuffle-buffer", "1", "--logs", str(tmp_path / "logs"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-eval", "--log-every-n-steps", "1",
            "--stop-after-steps", "2", "--gather-with-grad",
            # clipped gradients keep AdamW's steps of near-zero gradient entries (rounding noise) below the tolerance
            "--grad-clip-norm", "1.0"]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 2e-4) -> None:
    """max |actual - expected| <= tol * max |expected| (per tensor, so tiny entries of big tensors pass)."""
    scale = max(expected.abs().max().item(), 1e-8)
    err = (actual - expected).abs().max().item() / scale
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _checkpoints(tmp_path) -> tuple[dict, dict]:
    return tuple(torch.load(tmp_path / "logs" / n / "checkpoints" / "epoch_latest.pt", weights_only=True)
                 for n in ("ddp", "one"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert_same_weights(b, a, rtol=1e-4)


@pytest.mark.parametrize("backend, local_loss, resume", [("reference", True, False), ("chunked", True, True),
                                                         ("chunked", False, False)])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, teacher_ckpt, store_dir, interleaved, backend,
                                                         local_loss, resume):
    options = (["--fused"] if backend == "chunked" else []) + (["--local-loss"] if local_loss else [])
    two = _flags(tmp_path, teacher_ckpt, interleaved["two"], str(store_dir), LOCAL_BATCH, "ddp") + options
    proc = _torchrun([str(tmp_path / "dump_ddp"), *two], module="tests.first_step_dump")
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = _flags(tmp_path, teacher_ckpt, interleaved["one"], interleaved["one_store"], WORLD * LOCAL_BATCH, "one")
    train(one + options, after_backward=FirstStepDump(tmp_path / "dump_one"))

    # (a) first step: rank-averaged loss terms and DDP-averaged (unclipped) gradients equal the one-process ones
    want = torch.load(tmp_path / "dump_one" / "rank0.pt", weights_only=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / "dump_ddp" / f"rank{rank}.pt", weights_only=True)
        assert set(got["terms"]) == set(want["terms"]) and set(got["grads"]) == set(want["grads"])
        for key, value in want["terms"].items():
            assert got["terms"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"rank {rank} term {key}"
        for name, grad in want["grads"].items():
            _close(got["grads"][name], grad, f"rank {rank} grad {name}")
    assert any(name.startswith("loss_fn.") for name in want["grads"])  # the loss module's multipliers train too

    # (b) two AdamW steps: same weights (student and loss module), unwrapped state dicts loadable anywhere
    a, b = _checkpoints(tmp_path)
    assert a["step"] == b["step"] == 2 and a["world_size"] == WORLD and len(a["rank_rng"]) == WORLD
    assert set(a["state_dict"]) == set(b["state_dict"])  # no DDP "module." prefix
    _assert_same_weights(a, b)

    if resume:  # --resume latest continues each rank at its own data position: the rest of the epoch still matches
        assert _torchrun(two + ["--resume", "latest", "--stop-after-steps", "4"]).returncode == 0
        main(one + options + ["--resume", "latest", "--stop-after-steps", "4"])
        a, b = _checkpoints(tmp_path)
        assert a["step"] == b["step"] == 4
        _assert_same_weights(a, b)


def test_failed_rank_fails_the_job_with_a_clear_message(tmp_path, synth_data, teacher_ckpt, store_dir):
    """Rank 1 meets a corrupt shard: torchrun stops rank 0 (blocked in a collective) and names the failure."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-00000.tar", "train-00001.tar", "sizes.json"):
        shutil.copy(synth_data["root"] / name, data / name)
    two = str(data / "train-{00000..00001}.tar")
    victim = Path(epoch_shards(expand_urls(two), SEED, 0, 1, WORLD)[0])
    victim.write_bytes(victim.read_bytes()[:3000])
    proc = _torchrun(["--train-data", two, "--teacher-pretrained", str(teacher_ckpt), "--online-teacher",
                      "--batch-size", str(LOCAL_BATCH), "--epochs", "1", "--no-eval", "--no-progress",
                      "--logs", str(tmp_path / "logs"), "--name", "crash", "--shuffle-buffer", "1"], timeout=90)
    assert proc.returncode != 0
    assert f"corrupt shard {victim}" in proc.stderr
    assert "ChildFailedError" in proc.stderr and re.search(r"rank\s*:\s*1 ", proc.stderr), proc.stderr[-3000:]
