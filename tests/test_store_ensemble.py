"""A teacher store of an ensemble: two tiny teachers of different widths (128 and 64) in one store, each member's rows
those of its own single-teacher store, training from it checked by hand against kernels.clip_rd_loss, verify-views
per member, the DataCompDR export of its rows side by side, and every bad input refused in one line before any
step."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from engine import precompute as precompute_cmd
from engine import store as store_cmd
from engine import train as train_lib
from engine.data import shards as data_lib
from engine.teachers import default as defaults
from engine.teachers import reinforced
from engine.teachers import store as store_lib
from engine.teachers.precompute import build_store
from engine.teachers.sources import StoreTeacher
from engine.training.task import DistillationTask
from kernels import clip_rd_loss
from tests.helpers import (
    assert_refused_before_any_step,
    command_error,
    distinct_per_shard,
    seeded_checkpoint,
    shard_captions,
    train_cli,
)

SETTINGS = reinforced.Reinforcement.from_flags(2, {"scale": (0.5, 1.0)}, 2)
WIDTHS = [128, 64]


@pytest.fixture(scope="module")
def members(teacher_ckpt, tmp_path_factory):
    """The ensemble's (model, checkpoint) pairs in order: the session's tiny teacher, then a tiny-vit-student (64)."""
    return [("tiny-vit-teacher", str(teacher_ckpt)),
            ("tiny-vit-student", str(seeded_checkpoint(tmp_path_factory, "tiny-vit-student", 5)))]


def _counting(calls):
    """models.create_teacher with every image and text row given to each teacher counted, per checkpoint."""
    real_create = models.create_teacher

    def create(name, pretrained, *args, **kwargs):
        teacher = real_create(name, pretrained, *args, **kwargs)
        counts = calls.setdefault(pretrained, {"image": 0, "text": 0})
        for tower in ("image", "text"):
            def counted(x, *a, _encode=getattr(teacher, f"encode_{tower}"), _tower=tower, **k):
                counts[_tower] += len(x)
                return _encode(x, *a, **k)
            setattr(teacher, f"encode_{tower}", counted)
        return teacher
    return create


@pytest.fixture(scope="module")
def data(synth_data):
    """Two of the small dataset's three shards (64 samples), to keep the stores' builds short."""
    return {**synth_data, "train": str(synth_data["root"] / "train-{00000..00001}.tar")}


@pytest.fixture(scope="module")
def built(tmp_path_factory, data, members):
    """The ensemble store (2 views, 2 captions), each member's own store of the same settings, and the rows each
    teacher's forwards were given while building the ensemble's."""
    root = tmp_path_factory.mktemp("ensemble")
    calls = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "create_teacher", _counting(calls))
        build_store(data["train"], members, root / "ensemble", batch_size=48, progress=False,
                    settings=SETTINGS)
    singles = [build_store(data["train"], [member], root / f"single{k}", batch_size=48, progress=False,
                           settings=SETTINGS) for k, member in enumerate(members)]
    return root / "ensemble", singles, calls


def test_each_members_rows_are_its_own_stores_rows(built, members, data):
    root, singles, calls = built
    # per member, one image forward per view of each of the 64 samples and one text forward per caption distinct
    # within its shard, no more
    distinct = distinct_per_shard(shard_captions(data["train"], 2))
    assert distinct < 64 * 2 and calls == {path: {"image": 64 * 2, "text": distinct} for _, path in members}
    manifest = store_lib.read_manifest(root)
    assert manifest["format"] == store_lib.FORMAT_VERSION and manifest["embed_dim"] == sum(WIDTHS)
    assert [(m["model"], m["pretrained"], m["embed_dim"]) for m in manifest["teachers"]] == \
        [(model, path, width) for (model, path), width in zip(members, WIDTHS)]
    for single, member in zip(singles, manifest["teachers"]):
        assert store_lib.read_manifest(single)["teachers"] == [member]
    for name in manifest["parts"]:
        part = store_lib.open_part(root, name, ["image", "text", "views", "source_hw", "keys", "digests"])
        own = [store_lib.open_part(single, name, ["image", "text", "views", "source_hw", "keys", "digests"])
               for single in singles]
        for array in ("image", "text"):  # (count, 2, 192) = the members' (count, 2, 128) and (count, 2, 64)
            assert part[array].shape == (32, 2, sum(WIDTHS))
            assert np.array_equal(part[array], np.concatenate([o[array] for o in own], axis=-1)), (name, array)
        for array in ("views", "source_hw", "keys", "digests"):
            assert all(np.array_equal(part[array], o[array]) for o in own), (name, array)
    assert store_lib.verify(str(root)) == []
    info = store_lib.describe(str(root))
    assert "teacher 1" in info and "teacher 2" in info and "side by side: [128, 64]" in info


def test_default_folder_names_every_member_in_order(tmp_path):
    a, b = "tiny-vit-teacher:sha256=aa", "tiny-vit-student:sha256=bb"
    folders = [defaults.default_store_dir(tmp_path, fps, "/data/train-{0..1}.tar") for fps in ([a], [a, b], [b, a])]
    assert len(set(folders)) == 3 and folders[1].name.startswith("ensemble2-")


def _captured_first_step(monkeypatch):
    """Records the first step's batch (keys, digests, shards, drawn views and captions), the member rows the store
    gave, the student's outputs and the loss terms."""
    seen = {}
    real_rows, real_loss = StoreTeacher.rows, DistillationTask.loss

    def rows(self, batch, device):
        image, text = real_rows(self, batch, device)
        seen.setdefault("batch", batch)
        seen.setdefault("rows", (image, text))
        return image, text

    def loss(self, out, t_img, t_txt):
        terms = real_loss(self, out, t_img, t_txt)
        seen.setdefault("out", {k: v.detach() for k, v in out.items()})
        seen.setdefault("terms", {k: v.detach() for k, v in terms.items()})
        return terms

    monkeypatch.setattr(StoreTeacher, "rows", rows)
    monkeypatch.setattr(DistillationTask, "loss", loss)
    return seen


