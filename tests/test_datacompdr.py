"""DataCompDR shards (--dataset-reinforcement): views replayed as torchvision's primitives make them, stored rows
equal to the teachers' embeddings of the replayed views, training from them, and every bad input refused in one line
before any step."""
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from engine import train as train_lib
from engine.data import augment
from engine.data import datacompdr as dr
from engine.data import shards as data_lib
from engine.precompute import main as precompute
from engine.teachers.datacompdr import DataCompDRTeacher
from engine.training.config import TrainConfig
from engine.training.datacompdr import datacompdr_codec
from engine.training.distributed import DistEnv
from engine.training.task import DistillationTask
from kernels import ClipRDLoss
from tests import datacompdr_shards as fixture
from tests.helpers import assert_refused_before_any_step, command_error, seeded_checkpoint

WIDTHS = ("128", "64")  # tiny-vit-teacher, then tiny-vit-student as the second member


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    return [(name, str(seeded_checkpoint(tmp_path_factory, name, seed)))
            for name, seed in (("tiny-vit-teacher", 11), ("tiny-vit-student", 12))]


@pytest.fixture(scope="module")
def teachers(teacher_files):
    return [models.create_teacher(name, path) for name, path in teacher_files]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, teachers):
    return fixture.write_shards(tmp_path_factory.mktemp("dcdr") / "good", teachers)


def decoded(shards, epoch, **flags):
    cfg = TrainConfig(dataset_reinforcement=True, distill_teacher_dimension=[128, 64], **flags)
    student = models.create_model("tiny-vit-student")
    codec = datacompdr_codec(cfg, student)
    raws = [raw for url in data_lib.expand_urls(shards) for raw in data_lib.read_shard(url)]
    return raws, codec.collate([codec(raw, epoch) for raw in raws])


def test_every_view_replays_as_torchvision_makes_it(shards):
    for epoch in range(fixture.VIEWS):  # sequential: view epoch mod K, every view of every sample once
        raws, batch = decoded(shards, epoch, dataset_reinforcement_sample_sequential=True)
        assert batch["view_index"].tolist() == [epoch] * len(raws)
        for b, raw in enumerate(raws):
            entries = json.loads(raw["paug.json"])["param_aug"]
            entries = json.loads(entries) if isinstance(entries, str) else entries
            expected = fixture.apply_view(Image.open(io.BytesIO(raw["png"])).convert("RGB"), entries[epoch])
            assert torch.equal(batch["image"][b], fixture.pixels(expected)), (raw["__key__"], epoch)
            stored = np.load(io.BytesIO(raw["npz"]))["image_emb"][epoch] if "npz" in raw else None
            if stored is not None:
                assert torch.equal(batch["dr_image"][b], torch.from_numpy(stored))


def test_stored_embeddings_match_the_replayed_views_reembedded(shards, teachers):
    raws, batch = decoded(shards, 1, seed=5)
    views = [dr.read_views(raw) for raw in raws]
    images = [augment.replay(Image.open(io.BytesIO(raw["png"])).convert("RGB"), views[b][int(batch["view_index"][b])],
                             (32, 32), (32, 32)) for b, raw in enumerate(raws)]
    again, _ = fixture.embed(teachers, images, ["x"])
    for b, raw in enumerate(raws):
        tolerance = 1e-5 if "npz" in raw else 2 ** -7  # pth.gz holds bf16
        assert torch.allclose(batch["dr_image"][b], torch.from_numpy(again[b]), atol=tolerance, rtol=0)
    assert len(set(batch["view_index"].tolist())) == fixture.VIEWS  # seeded: every view drawn somewhere


