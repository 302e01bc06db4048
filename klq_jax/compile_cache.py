"""XLA's persistent compilation cache for training runs: a run started again (a resume after a kill, the same
config once more, another seed) loads its compiled programs instead of compiling them.

SmolLM2-135M's programs take ~17 s to compile on a 2-core CPU (the update 8 s, the two rollout loops 3-4 s each,
the reference 1.3 s) and ~39 s on an H200 (docs/performance.md, item 52); read back they load in well under a
second. JAX's key for an entry covers the program, the compile options, jaxlib and the backend, but not the
CPU's instruction set, for which XLA:CPU compiles: so the cache is one folder per machine kind (the backend and
device kind, and on CPU the model name and feature flags), and a home directory shared by different machines
never hands one machine another's code. JAX writes an entry only for a program that took at least
`jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile. It writes an entry in place, so a run
killed mid-write leaves a truncated one, which JAX reads as a miss (with a warning) at every later run and never
replaces: `enable` removes such entries first (`drop_unfinished_entries`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax

from klq_jax.models.cache import cache_root

MAX_BYTES = 4 * 2**30  # beyond it JAX evicts the least recently used entries


def machine_kind(backend: str, device_kind: str, cpuinfo: str = "") -> str:
    """A folder name for the compiled code of one kind of machine: `cpu-<hash of the CPU's model and flags>` or
    `<backend>-<device kind>` (e.g. `gpu-nvidia-h200`)."""
    if backend == "cpu":
        lines = [line for line in cpuinfo.splitlines()
                 if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        ident = "\n".join(sorted(set(lines))) or "unknown"
        return "cpu-" + hashlib.sha256(ident.encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in device_kind.lower()).strip("-")
    return f"{backend}-{slug or 'device'}"


def _this_machine_kind() -> str:
    cpuinfo = ""
    if jax.default_backend() == "cpu":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            pass
    return machine_kind(jax.default_backend(), jax.devices()[0].device_kind, cpuinfo)


def drop_unfinished_entries(folder: Path) -> list[str]:
    """Removes the entries of `folder` whose write was cut short; returns their keys.

    With eviction on (a size limit, as `enable` sets) JAX writes an entry's bytes and then its access-time file,
    both under the folder's lock, so an entry without its access-time file is an unfinished write. The scan holds
    the same lock, so it never sees a write in progress. Does nothing if this JAX names its files otherwise."""
    try:
        import filelock
        from jax._src import lru_cache

        cache_suffix, atime_suffix = lru_cache._CACHE_SUFFIX, lru_cache._ATIME_SUFFIX
    except (ImportError, AttributeError):
        return []
    dropped = []
    try:
        with filelock.FileLock(folder / ".lockfile", timeout=10):
            for entry in folder.glob(f"*{cache_suffix}"):
                key = entry.name[: -len(cache_suffix)]
                if not (folder / f"{key}{atime_suffix}").exists():
                    entry.unlink(missing_ok=True)
                    dropped.append(key)
    except filelock.Timeout:  # another run holds it long: leave the folder to JAX
        return []
    return dropped


def enable(setting: str) -> Path | None:
    """Points JAX's persistent compilation cache at `setting`'s folder (config `compile_cache`) and returns it.

    "auto": `<cache_root>/xla/<machine kind>`; a path: `<path>/<machine kind>`; "" (or "off"): no cache. A cache
    the user set for JAX itself (`JAX_COMPILATION_CACHE_DIR`) is left as it is. Call before anything compiles.
    Raises ValueError naming the folder when an explicit one cannot be made; with "auto" an unwritable cache
    root only turns the cache off."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if setting in ("", "off"):
        return None
    base = cache_root() / "xla" if setting == "auto" else Path(setting).expanduser()
    folder = base / _this_machine_kind()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as err:
        if setting == "auto":
            return None
        raise ValueError(f"compile_cache={setting!r}: cannot use {folder} ({err.strerror or err}); accepted: a "
                         "writable folder, 'auto' or '' (off)") from None
    drop_unfinished_entries(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
