"""What the machine's matmuls are fast at, for the settings whose best value depends on it (`"auto"`)."""

from __future__ import annotations

import functools

import jax


def cpu_flags(cpuinfo: str) -> set[str]:
    """The first core's feature flags in a Linux `/proc/cpuinfo` text ("flags" on x86, "Features" on Arm)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def bf16_matmul_is_fast(backend: str, flags: set[str]) -> bool:
    """Whether bf16 x bf16 -> fp32 matmuls beat fp32 ones on this backend.

    GPUs and TPUs: yes (their matrix units take bf16). XLA:CPU: only with AVX-512 BF16 (`avx512_bf16`). With
    bf16 operands the bf16-stored reward model scored in 0.53x the time on a Zen 5 VM (AVX-512 BF16); on a Zen 3
    VM (AVX2 only, XLA's bf16 2048^3 matmul at 0.69-0.73x its fp32 GFLOP/s) the reward phase took 1.56x TRL's
    with them, 1.01x with fp32 ones (`benchmarks/iteration.py`; docs/performance.md, items 26 and 27). Other
    CPUs (Arm's bf16 extension included) are not measured: fp32.
    """
    if backend != "cpu":
        return True
    return "avx512_bf16" in flags


@functools.lru_cache(maxsize=None)
def this_cpu_flags() -> frozenset[str]:
    """`cpu_flags` of this machine's `/proc/cpuinfo`; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(cpu_flags(f.read()))
    except OSError:
        return frozenset()


@functools.lru_cache(maxsize=None)
def this_bf16_matmul_is_fast() -> bool:
    """`bf16_matmul_is_fast` for the default JAX backend and, on CPU, this machine's flags (none off Linux: fp32)."""
    return bf16_matmul_is_fast(jax.default_backend(), set(this_cpu_flags()))
