"""A store or shard tampered with, its manifest's digest made consistent again: ``engine.store verify --train-data``
and training refuse it alike, each with one line (a digest detects accidents, not edits; what can be checked is)."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from engine import store as store_cmd
from engine.teachers import store as store_lib
from tests.helpers import train_cli


def _verify(store, *argv) -> list[str]:
    """engine.store verify's report: one ``error:`` line per problem on stderr (at least one), exit status 2."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        store_cmd.main(["verify", str(store), *argv])
    lines = err.getvalue().splitlines()
    assert exc.value.code == 2 and lines and all(line.startswith("error: ") for line in lines), err.getvalue()
    return lines


def _edit_manifest(store, change):
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    store_lib.write_manifest(store, manifest)


def _record(manifest, shard):
    return next(record for record in manifest["parts"].values() if record["shard"] == str(shard))


def _part(store, shard):
    return store / "parts" / store_lib.part_name(str(shard))


def _fix_sums(store, shards):
    """The manifest's checksums of these shards' parts made to match their files (an edit, not an accident)."""
    def fix(manifest):
        for shard in shards:
            sums = _record(manifest, shard)["sha256"]
            for array in sums:
                sums[array] = store_lib.sha256_file(_part(store, shard) / f"{array}.npy")
    _edit_manifest(store, fix)


def _scale(factor=None, value=None):
    def change(manifest):
        member = manifest["teachers"][0]
        member["logit_scale"] = value if factor is None else member["logit_scale"] * factor
    return change


def _double_width(manifest):
    manifest["teachers"][0]["embed_dim"] *= 2
    manifest["embed_dim"] *= 2


def _swap_parts(store, data):
    first, second = (_part(store, data / f"train-0000{i}.tar") for i in (0, 1))
    first.rename(store / "parts" / "swap")
    second.rename(first)
    (store / "parts" / "swap").rename(second)
    _fix_sums(store, [data / "train-00000.tar", data / "train-00001.tar"])


def _copy_shard(store, data):
    """Shard 2 in place of shard 0, padded with zero blocks (the end of a tar) to its size: only the samples tell."""
    copy, size = (data / "train-00002.tar").read_bytes(), (data / "train-00000.tar").stat().st_size
    assert len(copy) <= size and (size - len(copy)) % 512 == 0
    (data / "train-00000.tar").write_bytes(copy + bytes(size - len(copy)))


def _pickled_keys(store, data):
    keys = _part(store, data / "train-00001.tar") / "keys.npy"
    np.save(keys, np.load(keys).astype(object), allow_pickle=True)
    _fix_sums(store, [data / "train-00001.tar"])


# tamper -> what both must say
CASES = {
    "nan-scale": (lambda store, data: _edit_manifest(store, _scale(value=float("nan"))), "logit_scale nan is not a "
                  "teacher's logit scale (a finite number in (0, 1000])"),
    "negative-scale": (lambda store, data: _edit_manifest(store, _scale(value=-50)), "logit_scale -50 is not a "
                       "teacher's logit scale"),
    "doubled-scale": (lambda store, data: _edit_manifest(store, _scale(factor=2)), "is not its teacher's"),
    "doubled-width": (lambda store, data: _edit_manifest(store, _double_width), "(32, 1, 128), not (32, 1, 256)"),
    "swapped-parts": (_swap_parts, "train-00000.tar does not have the samples its part was built from"),
    "copied-shard": (_copy_shard, "train-00000.tar does not have the samples its part was built from"),
    "pickled-keys": (_pickled_keys, "keys.npy holds object values, not plain text keys"),
}


@pytest.mark.parametrize("tamper", list(CASES))
def test_verify_and_training_refuse_alike(tmp_path, synth_data, store_dir, tamper):
    store, data = tmp_path / "store", synth_data["root"]
    shutil.copytree(store_dir, store)
    if tamper == "copied-shard":  # the shards the store was built from, copied so that one can be replaced
        data = tmp_path / "data"
        shutil.copytree(synth_data["root"], data)
    change, expected = CASES[tamper]
    change(store, data)
    pattern = str(data / "train-{00000..00002}.tar")
    verified = _verify(store, "--train-data", pattern)
    trained = train_cli(tmp_path, {**synth_data, "train": pattern}, store)
    assert trained is not None and expected in trained and expected in verified[0], (verified, trained)


def test_verify_says_more_than_training(tmp_path, store_dir, synth_data):
    """Key hashes that are not their keys' and rows that are not unit-norm: training would refuse or mistrain at a
    step; verify names them at once."""
    shard = synth_data["root"] / "train-00002.tar"
    for array, change, expected in (("key_hashes", lambda a: a[::-1], "key_hashes.npy does not hold the hashes"),
                                    ("image", lambda a: a * 2, "image.npy: 32 row(s) are not unit-norm")):
        store = tmp_path / array
        shutil.copytree(store_dir, store)
        path = _part(store, shard) / f"{array}.npy"
        np.save(path, change(np.load(path)))
        _fix_sums(store, [shard])
        assert len(_verify(store)) == 1 and expected in _verify(store)[0]
