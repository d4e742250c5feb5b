import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from engine import store as store_cmd
from engine.data import shards as data_lib
from engine.data import synthetic
from engine.teachers import store as store_lib
from engine.teachers.precompute import build_store
from tests.helpers import command_error


def _part(store, shard):
    return store / "parts" / store_lib.part_name(str(shard))


def test_store_matches_teacher_embeddings(synth_data, teacher_ckpt, store_dir):
    urls = data_lib.expand_urls(synth_data["train"])
    fingerprint = store_lib.teacher_fingerprint("tiny-vit-teacher", str(teacher_ckpt))
    store = store_lib.TeacherStore(store_dir, urls, [fingerprint])
    manifest = store.manifest
    assert manifest["complete"] and manifest["count"] == 96 and manifest["embed_dim"] == 128
    assert [member["model"] for member in manifest["teachers"]] == ["tiny-vit-teacher"]
    assert manifest["teachers"][0]["embed_dim"] == 128 and manifest["dtype"] == "float16"
    assert "augmentation" in manifest and len(manifest["parts"]) == 3
    # independent recomputation for the first samples of shard 1
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    raws = list(data_lib.read_shard(urls[1]))[:5]
    preprocess, tokenizer = models.get_preprocess(teacher), models.get_tokenizer("tiny-vit-teacher")
    images = torch.stack([preprocess(Image.open(io.BytesIO(raw["png"])).convert("RGB")) for raw in raws])
    with torch.no_grad():
        out = teacher(images, tokenizer([raw["txt"].decode() for raw in raws]))
    image, text = store.lookup([raw["__key__"] for raw in raws], [data_lib.sample_digest(raw) for raw in raws],
                               [raw["__url__"] for raw in raws])
    assert image.dtype == torch.float16 and image.shape == (5, 128)
    torch.testing.assert_close(image.float(), F.normalize(out["image_features"], dim=-1), atol=2e-3, rtol=0)
    torch.testing.assert_close(text.float(), F.normalize(out["text_features"], dim=-1), atol=2e-3, rtol=0)
    assert abs(store.logit_scales[0] - teacher.logit_scale.exp().item()) < 1e-5


def test_store_resumes_only_missing_parts(tmp_path, synth_data, teacher_ckpt, store_dir):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    manifest = store_lib.read_manifest(copy)
    urls = data_lib.expand_urls(synth_data["train"])
    names = [store_lib.part_name(url) for url in urls]
    # simulate a build killed after the first two shards: the third part and completion are missing
    del manifest["parts"][names[2]]
    manifest["complete"] = False
    manifest["count"] = 64
    store_lib.write_manifest(copy, manifest)
    shutil.rmtree(copy / "parts" / names[2])
    kept = {p: os.stat(copy / "parts" / p / "image.npy").st_mtime_ns for p in names[:2]}
    with pytest.raises(store_lib.StoreError, match=r"no part for 1 training shard.*train-00002.tar.*'1000020000'"):
        store_lib.TeacherStore(copy, urls)
    build_store(synth_data["train"], [("tiny-vit-teacher", str(teacher_ckpt))], copy, progress=False)
    assert {p: os.stat(copy / "parts" / p / "image.npy").st_mtime_ns for p in kept} == kept
    for part in names:
        for array in store_lib.PART_ARRAYS:
            assert np.array_equal(np.load(copy / "parts" / part / f"{array}.npy"),
                                  np.load(store_dir / "parts" / part / f"{array}.npy")), (part, array)
    assert store_lib.read_manifest(copy)["complete"]


def test_store_from_another_teacher_refused(tmp_path, synth_data, store_dir):
    urls = data_lib.expand_urls(synth_data["train"])
    other = tmp_path / "other.pt"
    torch.save({"state_dict": models.create_model("tiny-vit-teacher").state_dict()}, other)
    with pytest.raises(store_lib.StoreError, match="store was built by other teachers than this run's: its teacher 1 "
                                                   "is tiny-vit-teacher:sha256="):
        store_lib.TeacherStore(store_dir, urls, [store_lib.teacher_fingerprint("tiny-vit-teacher", str(other))])
    with pytest.raises(store_lib.StoreError, match="store was built by other teachers: its teacher 1 is"):
        build_store(synth_data["train"], [("tiny-vit-teacher", str(other))], store_dir, progress=False)


