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


GUARD_CHILD = """
import ctypes, ctypes.util
from klq_jax.allocator import HeapGrowthGuard, keep_freed_memory, release_freed_memory, resident_bytes
assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
MiB = 2**20
def touched_block(size):
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)
    return block
guard = HeapGrowthGuard(slack_bytes=64 * MiB)
first = guard.after_iteration()                    # nothing to compare with yet
a = touched_block(256 * MiB)
pin = libc.malloc(ctypes.c_size_t(64))             # a small live block after it: the top cannot shrink
libc.free(ctypes.c_void_p(a))
kept = resident_bytes()                            # the freed 256 MiB are still resident
grew = guard.after_iteration()                     # grew by 256 MiB > slack: hands them back
released = resident_bytes()
steady = guard.after_iteration()                   # no growth since: nothing to do
print(first, grew, steady, (kept - released) // MiB)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_growth_guard_hands_back_freed_memory_only_after_growth():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", GUARD_CHILD], capture_output=True, text=True, env=env, check=True)
    first, grew, steady, released_mib = out.stdout.split()
    assert (first, grew, steady) == ("False", "True", "False")
    assert int(released_mib) > 200, released_mib   # the freed block's pages left the RSS


HUGE_PAGES_CHILD = """
import ctypes, ctypes.util, os, resource, sys, threading
from klq_jax.allocator import keep_freed_memory, restart_with_huge_pages
print("start", os.getpid(), flush=True)
restart_with_huge_pages([__file__])                # as `klq_jax.main` does first
keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
faults = []
def worker():                                      # as XLA:CPU's threads: a thread arena, so glibc maps the block
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(ctypes.c_size_t(256 * 2**20))
    ctypes.memset(block, 1, 256 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=worker)
thread.start()
thread.join()
print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), "faults", faults[0])
"""


def _transparent_huge_pages() -> str:
    """The kernel's THP mode (always, madvise, never; '' where unknown)."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                    reason="glibc's tunables on Linux")
@pytest.mark.parametrize("malloc", ["huge pages", "default"])
def test_restart_with_huge_pages(tmp_path, malloc):
    """`restart_with_huge_pages` re-runs the process once (same PID) with glibc's THP tunable added to the ones set;
    a 256 MiB block a worker thread touches then faults in 2 MiB pages (where the kernel's THP is on): under 1/2 of
    the 65536 faults of 4 KiB pages (~128 on an idle machine). `KLQ_JAX_MALLOC=default`: no restart, 4 KiB pages."""
    script = tmp_path / "child.py"
    script.write_text(HUGE_PAGES_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO), GLIBC_TUNABLES="glibc.malloc.check=0")
    if malloc == "default":
        env["KLQ_JAX_MALLOC"] = "default"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    starts = [line for line in out.stdout.splitlines() if line.startswith("start")]
    _, tunables, _, faults = out.stdout.splitlines()[-1].split()
    if malloc == "default":
        assert len(starts) == 1 and tunables == "glibc.malloc.check=0" and int(faults) > 60000, out.stdout
        return
    assert len(starts) == 2 and starts[0] == starts[1], out.stdout  # restarted once, in place
    assert tunables == "glibc.malloc.check=0:glibc.malloc.hugetlb=1", tunables
    if _transparent_huge_pages() in ("always", "madvise"):
        assert int(faults) < 65536 // 2, faults
    else:
        assert int(faults) > 60000, faults
