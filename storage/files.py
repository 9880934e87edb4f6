"""Durable files, written whole or not at all, on a local disk or a pyarrow filesystem URI.

Locally a write goes to a temporary name in the destination's folder, is fsynced, renamed over the
destination, and the folder is fsynced, so a crash leaves the old file or the new one, never a part.
On an object store (``s3://``, ``gs://``...) one PUT is atomic already: the bytes are staged in a
local temporary file and sent in a single upload. This module is the only place that renames a
durable file into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"          # every temporary name starts so: ``remove_stale_temps`` finds them


class StorageError(ValueError):
    """A storage location that cannot hold what must be written there (unwritable, full); the
    message names it and, for a full one, the space needed."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (object stores, ``file://``), False for a plain local path."""
    return "://" in str(location)


def filesystem(location: str | os.PathLike):
    """(pyarrow filesystem, path within it) for a local path or a URI such as s3://bucket/key."""
    import pyarrow.fs

    location = str(location)
    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` with single slashes, for paths and URIs alike."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(location: str | os.PathLike) -> bool:
    """True when ``location`` is a file (local path or URI)."""
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


class AtomicFile:
    """A file that appears at ``dest`` only on ``commit()``; ``discard()`` (or leaving a ``with``
    block by an exception) removes every trace. ``file`` is the binary handle to write to."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = str(dest)
        self.uri = is_uri(self.dest)
        if self.uri:
            self.tmp = Path(tempfile.mkstemp(prefix=TMP_PREFIX)[1])
        else:
            Path(self.dest).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_name(Path(self.dest))
        self.file: BinaryIO = open(self.tmp, "wb")
        self.done = False

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            if self.uri:
                _upload(self.tmp, self.dest)
            else:
                os.replace(self.tmp, self.dest)
                fsync_dir(Path(self.dest).parent)
        finally:
            self.done = True
            self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        self.done = True

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.done:
            self.commit()
        elif not self.done:
            self.discard()


def _upload(local: Path, dest: str) -> None:
    fs, path = filesystem(dest)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as out:
        shutil.copyfileobj(src, out, 16 << 20)


def atomic_write(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` (path or URI) so that a reader sees the old file or the new one."""
    with AtomicFile(dest) as f:
        f.write(data)


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the local file ``src`` to ``dest`` (path or URI), atomically."""
    with AtomicFile(dest) as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f.file, 16 << 20)


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """``atomic_write`` unless the local ``path`` already holds exactly ``data``; True if it wrote."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


def fsync_dir(d: str | os.PathLike) -> None:
    """Make a rename in ``d`` durable (a crash after it cannot resurrect the old name)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(d: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed writer left in ``d`` (never read); returns what it removed."""
    d, removed = Path(d), []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink()
                removed.append(p)
    return removed


def temp_name(path: Path) -> Path:
    # Unique per writer, so two processes (or Ray task retries) never share a temporary file.
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def remove(location: str | os.PathLike) -> None:
    """Delete a file (local path or URI) that may or may not be there."""
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)
