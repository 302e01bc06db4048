"""Multi-process JAX on one machine: two CPU processes on loopback (`jax.distributed.initialize` with a
local coordinator, 2 fake devices each, mesh fsdp=2 x tensor=2 spanning both) run the real online loop
(`klq_jax.rl.loop.run`: sampling, host rewards, reference and policy forwards, targets, the update) on a
tiny Llama for a few iterations, each process feeding its own half of every prompt batch. They must end
with the parameters of one process on one device running the same global batches, and sample the same
tokens. Run as a script, this file is the worker (`python tests/test_multihost.py worker ...`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ITERATIONS = 3
GLOBAL_BATCH = 8
TIMEOUT_S = 240


# ----------------------------------------------------------------------------- the worker


def worker(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={2 if num_processes > 1 else 1} "
                               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120)
    from klq_jax import sharding as shd
    from klq_jax.data.datasets import PromptStream
    from klq_jax.models.config import ModelConfig
    from klq_jax.models.sampler import Sampler
    from klq_jax.models.transformer import CausalLM, positions_from_mask
    from klq_jax.rl import loop
    from klq_jax.rl.train_step import (Rollout, TrainState, default_algo_config, default_optim_config,
                                       make_optimizer)

    cfg = ModelConfig(family="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=64)
    policy = CausalLM(cfg, value_head=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(policy)
    ref_graphdef, ref_params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    algo = default_algo_config()
    algo.epochs, algo.num_minibatches, algo.kl_coef = 2, 2, 0.05
    optim = default_optim_config()
    optim.learning_rate = 3e-3
    # float32 moments: a bfloat16 first moment turns the gradient's different summation order (fsdp across
    # processes against one device) into whole bf16 rounding steps, beyond this float32 comparison.
    optim.mu_dtype = "float32"
    optimizer = make_optimizer(optim)
    sampler = Sampler(graphdef=graphdef, eos_ids=(1,), pad_id=0, max_new_tokens=6, bucket=8)

    rng = np.random.default_rng(0)
    examples = [list(rng.integers(2, 48, size=int(rng.integers(1, 8)))) for _ in range(20)]
    stream = PromptStream(examples, GLOBAL_BATCH, seed=0, process_index=jax.process_index(),
                          process_count=jax.process_count())

    def apply_fn(p, tokens_bt, positions_bt, mask_bt):
        out = nnx.merge(graphdef, p)(tokens_bt, positions_bt, mask_bt)
        return out.logits_btv, out.values_bt

    def ref_next_token_logprobs(p, tokens_bt, positions_bt, mask_bt, logits_from, temperature):
        # the trainer's reference: LM head and log-softmax in chunks of positions (`CausalLM.next_token_logprobs`)
        return nnx.merge(ref_graphdef, p).next_token_logprobs(tokens_bt, positions_bt, mask_bt,
                                                              logits_from=logits_from, temperature=temperature)

    def host_reward(prompt_batch, batch):
        """Per-row reward from this process's rows: the share of even response tokens, minus length."""
        tokens, resp = np.asarray(batch.tokens_bt), np.asarray(batch.response_mask_bt)
        assert tokens.shape[0] == len(prompt_batch)
        # A jitted computation on this process's own device, as a learned reward model runs.
        even = np.asarray(local_even(jnp.asarray(tokens), jnp.asarray(resp)))
        return even - 0.01 * resp.sum(1)

    @jax.jit
    def local_even(tokens, resp):
        return ((tokens % 2 == 0) & resp).sum(1) / jnp.maximum(resp.sum(1), 1)

    sampled = []
    if num_processes > 1:
        # fsdp spans the two processes (parameters and batch split across them), tensor stays in each.
        mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 2})
        shd.check_batch(GLOBAL_BATCH, mesh, num_minibatches=algo.num_minibatches)

        def sample_fn(p, prompt_batch, key):
            out = shd.global_sample(sampler, p, prompt_batch, key, mesh, prompt_length=8)
            sampled.append(shd.to_host_local(out.tokens_bt))
            return Rollout.from_samples(out.tokens_bt, positions_from_mask(out.attention_mask_bt),
                                        out.attention_mask_bt, out.response_mask_bt, out.logprobs_bt, out.eos_b)

        reward_fn = shd.global_reward_fn(host_reward, mesh)
        ref_in = shd.place_state(ref_params, mesh)
        state = shd.create_train_state(params, optimizer, algo.kl_coef, mesh)
        expected_shardings = jax.tree.map(lambda x: x.sharding, state)
    else:
        mesh = None

        def sample_fn(p, prompt_batch, key):
            out = sampler(p, prompt_batch, key, prompt_length=8)
            sampled.append(np.asarray(out.tokens_bt))
            return Rollout.from_samples(out.tokens_bt, positions_from_mask(out.attention_mask_bt),
                                        out.attention_mask_bt, out.response_mask_bt, out.logprobs_bt, out.eos_b)

        reward_fn = host_reward
        ref_in = ref_params
        state = TrainState.create(params, optimizer, algo.kl_coef)

    ref_logprob_fn = loop.make_ref_next_token_logprob_fn(ref_next_token_logprobs, ref_in, algo.temperature)
    history = []
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        for state, metrics in loop.run(state=state, apply_fn=apply_fn, optimizer=optimizer, algo_cfg=algo,
                                       sample_fn=sample_fn, reward_fn=reward_fn, ref_logprob_fn=ref_logprob_fn,
                                       prompts=stream, rng=jax.random.key(7), num_iterations=ITERATIONS):
            history.append({k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))})
        if mesh is not None:  # the loop's jitted update kept the rules' shardings (donation reuses buffers)
            kept = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, expected_shardings)
            assert all(jax.tree.leaves(kept)), "state shardings changed during the loop"
            final = shd.gather_to_host(state.params)
        else:
            final = jax.device_get(state.params)

    def flat(tree):
        return {shd.path_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    out = Path(out_dir)
    np.savez(out / f"params_{num_processes}_{process_id}.npz", **flat(final))
    if num_processes == 1:
        np.savez(out / "initial.npz", **flat(jax.device_get(nnx.split(CausalLM(cfg, value_head=True,
                                                                                 rngs=nnx.Rngs(0)))[1])))
    np.save(out / f"tokens_{num_processes}_{process_id}.npy", np.stack(sampled))
    (out / f"metrics_{num_processes}_{process_id}.json").write_text(json.dumps(history))
    if num_processes > 1:
        jax.distributed.shutdown()


# ----------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id: int, num_processes: int, port: int, out_dir: Path, log: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, __file__, "worker", str(process_id), str(num_processes), str(port), str(out_dir)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=repo)


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    runs = [(0, 2), (1, 2), (0, 1)]
    procs = [(_launch(i, n, port, tmp_path, tmp_path / f"log_{n}_{i}.txt"), n, i) for i, n in runs]
    failed = []
    for proc, n, i in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        if rc != 0:
            failed.append(f"process {i}/{n} exited {rc}:\n" + (tmp_path / f"log_{n}_{i}.txt").read_text()[-3000:])
    assert not failed, "\n".join(failed)

    one = dict(np.load(tmp_path / "params_1_0.npz"))
    two = [dict(np.load(tmp_path / f"params_2_{i}.npz")) for i in range(2)]
    initial = dict(np.load(tmp_path / "initial.npz"))
    moved = max(float(np.abs(ref - initial[name]).max()) for name, ref in one.items())
    assert moved > 1e-3, "training did not move the parameters: the comparison would be vacuous"
    for name, ref in one.items():
        for params in two:  # both processes hold the same (replicated) final parameters
            np.testing.assert_allclose(params[name], ref, rtol=1e-4, atol=2e-5, err_msg=name)

    tokens_one = np.load(tmp_path / "tokens_1_0.npy")            # [iterations, B, T]
    tokens_two = np.concatenate([np.load(tmp_path / f"tokens_2_{i}.npy") for i in range(2)], axis=1)
    np.testing.assert_array_equal(tokens_two, tokens_one)

    m_one = json.loads((tmp_path / "metrics_1_0.json").read_text())
    m_two = json.loads((tmp_path / "metrics_2_0.json").read_text())
    assert len(m_one) == len(m_two) == ITERATIONS
    for a, b in zip(m_one, m_two):
        for key in ("rollout/reward", "rollout/kl", "train/loss", "train/grad_norm", "episodes"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