def test_captions_ground_truth_or_synthetic_by_key_regex(shards):
    raws, batch = decoded(shards, 0, dataset_reinforcement_mix_synthetic=True,
                          dataset_reinforcement_mix_synthetic_ratio=0.5)
    rows = batch["caption_index"].tolist()
    assert set(rows) == {0, 1, 2}  # the .txt, or syn_text's two captions (rows 1, 2); syn_other (row 3) never
    for b, raw in enumerate(raws):
        captions = [raw["txt"].decode(), *json.loads(raw["syn.json"])["syn_text"]]
        assert batch["caption"][b] == captions[rows[b]]
    _, other = decoded(shards, 0, dataset_reinforcement_mix_synthetic=True,
                       dataset_reinforcement_mix_synthetic_ratio=1.0,
                       dataset_reinforcement_syn_text_key_regex="syn_o")
    assert set(other["caption_index"].tolist()) == {3}
    raws, plain = decoded(shards, 0)  # MobileCLIP without mix: the .txt, and a synthetic caption beside it
    assert set(plain["caption_index"].tolist()) == {0} and set(plain["syn_caption_index"].tolist()) == {1, 2}
    for b, raw in enumerate(raws):
        assert plain["caption"][b] == raw["txt"].decode()
        assert plain["syn_caption"][b] == json.loads(raw["syn.json"])["syn_text"][plain["syn_caption_index"][b] - 1]


def train(tmp_path, data, *extra, name="run"):
    argv = ["--train-data", data, "--dataset-reinforcement", "--batch-size", "8", "--epochs", "1", "--no-eval",
            "--logs", str(tmp_path / "logs"), "--name", name, "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--log-every-n-steps", "1", "--distill-loss-weights", "1", "1", *extra]
    return command_error(train_lib.main, argv)


