"""open_clip_train's flags in engine.train: each one's meaning, and each bad value refused in one line at start."""
import json
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from engine.train import parse_args, parser
from engine.training import loop as training_loop
from engine.training import resume as training_resume
from engine.training import state as training_state
from engine.training.config import TrainConfig
from engine.training.distributed import DistEnv
from engine.training.prepare import resolve
from tests.helpers import assert_refused_before_any_step, command_error, seeded_checkpoint, train_cli

TEXT_TOWER = ("positional_embedding", "text_projection", "transformer.", "token_embedding.", "ln_final.")


def _run(cfg):
    """What ``python -m engine.train`` does in one process: prepare the inputs, then train."""
    cfg.validate()
    return training_loop.run(cfg, resolve(cfg, progress=False))


def _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, **overrides):
    base = dict(train_data=synth_data["train"], val_data=synth_data["val"], teacher_pretrained=str(teacher_ckpt),
                teacher_store=str(store_dir), batch_size=16, epochs=1, lr=1e-3, warmup=1, logs=str(tmp_path / "logs"),
                name="run", progress=False, log_every_n_steps=2, loss_backend="auto", cache_dir=str(tmp_path / "cache"))
    base.update(overrides)
    return TrainConfig(**base)


def _rows(tmp_path, name="run", kind=None):
    lines = (tmp_path / "logs" / name / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if kind is None or row["kind"] == kind]


def _checkpoint(tmp_path, name="run"):
    return torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt", weights_only=False)


@pytest.fixture(scope="session")
def student_ckpt(tmp_path_factory):
    return seeded_checkpoint(tmp_path_factory, "tiny-vit-student", 321)


def _cat_pipe(pattern: str) -> str:
    """The same shards as a webdataset ``pipe:`` URL pattern (as for `pipe:aws s3 cp s3://... -`)."""
    return f"pipe:cat {pattern}"


# ----------------------------------------------------------------------------------------------------- refusals

BAD_FLAGS = [
    (["--report-to", "wandb"], "--report-to wandb: 'wandb' is not supported here"),
    (["--report-to", "tensorboard,all"], "'all' is not supported here"),
    (["--report-to", "mlflow"], "--report-to mlflow: unknown backend 'mlflow'"),
    (["--val-frequency", "-1"], "--val-frequency: must be >= 0"),
    (["--zeroshot-frequency", "-2"], "--zeroshot-frequency: must be >= 0"),
    (["--train-num-samples", "0"], "--train-num-samples: must be >= 1"),
    (["--lock-image-unlocked-groups", "2"], "--lock-image-unlocked-groups only applies with --lock-image"),
    (["--lock-text-freeze-layer-norm"], "--lock-text-freeze-layer-norm only applies with --lock-text"),
    (["--lock-image", "--lock-image-unlocked-groups", "-1"], "--lock-image-unlocked-groups: must be >= 0"),
    (["--lock-text"], "--lock-text: tiny-vit-student: Unfreezing LayerNorm is not supported"),
    (["--pretrained", "/nowhere/student.pt"], "--pretrained: checkpoint file /nowhere/student.pt does not exist"),
    (["--pretrained", "laion-nope"], "--pretrained laion-nope: cannot load it into tiny-vit-student: pretrained "
                                     "'laion-nope' for model 'tiny-vit-student' is neither"),
    (["--imagenet-val", "/nowhere/imagenet/val"], "--imagenet-val /nowhere/imagenet/val: no such directory"),
    (["--train-data", "s3://bucket/train-{0..1}.tar"], "webdataset cannot open 's3' URLs"),
    (["--val-num-samples", "31"], "--val-num-samples 31: the --val-data shards hold 32 samples"),
    (["--val-num-samples", "0"], "--val-num-samples: must be >= 1"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_stops_before_any_step(tmp_path, synth_data, store_dir, flags, message):
    assert_refused_before_any_step(tmp_path, message, train_cli(tmp_path, synth_data, store_dir, *flags))


def test_bad_files_stop_before_any_step(tmp_path, synth_data, store_dir, teacher_ckpt):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    partial = tmp_path / "partial.pt"  # a student checkpoint that lost a tensor
    state = models.create_model("tiny-vit-student").state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "ln_final.weight"}}, partial)
    few = tmp_path / "imagenet-999"
    for i in range(999):
        (few / f"n{i:08d}").mkdir(parents=True)
    empty = tmp_path / "imagenet-empty"
    for i in range(1000):
        (empty / f"n{i:08d}").mkdir(parents=True)
    cases = [(["--pretrained", str(notes)], f"--pretrained {notes}: cannot load it into tiny-vit-student"),
             (["--pretrained", str(teacher_ckpt)],  # another architecture: the teacher's
              f"--pretrained {teacher_ckpt}: cannot load it into tiny-vit-student: text pos_embed width changed"),
             (["--pretrained", str(partial)], "Missing key(s) in state_dict: \"ln_final.weight\""),
             (["--imagenet-val", str(few)], f"--imagenet-val {few}: 999 class folders, expected ImageNet's 1000"),
             (["--imagenet-val", str(empty)], f"--imagenet-val {empty}: no images in its class folders"),
             (["--train-data", _cat_pipe(synth_data["train"])], "--train-data: the size of remote shard "
                                                                 "'pipe:cat "),
             (["--train-data", _cat_pipe(synth_data["train"])], "pass --train-num-samples")]
    for flags, message in cases:
        got = train_cli(tmp_path, synth_data, store_dir, *flags)
        assert got is not None and got.startswith("error: ") and message in got and "\n" not in got, (flags, got)
        assert not (tmp_path / "logs" / "bad" / "checkpoints" / "epoch_latest.pt").exists()


def test_missing_tensorboard_is_refused_at_start(tmp_path, synth_data, store_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now raises ImportError
    got = train_cli(tmp_path, synth_data, store_dir, "--report-to", "tensorboard")
    assert got == ("error: --report-to tensorboard: the tensorboard package is not installed; "
                   "pip install -e '.[tensorboard]'")
    assert not (tmp_path / "logs" / "bad" / "checkpoints").exists()


def test_dataset_type_as_open_clip_train_for_webdataset(capsys):
    """open_clip_train's --dataset-type webdataset (or auto) runs the same; its csv and synthetic are refused."""
    assert parse_args(["--dataset-type", "webdataset"]) == parse_args([]) == parse_args(["--dataset-type", "auto"])
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--dataset-type", "csv"])
    assert stopped.value.code == 2 and "--dataset-type: invalid choice: 'csv'" in capsys.readouterr().err


def test_flags_parse_with_open_clip_defaults():
    cfg = parse_args([])
    assert (cfg.val_frequency, cfg.zeroshot_frequency, cfg.report_to, cfg.train_num_samples) == (1, 2, None, None)
    assert (cfg.pretrained, cfg.lock_image, cfg.lock_text, cfg.imagenet_val) == (None, False, False, None)
    cfg = parse_args(["--pretrained", "s.pt", "--lock-image", "--lock-image-unlocked-groups", "2",
                      "--lock-image-freeze-bn-stats", "--lock-text", "--lock-text-unlocked-layers", "1",
                      "--lock-text-freeze-layer-norm", "--val-frequency", "3", "--zeroshot-frequency", "0",
                      "--imagenet-val", "/data/imagenet/val", "--report-to", "tensorboard",
                      "--train-num-samples", "1000"])
    assert (cfg.pretrained, cfg.lock_image_unlocked_groups, cfg.lock_text_unlocked_layers) == ("s.pt", 2, 1)
    assert cfg.lock_image and cfg.lock_image_freeze_bn_stats and cfg.lock_text and cfg.lock_text_freeze_layer_norm
    assert (cfg.val_frequency, cfg.zeroshot_frequency, cfg.train_num_samples) == (3, 0, 1000)
    assert (cfg.imagenet_val, cfg.report_to) == ("/data/imagenet/val", "tensorboard")
    help_text = parser().format_help()
    for flag in ("--pretrained", "--lock-image-unlocked-groups", "--lock-text-freeze-layer-norm", "--val-frequency",
                 "--zeroshot-frequency", "--imagenet-val", "--report-to", "--train-num-samples"):
        assert flag in help_text, flag
    for name in ("pretrained", "lock_image", "lock_text_unlocked_layers", "train_num_samples"):
        assert name in training_resume.RESUME_INVARIANTS, name


# ------------------------------------------------------------------------------------------ --pretrained, locks


def _tower(key: str) -> str:
    return "image" if key.startswith("visual.") else "text" if key.startswith(TEXT_TOWER) else "other"


def test_pretrained_student_is_loaded_before_training(tmp_path, synth_data, teacher_ckpt, store_dir, student_ckpt):
    cfg = _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, pretrained=str(student_ckpt))
    student = training_state.create_student(cfg, torch.device("cpu"))
    saved = torch.load(student_ckpt)["state_dict"]
    for key, value in student.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # an engine checkpoint (a run's epoch_latest.pt) loads too: the student of that run
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="first", stop_after_steps=1))
    engine_ckpt = tmp_path / "logs" / "first" / "checkpoints" / "epoch_latest.pt"
    cfg = _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, pretrained=str(engine_ckpt))
    student = training_state.create_student(cfg, torch.device("cpu"))
    for key, value in student.state_dict().items():
        assert torch.equal(value, _checkpoint(tmp_path, "first")["state_dict"][key]), key


