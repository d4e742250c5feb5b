import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from engine import data as data_lib
from engine import store as store_lib
from engine.precompute import build_store


def test_store_matches_teacher_embeddings(synth_data, teacher_ckpt, store_dir):
    urls = data_lib.expand_urls(synth_data["train"])
    store = store_lib.TeacherStore(store_dir, urls, store_lib.teacher_fingerprint("tiny-vit-teacher", str(teacher_ckpt)))
    manifest = store.manifest
    assert manifest["complete"] and manifest["count"] == 96 and manifest["embed_dim"] == 128
    assert manifest["teacher"]["model"] == "tiny-vit-teacher" and manifest["dtype"] == "float16"
    assert "augmentation" in manifest and len(manifest["parts"]) == 3
    # independent recomputation for the first samples of shard 1
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    codec = data_lib.Codec({"image": models.get_preprocess(teacher)}, {"text": models.get_tokenizer("tiny-vit-teacher")})
    samples = [codec(raw) for raw in data_lib.read_shard(urls[1])][:5]
    batch = data_lib.collate(samples)
    with torch.no_grad():
        out = teacher(batch["image"], batch["text"])
    image, text = store.lookup(batch["key"])
    assert image.dtype == torch.float16 and image.shape == (5, 128)
    torch.testing.assert_close(image.float(), F.normalize(out["image_features"], dim=-1), atol=2e-3, rtol=0)
    torch.testing.assert_close(text.float(), F.normalize(out["text_features"], dim=-1), atol=2e-3, rtol=0)
    assert abs(store.logit_scale - teacher.logit_scale.exp().item()) < 1e-5


def test_store_resumes_only_missing_parts(tmp_path, synth_data, teacher_ckpt, store_dir):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # simulate a build killed after the first two shards: the third part and completion are missing
    del manifest["parts"]["train-00002.tar"]
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    os.remove(copy / "parts" / "train-00002.npz")
    kept = {p: os.stat(copy / "parts" / p).st_mtime_ns for p in ("train-00000.npz", "train-00001.npz")}
    urls = data_lib.expand_urls(synth_data["train"])
    with pytest.raises(store_lib.StoreError, match=r"lacks the keys of 1 shard.*train-00002.tar.*'1000020000'"):
        store_lib.TeacherStore(copy, urls)
    build_store(synth_data["train"], "tiny-vit-teacher", str(teacher_ckpt), copy, progress=False)
    assert {p: os.stat(copy / "parts" / p).st_mtime_ns for p in kept} == kept
    for part in ("train-00000.npz", "train-00001.npz", "train-00002.npz"):
        a, b = np.load(copy / "parts" / part), np.load(store_dir / "parts" / part)
        assert (a["keys"] == b["keys"]).all() and np.array_equal(a["image"], b["image"])
    assert json.loads((copy / "manifest.json").read_text())["complete"]


def test_store_from_another_teacher_refused(tmp_path, synth_data, store_dir):
    urls = data_lib.expand_urls(synth_data["train"])
    other = tmp_path / "other.pt"
    torch.save({"state_dict": models.create_model("tiny-vit-teacher").state_dict()}, other)
    with pytest.raises(store_lib.StoreError, match="store was built by teacher tiny-vit-teacher:sha256="):
        store_lib.TeacherStore(store_dir, urls, store_lib.teacher_fingerprint("tiny-vit-teacher", str(other)))
    with pytest.raises(store_lib.StoreError, match="store was built by teacher"):
        build_store(synth_data["train"], "tiny-vit-teacher", str(other), store_dir, progress=False)


def test_store_missing_keys_named(tmp_path, synth_data, store_dir):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    part = copy / "parts" / "train-00001.npz"
    with np.load(part) as d:
        keys, image, text = d["keys"][1:], d["image"][1:], d["text"][1:]  # drop key 1000010000
    with open(part, "wb") as handle:
        np.savez(handle, keys=keys, image=image, text=text)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parts"]["train-00001.tar"]["sha256"] = store_lib.sha256_file(part)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    urls = data_lib.expand_urls(synth_data["train"])
    with pytest.raises(store_lib.StoreError, match=r"lacks 1 key\(s\) of shard .*train-00001.tar: \['1000010000'\]"):
        store_lib.TeacherStore(copy, urls)
    store = store_lib.TeacherStore(copy, urls, check_keys=False)
    with pytest.raises(store_lib.StoreError, match=r"no embeddings for key\(s\) \['1000010000'\]"):
        store.lookup(["1000000000", "1000010000"])


def test_store_corrupt_part_and_missing_store(tmp_path, synth_data, store_dir):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    with open(copy / "parts" / "train-00000.npz", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\xff" * 8)
    urls = data_lib.expand_urls(synth_data["train"])
    with pytest.raises(store_lib.StoreError, match="checksum does not match"):
        store_lib.TeacherStore(copy, urls)
    with pytest.raises(store_lib.StoreError, match="no teacher store at"):
        store_lib.TeacherStore(tmp_path / "nowhere", urls)
