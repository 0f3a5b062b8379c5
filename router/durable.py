"""Small helpers for writing files that survive a crash.

Every step of writing a stored body goes through these functions (and nothing else), so that a
test can watch or fail each one (``tests/test_spool.py``).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create(path: Path) -> int:
    """A new file only its owner may read (0600), opened for writing; never an existing one."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def fsync(fd: int) -> None:
    """Make a file's data durable."""
    os.fsync(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, without waiting (Linux starts the
    writeback of dirty pages for ``POSIX_FADV_DONTNEED``), so that the ``fsync`` at the end
    waits for the last few pieces only, not for a whole 200 MiB file. Advice only: ignored
    where not supported."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def rename(source: Path, target: Path) -> None:
    """Rename within a folder (atomic); durable only once the folder is fsync'd."""
    os.rename(source, target)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a file just created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0700, fsyncing the parent of every folder it creates: a file made
    durable inside a new folder is lost in a crash if the folder's own entry is not on disk."""
    if path.is_dir():
        return
    if not path.parent.exists():  # (a file there: mkdir below says "Not a directory")
        make_dirs(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        # Made meanwhile by another thread, which may not have fsync'd the parent yet.
    fsync_dir(path.parent)