@pytest.mark.parametrize("locked", ["image", "text"])
def test_locked_tower_is_unchanged_by_training(tmp_path, synth_data, teacher_ckpt, store_dir, student_ckpt, locked):
    lock = {"image": dict(lock_image=True), "text": dict(lock_text=True, lock_text_freeze_layer_norm=True)}[locked]
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, pretrained=str(student_ckpt), stop_after_steps=2,
              **lock))
    before, after = torch.load(student_ckpt)["state_dict"], _checkpoint(tmp_path)["state_dict"]
    changed = {_tower(key) for key in before if not torch.equal(before[key], after[key])}
    assert locked not in changed and {"image", "text", "other"} - {locked} <= changed, changed
    # frozen parameters are not in the optimizer (weight decay would move them otherwise)
    cfg = _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="built", **lock)
    state, _ = training_state.build_state(cfg, resolve(cfg, progress=False), DistEnv(), torch.device("cpu"))
    optimised = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    for key, parameter in state.student.named_parameters():
        assert (id(parameter) in optimised) == (_tower(key) != locked) == parameter.requires_grad, key


def test_lock_companions_leave_groups_unlocked(tmp_path, synth_data, teacher_ckpt, store_dir):
    cfg = _cfg(tmp_path, synth_data, teacher_ckpt, store_dir, lock_image=True, lock_image_unlocked_groups=2,
               lock_text=True, lock_text_unlocked_layers=2, lock_text_freeze_layer_norm=True)
    student = training_state.create_student(cfg, torch.device("cpu"))
    training_state.lock_towers(student, cfg)
    trainable = {key for key, p in student.named_parameters() if p.requires_grad}
    # open_clip's image groups: [stem], blocks but the last, [last block, ln_post], proj: the last two unlocked
    assert {k for k in trainable if k.startswith("visual.")} == {
        k for k, _ in student.named_parameters()
        if k == "visual.proj" or k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))}
    # open_clip's text groups: [embeddings], blocks but the last, [last block, ln_final], projection
    assert {k for k in trainable if _tower(k) == "text"} == {
        k for k, _ in student.named_parameters()
        if k == "text_projection" or k.startswith(("transformer.resblocks.1.", "ln_final."))}


# ------------------------------------------------------------------------------------------- --report-to


def test_report_to_tensorboard_writes_the_train_scalars(tmp_path, synth_data, teacher_ckpt, store_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, report_to="tensorboard", val_frequency=0))
    events = EventAccumulator(str(tmp_path / "logs" / "run" / "tensorboard"))
    events.Reload()
    rows = _rows(tmp_path, kind="train")
    for name in ("total", "fd", "lr"):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [row["step"] for row in rows] == [2, 4, 6], name
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in rows], rel=1e-6), name
    evaluation = _rows(tmp_path, kind="eval")[-1]
    assert events.Scalars("eval/acc1")[-1].value == pytest.approx(evaluation["acc1"], rel=1e-6)
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="plain", stop_after_steps=1))
    assert not (tmp_path / "logs" / "plain" / "tensorboard").exists()  # event files only when asked for


# --------------------------------------------------------------------------- --val-frequency, --zeroshot-frequency


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """ImageNet's layout in miniature: 1000 class folders, images (32x32 PNGs) in folders 7, 500 and 999."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    rng = np.random.default_rng(0)
    for index in range(1000):
        (root / f"n{index:08d}").mkdir(parents=True)
    for index in (7, 500, 999):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"n{index:08d}" / f"ILSVRC2012_val_{index:08d}.png")
    return root


@pytest.fixture
def two_templates(monkeypatch):
    """Two of open_clip's 80 ImageNet templates, so that a zero-shot classifier takes 2000 prompts, not 80000 (the
    commands read open_clip's list when they evaluate)."""
    import open_clip

    templates = (lambda c: f"a bad photo of a {c}.", lambda c: f"a photo of the large {c}.")
    monkeypatch.setattr(open_clip, "OPENAI_IMAGENET_TEMPLATES", templates)
    return templates


