"""The members of an uncompressed tar stream, read sequentially and several times faster than ``tarfile``.

webdataset reads shards through ``tarfile``, whose per-member header parsing costs about 0.08 ms; with three small
members per sample that is as much as decoding the sample. This reader parses only what a shard needs:

- regular files (types ``0``, ``\\0``, ``7``) are yielded as ``(name, bytes)``, in order;
- directories, links and other special members are skipped, as webdataset skips them;
- long names and large sizes come through pax extended headers (``x``: ``path``, ``size``) or GNU long names
  (``L``); global pax headers (``g``) and GNU long link names (``K``) are skipped; base-256 sizes are decoded;
- every header's checksum is verified, and a truncated member, a bad checksum or a sparse member raises
  ``TarFormatError`` with the member's offset.
"""
from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterator, Optional

from ..core.errors import ShardError

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
META = (b"x", b"L", b"g", b"K")  # pax header, GNU long name: for the next member; global pax, GNU long link: skipped
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


class TarFormatError(ShardError):
    """A tar stream that ends early or holds a damaged or unsupported header."""


def is_compressed(head: bytes) -> bool:
    return head.startswith(COMPRESSED_MAGIC)


def _name(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _read_exactly(stream: BinaryIO, size: int, what: str, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"{what} at byte {offset} ends after {len(data)} of {size} bytes (truncated?)")
    return data


def _pax_records(payload: bytes, offset: int) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(payload) and payload[pos:pos + 1] not in (b"\0", b""):
        space = payload.find(b" ", pos)
        try:
            length = int(payload[pos:space])
        except ValueError as exc:
            raise TarFormatError(f"damaged pax header at byte {offset}") from exc
        key, _, value = payload[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def regular_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file of an uncompressed tar stream, in stream order."""
    return _walk(stream, read_data=True)


def regular_member_names(stream: BinaryIO) -> Iterator[str]:
    """The name of each regular file of an uncompressed tar file, in order, reading only the headers: the stream must
    be seekable (a local file). A member that would end past the end of the file raises, as a short read would."""
    return (name for name, _ in _walk(stream, read_data=False))


def _walk(stream: BinaryIO, read_data: bool) -> Iterator[tuple[str, Optional[bytes]]]:
    """``(name, bytes)`` of each regular member, or ``(name, None)`` with the data skipped by seeking."""
    end = None  # with the data skipped, the file's size: a skipped member must fit in it
    if not read_data:
        end = stream.seek(0, io.SEEK_END)
        stream.seek(0)
    offset, pending = 0, {}  # pending: name/size overrides from a pax or GNU long-name member for the next one
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):  # end of archive (zero block or end of stream)
            if header and len(header) < BLOCK and header.strip(b"\0"):
                raise TarFormatError(f"header at byte {offset} ends after {len(header)} of {BLOCK} bytes (truncated?)")
            return
        try:
            stored, size = tarfile.nti(header[148:156]), tarfile.nti(header[124:136])
        except tarfile.InvalidHeaderError as exc:
            raise TarFormatError(f"header at byte {offset} is damaged ({exc}) or this is not a tar file") from exc
        unsigned = 256 + sum(header[:148]) + sum(header[156:])  # the checksum field itself counts as 8 spaces
        if stored != unsigned and stored != tarfile.calc_chksums(header)[1]:  # some writers sum signed bytes
            raise TarFormatError(f"header at byte {offset} has a bad checksum (damaged, or not a tar file)")
        kind = header[156:157]
        if kind in META:
            payload = _read_exactly(stream, size, f"{kind.decode()!r} header member", offset)
            stream.read(-size % BLOCK)
            if kind == b"x":
                pending.update(_pax_records(payload, offset))
            elif kind == b"L":
                pending["path"] = _name(payload)
            offset += BLOCK + size + -size % BLOCK
            continue
        name = _name(header[:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: long paths split into a prefix
            name = _name(header[345:500]) + "/" + name
        name, size, pending = pending.get("path", name), int(pending.get("size", size)), {}
        if kind == b"S":
            raise TarFormatError(f"member {name!r} at byte {offset} is a sparse file, which shards cannot hold")
        if read_data:
            data = _read_exactly(stream, size, f"member {name!r}", offset)
            stream.read(-size % BLOCK)  # padding to the next block
        else:
            if offset + BLOCK + size > end:
                raise TarFormatError(f"member {name!r} at byte {offset} ends after {end - offset - BLOCK} of {size} "
                                     "bytes (truncated?)")
            data = None
            stream.seek(size + -size % BLOCK, io.SEEK_CUR)
        offset += BLOCK + size + -size % BLOCK
        if kind in REGULAR:
            yield name, data
