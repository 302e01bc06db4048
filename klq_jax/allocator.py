"""Host memory allocation for long runs on CPU: keep freed memory mapped instead of giving it back.

XLA:CPU allocates each program's temporaries (for the SmolLM2-135M update: one 1.07 GiB block) with
`malloc` and frees them at the end. glibc serves blocks that large with `mmap` and returns them with
`munmap`, so every call faults the whole block in again and the kernel zeroes every page: 280k page
faults and, when other work ran in between (the RL loop's sampling, reward and reference phases), ~1 s of
kernel CPU time in `clear_page` per update. With arenas that keep what is freed (no mmap for large
blocks, no trimming), later calls reuse the same pages: 0 faults, and the update of one iteration takes
4.0-4.2 s instead of 4.7-5.3 s on a 2-core CPU. The process's RSS then stays at its high-water mark
between phases (the peak itself is the same program's).

glibc's per-thread arenas stay: with one arena for all threads (`M_ARENA_MAX=1`, this module's setting until
stop 19) XLA:CPU's worker threads queue on its lock for the small blocks each thunk allocates, and a bf16
decode step of SmolLM2-135M took 36 ms instead of 30 (7% of its CPU in `_int_malloc`), at a higher peak.

`keep_freed_memory()` sets this with `mallopt` (glibc only; elsewhere it does nothing). Call it before
JAX starts its threads, as `klq_jax.main` does. `KLQ_JAX_MALLOC=default` in the environment turns it off.

Blocks larger than a thread arena's heap (64 MiB) that XLA:CPU's worker threads allocate are mapped and unmapped
by glibc whatever the settings above (a thread arena cannot hold them): the SmolLM2 rollout's 0.48 GiB of temporaries
and its 0.24 GiB recording buffer, faulted in page by page at every rollout (185k page faults, 0.37 s of kernel CPU
time). One arena for all threads would keep them, at 0.3 GiB more peak RSS (stop 36). `restart_with_huge_pages()`
re-runs the process with glibc's malloc asking for transparent huge pages (`glibc.malloc.hugetlb=1`, read at
start-up only) instead: each 2 MiB page faults once, ~1.5k faults per rollout, and the 8 x 128-token iteration was
0.1 s faster at the same peak. `klq_jax.main` calls it first; where the kernel's huge pages are off (`never`), it
changes nothing.

What one-off work frees (checkpoint conversion at start-up, XLA's compilation of each program in the first
iteration) would then stay resident for the whole run, under the later phases' buffers. `release_freed_memory()`
(`malloc_trim`) hands those pages back; the trainer calls it after building and after each phase of the first
iteration, and `HeapGrowthGuard` after any later iteration that grew the process (which includes one that touched
again what the previous release handed back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # madvise(MADV_HUGEPAGE) on malloc's heap and mapped blocks
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_NEVER = 2**31 - 1  # bytes: larger than any block; mallopt takes an int


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """malloc arenas that keep freed memory (no mmap, no trim); returns whether it was applied."""
    libc = _glibc()
    if os.environ.get("KLQ_JAX_MALLOC") == "default" or libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, _NEVER), (_M_TRIM_THRESHOLD, _NEVER))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def environ_with_huge_pages(environ=None) -> dict[str, str] | None:
    """A copy of `environ` (default `os.environ`) whose glibc malloc asks for transparent huge pages
    (`HUGE_PAGES_TUNABLE` added to `GLIBC_TUNABLES`), or None where there is nothing to add: the tunable already
    set (to any value), `KLQ_JAX_MALLOC=default`, or not glibc on Linux."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("KLQ_JAX_MALLOC") == "default" or not sys.platform.startswith("linux") or _glibc() is None
            or "glibc.malloc.hugetlb=" in tunables):
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return environ


def restart_with_huge_pages(argv: list[str]) -> None:
    """Replaces this process (`os.execve`, same PID) with `python *argv` under `environ_with_huge_pages()`;
    returns where that is None (so the restarted process goes on). Call it first, before any thread starts."""
    environ = environ_with_huge_pages()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], environ)


def release_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the OS (`malloc_trim(0)`, glibc); returns whether it ran.
    Later allocations fault them in again: call it after one-off work, not in a loop."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident set size (bytes), from /proc/self/statm; 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapGrowthGuard:
    """Hands freed memory back after an iteration that grew the process, and only then.

    With freed memory kept, a small allocation that lands inside a large freed block splits it; the next
    program that needs the whole block then gets one at the top of the heap while the old pages stay
    resident, and the RSS creeps up from one iteration to the next (SmolLM2 benchmark, 6 iterations: peak
    4.48 GiB without this guard, 3.75 with it; 10 iterations: 3.78 and 4.23). `after_iteration()` compares the
    RSS with the previous iteration's end and calls `release_freed_memory()` when it grew by more than
    `slack_bytes`: iterations that reuse their blocks pay nothing, one that grew pays a page fault per released
    page it touches again.

    The previous end is measured after that iteration's release, so an iteration whose blocks were handed back
    and are touched again counts as growth too. In the trainer (SmolLM2, bf16 matmuls) the update's block is one,
    and the guard releases after every iteration. Comparing with the end before the release instead (measured
    with XLA's programs run on the calling thread) left the steady state without page faults, but made no
    iteration faster and raised the peak by 0.07 GiB (docs/performance.md, stop 26), so the release stays.
    """

    def __init__(self, slack_bytes: int = 64 * 2**20):
        self.slack_bytes = slack_bytes
        self.last_bytes: int | None = None

    def after_iteration(self) -> bool:
        now = resident_bytes()
        grew = self.last_bytes is not None and now > self.last_bytes + self.slack_bytes
        if grew:
            release_freed_memory()
        self.last_bytes = resident_bytes()
        return grew