def test_imagenet_zero_shot_against_a_hand_built_classifier(tmp_path, imagenet_dir, two_templates):
    import shutil

    import open_clip

    from engine.evaluation.metrics import imagenet_zero_shot

    torch.manual_seed(5)
    model = models.create_model("tiny-vit-student").eval()
    preprocess, tokenizer = models.get_preprocess(model), models.get_tokenizer("tiny-vit-student")
    # the classifier transcribed by hand: per class, the normalised mean of its normalised prompt embeddings
    prompts = [template(c) for c in open_clip.IMAGENET_CLASSNAMES for template in two_templates]
    with torch.no_grad():
        prompt_embeddings = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).reshape(1000, 2, -1)
    classifier = F.normalize(prompt_embeddings.mean(dim=1), dim=-1).T  # (D, 1000)
    images = sorted(imagenet_dir.glob("*/*.png"))
    with torch.no_grad():
        features = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in images])), dim=-1)
    ranking = (features @ classifier).argsort(dim=1, descending=True)  # (3, 1000) classes, best first
    # put image 0 in its best class (top-1 hit), image 1 in its 3rd (top-5 hit only), image 2 in its 10th (miss)
    root = tmp_path / "val"
    shutil.copytree(imagenet_dir, root)
    for path in root.glob("*/*.png"):
        path.unlink()
    for image, rank in zip(images, (0, 2, 9)):
        label = ranking[images.index(image), rank].item()
        shutil.copy(image, root / f"n{label:08d}" / image.name)
    scores = imagenet_zero_shot(model, preprocess, tokenizer, str(root), batch_size=2, templates=two_templates)
    assert scores == pytest.approx({"imagenet-zeroshot-val-top1": 1 / 3, "imagenet-zeroshot-val-top5": 2 / 3})


def test_eval_command_adds_imagenet_zero_shot(tmp_path, synth_data, student_ckpt, imagenet_dir, two_templates):
    from engine.eval import main as eval_main

    out = tmp_path / "metrics.json"
    eval_main(["--pretrained", str(student_ckpt), "--model", "tiny-vit-student", "--val-data", synth_data["val"],
               "--imagenet-val", str(imagenet_dir), "--output", str(out)])
    assert {"acc1", "imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5"} <= set(json.loads(out.read_text()))
    message = command_error(eval_main, ["--pretrained", student_ckpt, "--val-data", synth_data["val"],
                                        "--imagenet-val", tmp_path])
    assert message.startswith(f"error: --imagenet-val {tmp_path}: 0 class folders"), message


def test_evaluation_rows_follow_the_frequencies(tmp_path, synth_data, teacher_ckpt, store_dir, imagenet_dir,
                                                two_templates):
    result = _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, epochs=3, batch_size=32, val_frequency=1,
                       zeroshot_frequency=2, imagenet_val=str(imagenet_dir)))
    val = _rows(tmp_path, kind="val")
    assert [row["epoch"] for row in val] == [1, 2, 3] and [row["step"] for row in val] == [3, 6, 9]
    assert all("acc1" in row for row in val)
    zero_shot = {"imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5"}
    assert [zero_shot <= set(row) for row in val] == [False, True, True]  # --zeroshot-frequency 2 and the last
    final = _rows(tmp_path, kind="eval")
    assert len(final) == 1 and final[0]["step"] == 9
    assert result.metrics == {k: v for k, v in val[-1].items() if k not in ("kind", "step", "epoch")}
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="never", epochs=2, batch_size=32, val_frequency=0))
    assert _rows(tmp_path, "never", kind="val") == [] and len(_rows(tmp_path, "never", kind="eval")) == 1


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_low_precision_student_is_evaluated(tmp_path, synth_data, teacher_ckpt, store_dir, imagenet_dir, two_templates,
                                            precision):
    """--precision bf16 and pure_bf16 keep (some of) the student's weights in bf16: training and evaluation feed it
    images of that dtype."""
    result = _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, batch_size=32, precision=precision,
                       preset="clip-kd", imagenet_val=str(imagenet_dir), zeroshot_frequency=1))
    assert {"acc1", "image_retrieval_recall@1", "imagenet-zeroshot-val-top1"} <= set(result.metrics)
    weights = _checkpoint(tmp_path)["state_dict"]
    assert weights["visual.conv1.weight"].dtype == torch.bfloat16
    assert weights["visual.ln_pre.weight"].dtype == (torch.float32 if precision == "bf16" else torch.bfloat16)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"])
