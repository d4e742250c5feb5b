"""--online-augment: a new view of every sample at every epoch, the online teacher embedding that same view. The
decoded pixels against torchvision's primitives (through augment.replay, itself tested against them by hand), the
teacher's rows against the teacher run on those pixels, resume, and the refusals."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import models
from engine import train as train_cmd
from engine.data import augment
from engine.data import shards as data_lib
from engine.teachers.sources import OnlineTeacher
from engine.training.config import TrainConfig
from engine.training.state import fresh_views
from tests.helpers import assert_refused_before_any_step, command_error

CFG = augment.AugmentCfg.from_dict({"scale": (0.3, 0.8), "hflip": 0.5, "num_ops": 2, "magnitude": 12})


def _raws(synth_data):
    return list(data_lib.read_shard(data_lib.expand_urls(synth_data["train"])[0]))


def _pixels(image: Image.Image) -> torch.Tensor:
    """open_clip's to-tensor and normalise (the tiny models' mean and std 0.5)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def test_each_epoch_decodes_a_new_seeded_view_at_every_outputs_size(synth_data):
    student = models.create_model("tiny-vit-student")
    fresh = augment.FreshViews(CFG, (32, 32), (("image", (32, 32)), ("teacher_image", (20, 24))), seed=5)
    preprocess = models.get_preprocess(student)
    codec = data_lib.Codec({"image": preprocess, "teacher_image": preprocess}, {"text": models.get_tokenizer(
        "tiny-vit-student")}, fresh=fresh)
    raws = _raws(synth_data)[:8]
    batches = {epoch: codec.collate([codec(raw, epoch) for raw in raws]) for epoch in (0, 1)}
    for b, raw in enumerate(raws):
        image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
        view = fresh.draw(raw["__key__"], 1, (32, 32))
        assert torch.equal(batches[1]["image"][b], _pixels(augment.replay(image, view, (32, 32), (32, 32))))
        # the same region, flip and operations at the teacher's size (translations scaled to it)
        assert torch.equal(batches[1]["teacher_image"][b], _pixels(augment.replay(image, view, (20, 24), (32, 32))))
    # a pure function of (seed, epoch, key): decoding again, in another order, gives the same pixels
    again = codec.collate([codec(raw, 1) for raw in reversed(raws)])
    assert torch.equal(again["image"].flip(0), batches[1]["image"])
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    other_seed = augment.FreshViews(CFG, (32, 32), (("image", (32, 32)),), seed=6)
    assert {fresh.draw(raw["__key__"], 1, (32, 32)) != other_seed.draw(raw["__key__"], 1, (32, 32))
            for raw in raws} == {True}
    # the draws follow the settings: crops within the scale, some flipped, two operations each
    views = [fresh.draw(f"k{n}", 0, (32, 32)) for n in range(200)]
    areas = [v.box[2] * v.box[3] / 32 ** 2 for v in views]
    assert 0.2 < min(areas) and max(areas) < 0.9 and 40 < sum(v.flip for v in views) < 160
    assert {len(v.ops) for v in views} == {2}


def test_online_teacher_embeds_the_view_the_student_trains_on(synth_data, teacher_ckpt):
    cfg = TrainConfig(online_teacher=True, online_augment=True, aug_cfg=CFG.to_dict(), seed=2)
    cfg.validate()
    student = models.create_model(cfg.model)
    teacher = OnlineTeacher(cfg.teacher, str(teacher_ckpt), student, cfg.model, torch.device("cpu"), None)
    fresh = fresh_views(cfg, student, teacher)
    assert fresh.reference_hw == (32, 32) and fresh.out_hw == (("image", (32, 32)),)  # one preprocessing: one image
    codec = data_lib.Codec({"image": models.get_preprocess(student), **teacher.images},
                           {"text": models.get_tokenizer(cfg.model), **teacher.texts}, fresh=fresh)
    raws = _raws(synth_data)[:6]
    batch = codec.collate([codec(raw, 3) for raw in raws])
    image_rows, text_rows = teacher.rows(batch, torch.device("cpu"))
    model = models.create_teacher(cfg.teacher, str(teacher_ckpt))
    views = torch.stack([_pixels(augment.replay(Image.open(io.BytesIO(raw["png"])).convert("RGB"),
                                                fresh.draw(raw["__key__"], 3, (32, 32)), (32, 32), (32, 32)))
                         for raw in raws])
    with torch.no_grad():
        expected = model.encode_image(views, normalize=True)
    torch.testing.assert_close(image_rows, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(image_rows, model.encode_image(_pixels_of_eval(raws, model), normalize=True))
    assert text_rows.shape == (6, 128)


def _pixels_of_eval(raws, model):
    preprocess = models.get_preprocess(model)
    return torch.stack([preprocess(Image.open(io.BytesIO(raw["png"])).convert("RGB")) for raw in raws])


def _argv(tmp_path, synth_data, teacher_ckpt, *extra, name):
    return ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--teacher-pretrained",
            str(teacher_ckpt), "--batch-size", "16", "--epochs", "2", "--logs", str(tmp_path / "logs"), "--name", name,
            "--no-progress", "--fused", "--no-eval", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_resume_draws_the_same_fresh_views(tmp_path, synth_data, teacher_ckpt):
    common = ("--online-teacher", "--online-augment", "--aug-cfg", "scale=0.3,0.8", "hflip=0.5")
    assert command_error(train_cmd.main, _argv(tmp_path, synth_data, teacher_ckpt, *common, name="full")) is None
    cut = _argv(tmp_path, synth_data, teacher_ckpt, *common, "--stop-after-steps", "7", name="cut")
    assert command_error(train_cmd.main, cut) is None
    assert command_error(train_cmd.main, cut[:-2] + ["--resume", "latest"]) is None
    a, b = (torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt", weights_only=False)
            for name in ("full", "cut"))
    assert a["step"] == b["step"] == 12
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # the augmentation is part of the run: resuming without it is refused
    message = command_error(train_cmd.main, _argv(tmp_path, synth_data, teacher_ckpt, "--online-teacher",
                                                  "--resume", "latest", name="cut"))
    assert "online_augment True -> False" in message, message


@pytest.mark.parametrize("extra, message", [
    (("--online-augment",), "--online-augment: a new view per step needs the teacher run on the batch "
                            "(--online-teacher) or no teacher term"),
    (("--online-teacher", "--aug-cfg", "scale=0.5,1.0"), "--aug-cfg: stored views and captions come from a teacher "
                                                         "store; --online-teacher runs the teacher"),
    (("--online-teacher", "--online-augment", "--augmentations", "4"), "--augmentations: stored views and captions "
                                                                       "come from a teacher store"),
    (("--online-teacher", "--online-augment", "--aug-cfg", "re_prob=0.5"), "--aug-cfg: open_clip's 're_prob' cannot "
                                                                           "be stored as a replayable view"),
])
def test_bad_combinations_refused_before_any_step(tmp_path, synth_data, teacher_ckpt, extra, message):
    got = command_error(train_cmd.main, _argv(tmp_path, synth_data, teacher_ckpt, *extra, name="bad"))
    assert_refused_before_any_step(tmp_path, message, got)


def test_without_a_teacher_term_the_student_alone_trains_on_fresh_views(tmp_path, synth_data, teacher_ckpt):
    argv = _argv(tmp_path, synth_data, teacher_ckpt, "--preset", "baseline", "--online-augment", "--epochs", "1",
                 name="plain")
    assert command_error(train_cmd.main, argv) is None
    assert (tmp_path / "logs" / "plain" / "checkpoints" / "epoch_latest.pt").exists()
