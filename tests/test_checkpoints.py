"""Run checkpoints: round trip into abstract (sharded) shapes, retention, interrupted writes skipped,
config-fingerprint mismatch and unwritable-workdir errors, and a real SIGKILL-and-resume run."""

import shutil
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from klq_jax.checkpoints import (CheckpointError, CheckpointManager, abstract_state, config_fingerprint,
                                 kill_and_resume, load_raw, run_with_kill)
from klq_jax.rl.train_step import TrainState

CONFIG = {"algo": {"algo": "klq", "kl_coef": 0.05}, "optim": {"learning_rate": 1e-5}, "num_iterations": 10,
          "model": "embedded"}


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 6)))
        self.value_w_d = nnx.Param(jax.random.normal(rngs.params(), (4,)))


def _state(seed=0):
    params = nnx.state(Tiny(nnx.Rngs(seed)), nnx.Param)
    opt = optax.adam(1e-2)
    state = TrainState.create(params, opt, 0.05)
    grads = jax.tree.map(jnp.ones_like, params)  # a non-trivial optimizer state
    updates, opt_state = opt.update(grads, state.opt_state, params)
    return state.replace(params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=jnp.int32(7), kl_coef=jnp.float32(0.123))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip(tmp_path):
    state = _state()
    rng = jax.random.fold_in(jax.random.key(3), 5)
    with CheckpointManager(tmp_path, config=CONFIG, save_every=1, keep=2) as ckpt:
        assert ckpt.restore_latest(abstract_state(state)) is None
        assert ckpt.save(4, state, data_state={"epoch": 1, "position": 3}, rng=rng, extra={"note": "x"})
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        restored, meta = ckpt.restore_latest(abstract_state(_state(seed=1)))
    assert isinstance(restored, TrainState)
    _assert_trees_equal(restored, state)
    assert meta.iteration == 4 and meta.data_state == {"epoch": 1, "position": 3} and meta.extra == {"note": "x"}
    np.testing.assert_array_equal(jax.random.key_data(meta.rng), jax.random.key_data(rng))
    assert meta.fingerprint["hash"] == config_fingerprint(CONFIG)["hash"]
    raw_state, raw_meta = load_raw(tmp_path)
    np.testing.assert_array_equal(raw_state["params"]["w"]["value"], state.params["w"][...])
    assert raw_meta["iteration"] == 4


def test_restore_into_given_sharding(tmp_path):
    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    state = {"w": jax.device_put(jnp.arange(8.0), sharding), "rng_raw": jax.random.PRNGKey(1)}
    with CheckpointManager(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, rng=jax.random.PRNGKey(9))
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding),
              "rng_raw": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    with CheckpointManager(tmp_path) as ckpt:
        restored, meta = ckpt.restore_latest(target)
    assert restored["w"].sharding == sharding
    _assert_trees_equal(restored, state)
    np.testing.assert_array_equal(meta.rng, jax.random.PRNGKey(9))  # raw uint32 keys too


def test_save_every_and_retention(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [it for it in range(1, 8) if ckpt.save(it, state)]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, force=True)  # the final step, off the interval
        assert not ckpt.save(7, state, force=True)  # never overwrites
        ckpt.wait()
        assert ckpt.steps() == [6, 7]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "7"]


def test_interrupted_writes_are_skipped(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, config=CONFIG, save_every=1, keep=5) as ckpt:
        ckpt.save(1, state, data_state={"position": 1})
        ckpt.save(2, state.replace(step=jnp.int32(2)), data_state={"position": 2})
    root = tmp_path / "checkpoints"
    # A write killed mid-way leaves orbax's tmp directory (never listed, removed on the next start) ...
    shutil.copytree(root / "2", root / "3.orbax-checkpoint-tmp")
    (root / "3.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
    # ... and a step directory that is there but incomplete (its arrays missing) is skipped.
    shutil.copytree(root / "2", root / "4")
    shutil.rmtree(root / "4" / "state")
    (root / "4" / "state").mkdir()
    with CheckpointManager(tmp_path, config=CONFIG, save_every=1, keep=5) as ckpt:
        assert 3 not in ckpt.steps()
        restored, meta = ckpt.restore_latest(abstract_state(state))
        assert meta.iteration == 2 and meta.data_state == {"position": 2} and int(restored.step) == 2
        assert ckpt.steps() == [1, 2]
        assert len(list(root.glob("4.corrupt-*"))) == 1  # moved aside, not deleted
        # The resumed run saves steps 3 and 4 again.
        assert ckpt.save(3, restored) and ckpt.save(4, restored)
        ckpt.wait()
        assert ckpt.steps() == [1, 2, 3, 4]
    assert not list(root.glob("*.orbax-checkpoint-tmp*"))  # the leftover was cleaned up


def test_no_restorable_checkpoint_is_one_line_error_and_keeps_files(tmp_path):
    with CheckpointManager(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)})
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint .* could be restored") as e:
            ckpt.restore_latest({"other": jax.ShapeDtypeStruct((3,), jnp.float32)})
        assert "\n" not in str(e.value)
        assert ckpt.steps() == [1]


