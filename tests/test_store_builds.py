"""Building the embedded data and a teacher store: shards named alike in two folders, two processes building at
once, a build killed with SIGKILL, a full disk, captions repeated within a shard."""
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import models
from engine import eval as eval_cmd
from engine import export as export_cmd
from engine import precompute as precompute_cmd
from engine.core.errors import BusyError
from engine.core.lock import building
from engine.data import synthetic
from engine.data.shards import expand_urls
from engine.teachers import parts as parts_lib
from engine.teachers import store as store_lib
from engine.teachers.precompute import CaptionEmbeddings, build_store
from tests.helpers import command_error, dead_pid, train_cli

SPEC = dict(train_samples=96, val_samples=32, shard_size=32, seed=7)  # conftest's synth_data


def _build(data, teacher, store, seconds_per_part, log):
    """A forked process's build of conftest's data and store, each part slowed down, its stderr in ``log``."""
    torch.set_num_threads(1)  # the parent's thread pool does not survive fork
    sys.stderr = open(log, "w", buffering=1)
    append = parts_lib.PartWriter.append
    parts_lib.PartWriter.append = lambda self, *a: (time.sleep(seconds_per_part), append(self, *a))[1]
    patterns = synthetic.build(data, synthetic.SyntheticSpec(**SPEC), progress=False)
    build_store(patterns["train"], [("tiny-vit-teacher", str(teacher))], store, batch_size=40, progress=False)


def _start(*args):
    """``_build(*args)`` in a forked process (no second import of torch)."""
    proc = multiprocessing.get_context("fork").Process(target=_build, args=args)
    proc.start()
    return proc


def _assert_same_store(built, reference, urls):
    """Two stores hold the same part arrays for these shards."""
    mine, theirs = store_lib.TeacherStore(built, urls), store_lib.TeacherStore(reference, urls)
    for part, other in zip(mine.parts, theirs.parts, strict=True):
        for array in store_lib.PART_ARRAYS:
            np.testing.assert_array_equal(part[array], other[array], err_msg=f"{part['shard']} {array}")


def test_same_named_shards_in_two_folders_are_two_parts(tmp_path, synth_data, teacher_ckpt, store_dir):
    folders = {"a": "train-00000.tar", "b": "train-00001.tar", "c": "train-00000.tar"}  # c: a's samples again
    for folder, source in folders.items():
        (tmp_path / folder).mkdir()
        shutil.copyfile(synth_data["root"] / source, tmp_path / folder / "train-00000.tar")
    teacher = ["--teacher", "tiny-vit-teacher", "--teacher-pretrained", teacher_ckpt]
    two = f"{tmp_path}/a/train-00000.tar::{tmp_path}/b/train-00000.tar"
    store = tmp_path / "store"
    assert command_error(precompute_cmd.main, ["--train-data", two, *teacher, "--teacher-store", store]) is None
    built = store_lib.read_manifest(store)
    assert built["count"] == 64 and len(built["parts"]) == 2
    for name, record in built["parts"].items():
        assert name.startswith("train-00000-") and (store / "parts" / name).is_dir(), name
    original = store_lib.TeacherStore(store_dir, expand_urls(synth_data["train"])[:2])
    for part, other in zip(store_lib.TeacherStore(store, expand_urls(two)).parts, original.parts, strict=True):
        for array in store_lib.PART_ARRAYS:
            np.testing.assert_array_equal(part[array], other[array], err_msg=array)
    assert train_cli(tmp_path, {**synth_data, "train": two}, store, "--stop-after-steps", "1", "--no-eval") is None
    same = f"{tmp_path}/a/train-00000.tar::{tmp_path}/c/train-00000.tar"
    assert command_error(precompute_cmd.main, ["--train-data", same, *teacher, "--teacher-store", tmp_path / "s2"]) \
        == (f"error: sample key '1000000000' appears in shards {tmp_path}/a/train-00000.tar and "
            f"{tmp_path}/c/train-00000.tar; every sample needs a unique __key__ for its teacher embeddings to be found")


