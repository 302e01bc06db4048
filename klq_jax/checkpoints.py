"""Run checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`, and a kill-and-resume
test helper.

A checkpoint is one orbax step directory `<workdir>/checkpoints/<step>/` with two items:

- ``state``: the train state pytree (`TrainState`: params incl. the value head, optimizer state,
  step, kl coef), saved with `ocp.args.StandardSave` and restored with `ocp.args.StandardRestore`
  into the abstract state the caller gives (`jax.ShapeDtypeStruct` leaves with shardings), so a
  sharded run restores straight into its own layout.
- ``meta``: JSON (`ocp.args.JsonSave`): the iteration, the data-stream state (`PromptStream.state()`),
  the RNG key data (`jax.random.key_data`, uint32) with its implementation name, a config
  fingerprint (the flattened config) and free-form extras.

The step number is the number of completed iterations: after iteration ``it`` (0-based) the loop
calls ``save(it + 1, ...)``, and a restored ``meta.iteration`` is the iteration to run next.

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp-<time>`` and renamed
when complete, so a process killed mid-write leaves a tmp directory that is never listed as a step
(and is removed when the next manager starts). A step directory that is nonetheless incomplete
(for instance copied by hand, or on a filesystem without atomic rename) fails to restore; it is
then moved aside to ``<step>.corrupt-<time>`` and the previous step is restored.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
CHECKPOINT_SUBDIR = "checkpoints"
META_VERSION = 1
# Config keys (fnmatch patterns on the dotted key, or on its last component) that may change
# between a run and its resumption without making the checkpoints "from a different config".
DEFAULT_FINGERPRINT_IGNORE = (
    "workdir", "num_iterations", "total_iterations", "*_every", "keep_checkpoints", "max_to_keep",
    "progress", "tensorboard", "resume",
)


class CheckpointError(ValueError):
    """A run checkpoint problem: unwritable workdir, a different config, unreadable checkpoints.
    The message is one line."""


# ----------------------------------------------------------------------------------------------------
# Config fingerprint.


def _jsonable(value: Any) -> Any:
    """JSON-friendly copy: numpy/jax scalars and arrays become Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return repr(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(tree, "to_dict") and callable(tree.to_dict):  # ml_collections.ConfigDict
        tree = tree.to_dict()
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: _jsonable(tree)}