def test_fingerprint_mismatch_names_keys(tmp_path):
    with CheckpointManager(tmp_path, config=CONFIG, save_every=1) as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)})
    other = {**CONFIG, "algo": {"algo": "ppo", "kl_coef": 0.05}, "optim": {"learning_rate": 3e-5}, "seed": 1}
    with pytest.raises(CheckpointError, match="different config") as e:
        CheckpointManager(tmp_path, config=other)
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("algo.algo", "optim.learning_rate", "seed"):
        assert key in msg
    assert "kl_coef" not in msg and "model" not in msg
    # Keys that may change on resume (more iterations, another workdir) are not part of it.
    CheckpointManager(tmp_path, config={**CONFIG, "num_iterations": 20, "workdir": "/elsewhere"}).close()


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for workdir in (blocker / "run", blocker):  # works as root too, unlike chmod
        with pytest.raises(CheckpointError, match="workdir") as e:
            CheckpointManager(workdir)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="save_every"):
        CheckpointManager(tmp_path / "ok", save_every=0)


# ----------------------------------------------------------------------------------------------------
# SIGKILL and resume, end to end in subprocesses, on 4 fake CPU devices with sharded state.

TRAINER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from klq_jax.checkpoints import CheckpointManager, abstract_state

    workdir, n = sys.argv[1], int(sys.argv[2])
    mesh = jax.make_mesh((4,), ("data",))
    row = NamedSharding(mesh, P("data"))
    state = {"params": {"w": jax.device_put(jnp.zeros((8, 3)), row),
                        "big": jax.device_put(jnp.zeros((4, 65536)), row)},
             "step": jax.device_put(jnp.int32(0), NamedSharding(mesh, P()))}
    ckpt = CheckpointManager(workdir, config={"lr": 0.1, "num_iterations": n}, save_every=2, keep=2)
    start, rng, data = 0, jax.random.key(0), {"epoch": 0, "position": 0}
    restored = ckpt.restore_latest(abstract_state(state))
    if restored is not None:
        state, meta = restored
        start, rng, data = meta.iteration, meta.rng, meta.data_state
        assert state["params"]["w"].sharding == row
        print("resumed from", start, flush=True)

    @jax.jit
    def update(state, key):
        noise = jax.random.normal(key, state["params"]["w"].shape)
        w = state["params"]["w"] * 0.9 + noise
        return {"params": {"w": w, "big": state["params"]["big"] + w.sum()}, "step": state["step"] + 1}

    for it in range(start, n):
        rng, key = jax.random.split(rng)
        state = update(state, key)
        data = {"epoch": data["epoch"], "position": data["position"] + 1}
        if ckpt.save(it + 1, state, data_state=data, rng=rng):
            print("saving", it + 1, flush=True)
        print("iteration", it, "done", flush=True)
    ckpt.save(n, state, data_state=data, rng=rng, force=True)
    ckpt.close()
    print("finished", flush=True)
""")


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(__import__("os").environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    n = 7
    full = run_with_kill([sys.executable, str(script), str(tmp_path / "full"), str(n)], None, env=env,
                         timeout=120).check()
    assert "finished" in full.output and not full.killed
    # Killed right after the asynchronous save of step 4 started, usually mid-write (then a tmp dir
    # is left behind and step 2 is the latest committed one).
    cmd = [sys.executable, str(script), str(tmp_path / "killed"), str(n)]
    first = run_with_kill(cmd, r"^iteration 3 done", env=env, timeout=120)
    assert first.killed and first.returncode == -9 and "finished" not in first.output
    committed = ocp.utils.checkpoint_steps(tmp_path / "killed" / "checkpoints")
    assert max(committed) in (2, 4)
    second = run_with_kill(cmd, None, env=env, timeout=120).check()
    assert f"resumed from {max(committed)}\n" in second.output and "finished" in second.output
    a, meta_a = load_raw(tmp_path / "full")
    b, meta_b = load_raw(tmp_path / "killed")
    _assert_trees_equal(a, b)
    assert meta_a["iteration"] == meta_b["iteration"] == n
    assert meta_a["data_state"] == meta_b["data_state"] == {"epoch": 0, "position": n}
    assert meta_a["rng"] == meta_b["rng"]


def test_run_with_kill_stops_at_the_match(tmp_path):
    script = tmp_path / "count.py"
    script.write_text("import time\nfor i in range(100):\n    print('line', i)\n    time.sleep(0.01)\n")
    run = run_with_kill([sys.executable, str(script)], r"line 1\d$", occurrence=2)
    assert run.killed and run.matched_line == "line 11"
    assert "line 50" not in run.output
    run = run_with_kill([sys.executable, str(script)], r"never")
    assert not run.killed and run.returncode == 0 and "line 99" in run.output
    first, second = kill_and_resume([sys.executable, str(script)], r"^line 5$")
    assert first.killed and "line 60" not in first.output and second.returncode == 0 and "line 99" in second.output
    with pytest.raises(AssertionError, match="before line 1"):
        kill_and_resume([sys.executable, "-c", "print('hi')"], r"never")
