"""engine.export: an exported student loads in plain open_clip, in a process that cannot import this project.

The loading side runs in a separate interpreter started in isolated mode (no PYTHONPATH, no current folder on
sys.path) from an unrelated folder, with the project's packages blocked, so only open_clip (and, for the word
tokenizer, transformers) can be at work. Its weights, token ids, image tensors and embeddings are compared with the
checkpoint and with this project's own student, tokenizer and transform.
"""
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import models
from engine import export as export_cmd
from engine import train as train_lib
from engine.data import synthetic
from engine.evaluation import export as export_lib
from kernels import ClipRDLoss
from models.tokenizer import EOT, SOT
from tests.helpers import command_error

PROJECT_PACKAGES = ("kernels", "engine", "models", "bench", "tests")

# The loading side: plain open_clip, for each exported folder. Blocked project packages make any import of them fail.
LOAD_IN_PLAIN_OPEN_CLIP = """
import json, sys
for name in {packages!r}:
    sys.modules[name] = None
import open_clip, torch
from PIL import Image
job = json.load(open(sys.argv[1]))
results = {{}}
for folder in job["folders"]:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    ids = tokenizer(job["texts"])
    pixels = torch.stack([preprocess(Image.open(p)) for p in job["images"]])
    with torch.no_grad():
        image_features, text_features = model.encode_image(pixels), model.encode_text(ids)
    results[folder] = {{"state_dict": model.state_dict(), "ids": ids, "pixels": pixels, "tokenizer":
                       type(tokenizer).__name__, "image_features": image_features, "text_features": text_features}}
results["project_modules"] = [n for n in {packages!r} if sys.modules.get(n) is not None]
results["sys_path"] = sys.path
torch.save(results, job["out"])
"""


