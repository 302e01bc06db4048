"""The per-device memory estimate (klq_jax.memory): exact for parameters and optimiser state (checked
against arrays placed on 8 fake CPU devices), close to XLA's compiled temporaries for the update, the
forward and the sampler (float32, where XLA:CPU's numbers are representative), and the scale configs fit
their machines with the documented figures. Run as a script, this file is the 8-device subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# (preset, workload, mesh): small enough to compile in seconds, big enough that activations dominate.
CASES = [
    ("pythia-160m", dict(batch_size=16, prompt_len=256, response_len=53, num_minibatches=2), (1, 8, 1)),
    ("smollm2-135m", dict(batch_size=16, prompt_len=128, response_len=64, num_minibatches=2), (2, 2, 2)),
]


def _env(devices: int) -> dict:
    # Fast compilation: LLVM's effort changes code speed, not XLA's buffer sizes (the same numbers, half the time).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def checks() -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from klq_jax import memory, sharding
    from klq_jax.models.transformer import CausalLM
    from klq_jax.rl.train_step import TrainState, default_optim_config, make_optimizer

    out: dict = {}
    # Parameters and optimiser state really placed: device 0's bytes equal the estimate.
    cfg = memory.PRESETS["tiny"]
    mesh = sharding.make_mesh((2, 2, 2))
    _, params = nnx.split(CausalLM(cfg, value_head=True, rngs=nnx.Rngs(0)))
    _, ref = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(1)))
    state = sharding.place_state(TrainState.create(params, make_optimizer(default_optim_config()), 0.1), mesh)
    ref = sharding.place_state(ref, mesh)
    dev0 = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev0)

    est = memory.estimate(cfg, memory.Workload(batch_size=16, prompt_len=32, response_len=16), mesh)
    out["placed"] = {"state": on_dev0(state), "ref": on_dev0(ref), "est_state": est.params + est.optimizer + 8,
                     "est_ref": est.reference,
                     "unsharded": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))}
    for name, work, shape in CASES:
        w = memory.Workload(**work)
        e = memory.estimate(memory.PRESETS[name], w, shape)
        m = memory.measure(memory.PRESETS[name], w, sharding.make_mesh(shape))
        out[f"{name}/{shape}"] = {"estimate": e.as_dict(), "measured": m}
    return out


@pytest.fixture(scope="module")
def fake_devices():
    proc = subprocess.run([sys.executable, __file__, "checks"], capture_output=True, text=True, env=_env(8),
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parameters_and_optimizer_state_are_exact(fake_devices):
    r = fake_devices["placed"]
    assert r["state"] == r["est_state"] and r["ref"] == r["est_ref"], r
    assert r["state"] < r["unsharded"] / 3  # really sharded (fsdp x tensor = 4 ways for the matrices)


@pytest.mark.parametrize("case", [f"{name}/{shape}" for name, _, shape in CASES])
def test_estimate_tracks_compiled_temporaries(fake_devices, case):
    est, meas = fake_devices[case]["estimate"], fake_devices[case]["measured"]
    resident = est["params"] + est["optimizer"] + est["batch"] + 8
    assert abs(meas["resident"] - resident) <= 64, (meas["resident"], resident)
    state_bytes = est["params"] + est["optimizer"] + 8
    assert state_bytes < meas["update/arguments"] <= meas["resident"]  # the update takes the state and a minibatch
    for phase in ("update", "forward", "sample"):
        ratio = est[phase] / meas[f"{phase}/temps"]
        assert 0.85 <= ratio <= 1.35, (phase, est[phase], meas[f"{phase}/temps"], ratio)


# ----------------------------------------------------------------------------- in-process


def test_estimate_scales_with_the_mesh():
    from klq_jax import memory

    cfg = memory.PRESETS["pythia-1b"]
    work = memory.Workload(batch_size=64, prompt_len=512, response_len=53, num_minibatches=4)
    one = memory.estimate(cfg, work, (1, 1, 1))
    fsdp = memory.estimate(cfg, work, (1, 8, 1))
    data = memory.estimate(cfg, work, (8, 1, 1))
    n = cfg.num_params()
    assert 4 * n <= one.params <= 4.004 * n  # (ModelConfig.num_params omits biases)
    assert 0 <= one.optimizer - 1.5 * one.params <= 16  # mu (bf16, the default), nu (fp32) and step counters
    assert fsdp.params < one.params / 7 and data.params == one.params   # FSDP shards, pure DP replicates
    assert fsdp.activations < one.activations and data.kv_cache == fsdp.kv_cache == one.kv_cache / 8
    remat = memory.estimate(cfg, memory.Workload(**{**work.__dict__, "remat": "full"}), (1, 8, 1))
    assert remat.activations < fsdp.activations / 3


def test_cli_prints_a_table_and_json():
    proc = subprocess.run([sys.executable, "-m", "klq_jax.memory", "--model", "pythia-1b", "--batch", "64",
                           "--mesh", "1,-1,1", "--devices", "4", "--dtype", "bfloat16", "--hbm", "v4"],
                          capture_output=True, text=True, env=_env(1), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "peak = resident + max(update, forward, sample)" in proc.stdout and "AdamW moments" in proc.stdout
    assert "(1, 4, 1)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "klq_jax.memory", "--config", "configs/scale.py:pythia1b_tldr_v4_8",
                           "--json"], capture_output=True, text=True, env=_env(1), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["mesh"] == [1, 4, 1] and data["hardware"]["accelerator"] == "v4-8"


@pytest.mark.parametrize("args, message", [
    (["--mesh", "3,1,1", "--devices", "8"], "3 devices but 8"),
    (["--model", "gpt-17"], "--model='gpt-17'"),
    (["--dtype", "int8", "--devices", "1"], "--dtype='int8'"),
    (["--batch", "100", "--devices", "8", "--mesh", "1,8,1"], "accepted: a multiple of 32"),
])
def test_cli_bad_input_is_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "klq_jax.memory", *args], capture_output=True, text=True,
                          env=_env(1), cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _scale_variants():
    sys.path.insert(0, str(REPO / "configs"))
    import scale

    return scale


@pytest.mark.parametrize("variant", sorted(_scale_variants().HARDWARE))
def test_scale_configs_fit_their_machines(variant):
    from jax.sharding import AbstractMesh

    from klq_jax import memory, sharding

    scale = _scale_variants()
    est, work, shape, hw = memory.config_estimate(f"{REPO}/configs/scale.py:{variant}")
    config = scale.get_config(variant)
    assert shape[0] * shape[1] * shape[2] == hw["devices"]
    sharding.check_batch(config.batch_size, AbstractMesh(shape, sharding.MESH_AXES),
                         num_minibatches=config.rl.num_minibatches, num_microbatches=config.rl.num_microbatches,
                         process_count=hw["hosts"])
    assert abs(est.peak / GIB - scale.EXPECTED_PEAK_GIB[variant]) <= 0.05 + 0.01 * scale.EXPECTED_PEAK_GIB[variant]
    if hw["chip"]:
        assert est.peak <= 0.8 * memory.HBM_GIB[hw["chip"]] * GIB, (variant, est.peak / GIB)


def test_unknown_scale_variant():
    with pytest.raises(ValueError, match="unknown scale config variant 'v9'"):
        _scale_variants().get_config("v9")


if __name__ == "__main__" and sys.argv[1:] == ["checks"]:
    sys.path.insert(0, str(REPO))
    print(json.dumps(checks()))