def test_training_step_is_clip_rd_loss_of_the_members_rows(tmp_path, data, built, members, monkeypatch):
    root, singles, _ = built
    seen = _captured_first_step(monkeypatch)
    teachers = [arg for model, path in members for arg in ("--teacher", model, "--teacher-pretrained", path)]
    assert train_cli(tmp_path, data, root, *teachers, "--preset", "baseline", "--hrd-weight", "1",
                     "--distill-average-after-softmax", "--loss-backend", "reference", "--stop-after-steps", "2",
                     "--no-eval", name="after") is None
    batch, out, terms = seen["batch"], seen["out"], seen["terms"]
    assert [tuple(r.shape) for r in seen["rows"][0]] == [(16, 128), (16, 64)]
    # the teachers' rows read from each member's own store, for the views and captions this step drew
    own = [store_lib.TeacherStore(single).lookup(batch["key"], batch["digest"].tolist(), batch["url"],
                                                 batch["view_index"], batch["caption_index"]) for single in singles]
    scales = [torch.tensor(store_lib.TeacherStore(single).logit_scales[0]) for single in singles]
    t_img, t_txt = ([F.normalize(rows[i].float(), dim=-1) for rows in own] for i in (0, 1))
    expected = clip_rd_loss(F.normalize(out["image_features"].float(), dim=-1),
                            F.normalize(out["text_features"].float(), dim=-1), t_img, t_txt,
                            student_scale=out["logit_scale"].float(), teacher_scale=scales,
                            weights={"task": 1.0, "hrd": 1.0}, ensemble="average-after-softmax", backend="reference")
    for key in ("total", "task", "hrd"):
        torch.testing.assert_close(terms[key], expected[key].detach(), rtol=0, atol=0, msg=key)
    # the mean of the per-teacher losses (the default mode) trains every clip-rd term from the same store
    assert train_cli(tmp_path, data, root, "--stop-after-steps", "2", "--no-eval", name="losses") is None


def _edited_manifest(tmp_path, root, change):
    copy = tmp_path / "edited"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    store_lib.write_manifest(copy, manifest)
    return copy


def test_bad_inputs_refused_in_one_line_before_any_step(tmp_path, data, built, members):
    root, singles, _ = built
    (a, path_a), (b, path_b) = members
    refusals = {
        "count": (["--teacher", a, "--teacher-pretrained", path_a, "--teacher", b],
                  "--teacher-pretrained is given 1 time(s) for 2 teacher(s) (--teacher;"),
        "order": (["--teacher", b, "--teacher-pretrained", path_b, "--teacher", a, "--teacher-pretrained", path_a],
                  "built by other teachers than this run's: it holds the same teachers in another order"),
        "fewer": (["--teacher", a, "--teacher-pretrained", path_a], "it holds 2 teacher(s)"),
        "after-softmax": (["--distill-average-after-softmax"],
                          "--distill-average-after-softmax: the terms ['fd', 'icl', 'vrd', 'xrd'] of this run"),
        "afd": (["--afd-weight", "1"], "--afd-weight: afd fuses the student with one teacher"),
    }
    for case, (extra, message) in refusals.items():
        assert_refused_before_any_step(tmp_path, message, train_cli(tmp_path, data, root, *extra, name=case),
                                       name=case)
    online = command_error(train_lib.main, [
        "--train-data", data["train"], "--logs", tmp_path / "logs", "--name", "online", "--online-teacher",
        "--teacher", a, "--teacher-pretrained", path_a, "--teacher", b, "--teacher-pretrained", path_b])
    assert_refused_before_any_step(tmp_path, "--online-teacher: runs one teacher, and 2 are given", online, "online")
    other = [(b, path_b), (a, path_a)]
    got = command_error(precompute_cmd.main, ["--train-data", data["train"], "--teacher-store", root,
                                              *[x for m, p in other for x in ("--teacher", m, "--teacher-pretrained",
                                                                               p)]])
    assert got is not None and "store was built by other teachers: it holds the same teachers in another order" in got
    assert "--teacher-pretrained is given 1 time(s) for 2 teacher(s)" in command_error(precompute_cmd.main, [
        "--train-data", data["train"], "--teacher", a, "--teacher", b, "--teacher-pretrained", path_a])

    def doubled(manifest):
        manifest["teachers"][1]["logit_scale"] *= 2

    def infinite(manifest):
        manifest["teachers"][1]["logit_scale"] = float("inf")

    for change, message in ((doubled, "teachers[1]: logit_scale 28.5714 is not its teacher's (14.2857"),
                            (infinite, "teachers[1]: logit_scale inf is not a teacher's logit scale")):
        edited = _edited_manifest(tmp_path, root, change)
        assert_refused_before_any_step(tmp_path, message, train_cli(tmp_path, data, edited, name="scale"),
                                       name="scale")
        verified = store_lib.verify(str(edited))
        assert len(verified) == 1 and message in verified[0]
        shutil.rmtree(edited)