def load_in_plain_open_clip(folders, texts, image_paths, work_dir) -> dict:
    """{folder: what open_clip loads and computes} from an isolated interpreter started in an unrelated folder."""
    job, out, elsewhere = work_dir / "job.json", work_dir / "loaded.pt", work_dir / "elsewhere"
    elsewhere.mkdir()
    job.write_text(json.dumps({"folders": list(map(str, folders)), "texts": texts,
                               "images": list(map(str, image_paths)), "out": str(out)}))
    script = LOAD_IN_PLAIN_OPEN_CLIP.format(packages=PROJECT_PACKAGES)
    done = subprocess.run([sys.executable, "-I", "-c", script, str(job)], cwd=elsewhere, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(out, weights_only=False)
    assert loaded.pop("project_modules") == []
    assert not any(p in ("", ".", str(elsewhere)) for p in loaded.pop("sys_path"))
    return {Path(folder): result for folder, result in loaded.items()}


def project_side(name, state_dict, texts, image_paths) -> dict:
    """What this project computes for the same inputs: its student, tokenizer and evaluation transform."""
    student = models.create_model(name)
    student.load_state_dict(state_dict)
    student.eval()
    preprocess = models.get_preprocess(student)
    ids = models.get_tokenizer(name)(texts)
    pixels = torch.stack([preprocess(Image.open(p)) for p in image_paths])
    with torch.no_grad():
        return {"ids": ids, "pixels": pixels, "image_features": student.encode_image(pixels),
                "text_features": student.encode_text(ids)}


def procedural_images(tmp_path, count=6):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        image, _ = synthetic.make_sample(rng)
        paths.append(tmp_path / f"image{i}.png")
        image.save(paths[-1])
    return paths


def procedural_texts(count=300):
    """Captions as engine.synthetic draws them, every zero-shot prompt, and what a user might type."""
    rng = np.random.default_rng(11)
    captions = [synthetic.make_sample(rng)[1]["caption"] for _ in range(count)]
    prompts = [t.format(c=c) for t in synthetic.PROMPT_TEMPLATES for c in synthetic.CLASSNAMES]
    edge_cases = [
        "", "   ", "A Photo Of A RED Circle.", "a zebra and a unicorn", "red,green;blue:yellow!?", "don't stop",
        "a\tred\ncircle", "red-circle red_circle red2circle 42", "café naïve Ärger", "Kelvin K and İstanbul",
        "<start_of_text> <end_of_text> <pad> <unk>", "  a   small\t\tblue  square  ",
        " ".join(["large"] * 40),  # overlong: truncated, <eot> kept
        "a photo of a small red circle in the top left corner on a white background with a big ring",
    ]
    return captions + prompts + edge_cases


def save_checkpoint(path, model, state_dict, **extra):
    torch.save({"config": {"model": model, "batch_size": 16}, "model": model, "state_dict": state_dict,
                "step": 3, **extra}, path)
    return path


@pytest.fixture(scope="module")
def student_weights():
    torch.manual_seed(5)
    return models.create_model("tiny-vit-student").state_dict()


@pytest.fixture()
def student_ckpt(tmp_path, student_weights):
    loss = ClipRDLoss("clip-kd", student_dim=64, teacher_dim=128)
    return save_checkpoint(tmp_path / "epoch_latest.pt", "tiny-vit-student", student_weights,
                           loss_state_dict=loss.state_dict())


def transformers_needed():
    if importlib.util.find_spec("transformers") is None:
        pytest.fail("open_clip loads the word tokenizer through transformers: pip install -e '.[test]'")


BPE_MODEL = "export-test-bpe-vit"  # a small model of open_clip's standard kind: BPE tokenizer, 49408 tokens
BPE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory, synth_data, teacher_ckpt, store_dir):
    """A tiny student trained by engine.train and a BPE-tokenizer student, exported and loaded in plain open_clip.

    {model name: {"checkpoint", "printed", "files", "texts", "loaded", "ours"}}; one isolated interpreter loads both.
    """
    transformers_needed()
    work = tmp_path_factory.mktemp("round_trips")
    logs = work / "logs"
    train_lib.main(["--train-data", synth_data["train"], "--val-data", synth_data["val"],
                    "--teacher-pretrained", str(teacher_ckpt), "--teacher-store", str(store_dir),
                    "--preset", "clip-kd", "--batch-size", "32", "--epochs", "1", "--logs", str(logs), "--name", "run",
                    "--no-eval", "--no-progress", "--cache-dir", str(work / "cache")])
    checkpoints = {"tiny-vit-student": logs / "run" / "checkpoints" / "epoch_latest.pt"}

    config_dir = work / "configs"
    config_dir.mkdir()
    (config_dir / f"{BPE_MODEL}.json").write_text(json.dumps(BPE_CONFIG))
    open_clip.add_model_config(config_dir)  # as models/model_configs are registered
    try:
        torch.manual_seed(9)
        checkpoints[BPE_MODEL] = save_checkpoint(work / "epoch_1.pt", BPE_MODEL,
                                                 models.create_model(BPE_MODEL).state_dict())
        runs = {}
        for name, path in checkpoints.items():
            printed = io.StringIO()
            with redirect_stdout(printed):
                export_cmd.main([str(path), "--output", str(work / name)])
            runs[name] = {"checkpoint": torch.load(path, weights_only=True), "printed": printed.getvalue(),
                          "files": sorted(p.name for p in (work / name).iterdir())}
        texts, images = procedural_texts(), procedural_images(work)
        loaded = load_in_plain_open_clip([work / name for name in runs], texts, images, work)
        for name, run in runs.items():
            run["texts"], run["loaded"] = texts, loaded[work / name]
            run["ours"] = project_side(name, run["checkpoint"]["state_dict"], texts, images)
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(BPE_MODEL, None)
    return runs


