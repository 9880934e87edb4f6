"""One writer at a time on an output folder: ``OUT/.preprocess.lock``.

The lock file is created with ``O_CREAT | O_EXCL``, which is atomic on local disks and on NFS v3 and
later, and holds the holder's host, pid, start time and a random token. While it runs the holder
touches the file every ``HEARTBEAT_S`` seconds. A lock is *stale* when its holder's pid is gone on this
host, or when nobody has touched it for ``STALE_AFTER_S`` seconds (a holder on another host that died,
or lost the storage); a stale lock is removed and taken. ``--break-lock`` removes any lock. Two
writers finding the same stale lock cannot both take it: removing one first takes a second exclusive
file (``.preprocess.lock.break``) and re-reads the lock, so only the lock that was judged stale is
ever removed. A run that took a stale lock removes the temporary files its holder left; should that
holder wake, it stops at its next shard with ``lost`` naming who holds OUT now.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from storage.dataformat import DataError

LOCK = ".preprocess.lock"
HEARTBEAT_S = 30
STALE_AFTER_S = 15 * 60  # 30 missed heartbeats: a live holder never gets there
BREAKER_STALE_S = 60  # a breaker file older than this was left by a killed writer


class LockError(DataError):
    """OUT is held by another writer (or this run lost its lock); the message names the holder."""


def _describe(holder: dict | None, path: Path) -> str:
    if not holder:
        return f"an unknown writer (lock file {path} is empty or unreadable)"
    return (f"host {holder.get('host')} pid {holder.get('pid')}, started {holder.get('started_at')} "
            f"(lock file {path})")


def _not_a_file(path: Path) -> LockError:
    return LockError(f"{path} is a folder where the lock file belongs: remove it (rmdir {path}) and run again")


def _read(path: Path) -> tuple[bytes, dict | None, float] | None:
    """(raw bytes, parsed holder or None, mtime) of the lock, or None when there is no lock."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except IsADirectoryError as e:
        raise _not_a_file(path) from e
    except PermissionError as e:
        raise LockError(f"{path}: cannot read the lock file ({e.strerror}); its holder may be another "
                        "user. Run as that user, or remove the file once you know the holder is gone") from e
    try:
        holder = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        holder = None  # a writer between creating the file and writing it, or a damaged file
    return raw, holder if isinstance(holder, dict) else None, mtime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lost(out: str | Path) -> LockError:
    """The error of a run whose lock on ``out`` was taken away (judged stale, or ``--break-lock``):
    it names who holds the lock now."""
    path = Path(out) / LOCK
    if not Path(out).is_dir():
        return LockError(f"{out} was removed while this run wrote it")
    found = _read(path)
    now = f"to {_describe(found[1], path)}" if found else "to another run, which has released it since"
    return LockError(f"this run lost its lock on {out} {now}: that run judged the lock stale (not refreshed "
                     f"for {STALE_AFTER_S // 60} minutes: this run was stalled) or was given --break-lock, and "
                     "removed this run's unfinished files. This run published nothing more; run again once "
                     "that writer is done")


def stale_reason(holder: dict | None, mtime: float, now: float) -> str | None:
    """Why a lock is stale, or None while its holder may still be running."""
    if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _alive(holder["pid"]):
        return f"its process {holder['pid']} is gone"
    if now - mtime > STALE_AFTER_S:
        return f"nobody has refreshed it for {(now - mtime) / 60:.0f} minutes (a holder does every {HEARTBEAT_S} s)"
    return None


class Lock:
    """``Lock(out, log).acquire(break_lock)`` ... ``release()``; ``check()`` raises if it was taken away."""

    def __init__(self, out: Path, log):
        self.path = Path(out) / LOCK
        self.log = log
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, break_lock: bool = False) -> "Lock":
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="preprocess-lock")
                self._thread.start()
                return self
            found = _read(self.path)
            if found is None:
                continue  # released between our create and our read: try again
            raw, holder, mtime = found
            why = "--break-lock" if break_lock else stale_reason(holder, mtime, time.time())
            if why is None:
                raise LockError(f"{self.path.parent} is being written by another preprocessing run: "
                                f"{_describe(holder, self.path)}. Wait for it to finish; if it is gone, "
                                "rerun with --break-lock")
            if self._remove(raw):
                self.log(f"removed the lock of {_describe(holder, self.path)}: {why}")
        raise LockError(f"{self.path}: could not take the lock after 5 tries (other writers keep taking it)")

    def _create(self) -> bool:
        now = time.time()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                  "started_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                  "token": self.token}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False  # a folder there too: _read says so
        except PermissionError as e:
            raise LockError(f"{self.path}: cannot create the lock file ({e.strerror}); OUT must be "
                            "writable by this user") from e
        try:
            os.write(fd, json.dumps(holder).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _remove(self, raw: bytes) -> bool:
        """Remove the lock if it still holds ``raw``; True if it did."""
        breaker = self.path.with_name(LOCK + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if breaker.is_dir():
                raise _not_a_file(breaker) from None
            with contextlib.suppress(FileNotFoundError):   # the other breaker finished meanwhile
                if time.time() - breaker.stat().st_mtime > BREAKER_STALE_S:
                    breaker.unlink(missing_ok=True)  # its writer was killed while breaking a lock
            time.sleep(0.05)
            return False
        try:
            found = _read(self.path)
            if found is None or found[0] != raw:
                return False  # someone else replaced it meanwhile: judge the new lock afresh
            self.path.unlink()
            return True
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def _mine(self) -> bool:
        found = _read(self.path)
        return found is not None and found[1] is not None and found[1].get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._mine():
                return  # taken away: check() reports it before anything is published
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return  # removed between the two calls: the same, check() reports it

    def check(self) -> None:
        """Raise if the lock is no longer ours (broken by --break-lock or judged stale elsewhere)."""
        if not self._mine():
            raise lost(self.path.parent)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._mine():
            self.path.unlink(missing_ok=True)
