"""The exclusive lock a build holds beside ``--out`` (``.<name>.lock``) for its whole run."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(out_dir: Path, progress: bool):
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``out_dir`` for the whole build: a second build into the same
    folder waits here (saying so) instead of sharing the staging folder.

    The lock file exists only while a build holds or waits for it, so nothing is left beside ``--out``: the holder
    removes it before unlocking, and a build that was waiting and then holds the lock of a removed file opens the
    name again (the lock is the one on the file the name points to). Folders above ``--out`` that this call created
    are removed again when the build fails and they are still empty."""
    created = _missing_folders(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    succeeded = False
    try:
        lock = _acquire(lock_path, out_dir, progress)
        try:
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            yield
            succeeded = True
        finally:
            lock_path.unlink(missing_ok=True)  # still holding it: a waiter finds its file gone and opens the name again
            lock.close()  # unlocks
    finally:
        if not succeeded:
            for folder in created:  # deepest first; one that is not empty (another build's) stays
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _acquire(lock_path: Path, out_dir: Path, progress: bool):
    """The open lock file ``lock_path``, exclusively locked, and still the file that name points to."""
    while True:
        lock = open(lock_path, "a+")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                if progress:
                    print(f"waiting for the build already running into {out_dir} ({holder}) ...", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _is_same_file(lock, lock_path):
                lock.seek(0)
                lock.truncate()
                return lock
        except BaseException:
            lock.close()
            raise
        lock.close()  # the build that held it removed the file meanwhile: lock the one the name points to now


def _is_same_file(opened, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(opened.fileno())
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing
