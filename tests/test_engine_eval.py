import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.evaluation.metrics import retrieval_recall, zero_shot_accuracy
from tests.helpers import command_error


def test_retrieval_recall_hand_made():
    # 3 pairs in 2-D. text 0 -> image 0 best; text 1 ranks image 1 second; text 2 ranks image 2 third.
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.9], [0.1, 1.0]]), dim=-1)
    # scores text x image: t0 [.995,.0995,-.995] t1 [.74,.67,-.74] t2 [.0995,.995,-.0995]
    m = retrieval_recall(images, texts, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["image_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image queries: i0 -> t0 best (.995); i1 -> scores [.0995,.67,.995]: t1 second; i2 -> [-.995,-.74,-.0995]: t2 best
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_zero_shot_accuracy_hand_made():
    classifier = torch.eye(3)  # (D, C)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    m = zero_shot_accuracy(images, classifier, labels, ks=(1, 2))
    assert m["acc1"] == pytest.approx(2 / 4)  # rows 0, 1 right; row 2 predicts 0; row 3 predicts 2
    assert m["acc2"] == pytest.approx(3 / 4)  # row 2's label is 2nd; row 3's label 0 is last


def test_evaluate_on_shards(synth_data, teacher_ckpt):
    import models
    from engine.evaluation.metrics import evaluate

    model = models.create_model("tiny-vit-teacher", str(teacher_ckpt))
    metrics = evaluate(model, models.get_preprocess(model), models.get_tokenizer("tiny-vit-teacher"), synth_data["val"],
                       batch_size=7)
    recalls = (f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))
    assert set(metrics) == {"acc1", "acc5", *recalls}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_eval_refuses_files_that_are_not_checkpoints(tmp_path, synth_data, capsys):
    """engine.eval --pretrained with a text file, a shard, an empty or a cut-short file: one line, no traceback."""
    from engine.eval import main as eval_main

    text, empty, cut = tmp_path / "notes.txt", tmp_path / "empty.pt", tmp_path / "cut.pt"
    text.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    torch.save({"model": "tiny-vit-student", "state_dict": {"w": torch.zeros(64, 64)}}, cut)
    cut.write_bytes(cut.read_bytes()[:600])  # a copy interrupted mid-transfer
    shard = sorted(synth_data["root"].glob("train-*.tar"))[0]
    arrays, image = tmp_path / "weights.npz", tmp_path / "plot.png"
    np.savez(arrays, w=np.zeros(3))
    Image.new("RGB", (4, 4)).save(image)
    cases = {text: "it is a text file", empty: "the file is empty", cut: "a damaged or incomplete torch.save file",
             shard: "it is a tar archive, such as a webdataset shard", arrays: "it is a NumPy .npz archive",
             image: "it is a PNG image"}
    for path, reason in cases.items():
        message = command_error(eval_main, ["--pretrained", str(path), "--val-data", synth_data["val"]])
        expected = f"error: --pretrained {path}: not a checkpoint file ({reason}"
        assert message.startswith(expected) and "\n" not in message, message
    for path, reason in ((arrays, "it is a NumPy .npz archive (open_clip reads a .npz file as big_vision SigLIP "
                                  "weights, only into a timm image tower"), (image, "it is a PNG image")):
        message = command_error(eval_main, ["--pretrained", str(path), "--model", "tiny-vit-student"])
        expected = f"error: --pretrained {path}: cannot load it into tiny-vit-student: {reason}"
        assert message.startswith(expected) and "\n" not in message, message  # open_clip's loader: no traceback
    assert capsys.readouterr().out == ""  # no metrics printed


def _refusal(capsys, argv) -> str:
    """engine.eval's one-line refusal of ``argv``, after checking that it printed nothing on stdout."""
    from engine.eval import main as eval_main

    message = command_error(eval_main, argv)
    assert message is not None and capsys.readouterr().out == "", message  # no metrics printed
    return message


def test_metrics_refuse_non_finite_embeddings():
    """NaN compares false, so a NaN score ranked every pair first: recall 1.0 from a diverged model."""
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    images[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^the model's image embeddings hold NaN or inf"):
        retrieval_recall(images, texts)
    texts[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^the model's text embeddings hold NaN or inf"):
        retrieval_recall(F.normalize(torch.randn(4, 8), dim=-1), texts)
    with pytest.raises(ValueError, match=r"^the model's image embeddings hold NaN or inf"):
        zero_shot_accuracy(images, torch.eye(8), torch.tensor([0, 1, 2, 3]))


def test_zero_shot_accuracy_checks_labels_and_leaves_out_k_beyond_the_classes():
    classifier = torch.eye(3)  # 3 classes: acc5 would be selected from 3 (clip_benchmark has no acc5 then)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    assert zero_shot_accuracy(images, classifier, torch.tensor([0, 2])) == {"acc1": 0.5}
    with pytest.raises(ValueError, match=r"^labels must lie in 0\.\.2 \(one per class\), got 0\.\.3$"):
        zero_shot_accuracy(images, classifier, torch.tensor([0, 3]))  # label 3 could never be predicted: acc 0


def _engine_checkpoint(path, model: str, state_dict: dict):
    torch.save({"model": model, "state_dict": state_dict}, path)
    return path


def test_eval_refuses_checkpoints_with_non_finite_weights(tmp_path, synth_data, teacher_ckpt, capsys):
    weights = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    weights["positional_embedding"][3, 5] = float("nan")  # a run that diverged before its checkpoint
    diverged = _engine_checkpoint(tmp_path / "diverged.pt", "tiny-vit-teacher", weights)
    out = tmp_path / "metrics.json"
    message = _refusal(capsys, ["--pretrained", str(diverged), "--val-data", synth_data["val"], "--output", str(out)])
    assert message == (f"error: --pretrained {diverged}: weight positional_embedding holds NaN or inf: the "
                       f"checkpoint's weights are not finite (from a diverged run?)")
    assert not out.exists()


def test_eval_refuses_checkpoints_that_do_not_fit_the_model(tmp_path, synth_data, teacher_ckpt, capsys):
    import models

    teacher_weights = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    student_weights = models.create_model("tiny-vit-student").state_dict()
    wrong_model = _engine_checkpoint(tmp_path / "wrong.pt", "tiny-vit-teacher", student_weights)
    no_pos = _engine_checkpoint(tmp_path / "nopos.pt", "tiny-vit-teacher",
                                {k: v for k, v in teacher_weights.items() if k != "positional_embedding"})
    model_int = _engine_checkpoint(tmp_path / "modelint.pt", 5, teacher_weights)
    cases = {wrong_model: "cannot load it into tiny-vit-teacher: text pos_embed width changed!",
             no_pos: 'cannot load it into tiny-vit-teacher: Error(s) in loading state_dict for CLIP: Missing key(s) in '
                     'state_dict: "positional_embedding".',
             model_int: 'its "model" entry is 5, not a model name (pass --model)'}
    for path, reason in cases.items():
        message = _refusal(capsys, ["--pretrained", str(path), "--val-data", synth_data["val"]])
        assert message == f"error: --pretrained {path}: {reason}"


def test_eval_refuses_bad_classnames_files(tmp_path, synth_data, teacher_ckpt, capsys):
    import tarfile

    missing, truncated, no_keys, braces, few = (tmp_path / name for name in (
        "missing.json", "truncated.json", "nokeys.json", "braces.json", "few.json"))
    good = json.loads((synth_data["root"] / "classnames.json").read_text())
    truncated.write_text('{"classnames": ["red circle", "red sq')  # an interrupted copy
    no_keys.write_text(json.dumps({"names": good["classnames"]}))
    braces.write_text(json.dumps({**good, "templates": ["a photo of a {}."]}))  # OpenAI's template style
    few.write_text(json.dumps({**good, "classnames": good["classnames"][:5]}))
    with tarfile.open(synth_data["root"] / "val-00000.tar") as shard:
        labels = [json.load(shard.extractfile(m))["label"] for m in shard.getmembers()
                  if m.name.endswith(".json") and not m.name.endswith(".syn.json")]
    cases = {
        missing: f"cannot read it as JSON ([Errno 2] No such file or directory: '{missing}')",
        tmp_path: f"cannot read it as JSON ([Errno 21] Is a directory: '{tmp_path}')",
        truncated: "cannot read it as JSON (Unterminated string starting at: line 1 column 31 (char 30))",
        no_keys: 'expected a JSON object with "classnames" and "templates", each a non-empty list of strings',
        braces: "template 'a photo of a {}.' does not format (IndexError: Replacement index 0 out of range for "
                "positional args tuple); write the class name as {c}",
        few: f"5 class names, but {synth_data['val']!r} holds label {next(label for label in labels if label >= 5)} "
             f"(labels 0..N-1 need N class names, in label order)",
    }
    for path, reason in cases.items():
        message = _refusal(capsys, ["--pretrained", str(teacher_ckpt), "--model", "tiny-vit-teacher",
                                    "--val-data", synth_data["val"], "--classnames", str(path)])
        assert message == f"error: --classnames {path}: {reason}"


def test_eval_refuses_a_batch_size_below_one(synth_data, teacher_ckpt, capsys):
    for size in ("0", "-1"):
        message = _refusal(capsys, ["--pretrained", str(teacher_ckpt), "--val-data", synth_data["val"],
                                    "--batch-size", size])
        assert message == f"error: --batch-size: must be >= 1, got {size}"


def test_eval_checks_its_output_before_evaluating(tmp_path, synth_data, teacher_ckpt, capsys, monkeypatch):
    import subprocess

    import engine.eval

    a_file = tmp_path / "afile"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    cases = {tmp_path: f"is a folder; name a file, e.g. {tmp_path / 'metrics.json'}",
             a_file / "m.json": f"{a_file} is not a folder",
             tmp_path / "nodir" / "m.json": f"{tmp_path / 'nodir'} does not exist"}
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:  # root on ext4 etc.
        cases[locked / "m.json"] = f"cannot write in {locked} (Operation not permitted)"
    monkeypatch.setattr(engine.eval, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated before refusing"))
    try:
        for output, reason in cases.items():
            message = _refusal(capsys, ["--pretrained", str(teacher_ckpt), "--model", "tiny-vit-teacher",
                                        "--val-data", synth_data["val"], "--output", str(output)])
            assert message == f"error: --output {output}: {reason}"
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "locked"]  # no test file left behind
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)


def test_eval_writes_its_output_whole(tmp_path, synth_data, teacher_ckpt, capsys):
    from engine.eval import main as eval_main

    output = tmp_path / "metrics.json"
    output.write_text("{}")  # a previous evaluation's file is replaced
    eval_main(["--pretrained", str(teacher_ckpt), "--model", "tiny-vit-teacher", "--val-data", synth_data["val"],
               "--output", str(output), "--batch-size", "16"])
    assert json.loads(output.read_text()) == json.loads(capsys.readouterr().out)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_eval_refuses_a_cache_dir_that_is_a_file(tmp_path, teacher_ckpt, capsys):
    cache = tmp_path / "cache"
    cache.write_text("")  # --cache-dir given a file by mistake
    message = _refusal(capsys, ["--pretrained", str(teacher_ckpt), "--model", "tiny-vit-teacher",
                                "--cache-dir", str(cache)])
    assert message.startswith(f"error: --cache-dir {cache}: cannot prepare the embedded validation data there: ")
