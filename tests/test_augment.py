"""Replayable views (engine.data.augment) against torchvision's own primitives, written out here by hand."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from engine.core.errors import ConfigError, UserError
from engine.data import augment

NEAREST, BICUBIC = InterpolationMode.NEAREST, InterpolationMode.BICUBIC


def _image(height=40, width=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _by_hand(image, name, magnitude):
    """torchvision's functional call behind each RandAugment operation (its documented semantics)."""
    affine = dict(interpolation=NEAREST, fill=None)
    if name == "ShearX":
        return F.affine(image, 0.0, [0, 0], 1.0, [math.degrees(math.atan(magnitude)), 0.0], center=[0, 0], **affine)
    if name == "ShearY":
        return F.affine(image, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(magnitude))], center=[0, 0], **affine)
    if name == "TranslateX":
        return F.affine(image, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], **affine)
    if name == "TranslateY":
        return F.affine(image, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], **affine)
    if name == "Rotate":
        return F.rotate(image, magnitude, **affine)
    adjust = {"Brightness": F.adjust_brightness, "Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
              "Sharpness": F.adjust_sharpness}
    if name in adjust:
        return adjust[name](image, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(image, int(magnitude))
    if name == "Solarize":
        return F.solarize(image, magnitude)
    return {"AutoContrast": F.autocontrast, "Equalize": F.equalize, "Identity": lambda x: x}[name](image)


def test_replay_equals_torchvisions_primitives():
    image = _image()
    table = augment.magnitudes((32, 32))
    for op, name in enumerate(augment.OP_NAMES):
        bins, signed = table[name]
        magnitude = -float(bins[9]) if signed else (float(bins[9]) if bins.ndim else 0.0)
        view = augment.View((3, 5, 30, 36), op % 2 == 1, ((op, magnitude), (6, 0.3)))
        expected = F.resized_crop(image, 3, 5, 30, 36, [32, 32], interpolation=BICUBIC, antialias=True)
        expected = F.hflip(expected) if view.flip else expected
        expected = _by_hand(_by_hand(expected, name, magnitude), "Brightness", 0.3)
        got = augment.replay(image, view, (32, 32), (32, 32))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name


def test_another_resolution_replays_the_same_region_and_scales_translations():
    image, box = _image(), (2, 4, 30, 40)
    view = augment.View(box, False, ((3, 6.0), (4, -4.0)))  # TranslateX 6 px, TranslateY -4 px at 32 x 32
    got = augment.replay(image, view, (64, 64), (32, 32))
    expected = F.resized_crop(image, *box, [64, 64], interpolation=BICUBIC, antialias=True)
    expected = _by_hand(_by_hand(expected, "TranslateX", 12.0), "TranslateY", -8.0)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_parameters_round_trip_through_rows_and_mobileclip_param_aug():
    cfg = augment.AugmentCfg(scale=(0.3, 1.0), hflip=0.5, num_ops=3)
    rng = np.random.default_rng(1)
    views = [augment.sample_view(cfg, (40, 48), (32, 32), rng) for _ in range(50)]
    rows = np.stack([v.row() for v in views])
    assert rows.dtype == np.float32 and rows.shape == (50, cfg.width) == (50, 11)
    assert [augment.View.from_row(r) for r in rows] == views
    assert [augment.View.from_param_aug(v.to_param_aug(cfg), cfg) for v in views] == views
    assert {v.flip for v in views} == {False, True} and augment.rows_problem(rows[:, None], np.array([[40, 48]] * 50)) \
        is None
    # DataCompDR's entries: no flip in its config, so [[i, j, h, w], [[op, magnitude], ...]]
    plain = augment.AugmentCfg(num_ops=2)
    entry = views[0].to_param_aug(plain)
    assert entry == [list(views[0].box), [[op, m] for op, m in views[0].ops[:3]]] and len(entry) == 2
    for view in views:  # every crop inside the image, with torchvision's scale bounds (rounding aside)
        i, j, h, w = view.box
        assert 0 <= i and 0 <= j and i + h <= 40 and j + w <= 48 and 0.25 <= h * w / (40 * 48) <= 1.0


def test_sampling_is_seeded_and_the_evaluation_view_is_the_evaluation_region():
    cfg = augment.AugmentCfg()
    draw = [augment.sample_view(cfg, (32, 32), (32, 32), np.random.default_rng([5, 7])) for _ in range(2)]
    assert draw[0] == draw[1]
    assert augment.evaluation_view((30, 50), "shortest", 2) == augment.View((0, 10, 30, 30), False, ((0, 0.0),) * 2)
    squash = augment.evaluation_view((32, 32), "squash", 1)
    image = _image(32, 32)
    assert np.array_equal(np.asarray(augment.replay(image, squash, (32, 32), (32, 32))),
                          np.asarray(F.resize(image, [32, 32], interpolation=BICUBIC)))


def test_crop_outside_the_image_and_unknown_operation_refused():
    image = _image(32, 32)
    with pytest.raises(UserError) as exc:
        augment.replay(image, augment.View((4, 0, 30, 32), False, ()), (32, 32), (32, 32))
    assert str(exc.value) == "view crop [i, j, h, w] = [4, 0, 30, 32] lies outside its 32x32 image"
    with pytest.raises(UserError, match=r"^view operation \(14, 0.5\) is not a RandAugment operation index 0-13"):
        augment.replay(image, augment.View((0, 0, 32, 32), False, ((14, 0.5),)), (32, 32), (32, 32))
    rows = np.stack([augment.View((0, 0, 32, 32), False, ((1, 0.1),)).row()] * 3)[None]
    rows[0, 2, 0] = 8
    assert augment.rows_problem(rows, np.array([[32, 32]])) == (
        0, 2, "crop [i, j, h, w] = [8, 0, 32, 32] lies outside its 32x32 image")


def test_unknown_or_bad_config_refused():
    cases = {("shear=0.3",): "unknown augmentation key 'shear'; the keys are scale, ratio, hflip, num_ops, magnitude",
             ("color_jitter=0.4",): "open_clip's 'color_jitter' cannot be stored as a replayable view",
             ("scale=0.5",): "scale=0.5 must be two numbers, e.g. scale=0.5,1.0",
             ("scale=0.5,2",): "scale=(0.5, 2.0) must be two numbers with 0 < min <= max <= 1",
             ("hflip=2",): "hflip=2 must be a probability in [0, 1]",
             ("magnitude=31",): "magnitude=31 must be an integer in [0, 30]",
             ("num_ops",): "'num_ops' is not key=value"}
    for pairs, message in cases.items():
        with pytest.raises(ConfigError) as exc:
            augment.AugmentCfg.from_dict(augment.parse_pairs(pairs))
        assert message in str(exc.value) and str(exc.value).startswith("--aug-cfg: "), str(exc.value)
    cfg = augment.AugmentCfg.from_dict(augment.parse_pairs(["scale=(0.5,1)", "hflip=0.5", "num_ops=0"]))
    assert cfg == augment.AugmentCfg(scale=(0.5, 1.0), hflip=0.5, num_ops=0) and cfg.width == 5
    assert augment.AugmentCfg.from_dict(cfg.to_dict()) == cfg
    assert torch.is_tensor(augment.magnitudes((32, 32))["Rotate"][0])
