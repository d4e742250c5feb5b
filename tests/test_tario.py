"""engine.tario against Python's tarfile and webdataset's reader: the same members and samples for every tar
format a shard may come in, and a named error for every kind of damage."""
import io
import tarfile

import pytest
import webdataset as wds

from engine.data import shards as data_lib
from engine.data import tario

LONG_DIR = "d" * 120  # a path over 100 characters: ustar splits it into prefix/name, pax and GNU use extra members
MEMBERS = [  # (name, payload): sizes around the 512-byte block, an empty member, non-ASCII and long names
    ("000001.png", b"\x89PNG" + bytes(range(256)) * 2),
    ("000001.txt", "a red circle".encode()),
    ("000001.json", b'{"label": 3}'),
    ("000002.png", bytes(512)),
    ("000002.txt", b""),
    ("000003.png", b"x" * 513),
    ("000003.txt", "caf\u00e9 cr\u00e8me".encode()),
    (f"{LONG_DIR}/000004.png", b"long path"),
    (f"{LONG_DIR}/000004.txt", b"long path caption"),
    ("sample-with-a-very-long-key-" + "k" * 90 + ".txt", b"long key"),
    ("\u00e9t\u00e9-000005.txt", b"non-ascii key"),
    ("__index__", b"webdataset metadata, skipped"),
]


def _tar(fmt: int, members=MEMBERS, special: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if special:
            directory = tarfile.TarInfo("somedir")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for name, payload in members:
            if special and len(name) > 100 and fmt == tarfile.USTAR_FORMAT and "/" not in name[-100:]:
                continue  # ustar cannot store a long name without a '/' to split at
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 1_700_000_000
            tar.addfile(info, io.BytesIO(payload))
        if special:
            link = tarfile.TarInfo("link-to-000001.png")
            link.type, link.linkname = tarfile.SYMTYPE, "000001.png"
            tar.addfile(link)
    return buffer.getvalue()


def _tarfile_members(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_members_match_tarfile(fmt):
    blob = _tar(fmt)
    got = list(tario.regular_members(io.BytesIO(blob)))
    assert got == _tarfile_members(blob)
    assert any(len(name) > 100 for name, _ in got)  # the long names really went through the extra headers


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_names_alone_match_tarfile_and_shard_keys_webdataset(tmp_path, fmt):
    """The headers-only walk (shard_keys' fast path) names the same members; the keys are webdataset's samples'."""
    blob = _tar(fmt)
    assert list(tario.regular_member_names(io.BytesIO(blob))) == [name for name, _ in _tarfile_members(blob)]
    shard = tmp_path / "shard.tar"
    shard.write_bytes(blob)
    assert data_lib.shard_keys(str(shard)) == [s["__key__"] for s in wds.tarfile_samples([{"url": str(shard)}])]


def test_names_alone_refuse_a_member_past_the_end():
    blob = _tar(tarfile.PAX_FORMAT, special=False)
    with pytest.raises(tario.TarFormatError, match="member '000001.png' at byte 0 ends after 100 of 516 bytes"):
        list(tario.regular_member_names(io.BytesIO(blob[:512 + 100])))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_samples_match_webdataset(tmp_path, fmt):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(_tar(fmt))
    ours = list(data_lib.read_shard(str(shard)))
    theirs = list(wds.tarfile_samples([{"url": str(shard)}]))
    assert ours == theirs and len(ours) == 6


def test_synthetic_shard_matches_webdataset(synth_data):
    url = str(synth_data["root"] / "train-00001.tar")
    ours = list(data_lib.read_shard(url, 32))
    assert ours == list(wds.tarfile_samples([{"url": url}]))


def test_compressed_shard_goes_through_webdataset(tmp_path, synth_data):
    import gzip

    url = synth_data["root"] / "train-00001.tar"
    packed = tmp_path / "train-00001.tar.gz"
    packed.write_bytes(gzip.compress(url.read_bytes()))
    def without_url(samples):
        return [{k: v for k, v in sample.items() if k != "__url__"} for sample in samples]

    # tario would refuse the gzip bytes as a damaged header, so equal samples mean webdataset read them
    assert without_url(data_lib.read_shard(str(packed), 32)) == without_url(data_lib.read_shard(str(url), 32))


def _header_offsets(blob: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        return [info.offset for info in tar.getmembers()]


@pytest.mark.parametrize("damage", ["cut-in-data", "cut-in-header", "checksum", "size-field", "not-a-tar"])
def test_damage_is_refused(damage):
    blob = _tar(tarfile.PAX_FORMAT, special=False)
    second = _header_offsets(blob)[1]
    if damage == "cut-in-data":  # the first member's payload is cut short
        bad, match = blob[:512 + 100], "member '000001.png' at byte 0 ends after 100 of 516 bytes"
    elif damage == "cut-in-header":
        bad, match = blob[:second + 200], f"header at byte {second} ends after 200 of 512 bytes"
    elif damage == "checksum":  # one flipped byte in the second member's name
        bad = bytearray(blob)
        bad[second] ^= 0x01
        match = f"header at byte {second} has a bad checksum"
    elif damage == "size-field":
        bad = bytearray(blob)
        bad[second + 124:second + 136] = b"12z456789012"
        match = f"header at byte {second} is damaged"
    else:
        bad, match = b"not a tar file" * 100, "header at byte 0 is damaged"
    with pytest.raises(tario.TarFormatError, match=match):
        list(tario.regular_members(io.BytesIO(bytes(bad))))


def test_sparse_member_refused():
    blob = bytearray(_tar(tarfile.GNU_FORMAT, members=MEMBERS[:1], special=False))
    blob[156:157] = b"S"
    blob[148:156] = b"%06o\0 " % (256 + sum(blob[:148]) + sum(blob[156:512]))
    with pytest.raises(tario.TarFormatError, match="sparse file"):
        list(tario.regular_members(io.BytesIO(bytes(blob))))


def test_damaged_local_shard_named(tmp_path):
    shard = tmp_path / "train-00007.tar"
    blob = _tar(tarfile.PAX_FORMAT, special=False)
    shard.write_bytes(blob[:_header_offsets(blob)[2] + 10])
    with pytest.raises(data_lib.ShardError, match=r"corrupt shard .*train-00007.tar: header at byte \d+ ends"):
        list(data_lib.read_shard(str(shard)))