def test_verify_views_reports_each_member(tmp_path, built, capsys):
    root, _, _ = built
    store_cmd.main(["verify-views", str(root), "--samples", "1000"])
    lines = capsys.readouterr().out.splitlines()
    fingerprints = [m["fingerprint"] for m in store_lib.read_manifest(root)["teachers"]]
    assert [line.split(": 128 stored view(s) replayed; worst cosine error ")[0] for line in lines] == \
        [f"OK: {root}: teacher {k + 1} {fp}" for k, fp in enumerate(fingerprints)]
    # the second member's embedding of one stored view replaced by another sample's: only that member fails
    copy = tmp_path / "edited"
    shutil.copytree(root, copy)
    manifest = store_lib.read_manifest(copy)
    name = next(n for n in manifest["parts"] if n.startswith("train-00001-"))
    path = copy / "parts" / name / "image.npy"
    image = np.load(path)
    image[5, 1, 128:] = image[6, 1, 128:]
    np.save(path, image)
    manifest["parts"][name]["sha256"]["image"] = store_lib.sha256_file(path)
    store_lib.write_manifest(copy, manifest)
    with pytest.raises(SystemExit) as exc:
        store_cmd.main(["verify-views", str(copy), "--samples", "1000"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out.startswith(f"OK: {copy}: teacher 1 {fingerprints[0]}: 128 stored")
    assert captured.err.startswith(f"error: {copy}: teacher 2 {fingerprints[1]}: 128 stored view(s) replayed")
    assert "(sample '1000010005' of shard train-00001.tar, view 1)" in captured.err


def test_datacompdr_export_of_an_ensemble_trains_with_its_widths(tmp_path, data, built, members):
    root, _, _ = built
    out = tmp_path / "dr"
    teachers = [arg for model, path in members for arg in ("--teacher", model, "--teacher-pretrained", path)]
    argv = ["--train-data", data["train"], *teachers, "--teacher-store", root, "--augmentations", "2",
            "--aug-cfg", "scale=0.5,1.0", "--captions", "2", "--output-format", "datacompdr", "--output", out]
    assert command_error(precompute_cmd.main, argv) is None
    store = store_lib.TeacherStore(root)
    source = next(iter(data_lib.read_shard(data_lib.expand_urls(data["train"])[0])))
    exported = next(iter(data_lib.read_shard(str(out / "train-00000.tar"))))
    assert exported["__key__"] == source["__key__"]
    with np.load(io.BytesIO(exported["npz"])) as rows:
        image, text = rows["image_emb"], rows["text_emb"]
    key, digest = source["__key__"], data_lib.sample_digest(source)
    stored = [store.lookup([key], [digest], [None], [0], [caption]) for caption in (0, 1)]
    assert image.shape == text.shape == (2, sum(WIDTHS))  # (views, 128 + 64), (captions, 128 + 64)
    assert np.array_equal(text, np.stack([rows[1][0].float().numpy() for rows in stored]))
    assert np.array_equal(image[0], stored[0][0][0].float().numpy())
    dr = ["--train-data", str(out / "train-{00000..00001}.tar"), "--dataset-reinforcement", "--batch-size", "16",
          "--epochs", "1", "--no-eval", "--stop-after-steps", "1", "--logs", str(tmp_path / "logs"), "--name", "dr",
          "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--distill-loss-weights", "1", "1",
          "--distill-teacher-dimension", *map(str, WIDTHS), "--distill-logit-scale", *map(str, store.logit_scales)]
    assert command_error(train_lib.main, dr) is None