def _ignored(key: str, patterns: Iterable[str]) -> bool:
    last = key.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def config_fingerprint(config: Any, ignore: Iterable[str] = DEFAULT_FINGERPRINT_IGNORE) -> dict[str, Any]:
    """`{"hash": sha256, "config": {dotted key: value}}` of a (nested) config mapping or ConfigDict.

    Keys matching `ignore` (fnmatch patterns on the dotted key or its last component) are left out:
    they may change when a run is resumed (the workdir, the number of iterations, logging cadence).
    """
    ignore = tuple(ignore)
    flat = {k: v for k, v in sorted(_flatten(config).items()) if not _ignored(k, ignore)}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    return {"hash": digest, "config": flat}


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints' configs (or exist in only one)."""
    a, b = saved.get("config", {}), current.get("config", {})
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _describe_diff(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str], limit: int = 6) -> str:
    a, b = saved.get("config", {}), current.get("config", {})

    def show(d, k):
        return "(absent)" if k not in d else json.dumps(d[k])[:40]

    parts = [f"{k} ({show(a, k)} -> {show(b, k)})" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# RNG keys in JSON.


def rng_to_json(key: jax.Array) -> dict[str, Any]:
    """A typed key (`jax.random.key`) or a raw uint32 key (`jax.random.PRNGKey`) as JSON."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(key), np.uint32)
        return {"typed": True, "impl": str(jax.random.key_impl(key)), "shape": list(data.shape),
                "data": data.reshape(-1).tolist()}
    data = np.asarray(key, np.uint32)
    return {"typed": False, "impl": None, "shape": list(data.shape), "data": data.reshape(-1).tolist()}


def rng_from_json(d: Mapping[str, Any]) -> jax.Array:
    data = np.asarray(d["data"], np.uint32).reshape(d["shape"])
    if d.get("typed", True):
        return jax.random.wrap_key_data(data, impl=d.get("impl") or None)
    return jax.numpy.asarray(data)


# ----------------------------------------------------------------------------------------------------
# The manager.


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint holds besides the train state.

    iteration: completed iterations (= the step number; the next iteration to run).
    data_state: the prompt stream's `state()` (a dict of ints), or {}.
    rng: the run's RNG key as saved (typed or raw uint32), or None.
    fingerprint: the config fingerprint (see `config_fingerprint`), or None.
    extra: anything else the caller saved (JSON).
    """

    iteration: int
    data_state: dict[str, Any]
    rng: jax.Array | None
    fingerprint: dict[str, Any] | None
    extra: dict[str, Any]


def abstract_state(state: Any) -> Any:
    """`jax.ShapeDtypeStruct` tree (with each leaf's sharding) of a concrete state, for `restore_latest`.

    In a real run, build it without materialising: `jax.eval_shape(init_fn)` plus the shardings from
    the sharding rules (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _check_writable(directory: Path) -> None:
    """Create `directory` (and parents) and write a probe file in it, or raise a one-line error."""
    accepted = "accepted: a directory path this process can create and write to"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CheckpointError(f"workdir {str(directory)!r} exists and is not a directory; {accepted}") from None
    except OSError as e:
        raise CheckpointError(f"workdir {str(directory)!r} is not writable ({e.strerror or _first_line(e)}); "
                              f"{accepted}") from None
    probe = directory / f".write-probe-{os.getpid()}-{jax.process_index()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"workdir {str(directory)!r} is not writable ({e.strerror or _first_line(e)}); "
                              f"{accepted}") from None


class CheckpointManager:
    """Saves every `save_every` iterations, keeps the last `keep`, restores the latest good one.

        ckpt = CheckpointManager(workdir, config=config, save_every=10, keep=3)
        restored = ckpt.restore_latest(abstract_state(state))   # or built with jax.eval_shape
        if restored: state, meta = restored; stream.restore(meta.data_state); rng = meta.rng
        for it in range(start, n):
            ...
            ckpt.save(it + 1, state, data_state=stream.state(), rng=rng)   # saves when due
        ckpt.save(n, state, ..., force=True); ckpt.close()

    `config` (a mapping or ConfigDict) is fingerprinted; a workdir whose checkpoints were written
    with a different config (up to `fingerprint_ignore` keys) raises a one-line `CheckpointError`
    naming the differing keys, at construction. Saving is asynchronous (orbax): `save` returns once
    the arrays are copied off the device; `wait()` or `close()` waits for the write to commit.
    All processes of a multi-host run must call every method (orbax coordinates them).
    """

    def __init__(self, workdir: str | os.PathLike, *, config: Any = None, save_every: int = 1,
                 keep: int | None = 3, async_save: bool = True,
                 fingerprint_ignore: Iterable[str] = DEFAULT_FINGERPRINT_IGNORE,
                 subdir: str = CHECKPOINT_SUBDIR):
        if int(save_every) <= 0:
            raise CheckpointError(f"save_every={save_every!r}; accepted: a positive integer")
        if keep is not None and int(keep) <= 0:
            raise CheckpointError(f"keep={keep!r}; accepted: a positive integer or None (keep all)")
        self.workdir = Path(workdir).expanduser().absolute()
        self.directory = self.workdir / subdir if subdir else self.workdir
        self.save_every = int(save_every)
        self.keep = None if keep is None else int(keep)
        self.fingerprint = None if config is None else config_fingerprint(config, fingerprint_ignore)
        _check_writable(self.workdir)
        _check_writable(self.directory)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(self.save_every),
                policies.PreemptionCheckpointingPolicy(),  # TPU preemption notice: save now
            ]),
            preservation_policy=policies.LatestN(self.keep),
            cleanup_tmp_directories=True,  # leftovers of writes killed mid-way
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, META_ITEM))
        except OSError as e:
            raise CheckpointError(f"workdir {str(self.directory)!r} is not usable for checkpoints "
                                  f"({_first_line(e)})") from None
        # Orbax sweeps leftover tmp folders on a background thread and `close()` does not wait for it:
        # a run that fails fast (bad input) would exit while the sweep still schedules work, and the
        # interpreter's shutdown turns that into a traceback after our one-line error. Wait here.
        wait_for_sweep = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_sweep is not None:
            wait_for_sweep()
        self._check_fingerprint()

    # -- queries

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return list(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, iteration: int) -> bool:
        return self._mngr.should_save(int(iteration))

    # -- saving

    def save(self, iteration: int, state: Any, *, data_state: Mapping[str, Any] | None = None,
             rng: jax.Array | None = None, extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save `state` as step `iteration` (completed iterations) if due (every `save_every`, on a
        preemption notice) or `force`; returns whether a save started. An existing step is never
        overwritten (returns False)."""
        iteration = int(iteration)
        if iteration in self._mngr.all_steps():
            return False
        if not force and not self._mngr.should_save(iteration):
            return False
        meta = {
            "version": META_VERSION,
            "iteration": iteration,
            "data_state": _jsonable(dict(data_state or {})),
            "rng": None if rng is None else rng_to_json(rng),
            "fingerprint": self.fingerprint,
            "extra": _jsonable(dict(extra or {})),
        }
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)})
        try:
            return bool(self._mngr.save(iteration, args=args, force=True))
        except OSError as e:
            raise CheckpointError(f"saving checkpoint {iteration} in {str(self.directory)!r} failed "
                                  f"({_first_line(e)})") from None

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring

    def _read_meta(self, step: int) -> dict[str, Any]:
        out = self._mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        meta = out[META_ITEM]
        if not isinstance(meta, Mapping) or "iteration" not in meta:
            raise ValueError(f"meta item of step {step} is not a klq_jax checkpoint record")
        return dict(meta)

    def _mismatch_error(self, step: int, saved: Mapping[str, Any]) -> CheckpointError:
        keys = fingerprint_diff(saved, self.fingerprint)
        return CheckpointError(
            f"workdir {str(self.workdir)!r} holds checkpoints (step {step}) from a different config; differing "
            f"keys: {_describe_diff(saved, self.fingerprint, keys)}; accepted: the same config, or a new workdir")

    def _check_fingerprint(self) -> None:
        if self.fingerprint is None:
            return
        for step in reversed(self.steps()):
            try:
                meta = self._read_meta(step)
            except Exception:  # unreadable: restore_latest will deal with it
                continue
            saved = meta.get("fingerprint")
            if saved and saved.get("hash") != self.fingerprint["hash"]:
                raise self._mismatch_error(step, saved)
            return

    def _meta_from_record(self, meta: Mapping[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(
            iteration=int(meta["iteration"]),
            data_state=dict(meta.get("data_state") or {}),
            rng=None if meta.get("rng") is None else rng_from_json(meta["rng"]),
            fingerprint=meta.get("fingerprint"),
            extra=dict(meta.get("extra") or {}),
        )

    def restore(self, step: int, abstract: Any) -> tuple[Any, CheckpointMeta]:
        """Restore step `step` into `abstract` (a tree of `jax.ShapeDtypeStruct` with shardings)."""
        meta = self._read_meta(step)
        saved = meta.get("fingerprint")
        if self.fingerprint is not None and saved and saved.get("hash") != self.fingerprint["hash"]:
            raise self._mismatch_error(step, saved)
        out = self._mngr.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}))
        return out[STATE_ITEM], self._meta_from_record(meta)

    def restore_latest(self, abstract: Any) -> tuple[Any, CheckpointMeta] | None:
        """(state, meta) of the newest checkpoint that restores, or None when there is none.

        Incomplete newer steps are moved aside (to `<step>.corrupt-<time>`, with a warning) so the
        resumed run can save those steps again. Raises `CheckpointError` (one line) when the
        checkpoints are from a different config or none of them restores.
        """
        failures: list[tuple[int, BaseException]] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means "not a good step"
                failures.append((step, e))
                continue
            if failures:
                self._quarantine([s for s, _ in failures])
                log.warning("checkpoint steps %s in %s could not be restored (%s); resumed from step %d",
                            [s for s, _ in failures], self.directory, _first_line(failures[0][1]), step)
            return state, meta
        if failures:
            step, e = failures[0]
            raise CheckpointError(
                f"no checkpoint in {str(self.directory)!r} could be restored (latest step {step}: {_first_line(e)}); "
                "accepted: checkpoints written by this code for this model and config, or an empty workdir")
        return None

    def _quarantine(self, steps: Sequence[int]) -> None:
        self.wait()
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = self.directory / str(step)
                if src.exists():
                    src.rename(self.directory / f"{step}.corrupt-{stamp}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("klq_jax_checkpoint_quarantine")
        self._mngr.reload()


def load_raw(workdir: str | os.PathLike, step: int | None = None, *, subdir: str = CHECKPOINT_SUBDIR
             ) -> tuple[Any, dict[str, Any]] | None:
    """(state as nested dicts of numpy arrays, meta record) of a step (default: the latest committed
    one), without a target structure and whatever devices it was saved from; for tests and tools
    that compare runs. None if the workdir has no checkpoint."""
    directory = Path(workdir).expanduser().absolute()
    directory = directory / subdir if subdir else directory
    if not directory.is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)
    if step is None:
        if not steps:
            return None
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"no committed checkpoint step {step} in {str(directory)!r}; "
                              f"accepted: one of {sorted(steps)}")
    state_dir = directory / str(step) / STATE_ITEM
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(state_dir).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(directory / str(step) / META_ITEM, args=ocp.args.JsonRestore())
    return state, dict(meta)


