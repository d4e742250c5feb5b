import pytest
import torch
import torch.nn.functional as F

from engine.eval import retrieval_recall, zero_shot_accuracy


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
    from engine.eval import evaluate

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
    cases = {text: "it is a text file", empty: "the file is empty", cut: "a damaged or incomplete torch.save file",
             shard: "it is a tar archive, such as a webdataset shard"}
    for path, reason in cases.items():
        with pytest.raises(SystemExit) as stop:
            eval_main(["--pretrained", str(path), "--val-data", synth_data["val"]])
        message = str(stop.value.code)
        expected = f"error: --pretrained {path}: not a checkpoint file ({reason}"
        assert message.startswith(expected) and "\n" not in message, message
    assert capsys.readouterr().out == ""  # no metrics printed
