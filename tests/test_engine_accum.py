"""--accum-freq (GradCache): K micro-batches give the same step as one batch K times larger; MFD masks replay."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.data import synthetic
from engine.teachers.precompute import build_store
from engine.train import main
from tests.helpers import assert_same_weights, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_256(tmp_path_factory, teacher_ckpt):
    """256 training samples in 2 shards and their store: two steps of a 128-sample batch."""
    root = tmp_path_factory.mktemp("accum")
    patterns = synthetic.build(root / "data", synthetic.SyntheticSpec(train_samples=256, val_samples=8,
                                                                     shard_size=128, seed=5), progress=False)
    store = build_store(patterns["train"], [("tiny-vit-teacher", str(teacher_ckpt))], root / "store", progress=False)
    return {"train": patterns["train"], "store": str(store)}


def _flags(tmp_path, data, name, batch_size, *extra):
    return ["--train-data", data["train"], "--teacher-store", data["store"], "--batch-size", str(batch_size),
            "--epochs", "1", "--stop-after-steps", "2", "--warmup", "1", "--lr", "1e-3", "--no-eval",
            "--no-progress", "--fused", "--logs", str(tmp_path / "logs"), "--name", name,
            "--cache-dir", str(tmp_path / "cache"), *extra]


def _assert_same_weights(tmp_path, a: str, b: str) -> None:
    first, second = (torch.load(tmp_path / "logs" / n / "checkpoints" / "epoch_latest.pt", weights_only=True)
                     for n in (a, b))
    assert first["step"] == second["step"] == 2
    assert_same_weights(first, second, rtol=2e-4)


def test_four_micro_batches_equal_one_batch_four_times_larger(tmp_path, data_256):
    main(_flags(tmp_path, data_256, "whole", 128))
    main(_flags(tmp_path, data_256, "accum", 32, "--accum-freq", "4"))
    _assert_same_weights(tmp_path, "whole", "accum")


def test_two_ranks_with_accumulation_equal_two_ranks_without(tmp_path, data_256):
    def torchrun(args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "engine.train", "--", *args]
        proc = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ddp = ["--local-loss", "--gather-with-grad"]
    torchrun(_flags(tmp_path, data_256, "whole", 64, *ddp))
    torchrun(_flags(tmp_path, data_256, "accum", 16, "--accum-freq", "4", *ddp))
    _assert_same_weights(tmp_path, "whole", "accum")


def test_mfd_masks_replay_in_the_second_pass(tmp_path, data_256, monkeypatch):
    """Each micro-batch is embedded twice (without, then with a graph): both passes must drop the same patches."""
    from engine.training.task import DistillationTask

    embed, seen = DistillationTask.embed, []

    def recording(self, batch):
        out = embed(self, batch)
        seen.append(out["image_features"].detach().clone())
        return out

    monkeypatch.setattr(DistillationTask, "embed", recording)
    main(_flags(tmp_path, data_256, "mfd", 32, "--accum-freq", "2", "--mfd-mask-ratio", "0.5",
                "--stop-after-steps", "1"))
    first, replay = seen[:2], seen[2:4]  # one step: two cached embeddings, then their two replays
    assert len(seen) == 4 and not torch.equal(first[0], first[1])
    for cached, again in zip(first, replay):
        torch.testing.assert_close(again, cached, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_the_same_step(tmp_path, data_256):
    main(_flags(tmp_path, data_256, "plain", 64))
    main(_flags(tmp_path, data_256, "checkpointed", 64, "--grad-checkpointing"))
    _assert_same_weights(tmp_path, "plain", "checkpointed")


@pytest.mark.parametrize("precision", ["amp", "amp_bf16"])
def test_accumulation_with_the_online_teacher_and_autocast(tmp_path, data_256, teacher_ckpt, precision):
    """The online teacher and autocast go through the accumulated step too: same first-step loss as one batch."""
    import json

    online = ["--teacher-pretrained", str(teacher_ckpt), "--online-teacher", "--precision", precision,
              "--stop-after-steps", "1", "--log-every-n-steps", "1"]
    for name, batch, extra in (("whole", 64, []), ("accum", 32, ["--accum-freq", "2"])):
        flags = _flags(tmp_path, data_256, name, batch, *online, *extra)
        store = flags.index("--teacher-store")
        main(flags[:store] + flags[store + 2:])
    first = {n: json.loads((tmp_path / "logs" / n / "metrics.jsonl").read_text().splitlines()[0])
             for n in ("whole", "accum")}
    for key in ("total", "task", "fd", "icl", "hrd", "vrd", "xrd"):
        assert first["accum"][key] == pytest.approx(first["whole"][key], rel=2e-2, abs=1e-4), key


def test_siglip_student_with_sigmoid_distillation_accumulates_exactly(tmp_path, data_256):
    """--siglip (a learnable logit bias) with sigmoid_kd: 4 micro-batches give the whole batch's step, the bias
    included (GradCache replays its gradient as the scale's)."""
    siglip = ["--siglip", "--sigmoid-kd-weight", "1", "--distill-logit-bias", "-5", "--preset", "baseline"]
    main(_flags(tmp_path, data_256, "whole", 128, *siglip))
    main(_flags(tmp_path, data_256, "accum", 32, "--accum-freq", "4", *siglip))
    _assert_same_weights(tmp_path, "whole", "accum")
    state = torch.load(tmp_path / "logs" / "whole" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert state["config"]["siglip"] and state["state_dict"]["logit_bias"].item() != -10.0  # the bias learns
