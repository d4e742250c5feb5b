"""The reinforced store: K stored views and C captions per sample, their replay in training, verify-views, and every
bad input refused in one line before any step."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from engine import store as store_cmd
from engine.data import augment
from engine.data import shards as data_lib
from engine.teachers import reinforced
from engine.teachers import store as store_lib
from engine.teachers.precompute import build_store
from engine.teachers.viewcheck import VIEW_TOLERANCE
from engine.training.config import TrainConfig
from engine.training.state import view_draw
from tests.helpers import assert_refused_before_any_step, command_error, distinct_per_shard, shard_captions, train_cli

SETTINGS = reinforced.Reinforcement.from_flags(3, {"scale": (0.5, 1.0), "hflip": 0.5}, 3)


@pytest.fixture(scope="module")
def built(tmp_path_factory, synth_data, teacher_ckpt):
    """A store of 3 views and 3 captions of the small data, and the rows each teacher forward was given."""
    calls = {"image": 0, "text": 0}
    real_create = models.create_teacher

    def counting_teacher(*args, **kwargs):
        teacher = real_create(*args, **kwargs)
        for tower in ("image", "text"):
            encode = getattr(teacher, f"encode_{tower}")

            def counted(x, *a, _encode=encode, _tower=tower, **k):
                calls[_tower] += len(x)
                return _encode(x, *a, **k)

            setattr(teacher, f"encode_{tower}", counted)
        return teacher

    root = tmp_path_factory.mktemp("reinforced") / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "create_teacher", counting_teacher)
        build_store(synth_data["train"], [("tiny-vit-teacher", str(teacher_ckpt))], root, batch_size=48, progress=False,
                    settings=SETTINGS)
    return root, calls


def _part(root: Path, shard: str) -> str:
    """The part folder name of shard ``shard`` (its file name without .tar) in store ``root``."""
    return next(name for name in store_lib.read_manifest(root)["parts"] if name.startswith(f"{shard}-"))


def _edited(tmp_path, root, shard, array, edit) -> Path:
    """A copy of the store whose part ``array`` went through ``edit`` (checksum and manifest made consistent)."""
    copy = tmp_path / "edited"
    shutil.copytree(root, copy)
    name = _part(copy, shard)
    path = copy / "parts" / name / f"{array}.npy"
    values = np.load(path)
    np.save(path, edit(values))
    manifest = store_lib.read_manifest(copy)
    manifest["parts"][name]["sha256"][array] = store_lib.sha256_file(path)
    store_lib.write_manifest(copy, manifest)
    return copy


def test_store_holds_every_view_and_caption_with_one_forward_each(built, synth_data, teacher_ckpt, store_dir):
    root, calls = built
    urls = data_lib.expand_urls(synth_data["train"])
    shards = shard_captions(synth_data["train"], 3)
    distinct = distinct_per_shard(shards)
    assert sum(map(len, shards)) == 96 and distinct < 96 * 3  # the small data repeats captions within a shard
    # K image rows per sample, and one text row per caption distinct within its shard: no more
    assert calls == {"image": 96 * 3, "text": distinct}
    store = store_lib.TeacherStore(root, urls)
    plain = store_lib.TeacherStore(store_dir)
    part, first = ({name: np.array(value) for name, value in p.items()} for p in (store.parts[1], plain.parts[1]))
    assert part["image"].shape == (32, 3, 128) and part["text"].shape == (32, 3, 128)
    assert part["views"].shape == (32, 3, SETTINGS.aug.width) and part["source_hw"].tolist() == [[32, 32]] * 32
    record = store.manifest["augmentation"]
    assert record["views"] == 3 and record["reference_hw"] == [32, 32] and record["view_0"] == reinforced.VIEW_ZERO
    # view 0 is the evaluation view and caption 0 the .txt: the plain store's rows (another batch split: fp16 ulps)
    torch.testing.assert_close(torch.from_numpy(part["image"][:, 0]).float(), torch.from_numpy(first["image"][:, 0])
                               .float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(part["text"][:, 0]).float(), torch.from_numpy(first["text"][:, 0])
                               .float(), atol=2e-3, rtol=0)
    # the stored parameters are the key-seeded draw, and caption 2 is the teacher's embedding of syn_text[1]
    raws = list(data_lib.read_shard(data_lib.expand_urls(synth_data["train"])[1]))[:4]
    for row, raw in enumerate(raws):
        assert np.array_equal(part["views"][row], reinforced.draw_views(raw["__key__"], (32, 32), SETTINGS, (32, 32),
                                                                        "squash"))
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    with torch.no_grad():
        text = teacher.encode_text(models.get_tokenizer("tiny-vit-teacher")(
            [json.loads(raw["syn.json"])["syn_text"][1] for raw in raws]), normalize=True)
    torch.testing.assert_close(torch.from_numpy(part["text"][:4, 2]).float(), text, atol=2e-3, rtol=0)
    assert {bool(f) for f in part["views"][:, 1:, 4].ravel()} == {False, True}  # hflip=0.5 flips some views
    # a caption repeated in the shard has one row, wherever it appears
    where = {}
    for row, captions in enumerate(shards[1]):
        for c, caption in enumerate(captions):
            where.setdefault(caption, []).append((row, c))
    repeated = [places for places in where.values() if len(places) > 1]
    assert repeated
    for places in repeated:
        rows = np.stack([part["text"][row, c] for row, c in places])
        assert (rows == rows[0]).all()


def test_verify_views_passes_every_view_and_fails_a_shifted_one(tmp_path, built, capsys):
    root, _ = built
    store_cmd.main(["verify-views", str(root), "--samples", "1000"])
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {root}: 288 stored view(s) replayed; worst cosine error ") and out.count("\n") == 1

    def shift(views):  # sample 5's view 2 one pixel across (its crop narrowed where it cannot move)
        i, j, h, w = views[5, 2, :4]
        views[5, 2, 1], views[5, 2, 3] = (j + 1, w) if j + w < 32 else (j, w - 1)
        return views

    copy = _edited(tmp_path, root, "train-00001", "views", shift)
    with pytest.raises(SystemExit) as exc:
        store_cmd.main(["verify-views", str(copy), "--samples", "1000"])
    out = capsys.readouterr().err
    assert exc.value.code == 2 and out.startswith(f"error: {copy}: 288 stored view(s) replayed; worst cosine error ")
    assert "(sample '1000010005' of shard train-00001.tar, view 2)" in out
    assert float(out.split("worst cosine error ")[1].split()[0]) > 10 * VIEW_TOLERANCE


def test_training_replays_the_drawn_view_and_reads_its_rows(built, synth_data):
    root, _ = built
    store = store_lib.TeacherStore(root)
    student = models.create_model("tiny-vit-student")
    cfg = TrainConfig(mix_synthetic_ratio=0.5, seed=3)
    draw = view_draw(cfg, store, student)
    codec = data_lib.Codec({"image": models.get_preprocess(student)}, {"text": models.get_tokenizer(cfg.model)}, draw)
    raws = list(data_lib.read_shard(data_lib.expand_urls(synth_data["train"])[0]))
    batch = codec.collate([codec(raw, epoch=1) for raw in raws])
    views, captions = batch["view_index"].tolist(), batch["caption_index"].tolist()
    assert set(views) == {0, 1, 2} and set(captions) == {0, 1, 2} and captions.count(0) > 8
    for b, raw in enumerate(raws[:6]):
        stored = augment.View.from_row(store.parts[0]["views"][b][views[b]])
        expected = augment.replay(Image.open(io.BytesIO(raw["png"])).convert("RGB"), stored, (32, 32), (32, 32))
        pixels = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        assert torch.equal(batch["image"][b], pixels)
        assert batch["caption"][b] == data_lib.sample_captions(raw, 3)[captions[b]]
    image, text = store.lookup(batch["key"], batch["digest"].tolist(), batch["url"], views, captions)
    assert torch.equal(image, torch.from_numpy(store.parts[0]["image"][np.arange(32), views]))
    assert torch.equal(text, torch.from_numpy(store.parts[0]["text"][np.arange(32), captions]))
    # a pure function of (seed, epoch, key); sequential: view epoch mod K; ratio 0: the .txt, 1: a synthetic one
    assert [draw.choose(raw["__key__"], 1) for raw in raws] == list(zip(views, captions))
    sequential = view_draw(TrainConfig(view_sampling="sequential", mix_synthetic_ratio=1.0), store, student)
    assert {sequential.choose(raw["__key__"], 4) for raw in raws} == {(1, 1)}
    assert {view_draw(TrainConfig(mix_synthetic_ratio=0.0), store, student).choose(raw["__key__"], 2)[1]
            for raw in raws} == {0}


def test_resume_draws_the_same_views(tmp_path, built, synth_data):
    root, _ = built
    common = ("--mix-synthetic-ratio", "0.5", "--no-eval", "--log-every-n-steps", "1")
    assert train_cli(tmp_path, synth_data, root, *common, name="full") is None
    assert train_cli(tmp_path, synth_data, root, *common, "--stop-after-steps", "3", name="cut") is None
    assert train_cli(tmp_path, synth_data, root, *common, "--resume", "latest", name="cut") is None
    a, b = (torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt", weights_only=False)
            for name in ("full", "cut"))
    assert a["step"] == b["step"] == 6
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_bad_inputs_refused_in_one_line_before_any_step(tmp_path, built, synth_data, teacher_ckpt):
    from engine.precompute import main as precompute

    root, _ = built
    assert command_error(precompute, ["--train-data", synth_data["train"], "--augmentations", "-1"]) == \
        "error: --augmentations: must be an integer >= 0 (0: the evaluation view alone), got -1"
    assert_refused_before_any_step(tmp_path, "--aug-cfg: unknown augmentation key 'shear'; the keys are scale, "
                                   "ratio, hflip, num_ops, magnitude",
                                   train_cli(tmp_path, synth_data, root, "--aug-cfg", "shear=1"))
    assert_refused_before_any_step(tmp_path, f"--teacher-store {root}: built with other augmentation settings than "
                                   "this run asks for: views 3 (the run asks for 2)",
                                   train_cli(tmp_path, synth_data, root, "--augmentations", "2"))
    cases = {("views", lambda v: v.__setitem__((7, 1, slice(0, 4)), (8, 0, 32, 32)) or v):
             "stored view 1: crop [i, j, h, w] = [8, 0, 32, 32] lies outside its 32x32 image",
             ("views", lambda v: v[:, :2]): "views.npy holds an array of shape (32, 2, 9), not (32, 3, 9) (the "
                                            "manifest's count, embed_dim, views and captions)",
             ("image", lambda v: v.__setitem__((4, 2, 0), np.nan) or v):
             "/image.npy holds non-finite values"}
    for (array, edit), message in cases.items():
        copy = _edited(tmp_path, root, "train-00002", array, edit)
        assert_refused_before_any_step(tmp_path, message, train_cli(tmp_path, synth_data, copy))
        shutil.rmtree(copy)
    manifest = json.loads((root / "manifest.json").read_text())
    old = tmp_path / "old"
    shutil.copytree(root, old)
    store_lib.write_manifest(old, {**manifest, "format": 4})  # one teacher's fields at the top level, before 5
    assert_refused_before_any_step(tmp_path, f"store format 4 is not {store_lib.FORMAT_VERSION} (a store of an older "
                                   "version or a foreign one)", train_cli(tmp_path, synth_data, old))


def test_non_finite_view_refused_when_written(tmp_path, built):
    root, _ = built
    manifest = store_lib.read_manifest(root)
    writer = store_lib.PartWriter(tmp_path, manifest, str(tmp_path / "train-00000.tar"), 2)
    image, text = F.normalize(torch.randn(2, 3, 128), dim=-1), F.normalize(torch.randn(2, 3, 128), dim=-1)
    image[1, 2, 5] = float("inf")
    views = np.stack([reinforced.draw_views(key, (32, 32), SETTINGS, (32, 32), "squash") for key in "ab"])
    with pytest.raises(store_lib.StoreError) as exc:
        writer.append(["a", "b"], [1, 2], image, text, views, np.array([[32, 32]] * 2))
    writer.abort()
    assert str(exc.value) == (f"shard {tmp_path / 'train-00000.tar'}: the teacher gave non-finite embeddings for 1 "
                              "sample(s), keys ['b'] (first: sample 1 of the batch, image of view 2); refusing to "
                              "store them (check the teacher weights)")
