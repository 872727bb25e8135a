"""Small POSIX file helpers shared by the WAL and the snapshot store.

Owns the durability primitives (complete writes, directory fsync, forensic copies)
so that both stores get them right the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

Syncer = Callable[[int], None]
"""Makes a file descriptor's data durable (`os.fdatasync`, `os.fsync`, or a test double)."""


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Writes every byte of `data`; os.write may legitimately write fewer."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Makes file creations, renames and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(directory: Path) -> None:
    """Creates `directory` (and parents) and makes its entry durable in the parent."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fsync_dir(directory.parent)


def write_durable_file(path: Path, parts: Sequence[bytes], syncer: Syncer) -> None:
    """Creates `path` with `parts`, one after the other (so a large file need not be
    joined first), and syncs it; the caller fsyncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for part in parts:
            write_all(fd, part)
        syncer(fd)
    finally:
        os.close(fd)


def unused_path(path: Path) -> Path:
    """`path` itself if free, else `path.1`, `path.2`...; never overwrites evidence."""
    if not path.exists():
        return path
    n = 1
    while True:
        candidate = path.with_name(f"{path.name}.{n}")
        if not candidate.exists():
            return candidate
        n += 1
