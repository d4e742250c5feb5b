import subprocess
import sys

import pytest
import torch

import models
from models.tokenizer import EOT, SOT, WordTokenizer


def test_extra_configs_registered():
    names = models.list_models()
    for name in ("ViT-T-16", "tiny-vit-student", "tiny-vit-teacher", "ViT-B-16"):
        assert name in names
    vit_t = models.model_config("ViT-T-16")
    assert vit_t["vision_cfg"]["width"] == 192 and vit_t["vision_cfg"]["patch_size"] == 16


def test_teacher_has_several_times_the_student_compute():
    # per-token transformer cost ~ layers * width^2 (tower widths and token counts are equal otherwise)
    def cost(cfg):
        return cfg["vision_cfg"]["layers"] * cfg["vision_cfg"]["width"] ** 2

    assert cost(models.model_config("tiny-vit-teacher")) >= 4 * cost(models.model_config("tiny-vit-student"))


def test_create_student_forward_shapes():
    model = models.create_model("tiny-vit-student")
    tokens = models.get_tokenizer("tiny-vit-student")(["a red circle", "a blue ring in the center"])
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert out["image_features"].shape == (2, 64) and out["text_features"].shape == (2, 64)
    assert out["logit_scale"].ndim == 0


def test_unknown_model_and_bad_pretrained_raise():
    with pytest.raises(ValueError, match="unknown model 'ViT-T-17'"):
        models.create_model("ViT-T-17")
    with pytest.raises(ValueError, match="neither an existing checkpoint file nor an open_clip pretrained tag"):
        models.create_model("tiny-vit-teacher", pretrained="/nonexistent/teacher.pt")
    with pytest.raises(ValueError, match="need pretrained weights"):
        models.create_teacher("tiny-vit-teacher", None)


def test_teacher_from_checkpoint_file_is_frozen_and_loaded(teacher_ckpt):
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    saved = torch.load(teacher_ckpt)["state_dict"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_word_tokenizer_layout():
    tok = WordTokenizer(context_length=6)
    ids = tok(["a red circle in the top left corner"])[0]
    assert ids[0] == SOT and ids[-1] == EOT  # truncated to 4 words, <eot> kept
    assert int(ids.argmax()) == 5  # open_clip pools at argmax: the <eot> position
    assert tok(["zzz"])[0, 1] == 1  # unknown word -> <unk>


def test_models_import_without_training_extras():
    # webdataset / matplotlib / tensorboard are training extras; tqdm is an open_clip dependency, so not blocked
    code = ("import sys\n"
            "for name in ('webdataset', 'matplotlib', 'torch.utils.tensorboard', 'engine'):\n"
            "    sys.modules[name] = None  # any import of these now fails\n"
            "import models\n"
            "models.create_model('tiny-vit-student')\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