def steps_logged(tmp_path, name="run"):
    rows = [json.loads(line) for line in (tmp_path / "logs" / name / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("kind") == "train"]


def test_training_runs_from_one_concatenated_teacher(tmp_path, shards):
    assert train(tmp_path, shards, "--distill-logit-scale", "50", "--dataset-reinforcement-mix-synthetic",
                 "--dataset-reinforcement-mix-synthetic-ratio", "0.5", "--dataset-reinforcement-verify-sha256") is None
    rows = steps_logged(tmp_path)
    assert len(rows) == 3 and all(math.isfinite(row["hrd"]) and math.isfinite(row["task"]) for row in rows)


def test_training_runs_from_an_ensemble_and_resumes_exactly(tmp_path, shards):
    ensemble = ("--distill-teacher-dimension", *WIDTHS, "--distill-logit-scale", "100", "50")
    for mode in ([], ["--distill-average-after-softmax"]):
        name = "after" if mode else "losses"
        assert train(tmp_path, shards, *ensemble, *mode, name=name) is None
        assert len(steps_logged(tmp_path, name)) == 3
    assert train(tmp_path, shards, *ensemble, "--stop-after-steps", "1", name="cut") is None
    assert train(tmp_path, shards, *ensemble, "--resume", "latest", name="cut") is None
    full, cut = (torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt", weights_only=False)
                 for name in ("losses", "cut"))
    assert full["step"] == cut["step"] == 3
    for key in full["state_dict"]:  # the same views and captions drawn after the resume
        assert torch.equal(full["state_dict"][key], cut["state_dict"][key]), key


def edited(tmp_path, shards, name, edit, shard=1):
    """A copy of the shards with ``edit`` applied to the first sample of shard ``shard``."""
    root = tmp_path / name
    root.mkdir()
    for url in data_lib.expand_urls(shards):
        samples = fixture.read_tar(Path(url))
        if Path(url).name == f"{shard:05d}.tar":
            samples[0] = edit(dict(samples[0]))
        fixture.write_tar(root / Path(url).name, samples)
    return str(root / "{00000..00001}.tar")


def nan_embeddings(sample):
    archive = dict(np.load(io.BytesIO(sample["npz"])))
    archive["image_emb"][1, 3] = np.nan
    buffer = io.BytesIO()
    np.savez(buffer, **archive)
    return {**sample, "npz": buffer.getvalue()}


def short_views(sample):
    entries = json.loads(sample["paug.json"])["param_aug"]
    entries = json.loads(entries) if isinstance(entries, str) else entries
    return {**sample, "paug.json": json.dumps({"param_aug": entries[:2]}).encode()}


def changed_pixel(sample):
    image = np.array(Image.open(io.BytesIO(sample["png"])))
    image[0, 0, 0] ^= 1
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    return {**sample, "png": png.getvalue()}


def test_bad_inputs_refused_in_one_line_before_any_step(tmp_path, shards):
    changed = edited(tmp_path, shards, "changed", changed_pixel, shard=1)
    assert_refused_before_any_step(tmp_path, "--dataset-reinforcement-verify-sha256: 1 image(s) do not match their "
                                   "json's sha256 (first: 000012)",
                                   train(tmp_path, changed, "--dataset-reinforcement-verify-sha256", name="bad"),
                                   name="bad")
    cases = {
        "short": (short_views, (), "sample '000000' has 2 view(s) in paug.json but 3 image_emb row(s)"),
        "nan": (nan_embeddings, (), "sample '000000' npz holds non-finite values (NaN or Inf)"),
        "nosyn": (lambda s: {k: v for k, v in s.items() if k != "syn.json"}, ("--dataset-reinforcement-mix-synthetic",),
                  "sample '000000' lacks syn.json, which --dataset-reinforcement-mix-synthetic reads"),
        "dims": (lambda s: s, ("--distill-teacher-dimension", "128", "32"),
                 "--distill-teacher-dimension 128 32: sums to 160, but sample '000000'"),
    }
    for name, (edit, flags, message) in cases.items():
        data = edited(tmp_path, shards, name, edit, shard=0)
        assert_refused_before_any_step(tmp_path, message, train(tmp_path, data, *flags, name="bad"), name="bad")


def test_mismatched_images_dropped_and_counted(tmp_path, shards):
    changed = edited(tmp_path, shards, "changed", changed_pixel, shard=1)
    assert train(tmp_path, changed, "--dataset-reinforcement-verify-sha256", "--dataset-reinforcement-drop-mismatched",
                 name="drop") is None
    log = (tmp_path / "logs" / "drop" / "out.log").read_text()
    assert "epoch 1: dropped 1 sample(s) whose image does not match its sha256" in log


def test_param_aug_round_trip_and_refusals(tmp_path):
    config = tmp_path / "dr.json"
    config.write_text(json.dumps({"reinforce": {"image_augmentation": {"random_resized_crop": {"size": 224}}}}))
    assert dr.read_config(str(config)) == (224, 224)
    config.write_text("{}")
    with pytest.raises(dr.ConfigError, match="cannot read reinforce.image_augmentation.random_resized_crop.size"):
        dr.read_config(str(config))
    view = dr.parse_view([[1, 2, 30, 40], True, [[3, 4.5], [10, 4.0]]])
    assert view == augment.View((1, 2, 30, 40), True, ((3, 4.5), (10, 4.0)))
    assert dr.parse_view([[1, 2, 30, 40], [[0, 0.0]]]) == augment.View((1, 2, 30, 40), False, ((0, 0.0),))


def test_precompute_writes_datacompdr_shards_that_train(tmp_path, shards, teacher_files):
    out, teacher_ckpt = tmp_path / "dr", teacher_files[0][1]
    argv = ["--train-data", shards, "--teacher-pretrained", teacher_ckpt, "--teacher-store",
            tmp_path / "store", "--augmentations", "2", "--aug-cfg", "hflip=0.5", "--captions", "2",
            "--output-format", "datacompdr", "--output", out, "--cache-dir", tmp_path / "cache"]
    assert command_error(precompute, argv) is None
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == [Path(u).name for u in data_lib.expand_urls(shards)]
    assert set(sizes.values()) == {12}
    written = {name: (out / name).stat().st_mtime_ns for name in sizes}
    assert command_error(precompute, argv) is None  # resumed: nothing rewritten
    assert {name: (out / name).stat().st_mtime_ns for name in sizes} == written
    teacher = models.create_teacher("tiny-vit-teacher", teacher_ckpt)
    raws = list(data_lib.read_shard(str(out / sorted(sizes)[0])))
    settings = dr.DRSettings(mix_synthetic=True)
    for raw in raws[:4]:
        sample = dr.read_sample(raw, settings, dr.syn_key_pattern("syn_text"))
        image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
        views = [fixture.pixels(augment.replay(image, v, (32, 32), (32, 32))) for v in sample.views]
        again = torch.nn.functional.normalize(teacher.encode_image(torch.stack(views)), dim=-1).detach()
        assert torch.allclose(torch.from_numpy(sample.image_emb), again, atol=2e-3, rtol=0)
        assert dr.sha256_mismatch(raw) is None and len(sample.synthetic) == 1
    pattern = f"{out}/{{{','.join(sorted(sizes))}}}"
    assert train(tmp_path, pattern, "--dataset-reinforcement-mix-synthetic",
                 "--dataset-reinforcement-mix-synthetic-ratio", "0.5", "--dataset-reinforcement-verify-sha256") is None


def test_precompute_writes_bf16_pth_gz_embeddings(tmp_path, shards, teacher_files):
    """--datacompdr-embeddings pth.gz: every sample's embeddings are the npz export's rounded to bf16 (gzip'd
    torch.save, DataCompDR-1B's form), smaller, and they train; a resumed export in the other form is refused."""
    teacher_ckpt = teacher_files[0][1]
    common = ["--train-data", shards, "--teacher-pretrained", teacher_ckpt, "--teacher-store", tmp_path / "store",
              "--augmentations", "2", "--captions", "2", "--output-format", "datacompdr",
              "--cache-dir", tmp_path / "cache"]
    assert command_error(precompute, [*common, "--output", tmp_path / "npz"]) is None
    assert command_error(precompute, [*common, "--output", tmp_path / "pth", "--datacompdr-embeddings",
                                      "pth.gz"]) is None
    assert json.loads((tmp_path / "pth" / "export.json").read_text()) == {"embeddings": "pth.gz"}
    sizes = json.loads((tmp_path / "pth" / "sizes.json").read_text())
    bytes_of = {"npz": 0, "pth.gz": 0}
    for name in sizes:
        as_npz = list(data_lib.read_shard(str(tmp_path / "npz" / name)))
        as_pth = list(data_lib.read_shard(str(tmp_path / "pth" / name)))
        assert [r["__key__"] for r in as_npz] == [r["__key__"] for r in as_pth] and len(as_pth) == sizes[name]
        for a, b in zip(as_npz, as_pth):
            assert "npz" not in b and "pth.gz" not in a
            bytes_of["npz"] += len(a["npz"])
            bytes_of["pth.gz"] += len(b["pth.gz"])
            full, half = dr.read_embeddings(a), dr.read_embeddings(b)
            for x, y in zip(full, half):
                assert y.dtype == np.float32 and x.shape == y.shape
                assert np.array_equal(torch.from_numpy(x).bfloat16().float().numpy(), y)
            assert {k: v for k, v in a.items() if k not in ("npz", "__url__")} == \
                {k: v for k, v in b.items() if k not in ("pth.gz", "__url__")}
    assert bytes_of["pth.gz"] < 0.7 * bytes_of["npz"], bytes_of  # (0.62 at this width; 0.40 at DataCompDR's)
    pattern = f"{tmp_path / 'pth'}/{{{','.join(sorted(sizes))}}}"
    assert train(tmp_path, pattern, "--dataset-reinforcement-mix-synthetic") is None
    message = command_error(precompute, [*common, "--output", tmp_path / "pth"])
    assert f"--output {tmp_path / 'pth'}: holds shards with pth.gz embeddings, this export writes npz" in message
    assert command_error(precompute, ["--train-data", shards, "--datacompdr-embeddings", "pth.gz"]) == \
        "error: --datacompdr-embeddings only applies with --output-format datacompdr"


def test_verify_views_on_shards_per_teacher_by_pipe_and_a_wrong_teacher_order(tmp_path, shards, teacher_files,
                                                                               capsys):
    from engine import store as store_cmd
    from engine.teachers.store import teacher_fingerprint
    from engine.teachers.viewcheck import BF16_VIEW_TOLERANCE

    given = [word for name, path in teacher_files for word in ("--teacher", name, "--teacher-pretrained", path)]
    fingerprints = [teacher_fingerprint(name, path) for name, path in teacher_files]
    total = 2 * 12 * fixture.VIEWS
    for pattern in (shards, f"pipe:cat {shards}"):  # local, and streamed as a remote shard is
        store_cmd.main(["verify-views", pattern, *given, "--samples", "1000"])
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(" stored view(s) replayed; worst cosine error ")[0] for line in lines] == \
            [f"OK: {pattern}: teacher {k + 1} {fp}: {total}" for k, fp in enumerate(fingerprints)]
        assert all(line.endswith(f"tolerance {BF16_VIEW_TOLERANCE:.3g}") for line in lines)  # shard 1 is pth.gz
    store_cmd.main(["verify-views", shards, *given, "--samples", "5", "--seed", "3"])
    assert ": 5 stored view(s) replayed" in capsys.readouterr().out
    # the members named in the other order: the widths still sum to the rows' (64 + 128), the embeddings do not match
    swapped = [word for name, path in reversed(teacher_files)
               for word in ("--teacher", name, "--teacher-pretrained", path)]
    with pytest.raises(SystemExit) as exc:
        store_cmd.main(["verify-views", shards, *swapped, "--samples", "6"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.err.count("error: ") == 2 and "teacher 2" in captured.err
    assert command_error(store_cmd.main, ["verify-views", shards]) == \
        f"error: {shards}: not a store directory (no manifest.json); for DataCompDR shards pass --teacher and " \
        f"--teacher-pretrained, once per teacher in the rows' order"
    one = ["--teacher", teacher_files[0][0], "--teacher-pretrained", teacher_files[0][1]]
    assert "--teacher: the teachers' widths [128] sum to 128, but sample" in \
        command_error(store_cmd.main, ["verify-views", shards, *one])
    # one stored view's crop a pixel shorter than the one the teachers embedded: both teachers see the difference
    shifted = edited(tmp_path, shards, "shifted", shorter_first_crop, shard=0)
    with pytest.raises(SystemExit) as exc:
        store_cmd.main(["verify-views", shifted, *given, "--samples", "1000"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.err.count("error: ") == 2
    assert captured.err.count("(sample '000000' of shard 00000.tar, view 0)") == 2, captured.err


def shorter_first_crop(sample):
    entries = json.loads(sample["paug.json"])["param_aug"]
    entries = json.loads(entries) if isinstance(entries, str) else entries
    entries[0][0][2] -= 1  # [i, j, h, w]: h one pixel less
    return {**sample, "paug.json": json.dumps({"param_aug": entries}).encode()}


def test_mobileclips_published_command_line_trains(tmp_path, shards):
    """Every flag of MobileCLIP's run_datacompdr12m.sh (apple/ml-mobileclip, training/configs), unchanged, with the
    sizes scaled to the fixture (data, model, batch, samples, widths, workers) and without the two that name other
    services (--report-to wandb, --wandb-project-name) or data this machine lacks (--imagenet-val)."""
    config = tmp_path / "datacompdr12m.json"
    config.write_text(json.dumps({"reinforce": {"image_augmentation": {"random_resized_crop": {"size": 32}}}}))
    script = ["--save-frequency", "1", "--ddp-static-graph", "--local-loss", "--gather-with-grad",
              "--grad-checkpointing", "--train-data", shards, "--train-num-samples", "24", "--warmup", "2",
              "--dataset-type", "webdataset", "--precision", "amp", "--workers", "1", "--model", "tiny-vit-student",
              "--batch-size", "8", "--epochs", "2", "--lr", "1.e-3", "--name", "mobileclip", "--seed", "0",
              "--accum-freq", "1", "--log-every-n-steps", "1", "--beta2", "0.95", "--wd", "0.2",
              "--dataset-resampled", "--save-most-recent", "--grad-clip-norm", "1.0", "--zeroshot-frequency", "1",
              "--dataset-reinforcement", "--dataset-reinforcement-config", str(config), "--distill-logit-scale",
              "100", "--distill-loss-weights", "0.0", "1.0", "--distill-teacher-dimension", *WIDTHS,
              "--distill-average-after-softmax"]
    ours = ["--logs", str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-eval"]
    assert command_error(train_lib.main, script + ours) is None
    saved = torch.load(tmp_path / "logs" / "mobileclip" / "checkpoints" / "epoch_latest.pt", weights_only=False)
    assert saved["step"] == 6 and saved["config"]["dataset_resampled"]
    assert saved["config"]["distill_teacher_dimension"] == [128, 64] and saved["config"]["precision"] == "amp"
    rows = steps_logged(tmp_path, "mobileclip")
    assert len(rows) == 6 and all(row["total"] == row["hrd"] and math.isfinite(row["hrd"]) for row in rows)


def test_exported_shards_train_as_the_store_they_were_written_from(tmp_path, synth_data, teacher_ckpt):
    """A reinforced store and the DataCompDR shards exported from it, trained with the same settings (the view and
    caption drawn per sample and epoch, the teacher's logit scale, contrastive + logit distillation): the same
    losses at every step and the same final weights, to the bit."""
    from engine.teachers.store import TeacherStore

    store, out = tmp_path / "store", tmp_path / "dr"
    assert command_error(precompute, ["--train-data", synth_data["train"], "--teacher-pretrained", str(teacher_ckpt),
                                      "--teacher-store", store, "--augmentations", "3", "--captions", "3",
                                      "--output-format", "datacompdr", "--output", out]) is None
    scale = repr(TeacherStore(store).logit_scales[0])
    common = ["--batch-size", "16", "--epochs", "2", "--no-eval", "--logs", str(tmp_path / "logs"), "--no-progress",
              "--log-every-n-steps", "1", "--cache-dir", str(tmp_path / "cache"), "--seed", "5"]
    from_store = ["--train-data", synth_data["train"], "--teacher-store", str(store), "--preset", "baseline",
                  "--hrd-weight", "1", "--mix-synthetic-ratio", "0.5", "--name", "store"]
    from_shards = ["--train-data", str(out / "train-{00000..00002}.tar"), "--dataset-reinforcement",
                   "--distill-loss-weights", "1", "1", "--distill-logit-scale", scale,
                   "--dataset-reinforcement-mix-synthetic", "--dataset-reinforcement-mix-synthetic-ratio", "0.5",
                   "--name", "shards"]
    for argv in (from_store, from_shards):
        assert command_error(train_lib.main, common + argv) is None
    store_rows, shard_rows = steps_logged(tmp_path, "store"), steps_logged(tmp_path, "shards")
    assert len(store_rows) == 12
    assert [(r["task"], r["hrd"]) for r in store_rows] == [(r["task"], r["hrd"]) for r in shard_rows]
    a, b = (torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt", weights_only=False)
            for name in ("store", "shards"))
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_shards_through_pipe_train_like_local_ones(tmp_path, shards):
    """The same shards read through ``pipe:cat`` (as ``pipe:aws s3 cp ... -`` or ``http(s)://`` would stream them,
    sizes unknown: --train-num-samples) give the same steps as the local files."""
    flags = ("--train-num-samples", "24", "--dataset-reinforcement-mix-synthetic", "--distill-teacher-dimension",
             *WIDTHS)
    assert train(tmp_path, shards, *flags, name="local") is None
    assert train(tmp_path, f"pipe:cat {shards}", *flags, name="piped") is None
    local, piped = steps_logged(tmp_path, "local"), steps_logged(tmp_path, "piped")
    assert len(local) == 3 and [(r["task"], r["hrd"]) for r in local] == [(r["task"], r["hrd"]) for r in piped]


def test_without_mix_a_step_adds_the_synthetic_captions_loss(shards):
    """MobileCLIP's DRClipLoss without mix-synthetic: loss(images, .txt) + loss(images, synthetic), term by term."""
    _, batch = decoded(shards, 0)
    torch.manual_seed(0)
    student = models.create_model("tiny-vit-student")
    teacher = DataCompDRTeacher.of([192], [100.0], None, 192)
    task = DistillationTask(student, ClipRDLoss({"task": 1.0, "hrd": 1.0}, student_dim=64, teacher_dim=192,
                                                backend="reference"), teacher, DistEnv(), False, False)
    both = task(batch)
    plain = {k: v for k, v in batch.items() if not k.startswith(("syn_", "dr_syn"))}
    synthetic = {**plain, "text": batch["syn_text"], "dr_text": batch["dr_syn_text"]}
    gt, syn = task(plain), task(synthetic)
    for name in ("total", "task", "hrd"):
        assert torch.allclose(both[name], gt[name] + syn[name], rtol=1e-6, atol=0), name