def test_corrupt_part_and_missing_store(tmp_path, synth_data, store_dir):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    with open(_part(copy, synth_data["root"] / "train-00000.tar") / "image.npy", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x3c" * 8)  # finite fp16 values: only the checksum can tell
    urls = data_lib.expand_urls(synth_data["train"])
    with pytest.raises(store_lib.StoreError, match="train-00000-[0-9a-f]{8}/image.npy: checksum does not match"):
        store_lib.TeacherStore(copy, urls)
    with pytest.raises(store_lib.StoreError, match="no teacher store at"):
        store_lib.TeacherStore(tmp_path / "nowhere", urls)


# ------------------------------------------------------------------------------------------- tampering, end to end


def _train(tmp_path, train, store, *extra):
    """engine.train's command line on a store; returns the error line (None if the run succeeded)."""
    from engine.train import main

    argv = ["--train-data", train, "--teacher-store", str(store), "--batch-size", "16", "--epochs", "1",
            "--logs", str(tmp_path / "logs"), "--name", "tamper", "--no-eval", "--no-progress", "--fused",
            "--cache-dir", str(tmp_path / "cache"), *extra]
    return command_error(main, argv)


def _rewrite_tar(src, dst, change):
    """Copy a shard member by member, ``change(name, payload) -> payload`` (same length keeps the tar's size)."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w") as tar_out:
        for member in tar_in.getmembers():
            payload = change(member.name, tar_in.extractfile(member).read())
            member.size = len(payload)
            tar_out.addfile(member, io.BytesIO(payload))


def _copy_data(tmp_path, synth_data) -> Path:
    data = tmp_path / "data"
    shutil.copytree(synth_data["root"], data)
    return data


def _train_pattern(data: Path) -> str:
    return str(data / "train-{00000..00002}.tar")


def test_untouched_store_trains(tmp_path, synth_data, store_dir):
    assert _train(tmp_path, synth_data["train"], store_dir) is None


def test_other_samples_under_the_same_names_refused(tmp_path, synth_data, store_dir):
    """The same shard names, keys and counts, other content (another generator seed)."""
    other = synthetic.build(tmp_path / "other", synthetic.SyntheticSpec(train_samples=96, val_samples=32,
                                                                       shard_size=32, seed=1), progress=False)
    assert data_lib.shard_keys(data_lib.expand_urls(other["train"])[0]) == \
        data_lib.shard_keys(data_lib.expand_urls(synth_data["train"])[0])
    message = _train(tmp_path, other["train"], store_dir)
    assert message and str(store_dir) in message and "\n" not in message
    assert "changed since the store was built" in message or "content digest differs" in message


def test_caption_edited_in_place_refused(tmp_path, synth_data, store_dir):
    data = _copy_data(tmp_path, synth_data)
    shard = data / "train-00001.tar"
    edited_key = data_lib.shard_keys(str(shard))[5]
    original_size = os.path.getsize(shard)

    def swap_caption(name, payload):
        return payload[::-1] if name == f"{edited_key}.txt" else payload  # same length, other caption

    _rewrite_tar(synth_data["root"] / "train-00001.tar", shard, swap_caption)
    assert os.path.getsize(shard) == original_size
    message = _train(tmp_path, _train_pattern(data), store_dir)
    assert message is not None and "\n" not in message
    assert f"sample '{edited_key}' of shard {shard}" in message and "content digest differs" in message
    assert str(store_dir) in message
    # the verify command finds the same sample without training
    problems = store_lib.verify(str(store_dir), _train_pattern(data))
    assert len(problems) == 1 and "train-00001.tar: 1 sample(s) differ" in problems[0] and edited_key in problems[0]


def test_repeated_key_refused_by_precompute_and_by_the_index(tmp_path, synth_data, teacher_ckpt, store_dir):
    data = _copy_data(tmp_path, synth_data)
    keys0 = data_lib.shard_keys(str(synth_data["root"] / "train-00000.tar"))
    keys1 = data_lib.shard_keys(str(synth_data["root"] / "train-00001.tar"))
    rename = {keys1[3]: keys0[7]}  # one sample of shard 1 takes the key of a sample of shard 0
    with tarfile.open(synth_data["root"] / "train-00001.tar") as tar_in, \
            tarfile.open(data / "train-00001.tar", "w") as tar_out:
        for member in tar_in.getmembers():
            payload = tar_in.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            member.name = f"{rename.get(key, key)}.{ext}"
            tar_out.addfile(member, io.BytesIO(payload))
    with pytest.raises(store_lib.StoreError, match=rf"key '{keys0[7]}' appears in shards .*train-00000.tar and "
                                                   rf".*train-00001.tar"):
        build_store(_train_pattern(data), [("tiny-vit-teacher", str(teacher_ckpt))], tmp_path / "new", progress=False)
    # a store whose parts repeat a key (built by hand) is refused at load: the index never overwrites an entry
    source = store_lib.TeacherStore(store_dir)
    root = tmp_path / "dup"
    manifest = store_lib.begin(root, source.teachers)
    for url in (synth_data["root"] / "train-00000.tar", data / "train-00001.tar"):
        raws = list(data_lib.read_shard(str(url)))
        keys = [r["__key__"] for r in raws]
        writer = store_lib.PartWriter(root, manifest, str(url), len(keys))
        writer.append(keys, [data_lib.sample_digest(r) for r in raws], torch.zeros(len(keys), 128),
                      torch.zeros(len(keys), 128))
        writer.commit()
    with pytest.raises(store_lib.StoreError, match=rf"key '{keys0[7]}' appears twice .*train-00000.tar and "
                                                   rf".*train-00001.tar"):
        store_lib.TeacherStore(root)


@pytest.mark.parametrize("tamper", ["logit_scale", "truncate"])
def test_manifest_edit_refused(tmp_path, synth_data, store_dir, tamper):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    path = copy / "manifest.json"
    if tamper == "logit_scale":
        manifest = json.loads(path.read_text())
        manifest["teachers"][0]["logit_scale"] += 80
        path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        expected = "content does not match its digest"
    else:
        path.write_text(path.read_text()[:200])
        expected = "not valid JSON"
    message = _train(tmp_path, synth_data["train"], copy)
    assert message is not None and str(path) in message and expected in message and "\n" not in message


def test_non_finite_rows_refused_at_precompute_and_at_load(tmp_path, synth_data, teacher_ckpt, store_dir,
                                                          monkeypatch):
    import models

    real_create = models.create_teacher

    def nan_teacher(*args, **kwargs):  # a teacher whose image tower gives NaN for every sample
        teacher = real_create(*args, **kwargs)
        teacher.visual.proj.data.fill_(float("nan"))
        return teacher

    monkeypatch.setattr(models, "create_teacher", nan_teacher)
    with pytest.raises(store_lib.StoreError, match=r"non-finite embeddings for 32 sample\(s\), keys \['1000000000'"):
        build_store(synth_data["train"], [("tiny-vit-teacher", str(teacher_ckpt))], tmp_path / "nan", progress=False)
    assert not list((tmp_path / "nan" / "parts").iterdir())  # nothing half-written is left behind
    monkeypatch.undo()
    # a part damaged after the build (NaN row, checksum and manifest made consistent) is refused when loading
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    image_file = _part(copy, synth_data["root"] / "train-00002.tar") / "image.npy"
    image = np.load(image_file)
    image[4] = np.nan
    np.save(image_file, image)
    manifest = store_lib.read_manifest(copy)
    manifest["parts"][image_file.parent.name]["sha256"]["image"] = store_lib.sha256_file(image_file)
    store_lib.write_manifest(copy, manifest)
    message = _train(tmp_path, synth_data["train"], copy)
    assert message is not None and f"{image_file} holds non-finite values" in message


def test_store_command_line(tmp_path, synth_data, store_dir, capsys):
    store_cmd.main(["verify", str(store_dir), "--train-data", synth_data["train"]])
    assert capsys.readouterr().out.startswith(f"OK: {store_dir}: 96 samples in 3 part(s)")
    store_cmd.main(["info", str(store_dir)])
    assert "logit scale" in capsys.readouterr().out
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(SystemExit) as exc:
        store_cmd.main(["verify", str(copy)])
    assert exc.value.code == 2 and "not valid JSON" in capsys.readouterr().err


def _peak_rss_of_precompute(tmp_path, train_samples: int) -> int:
    """Peak RSS (bytes) of a fresh process that builds the store of a one-shard dataset of ``train_samples``."""
    data = synthetic.build(tmp_path / f"data{train_samples}", synthetic.SyntheticSpec(
        train_samples=train_samples, val_samples=8, shard_size=train_samples, seed=3), progress=False)
    script = (
        "import resource, sys, torch\n"
        "torch.manual_seed(0)\n"
        "import models\n"
        "from engine.teachers.precompute import build_store\n"
        "path = sys.argv[3] + '/teacher.pt'\n"
        "torch.save({'state_dict': models.create_model('tiny-vit-teacher').state_dict()}, path)\n"
        "build_store(sys.argv[1], [('tiny-vit-teacher', path)], sys.argv[2], batch_size=128, progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, data["train"], str(tmp_path / f"store{train_samples}"),
                          str(tmp_path)], capture_output=True, text=True, check=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def test_precompute_memory_does_not_grow_with_shard_size(tmp_path):
    small, large = _peak_rss_of_precompute(tmp_path, 256), _peak_rss_of_precompute(tmp_path, 4096)
    print(f"precompute peak RSS: 256-sample shard {small / 2**20:.1f} MiB, 4096-sample shard {large / 2**20:.1f} MiB")
    assert large - small < 100 * 2**20


# ------------------------------------------------------------------------------------- precompute's input checks


def _precompute(*argv) -> str:
    """engine.precompute's command line; returns its exit message (the test fails if it succeeds)."""
    from engine.precompute import main

    message = command_error(main, argv)
    assert message is not None, "not refused"
    return message


@pytest.fixture
def no_teacher(monkeypatch):
    """A refusal must come before the teacher is loaded."""
    monkeypatch.setattr(models, "create_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))


def test_resume_refuses_a_store_of_other_data_or_damaged(tmp_path, synth_data, teacher_ckpt, store_dir, no_teacher):
    other = synthetic.build(tmp_path / "other", synthetic.SyntheticSpec(train_samples=96, val_samples=32,
                                                                       shard_size=32, seed=1), progress=False)
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    fix = f"the store was built from other data or is damaged: pass another --teacher-store, or delete {copy} to " \
          f"rebuild it"
    teacher = ["--teacher", "tiny-vit-teacher", "--teacher-pretrained", str(teacher_ckpt), "--teacher-store", str(copy)]
    assert _precompute("--train-data", other["train"], *teacher) == (
        f"error: --teacher-store {copy}: cannot resume its build: shard {tmp_path / 'other/train-00000.tar'} does "
        f"not begin with the sample its part was built from (key or content differs); {fix}")
    part = _part(copy, synth_data["root"] / "train-00001.tar")
    shutil.rmtree(part)
    assert _precompute("--train-data", synth_data["train"], *teacher) == (
        f"error: --teacher-store {copy}: cannot resume its build: {part / 'keys.npy'} is missing; "
        f"{fix}")


def test_precompute_checks_batch_size_output_and_cache(tmp_path, synth_data, teacher_ckpt, no_teacher):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    args = ["--train-data", synth_data["train"], "--teacher", "tiny-vit-teacher", "--teacher-pretrained",
            str(teacher_ckpt)]
    assert _precompute(*args, "--batch-size", "0") == "error: --batch-size: must be >= 1, got 0"
    cases = {a_file / "store": f"Not a directory: {a_file / 'store/parts'}",
             a_file: f"Not a directory: {a_file / 'parts'}"}
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:  # root on ext4 etc.
        cases[locked / "store"] = f"Operation not permitted: {locked / 'store'}"
    try:
        for store, reason in cases.items():
            assert _precompute(*args, "--teacher-store", str(store)) == \
                f"error: --teacher-store {store}: cannot write the store there ({reason})"
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    message = _precompute("--cache-dir", str(a_file))
    assert message.startswith(f"error: --cache-dir {a_file}: cannot prepare the embedded dataset there: ")
    assert "\n" not in message


def test_precompute_refuses_teacher_weights_that_do_not_load(tmp_path, synth_data, teacher_ckpt):
    text, empty, truncated, student = (tmp_path / name for name in ("notes.pt", "empty.pt", "cut.pt", "student.pt"))
    text.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    truncated.write_bytes(teacher_ckpt.read_bytes()[:5000])
    torch.save({"state_dict": models.create_model("tiny-vit-student").state_dict()}, student)
    cases = {text: "it is a text file", empty: "the file is empty",
             truncated: "a damaged or incomplete torch.save file",
             student: "text pos_embed width changed"}
    for weights, reason in cases.items():
        message = _precompute("--train-data", synth_data["train"], "--teacher", "tiny-vit-teacher",
                              "--teacher-pretrained", str(weights), "--teacher-store", str(tmp_path / "store"))
        assert message.startswith(f"error: --teacher-pretrained {weights}: cannot load it into tiny-vit-teacher: "
                                  f"{reason}") and "\n" not in message, message


def test_store_command_names_damaged_files(tmp_path, synth_data, store_dir, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    part_file = _part(copy, synth_data["root"] / "train-00001.tar") / "image.npy"
    part_file.unlink()
    part_file.mkdir()
    data = tmp_path / "data"
    shutil.copytree(synth_data["root"], data)
    (data / "sizes.json").write_text('{"train-00000.tar": 32,')
    shard = synth_data["root"] / "train-00001.tar"
    for argv, message in [(["verify", str(copy)], f"part of shard {shard}: {part_file} cannot be read (Is a "
                                                  f"directory); rebuild the store"),
                          (["verify", str(store_dir), "--train-data", str(data / "train-{00000..00002}.tar")],
                           f"error: {data / 'sizes.json'}: damaged sizes file (Expecting property name")]:
        with pytest.raises(SystemExit):
            store_cmd.main(argv)
        out = capsys.readouterr().err
        assert out.count("\n") == 1 and out.startswith("error: ") and message in out, out
    manifest = copy / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    for command in ("info", "verify"):
        with pytest.raises(SystemExit):
            store_cmd.main([command, str(copy)])
        captured = capsys.readouterr()
        reported = captured.err.strip()
        assert reported == (f"error: {manifest}: cannot read it (Is a directory); restore it or rebuild the store "
                            f"with engine.precompute (into a new --teacher-store)")


def test_verify_compares_shard_sizes(tmp_path, synth_data, store_dir):
    data = tmp_path / "data"
    shutil.copytree(synth_data["root"], data)
    shard = data / "train-00002.tar"
    os.truncate(shard, os.path.getsize(shard) - 1024)  # only the end-of-archive blocks: every sample still reads
    problems = store_lib.verify(str(store_dir), str(data / "train-{00000..00002}.tar"))
    assert problems == [f"shard {shard} changed since the store was built ({os.path.getsize(shard)} bytes, store "
                        f"recorded {os.path.getsize(shard) + 1024})"]


def _advice_flags(path_part: str) -> dict[str, set]:
    """File name -> the kernel's VmFlags of this process's mappings of files whose path holds ``path_part``
    (/proc/self/smaps: 'rr' random-read advice, 'sr' sequential-read advice)."""
    flags, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line: its path last
            current = fields[-1] if path_part in fields[-1] else None
        elif current and line.startswith("VmFlags:"):
            flags.setdefault(Path(current).name, set()).update(fields[1:])
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the kernel's mapping flags (Linux)")
def test_training_maps_are_advised_random_and_verify_sequential(store_dir):
    """Training looks rows up at random: a store larger than memory must not read a readahead window per lookup
    (bench.store_lookup: 59-101 against 2 120 lookups/s). Verify and export read them in order."""
    store = store_lib.TeacherStore(store_dir)
    flags = _advice_flags(str(store_dir))
    assert store.maps_advised == 2 * len(store.parts) and {"image.npy", "text.npy"} <= set(flags)
    assert "rr" in flags["image.npy"] and "rr" in flags["text.npy"], flags
    assert "rr" not in flags.get("keys.npy", set())  # keys are read whole when the store is opened
    del store
    gc.collect()  # its maps unmapped
    in_order = store_lib.TeacherStore(store_dir, access="sequential")
    flags = _advice_flags(str(store_dir))
    assert "sr" in flags["image.npy"] and "rr" not in flags["image.npy"], flags
    assert in_order.maps_advised == 2 * len(in_order.parts)
    with pytest.raises(ValueError, match="access must be one of"):
        store_lib.TeacherStore(store_dir, access="often")
