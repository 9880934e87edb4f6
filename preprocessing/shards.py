"""Deterministic WebDataset shards: ustar tar members in a fixed order, with their DALI index lines.

A shard's bytes depend only on its samples: every member has mtime 0, mode 0644, uid/gid 0, empty
user/group names, and a sample's members come in the order ``box, cls, jpg, key, lbl`` (sorted
extensions; ``box`` only for a sample with boxes).
The index (``storage.dataformat``) is written from the offsets known while writing: no second pass,
no ``tar`` subprocess.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from preprocessing.lock import lost
from storage.dataformat import BOX_EXT
from storage.files import AtomicFile

BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size: GNU tar and Python's tarfile pad archives to it
EXTENSIONS = ("cls", "jpg", "key", "lbl")  # every sample's members, in order, after an optional BOX_EXT


def members(key: str, label: int, jpg: bytes, boxes: bytes = b"") -> list[tuple[str, bytes]]:
    """A sample's (extension, bytes) members in shard order (docs/data-format.md). ``boxes``: the
    ``storage.dataformat.encode_boxes`` bytes; a sample without boxes has no ``box`` member."""
    box = [(BOX_EXT, boxes)] if boxes else []
    return box + [("cls", str(label).encode("ascii")), ("jpg", jpg), ("key", key.encode("ascii")),
                  ("lbl", struct.pack("<i", label))]


def tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file, byte-identical to Python tarfile's USTAR_FORMAT one with
    mtime 0, mode 0644, uid/gid 0 and empty names, built directly because it is 5x faster."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    if size >= 8 ** 11:
        raise ValueError(f"tar member {name!r} of {size} bytes exceeds ustar's 8 GiB limit")
    head = (raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0"
            + b"%011o\0" % size + b"00000000000\0")
    # typeflag '0', empty linkname, magic+version, empty uname/gname/devmajor/devminor/prefix
    tail = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(BLOCK - 156, b"\0")
    chksum = sum(head) + 8 * 32 + sum(tail)  # the checksum field counts as eight spaces
    return head + b"%06o\0 " % chksum + tail


class ShardWriter:
    """Streams samples into ``<path>`` through a ``storage.files.AtomicFile``: ``commit`` makes it
    appear and returns the index lines; leaving the ``with`` block without ``commit`` leaves no trace.
    The sha256 of the archive is taken over the bytes as they are written (no second read)."""

    def __init__(self, path: Path):
        self.out = AtomicFile(path)
        self.pos = 0
        self.lines: list[str] = []
        self.sha256 = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.sha256.update(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.out.done:
            self.out.discard()

    def add(self, key: str, label: int, jpg: bytes, boxes: bytes = b"") -> None:
        parts, chunks = [], []
        for ext, data in members(key, label, jpg, boxes):
            name = f"{key}.{ext}"
            pad = -len(data) % BLOCK
            chunks += [tar_header(name, len(data)), data, b"\0" * pad]
            parts.append(f"{ext} {self.pos + BLOCK} {len(data)} {name}")
            self.pos += BLOCK + len(data) + pad
        self._write(b"".join(chunks))  # one write per sample
        self.lines.append(" ".join(parts))

    def commit(self) -> tuple[int, list[str], str]:
        """Finish the archive; returns (its size in bytes, the DALI index lines, its hex sha256)."""
        end = self.pos + 2 * BLOCK  # two zero blocks end a tar archive
        end += -end % RECORD
        self._write(b"\0" * (end - self.pos))
        try:
            self.out.commit()
        except FileNotFoundError as e:
            # The temporary file is gone: only a run that took OUT's lock from this one removes it.
            raise lost(Path(self.out.dest).parent) from e
        return end, self.lines, self.sha256.hexdigest()


