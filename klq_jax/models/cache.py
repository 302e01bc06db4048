"""The cache of embedded models (the converted GGUF, the unzipped MiniLM): where it is, and one process at a
time filling a folder of it.

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

CACHE_ENV = "KLQ_JAX_CACHE"

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; the rename still keeps each folder whole
    fcntl = None


def cache_root() -> Path:
    """`$KLQ_JAX_CACHE`, else `$XDG_CACHE_HOME/klq_jax`, else `~/.cache/klq_jax`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "klq_jax"


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