@pytest.mark.parametrize("name, tokenizer", [("tiny-vit-student", "HFTokenizer"), (BPE_MODEL, "SimpleTokenizer")])
def test_exported_student_loads_in_plain_open_clip_with_identical_weights(round_trips, name, tokenizer):
    run = round_trips[name]
    weights, loaded = run["checkpoint"]["state_dict"], run["loaded"]
    assert loaded["tokenizer"] == tokenizer
    assert loaded["state_dict"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(loaded["state_dict"][key], value), key


@pytest.mark.parametrize("name", ["tiny-vit-student", BPE_MODEL])
def test_exported_student_tokenizes_transforms_and_embeds_as_the_project(round_trips, name):
    run = round_trips[name]
    ours, loaded = run["ours"], run["loaded"]
    mismatched = [text for text, a, b in zip(run["texts"], ours["ids"], loaded["ids"]) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:5]
    assert torch.equal(ours["pixels"], loaded["pixels"])
    torch.testing.assert_close(loaded["image_features"], ours["image_features"], rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded["text_features"], ours["text_features"], rtol=0, atol=1e-6)


def test_export_lists_its_files_and_what_it_left_out(round_trips):
    tiny, bpe = round_trips["tiny-vit-student"], round_trips[BPE_MODEL]
    assert tiny["files"] == ["open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json",
                             "tokenizer_config.json"]
    assert bpe["files"] == ["open_clip_config.json", "open_clip_model.safetensors"]
    for name in tiny["files"]:
        assert name in tiny["printed"]
    # a 64-wide student under a 128-wide teacher: the loss module's projections exist and are named as left out
    assert "image_projection.weight" in tiny["checkpoint"]["loss_state_dict"]
    assert "left out" in tiny["printed"] and "image_projection.weight" in tiny["printed"]


def test_word_tokenizer_edge_cases_by_hand(tmp_path, student_ckpt):
    """Hand-written ids: the Hugging Face form and WordTokenizer are both checked against these."""
    transformers_needed()
    from transformers import AutoTokenizer

    export_lib.export(student_ckpt, tmp_path / "student")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "student"))
    word = models.get_tokenizer("tiny-vit-student")
    vocab = word.vocab
    cases = {
        "A RED, circle!": [SOT, vocab["a"], vocab["red"], vocab["circle"], EOT],
        "zebra red2circle": [SOT, 1, vocab["red"], vocab["circle"], EOT],  # unknown word -> <unk> (id 1)
        "": [SOT, EOT],
        "<end_of_text> red": [SOT, 1, vocab["of"], 1, vocab["red"], EOT],  # spelled specials are plain words
        " ".join(["big"] * 30): [SOT] + [vocab["big"]] * 14 + [EOT],  # context 16: 14 words, <eot> kept
    }
    for text, ids in cases.items():
        expected = ids + [0] * (16 - len(ids))
        got = hf([text], max_length=16, padding="max_length", truncation=True, return_tensors="pt").input_ids
        assert got[0].tolist() == expected, text
        assert word([text])[0].tolist() == expected, text


def test_weights_file_holds_the_checkpoint_tensors_in_their_dtype(tmp_path, student_weights):
    bf16 = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
            for key, value in student_weights.items()}  # what --precision bf16 trains and saves
    ckpt = save_checkpoint(tmp_path / "bf16.pt", "tiny-vit-student", bf16)
    export_lib.export(ckpt, tmp_path / "student")
    written = load_file(tmp_path / "student" / export_lib.WEIGHTS_FILE)
    assert written.keys() == bf16.keys()
    for key, value in bf16.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


def test_exported_config_carries_the_tiny_models_preprocessing(tmp_path, student_ckpt):
    export_lib.export(student_ckpt, tmp_path / "student")
    config = json.loads((tmp_path / "student" / export_lib.CONFIG_FILE).read_text())
    assert config["preprocess_cfg"]["size"] in (32, [32, 32])
    assert config["preprocess_cfg"]["mean"] == [0.5] * 3 and config["preprocess_cfg"]["std"] == [0.5] * 3
    assert config["preprocess_cfg"]["resize_mode"] == "squash"
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 64
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"]  # open_clip then reads the folder's tokenizer


