"""Sharding: the mesh from config, the parameter rules, and sharded execution equal to one device.

The checks that need several devices run in one subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`; this pytest process already has JAX with one):
for meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) the sharded train step equals the
single-device step, the sampler draws the same tokens and the reference forward gives the same logprobs
(that the loop's own jitted update keeps the shardings is checked in tests/test_multihost.py). Run as a
script, this file is that subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
TOL = dict(rtol=2e-4, atol=2e-5)
# Tiny programs: compile fast rather than run fast (halves this file's time on CPU).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ----------------------------------------------------------------------------- shared tiny setup


def tiny_config(family: str = "llama"):
    from klq_jax.models.config import ModelConfig

    if family == "llama":
        return ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=64)
    if family == "gpt_neox":
        return ModelConfig(family="gpt_neox", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=4, max_position_embeddings=64, attention_bias=True,
                           output_bias=True, mlp_bias=True, activation="gelu", rotary_dim=2, parallel_residual=True)
    return ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=4, head_dim=4, max_position_embeddings=64, tie_embeddings=True,
                       attention_bias=True, output_bias=True, mlp_bias=True, activation="gelu_new")


# ----------------------------------------------------------------------------- in-process: the rules


def test_mesh_shape_from_config():
    from klq_jax.sharding import MeshError, mesh_shape

    assert mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert mesh_shape({"data": -1, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_shape("2,2,2", 8) == (2, 2, 2)
    assert mesh_shape("data=1,fsdp=-1", 4) == (1, 4, 1)
    assert mesh_shape(None, 4) == (4, 1, 1)
    for bad, why in [({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
                     ({"data": 3, "fsdp": 1, "tensor": 1}, "3 devices but 8"),
                     ({"data": -1, "fsdp": 3, "tensor": 1}, "do not divide"),
                     ({"data": 8, "pipeline": 1}, "unknown mesh axis 'pipeline'"),
                     ((2, 2), "3 sizes"),
                     ("2,x,2", "accepted: three integer sizes"),
                     ({"data": "two"}, "sizes must be integers")]:
        with pytest.raises(MeshError, match=why):
            mesh_shape(bad, 8)


def test_make_mesh_on_one_device():
    import jax

    from klq_jax.sharding import MESH_AXES, make_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert mesh.axis_names == MESH_AXES and mesh.devices.shape == (jax.device_count(), 1, 1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _abstract(family="llama", **heads):
    import jax
    from flax import nnx

    from klq_jax.models.transformer import CausalLM

    model = nnx.eval_shape(lambda: CausalLM(tiny_config(family), rngs=nnx.Rngs(0), **heads))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.state(model))


def test_param_specs_follow_the_rules():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from klq_jax.sharding import param_specs

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = param_specs(_abstract("llama", value_head=True), mesh)
    assert specs["embed_vd"] == P("tensor", "fsdp")
    assert specs["lm_head_dv"] == P("fsdp", "tensor")
    assert specs["blocks"]["wq_dnh"] == P(None, "fsdp", "tensor")   # the layer axis is never split
    assert specs["blocks"]["wk_dkh"] == P(None, "fsdp", "tensor")
    assert specs["blocks"]["wo_nhd"] == P(None, "tensor", None, "fsdp")
    assert specs["blocks"]["w_gate_df"] == P(None, "fsdp", "tensor")
    assert specs["blocks"]["w_down_fd"] == P(None, "tensor", "fsdp")
    assert specs["blocks"]["ln1_scale"] == P()
    assert specs["value_w_d"] == P() and specs["value_b"] == P()
    # 2 KV heads do not split over tensor=4: that dimension stays replicated, the rest still shards.
    wide = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
    assert param_specs(_abstract("llama"), wide)["blocks"]["wk_dkh"] == P(None, "fsdp")
    # Axes of size 1 are dropped: pure data parallelism replicates everything.
    data = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))
    assert all(s == P() for s in __import__("jax").tree.leaves(param_specs(_abstract("llama"), data),
                                                                is_leaf=lambda x: isinstance(x, P)))


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("heads", [dict(value_head=True), dict(lm_head=False, score_head=True, score_bias=True)])
def test_every_matrix_of_every_family_has_a_rule(family, heads):
    from klq_jax.sharding import unmatched

    assert unmatched(_abstract(family, **heads)) == []


def test_optimizer_state_is_sharded_like_the_params():
    import jax
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from klq_jax.rl.train_step import TrainState, default_optim_config, make_optimizer
    from klq_jax.sharding import param_specs, path_str

    params = _abstract("gpt_neox", value_head=True)
    state = jax.eval_shape(lambda p: TrainState.create(p, make_optimizer(default_optim_config()), 0.1), params)
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = param_specs(state, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    flat = {path_str(k): v for k, v in leaves}
    assert flat["params.blocks.wq_dnh"] == P(None, "fsdp", "tensor")
    mu = [k for k in flat if k.endswith(".mu.blocks.wq_dnh")]
    nu = [k for k in flat if k.endswith(".nu.blocks.w_up_df")]
    assert mu and nu and flat[mu[0]] == P(None, "fsdp", "tensor") and flat[nu[0]] == P(None, "fsdp", "tensor")
    assert flat["step"] == P() and flat["kl_coef"] == P()
    assert all(v == P() for k, v in flat.items() if k.endswith("count"))


def test_check_batch():
    from jax.sharding import AbstractMesh

    from klq_jax.sharding import MeshError, check_batch

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    check_batch(16, mesh, num_minibatches=2, num_microbatches=2, process_count=1)
    with pytest.raises(MeshError, match="accepted: a multiple of 16"):
        check_batch(8, mesh, num_minibatches=2, num_microbatches=2, process_count=1)
    with pytest.raises(MeshError, match="accepted: a multiple of 12"):
        check_batch(8, mesh, process_count=3)


# ----------------------------------------------------------------------------- 8 fake devices


def checks() -> dict:
    """Runs in the subprocess: every sharded result next to its single-device twin."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from klq_jax import sharding as shd
    from klq_jax.models.sampler import Sampler
    from klq_jax.models.transformer import CausalLM, positions_from_mask
    from klq_jax.rl import loop
    from klq_jax.rl.train_step import (Rollout, TrainState, compute_targets, default_algo_config,
                                       default_optim_config, make_optimizer, make_train_step)

    assert jax.device_count() == 8
    out: dict = {}

    def max_err(a, b):
        errs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                                               / (1.0 + float(np.max(np.abs(np.asarray(y)))))), a, b)
        return max(jax.tree.leaves(errs))

    def setup(family, algo_name):
        cfg = tiny_config(family)
        remat = "dots" if family == "gpt_neox" else "none"  # rematerialisation under sharding too
        graphdef, params = nnx.split(CausalLM(cfg, value_head=True, remat=remat, rngs=nnx.Rngs(0)))
        params = jax.device_get(params)  # host copies: every placement below starts from the same values

        def apply_fn(p, tokens_bt, positions_bt, mask_bt):
            o = nnx.merge(graphdef, p)(tokens_bt, positions_bt, mask_bt)
            return o.logits_btv, o.values_bt

        algo = default_algo_config()
        algo.algo, algo.num_microbatches = algo_name, 2
        optim = default_optim_config()
        optim.learning_rate = 1e-3
        optimizer = make_optimizer(optim)
        rng = np.random.default_rng(0)
        b, t = 16, 12
        tokens = rng.integers(2, cfg.vocab_size, (b, t)).astype(np.int32)
        mask = np.ones((b, t), bool)
        mask[:, :4] = rng.random((b, 4)) > 0.5
        resp = np.zeros((b, t), bool)
        resp[:, 6:] = True
        batch = Rollout.from_samples(tokens, positions_from_mask(jnp.asarray(mask)), mask, resp,
                                     np.zeros((b, t), np.float32), rng.random(b) > 0.5)
        batch = batch.replace(rewards_b=jnp.asarray(rng.normal(size=b), jnp.float32),
                              old_logp_bt=jnp.asarray(-rng.random((b, t)) - 3.0, jnp.float32),
                              ref_logp_bt=jnp.asarray(-rng.random((b, t)) - 3.0, jnp.float32),
                              old_values_bt=jnp.asarray(rng.normal(size=(b, t)), jnp.float32))
        batch = jax.device_get(compute_targets(batch, 0.05, algo))
        return cfg, graphdef, params, apply_fn, algo, optimizer, batch

    # --- the train step (KLQ on a Llama with GQA; PPO on GPT-NeoX with remat="dots" on the widest mesh; KLQ with
    # the trainer's log-probabilities without the logits, `apply_fn.next_token_logprobs`, against the logits step)
    for family, algo_name, meshes, fused in [("llama", "klq", MESHES, False), ("gpt_neox", "ppo", [(2, 2, 2)], False),
                                             ("llama", "klq", [(2, 4, 1), (2, 2, 2)], True)]:
        cfg, graphdef, params, apply_fn, algo, optimizer, batch = setup(family, algo_name)
        single = jax.jit(make_train_step(apply_fn, algo, optimizer, jit=False))
        if fused:
            apply_fn = functools.partial(apply_fn)
            apply_fn.next_token_logprobs = lambda p, tokens, positions, mask, logits_from, temperature, g=graphdef: (
                nnx.merge(g, p).next_token_logprobs(tokens, positions, mask, logits_from=logits_from,
                                                    temperature=temperature, with_values=True))
            family = "llama-fused"
        step = make_train_step(apply_fn, algo, optimizer, jit=False)
        ref_state = TrainState.create(params, optimizer, 0.05)
        ref_metrics = []
        for _ in range(2):
            ref_state, m = single(ref_state, batch)
            ref_metrics.append(jax.device_get(m))
        for shape in meshes:
            mesh = shd.make_mesh(shape)
            with jax.set_mesh(mesh):
                state = shd.create_train_state(params, optimizer, 0.05, mesh)
                sharded = shd.shard_train_step(step, state, mesh)
                metrics = []
                for _ in range(2):
                    state, m = sharded(state, shd.to_global(batch, mesh))
                    metrics.append(jax.device_get(m))
                specs = {shd.path_str(k): str(v.sharding.spec) for k, v in
                         jax.tree_util.tree_flatten_with_path(state)[0]}
                mu_spec = [v for k, v in specs.items() if k.endswith("mu.blocks.wq_dnh")]
            # Clip fractions count tokens past a clip boundary: a token at the boundary flips under another
            # summation order (one of 96 did on an Intel VM), at no cost to the loss, which is continuous there.
            # They are compared in tokens; every other metric within the tolerance.
            clipped = [k for k in metrics[0] if k.endswith("clip_frac")]
            out[f"step/{family}/{algo_name}/{shape}"] = {
                "param_err": max_err(state.params, ref_state.params),
                "metric_err": max_err([{k: v for k, v in m.items() if k not in clipped} for m in metrics],
                                      [{k: v for k, v in m.items() if k not in clipped} for m in ref_metrics]),
                "clip_flips": max([round(abs(float(m[k]) - float(r[k])) * float(r["tokens"]))
                                   for m, r in zip(metrics, ref_metrics) for k in clipped], default=0),
                "loss": float(metrics[-1]["loss"]),
                "wq_spec": specs["params.blocks.wq_dnh"], "embed_spec": specs["params.embed_vd"],
                "mu_spec": mu_spec[0]}

    # --- sampling and the reference forward
    sampler = Sampler(graphdef=graphdef, eos_ids=(1,), pad_id=0, max_new_tokens=8, bucket=8)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(2, cfg.vocab_size, size=int(rng.integers(1, 8)))) for _ in range(16)]
    key = jax.random.key(3)
    ref_sample = jax.device_get(sampler(params, prompts, key, prompt_length=8))
    ref_logp_fn = loop.make_ref_logprob_fn(lambda p, *a: apply_fn(p, *a)[0], params, 1.0)
    mask = ref_sample.attention_mask_bt
    ref_lp = jax.device_get(ref_logp_fn(ref_sample.tokens_bt, positions_from_mask(mask), mask))
    for shape in MESHES:
        mesh = shd.make_mesh(shape)
        with jax.set_mesh(mesh):
            placed = shd.place_state(params, mesh)
            s = shd.global_sample(sampler, placed, prompts, key, mesh, prompt_length=8)
            lp_fn = loop.make_ref_logprob_fn(lambda p, *a: apply_fn(p, *a)[0], placed, 1.0)
            lp = lp_fn(s.tokens_bt, positions_from_mask(s.attention_mask_bt), s.attention_mask_bt)
            # the trainer's reference: the LM head and the log-softmax in chunks of positions, on the sharded model
            chunked_fn = loop.make_ref_next_token_logprob_fn(
                lambda p, tokens, positions, mask, logits_from, temperature: nnx.merge(graphdef, p).next_token_logprobs(
                    tokens, positions, mask, logits_from=logits_from, temperature=temperature), placed, 1.0)
            chunked_lp = chunked_fn(s.tokens_bt, positions_from_mask(s.attention_mask_bt), s.attention_mask_bt)
            tokens_spec = str(s.tokens_bt.sharding.spec)
            s = jax.device_get(s)
        out[f"sample/{shape}"] = {
            "tokens_equal": bool(np.array_equal(s.tokens_bt, ref_sample.tokens_bt)),
            "masks_equal": bool(np.array_equal(s.response_mask_bt, ref_sample.response_mask_bt)),
            "logp_err": max_err(s.logprobs_bt, ref_sample.logprobs_bt),
            "ref_logp_err": max_err(jax.device_get(lp), ref_lp),
            "chunked_ref_logp_err": max_err(jax.device_get(chunked_lp), ref_lp),
            "tokens_spec": tokens_spec}
    return out


