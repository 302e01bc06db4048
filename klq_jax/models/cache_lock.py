"""One process at a time fills a cache folder (the converted GGUF, the unzipped MiniLM).

Each fill builds its folder aside and renames it into place, so no reader ever sees half a folder. Without a
lock, two processes that both find the folder missing (two test workers, two hosts of a run on a shared home)
both build it, and the later one swaps its copy in under a process already reading the first. Holding this
lock, the later one waits, then finds the folder current and keeps it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; the rename still keeps each folder whole
    fcntl = None


@contextlib.contextmanager
def filling(folder: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `.<name>.lock` beside `folder` for the block."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, also if the process dies
        yield
    finally:
        os.close(fd)