def _refused(argv, capsys) -> str:
    message = command_error(export_cmd.main, argv)
    assert message is not None, "not refused"
    assert capsys.readouterr().out == ""  # nothing reported as written
    return message


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys, synth_data, student_weights):
    out = tmp_path / "out"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    shard = sorted(synth_data["root"].glob("train-*.tar"))[0]
    assert tarfile.is_tarfile(shard)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, "tiny-vit-student", student_weights)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # a copy cut short
    state_dict_only = tmp_path / "open_clip_weights.pt"
    torch.save(student_weights, state_dict_only)
    wrong_model = save_checkpoint(tmp_path / "wrong_model.pt", "tiny-vit-teacher", student_weights)
    unknown_model = save_checkpoint(tmp_path / "unknown.pt", "tiny-vit-studnet", student_weights)
    nan = save_checkpoint(tmp_path / "nan.pt", "tiny-vit-student",
                          {**student_weights, "text_projection": torch.full_like(student_weights["text_projection"],
                                                                                 float("nan"))})
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path: "not a file",
        text: "not a checkpoint file (it is a text file)",
        shard: "not a checkpoint file (it is a tar archive",
        truncated: "not a checkpoint file",
        models.MODEL_CONFIG_DIR.parent / "pretrained" / "tiny-vit-teacher.pt": "no config",  # the shipped teacher
        state_dict_only: "no config, model, state_dict",
        wrong_model: "does not fit model 'tiny-vit-teacher'",
        unknown_model: "unknown model 'tiny-vit-studnet'",
        nan: "text_projection holds NaN",
    }
    for path, expected in cases.items():
        message = _refused([path, "--output", out], capsys)
        assert expected in message and str(path) in message, message
        assert not out.exists()  # refused before anything was written


def test_existing_output_is_refused_unless_forced(tmp_path, capsys, student_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert "not empty" in _refused([student_ckpt, "--output", out], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_cmd.main([str(student_ckpt), "--output", str(out), "--force"])
    assert "tokenizer.json" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"notes.txt", export_lib.WEIGHTS_FILE, export_lib.CONFIG_FILE, "tokenizer.json"} <= names
    assert not any(name.startswith(".") for name in names)  # no temporary file left
    file_as_output = tmp_path / "file"
    file_as_output.write_text("")
    assert "is not a folder" in _refused([student_ckpt, "--output", file_as_output], capsys)


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        export_cmd.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m engine.export")
    assert "(default: False)" in text  # defaults shown
    for action in export_cmd.parser()._actions:
        assert action.help, action.dest


def test_bad_output_location_is_refused_before_building(tmp_path, capsys, student_ckpt, monkeypatch):
    def no_build(*args):
        raise AssertionError("the student was built")

    monkeypatch.setattr(export_lib, "_student", no_build)
    afile = tmp_path / "afile"
    afile.write_text("")
    message = _refused([student_ckpt, "--output", afile / "sub"], capsys)
    assert f"--output {afile / 'sub'}: {afile} is not a folder" in message


@pytest.mark.parametrize("failing", ["weights", "config", "swap"])
def test_failed_forced_export_leaves_the_old_folder_intact(tmp_path, capsys, student_ckpt, monkeypatch, failing):
    from safetensors import SafetensorError

    out = tmp_path / "out"
    export_cmd.main([str(student_ckpt), "--output", str(out)])
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def fail(*args, **kwargs):
        raise {"weights": SafetensorError("Error while serializing: IoError(Os { code: 28 })"),
               "config": OSError(28, "No space left on device"), "swap": OSError(1, "Operation not permitted")}[failing]

    monkeypatch.setattr(*{"weights": (export_lib, "save_file", fail), "config": (export_lib, "_write_json", fail),
                          "swap": (export_lib.os, "rename", fail)}[failing])
    message = _refused([student_ckpt, "--output", out, "--force"], capsys)
    assert f"--output {out}: could not " in message
    assert {"weights": "open_clip_model.safetensors: Error while serializing", "config": "No space left",
            "swap": "put the export in place"}[failing] in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_latest.pt", "out"]  # no staging folder left