def test_low_precision_student_is_open_clips(precision):
    """--precision as open_clip_train builds the model: bf16 / fp16 its OpenAI-style mixed precision (linear,
    convolution and attention weights in low precision, LayerNormFp32, the rest fp32), pure_* every weight."""
    student = training_state.create_student(TrainConfig(precision=precision), torch.device("cpu"))
    if precision in training_state.PURE:
        student.to(getattr(torch, training_state.PURE[precision]))  # as build_state does
    reference = models.create_model("tiny-vit-student", precision=precision)
    assert [(name, p.dtype) for name, p in student.named_parameters()] == \
        [(name, p.dtype) for name, p in reference.named_parameters()]
    assert [type(m).__name__ for m in student.modules()] == [type(m).__name__ for m in reference.modules()]
    assert models.input_dtype(student) == open_clip.get_input_dtype(precision) or torch.float32


# ----------------------------------------------------------------------- remote shards, --train-num-samples


@pytest.fixture(scope="module")
def http_root(synth_data):
    """The synthetic shards served over HTTP on localhost (webdataset reads http:// URLs through curl)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(synth_data["root"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("scheme", ["pipe", "http"])
def test_remote_shards_train_like_local_ones(tmp_path, synth_data, teacher_ckpt, store_dir, http_root, scheme):
    """Shards read through ``pipe:cat`` or ``http://``, --train-num-samples equal to their size: the same batches
    as the local files, the same weights (the store built from the local files serves them)."""
    remote = _cat_pipe(synth_data["train"]) if scheme == "pipe" else f"{http_root}/train-{{00000..00002}}.tar"
    common = dict(stop_after_steps=3, val_data=None, eval=False, workers=1)
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="local", **common))
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="remote", train_data=remote, train_num_samples=96,
              **common))
    local, pipe = _checkpoint(tmp_path, "local"), _checkpoint(tmp_path, "remote")
    assert local["step"] == pipe["step"] == 3
    for key, value in local["state_dict"].items():
        assert torch.equal(value, pipe["state_dict"][key]), key


def test_val_num_samples_checks_remote_validation_shards(tmp_path, synth_data, teacher_ckpt, store_dir):
    from engine.core.errors import ShardError

    remote_val = dict(val_data=_cat_pipe(synth_data["val"]), stop_after_steps=None, epochs=1, batch_size=32)
    result = _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="right", val_num_samples=32, **remote_val))
    assert "image_retrieval_recall@1" in result.metrics  # retrieval (classnames.json is looked for beside local
    assert "acc1" not in result.metrics                    # shards only: remote ones get no zero-shot acc1)
    with pytest.raises(ShardError, match=r"--val-num-samples 40: read 32 samples from 'pipe:cat "):
        _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="wrong", val_num_samples=40, **remote_val))


def test_train_num_samples_sets_the_epoch_length(tmp_path, synth_data, teacher_ckpt, store_dir):
    """96 samples in 3 shards: 160 per epoch start over the shards (10 steps of 16), 48 stop half-way (3)."""
    pattern = _cat_pipe(synth_data["train"])
    for name, samples, steps in (("long", 160, 10), ("short", 48, 3)):
        _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name=name, train_data=pattern,
                  train_num_samples=samples, eval=False))
        assert _checkpoint(tmp_path, name)["step"] == steps, name


def test_store_built_from_pipe_shards(tmp_path, synth_data, teacher_ckpt, store_dir):
    from engine.teachers.precompute import build_store
    from engine.teachers.store import TeacherStore

    pipe = _cat_pipe(synth_data["train"])
    built = build_store(pipe, [("tiny-vit-teacher", str(teacher_ckpt))], tmp_path / "store", batch_size=40,
                        progress=False)
    reference = TeacherStore(store_dir)
    urls = [f"pipe:cat {synth_data['root']}/train-0000{i}.tar" for i in range(3)]
    remote = TeacherStore(built, urls)
    assert [part["shard"] for part in remote.parts] == urls  # a remote shard is identified by its URL
    for mine, theirs in zip(remote.parts, reference.parts):
        for array in ("keys", "digests", "image", "text"):
            np.testing.assert_array_equal(mine[array], theirs[array], err_msg=array)


def test_resume_over_repeated_pipe_shards_is_exact(tmp_path, synth_data, teacher_ckpt, store_dir):
    """160 samples per epoch from 96: a run stopped in the second pass over the shards resumes at the same sample."""
    common = dict(train_data=_cat_pipe(synth_data["train"]), train_num_samples=160, eval=False)
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="full", **common))
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="killed", stop_after_steps=8, **common))
    _run(_cfg(tmp_path, synth_data, teacher_ckpt, store_dir, name="killed", resume="latest", **common))
    full, resumed = _checkpoint(tmp_path, "full"), _checkpoint(tmp_path, "killed")
    assert full["step"] == resumed["step"] == 10
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