def test_a_store_of_the_previous_format_is_refused(tmp_path, synth_data, store_dir):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    manifest = store_lib.read_manifest(store)
    manifest["format"] = 2
    store_lib.write_manifest(store, manifest)
    message = train_cli(tmp_path, synth_data, store)
    assert message == (f"error: {store / 'manifest.json'}: store format 2 is not {store_lib.FORMAT_VERSION} (a store "
                       f"of an older version or a foreign one); delete {store} and rebuild it with engine.precompute")


def _wait_for(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_processes_build_the_same_data_and_store(tmp_path, synth_data, teacher_ckpt, store_dir):
    """Both wait while this test holds the data folder's lock, then build at once: one builds, the other waits for
    it, and both end with the data and store a single process builds."""
    data, store = tmp_path / "data", tmp_path / "store"
    data.mkdir()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    for log in logs:
        log.write_text("")
    with building(data, "test data"):
        procs = [_start(data, teacher_ckpt, store, 0.5, log) for log in logs]
        _wait_for(lambda: all("waiting for another process building the procedural dataset" in log.read_text()
                              for log in logs), "both processes to wait for the data")
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    said = "".join(log.read_text() for log in logs)
    assert f"waiting for another process building teacher store {store} (pid " in said, said
    for shard in synth_data["root"].glob("*.tar"):
        assert (data / shard.name).read_bytes() == shard.read_bytes(), shard.name
    _assert_same_store(store, store_dir, expand_urls(str(data / "train-{00000..00002}.tar")))
    assert not [p for p in (*data.iterdir(), *store.iterdir(), *(store / "parts").iterdir()) if ".tmp" in p.name]


def test_a_build_waits_for_the_lock_at_most_its_timeout(tmp_path, capsys):
    with building(tmp_path, "the first thing"):
        with pytest.raises(BusyError, match=rf"^the second thing: another process \(pid {os.getpid()}\) is still "
                                            rf"building it after 0.3 s; let it finish, or stop it and run again"):
            with building(tmp_path, "the second thing", timeout=0.3):
                pytest.fail("the lock was taken twice")
    assert capsys.readouterr().err == (f"waiting for another process building the second thing (pid {os.getpid()}), "
                                       f"at most 0.3 s\n")
    with building(tmp_path, "the third thing", timeout=0):  # released: taken at once
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_killed_build_leaves_temporaries_that_the_next_build_sweeps(tmp_path, synth_data, teacher_ckpt,
                                                                      store_dir):
    data, store = tmp_path / "data", tmp_path / "store"
    shutil.copytree(synth_data["root"], data)
    proc = _start(data, teacher_ckpt, store, 30, tmp_path / "killed.log")
    _wait_for(lambda: (store / "parts").is_dir() and any((store / "parts").iterdir()), "a part to be begun")
    proc.kill()
    proc.join()
    left = [p.name for p in (store / "parts").iterdir()]
    assert len(left) == 1 and left[0].startswith(".train-00000-") and left[0].endswith(f".tmp{proc.pid}"), left
    live = store / "parts" / f".other.tmp{os.getpid()}"  # a live process's temporary is never swept
    live.mkdir()
    (data / f".train-00001.tar.tmp{dead_pid()}").write_bytes(b"half a shard")
    (data / "dataset.json").rename(data / "building.json")  # as if the data build had been killed too
    synthetic.build(data, synthetic.SyntheticSpec(**SPEC), progress=False)
    build_store(str(data / "train-{00000..00002}.tar"), [("tiny-vit-teacher", str(teacher_ckpt))], store, batch_size=40,
                progress=False)
    assert sorted(p.name for p in (store / "parts").iterdir() if ".tmp" in p.name) == [live.name]
    assert not [p for p in data.iterdir() if ".tmp" in p.name]
    _assert_same_store(store, store_dir, expand_urls(str(data / "train-{00000..00002}.tar")))


# --------------------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs (mounting needs root; skipped elsewhere); ``resize(size)`` changes its size."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_precompute_on_a_full_disk_says_so_and_resumes(tmp_path, synth_data, teacher_ckpt, store_dir, small_disk):
    disk, resize = small_disk
    store = disk / "store"
    argv = ["--train-data", synth_data["train"], "--teacher", "tiny-vit-teacher", "--teacher-pretrained", teacher_ckpt,
            "--teacher-store", store, "--batch-size", "40"]
    (disk / "filler").write_bytes(b"\0" * 90_000)  # room for the manifest and a part or two, not three
    message = command_error(precompute_cmd.main, argv)
    assert message is not None and "no space left on the device" in message and str(store) in message, message
    assert not [p for p in (*store.iterdir(), *(store / "parts").iterdir()) if ".tmp" in p.name]
    before = store_lib.read_manifest(store)
    assert not before["complete"] and len(before["parts"]) < 3
    assert {p.name for p in (store / "parts").iterdir()} == set(before["parts"])
    resize("4m")
    assert command_error(precompute_cmd.main, argv) is None
    _assert_same_store(store, store_dir, expand_urls(synth_data["train"]))


def test_eval_and_export_on_a_full_disk_say_so(tmp_path, synth_data, teacher_ckpt, small_disk, monkeypatch):
    disk, _ = small_disk
    monkeypatch.setattr(eval_cmd, "evaluate", lambda *args, **kwargs: {"acc1": 0.5})  # only its output matters
    checkpoint = tmp_path / "epoch_latest.pt"
    weights = models.create_model("tiny-vit-student").state_dict()
    torch.save({"config": {"model": "tiny-vit-student", "batch_size": 16}, "model": "tiny-vit-student",
                "state_dict": weights, "step": 1}, checkpoint)
    with open(disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):  # every page of the disk
        while True:
            filler.write(b"\0" * 4096)
    output = disk / "metrics.json"
    message = command_error(eval_cmd.main, ["--pretrained", teacher_ckpt, "--model", "tiny-vit-teacher",
                                            "--val-data", synth_data["val"], "--output", output])
    assert message == (f"error: could not write --output {output}: no space left on the device; the previous file "
                       f"there, if any, is intact")
    message = command_error(export_cmd.main, [checkpoint, "--output", disk / "student"])
    assert message is not None and "no space left on" in message.lower(), message
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_repeated_caption_is_embedded_once_and_the_oldest_dropped_past_the_memory_budget(teacher_ckpt):
    teacher = models.create_teacher("tiny-vit-teacher", str(teacher_ckpt))
    tokenizer = models.get_tokenizer("tiny-vit-teacher")
    texts = [["a red circle", "a blue square", "a red circle"], ["a blue square", "a green cross", "a red circle"]]
    tokens = torch.stack([tokenizer(captions) for captions in texts])  # (2 samples, 3 captions, L)
    given = []
    encode = teacher.encode_text
    teacher.encode_text = lambda x, **kw: (given.append(len(x)), encode(x, **kw))[1]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encode(tokens.flatten(0, 1), normalize=True), dim=-1)
    row_bytes = 128 * 4 + tokens.shape[-1] * 8 + 200  # as CaptionEmbeddings counts a row
    captions = CaptionEmbeddings(teacher, "cpu", max_bytes=2 * row_bytes)  # room for two rows
    out = captions(tokens)
    assert given == [3] and out.shape == (2, 3, 128)  # the three distinct captions in one forward
    torch.testing.assert_close(out.flatten(0, 1), expected, atol=1e-6, rtol=0)
    assert len(captions.rows) == 2  # the least recently used ("a blue square", last seen at row 3) dropped
    again = captions(tokenizer(["a red circle", "a green cross", "a blue square"])[None])
    assert given == [3, 1]  # only the dropped caption runs again
    torch.testing.assert_close(again[0], expected[[0, 4, 1]], atol=1e-6, rtol=0)
