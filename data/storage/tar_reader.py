"""A sequential tar member reader for shards: ustar, GNU long names and pax headers, read with two
``read`` calls per member (Python's ``tarfile`` costs ~0.1 ms a member in Python code, as much as
loading a small image).

It is stricter than ``tarfile``'s stream mode, which stops silently at a damaged header mid-archive
(the rest of the shard is lost without a word): here a bad header checksum, a short member or a
missing end-of-archive marker raise ``tarfile.ReadError`` naming the byte offset.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")     # regular and contiguous files (tarfile's isfile(), less sparse files)
_META = (b"x", b"L", b"g", b"K")   # pax header, GNU long name; pax global header, GNU long link (skipped)


def _number(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {field!r} in the tar header at byte {offset}") from None


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _number(header[148:156], "checksum", offset)
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in header if b > 127) + 2 * sum(b for b in header[148:156] if b > 127)
    return stored == signed


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError(f"bad pax header record at byte {offset + pos}") from None
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_files(fileobj: BinaryIO) -> Iterator[tuple[str, callable]]:
    """``(name, read_data)`` for every regular file member, in order; ``read_data()`` returns its
    bytes (call it before the next item; an unread member is skipped). Raises ``tarfile.ReadError`` on
    a damaged archive after the members before the damage."""
    read = fileobj.read
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"tar ends at byte {offset + len(header)} without its end-of-archive marker "
                                    "(truncated)")
        if header == _ZERO:
            break
        if not _checksum_ok(header, offset):
            raise tarfile.ReadError(f"bad header checksum at byte {offset} (damaged tar)")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136], "size", offset)
        offset += BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in _META:
            data = read(padded)
            if len(data) < padded:
                raise tarfile.ReadError(f"tar ends at byte {offset + len(data)} inside a header (truncated)")
            offset += padded
            if kind == b"x":
                pax = _pax_records(data[:size], offset - padded)
            elif kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        consumed = False

        def read_data() -> bytes:  # valid until the next item: it reads this member's payload
            nonlocal consumed, offset
            consumed = True
            data = read(padded)
            if len(data) < size:
                raise tarfile.ReadError(f"member {name} truncated ({len(data)} of {size} bytes)")
            if len(data) < padded:
                raise tarfile.ReadError(f"tar ends at byte {offset + len(data)} without its end-of-archive "
                                        "marker (truncated)")
            offset += padded
            return data[:size]
        if kind in _REGULAR:
            yield name, read_data
        if not consumed:
            read_data()
    while read(1 << 16):  # drain (a pipe's writer finishes); what follows the marker is not read
        pass