# ----------------------------------------------------------------------------------------------------
# End-to-end kill test helper.


@dataclasses.dataclass
class ProcessRun:
    """Outcome of a subprocess run: `killed` is True when we SIGKILLed it at the matching line."""

    returncode: int | None
    output: str
    killed: bool = False
    matched_line: str | None = None

    def check(self) -> "ProcessRun":
        """Raise if the process was not killed and did not exit 0 (shows the output's tail)."""
        if not self.killed and self.returncode != 0:
            tail = "\n".join(self.output.splitlines()[-40:])
            raise AssertionError(f"process exited with {self.returncode}:\n{tail}")
        return self


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    out["PYTHONUNBUFFERED"] = "1"  # lines reach us as they are printed
    return out


def run_with_kill(cmd: Sequence[str], kill_after_lines_matching: str | None, *, occurrence: int = 1,
                  timeout: float = 300.0, env: Mapping[str, str] | None = None,
                  cwd: str | os.PathLike | None = None, echo: bool = False) -> ProcessRun:
    """Run `cmd` (stdout and stderr merged), SIGKILL its process group right after the
    `occurrence`-th output line matching the regex `kill_after_lines_matching` (None: never kill).

    The child runs with `PYTHONUNBUFFERED=1` in its own session, so the kill reaches any processes it
    spawned and nothing it printed is lost in a buffer. Raises `TimeoutError` (after killing it) if
    the process runs longer than `timeout` seconds.
    """
    pattern = re.compile(kill_after_lines_matching) if kill_after_lines_matching else None
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=_child_env(env), cwd=cwd, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out: list[str] = []
    hits, killed, matched = 0, False, None
    deadline = time.monotonic() + timeout

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                kill()
                proc.wait()
                raise TimeoutError(f"{' '.join(map(str, cmd))} ran past {timeout}s; output tail:\n"
                                   + "".join(out[-20:])) from None
            if line is None:
                break
            out.append(line)
            if echo:
                sys.stdout.write(line)
            if pattern is not None and not killed and pattern.search(line):
                hits += 1
                if hits >= occurrence:
                    kill()
                    killed, matched = True, line.rstrip("\n")
                    break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            kill()
            proc.wait()
    reader.join(timeout=5)
    while not lines.empty():  # whatever was already in the pipe before the kill
        line = lines.get_nowait()
        if line is not None:
            out.append(line)
    return ProcessRun(returncode=proc.returncode, output="".join(out), killed=killed, matched_line=matched)


def kill_and_resume(cmd: Sequence[str], kill_after_lines_matching: str, *, occurrence: int = 1,
                    resume_cmd: Sequence[str] | None = None, timeout: float = 300.0,
                    env: Mapping[str, str] | None = None,
                    cwd: str | os.PathLike | None = None) -> tuple[ProcessRun, ProcessRun]:
    """Run `cmd`, SIGKILL it at the matching line, then run `resume_cmd` (default: `cmd` again) to
    completion. Returns both runs; raises AssertionError if the first was never killed (the pattern
    did not occur) or the second failed. Compare its final state with an uninterrupted run of `cmd`
    in another workdir (for instance with `load_raw`)."""
    first = run_with_kill(cmd, kill_after_lines_matching, occurrence=occurrence, timeout=timeout, env=env, cwd=cwd)
    if not first.killed:
        tail = "\n".join(first.output.splitlines()[-40:])
        raise AssertionError(f"the run ended (exit {first.returncode}) before line {occurrence} matching "
                             f"{kill_after_lines_matching!r}:\n{tail}")
    second = run_with_kill(resume_cmd or cmd, None, timeout=timeout, env=env, cwd=cwd).check()
    return first, second
