"""klq_jax.allocator: with `keep_freed_memory()` a freed large block is reused without page faults (the
cost XLA:CPU's per-call temporaries paid at every update); without it glibc unmaps it and the next block of
that size faults in again."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import ctypes, ctypes.util, resource
from klq_jax.allocator import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20
def touched_block():
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)                  # write every page, as a program's temporaries are
    return block
libc.free(ctypes.c_void_p(touched_block()))        # 256 MiB, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touched_block()                                    # the same size again
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _run({})
    assert applied and faults < 1000, faults                       # reused: no page of 65536 faults again
    applied, faults = _run({"KLQ_JAX_MALLOC": "default"})
    assert not applied and faults > 60000, faults                  # unmapped and faulted in again