@pytest.fixture(scope="module")
def fake_devices():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "checks"], capture_output=True, text=True, env=env, cwd=repo,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_train_step_equals_single_device(fake_devices, shape):
    r = fake_devices[f"step/llama/klq/{shape}"]
    assert r["param_err"] < TOL["rtol"] and r["metric_err"] < TOL["rtol"] and r["clip_flips"] <= 1, r
    if shape == (2, 2, 2):
        assert r["wq_spec"] == "P(None, 'fsdp', 'tensor')" and r["embed_spec"] == "P('tensor', 'fsdp')", r
        assert r["mu_spec"] == r["wq_spec"], r  # AdamW moments created already sharded like their parameter


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)])
def test_sharded_step_without_the_logits_equals_the_logits_step(fake_devices, shape):
    r = fake_devices[f"step/llama-fused/klq/{shape}"]
    assert r["param_err"] < TOL["rtol"] and r["metric_err"] < TOL["rtol"] and r["clip_flips"] <= 1, r


def test_sharded_ppo_step_on_gpt_neox(fake_devices):
    r = fake_devices["step/gpt_neox/ppo/(2, 2, 2)"]
    assert r["param_err"] < TOL["rtol"] and r["metric_err"] < TOL["rtol"] and r["clip_flips"] <= 1, r


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_sampling_gives_the_same_tokens(fake_devices, shape):
    r = fake_devices[f"sample/{shape}"]
    assert r["tokens_equal"] and r["masks_equal"], r
    assert r["logp_err"] < 1e-4 and r["ref_logp_err"] < 1e-4 and r["chunked_ref_logp_err"] < 1e-4, r
    assert "data" in r["tokens_spec"]  # the batch really is split


if __name__ == "__main__" and sys.argv[1:] == ["checks"]:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps({k: v for k, v in checks().items()}))
