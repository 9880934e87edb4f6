"""Every entry under SOURCE, once: regular files (symlinks to files followed), and the entries that
cannot be read, each with the reason.

Folder symlinks are walked like folders (torchvision's ImageFolder walks with ``followlinks=True``);
a link to one of its own ancestor folders is a loop: it is reported, not walked. A dangling link, a
link loop, a FIFO or device, an unreadable folder: each is one entry with a ``problem`` instead of an
exception, so one bad entry never stops a run.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to SOURCE, POSIX separators
    size: int  # bytes of the file (of the link itself when it cannot be followed)
    mtime_ns: int
    problem: str  # "" for a readable regular file, else why it cannot be read
    hidden: bool  # its name, or a folder on its path, starts with "."


def problem_of(path: str | os.PathLike, error: OSError) -> str:
    """Why ``path`` cannot be read, for a quarantine reason: names dangling links and link loops."""
    path = str(path)
    if os.path.islink(path):
        if isinstance(error, FileNotFoundError):
            return f"dangling symlink to {os.readlink(path)}"
        if error.errno == errno.ELOOP:
            return f"symlink loop ({os.readlink(path)} leads back to itself)"
    return f"unreadable: {type(error).__name__}: {error.strerror or error}"


def listing(root: Path) -> list[Entry]:
    """Every file-like entry under ``root`` (a folder), sorted by ``rel``."""
    out: list[Entry] = []
    st = os.stat(root)
    stack = [(root, "", frozenset({(st.st_dev, st.st_ino)}), False)]
    while stack:
        folder, rel, ancestors, hidden = stack.pop()
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            out.append(Entry(rel, 0, 0, f"unreadable folder: {e.strerror or e}", hidden))
            continue
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            child_hidden = hidden or child.name.startswith(".")
            entry, sub = _entry(child, child_rel, ancestors, child_hidden)
            if sub is not None:
                stack.append((Path(child.path), child_rel, ancestors | {sub}, child_hidden))
            elif entry is not None:
                out.append(entry)
    return sorted(out, key=lambda e: e.rel)


def _entry(child: os.DirEntry, rel: str, ancestors: frozenset, hidden: bool):
    """(an Entry, None) for a file or a problem; (None, (dev, inode)) for a folder to walk."""
    try:
        st = os.stat(child.path)  # follows symlinks
    except OSError as e:
        try:
            link = os.lstat(child.path)
            size, mtime = link.st_size, link.st_mtime_ns
        except OSError:
            size, mtime = 0, 0
        return Entry(rel, size, mtime, problem_of(child.path, e), hidden), None
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            target = os.readlink(child.path) if child.is_symlink() else child.path
            return Entry(rel, 0, 0, f"symlink loop: a link to {target}, a folder that contains it", hidden), None
        return None, key
    if not stat.S_ISREG(st.st_mode):
        return Entry(rel, 0, st.st_mtime_ns, "not a regular file (a FIFO, socket or device)", hidden), None
    return Entry(rel, st.st_size, st.st_mtime_ns, "", hidden), None
