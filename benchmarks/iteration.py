"""One full RLHF iteration, ours (KLQ and PPO) against TRL's PPO, on the same model, batch and lengths.

Each side runs in its own process (so each peak RSS is its own, read by the parent with `wait4`):

    ours KLQ / ours PPO   `klq_jax.rl.loop.run` on what `klq_jax.trainer.build` makes from
                          `configs/dialogue.py` with the settings below: rollout (sampler), reward
                          (`HFRewardModel`: SmolLM2 with a score head), reference logprobs, policy
                          forward (old logprobs and values), targets, update.
    TRL PPO               `benchmarks/trl_ppo_iteration.py` in the benchmark venv (TRL 1.12.0 and torch,
                          `benchmarks/requirements-bench.txt`): policy, reference, value and reward model
                          all SmolLM2-135M-Instruct, the reward model the same score-head weights as ours.

Same work on both sides: 8 chat prompts of the embedded dialogue set, exactly `--new_tokens` response
tokens (no EOS stop on either side), temperature 1, one minibatch of the whole batch, `--epochs` epochs,
fp32 parameters. Architectural difference kept: TRL's PPO has a separate value model (a second backbone
in the rollout and in the update), ours a value head on the policy (klq_jax's design, the same for KLQ
and PPO). Each side runs `--iterations` iterations; the first of ours includes compilation, and the
table reports the fastest of the others (the same statistic for TRL), so noise from other processes
on the machine inflates neither side. `--rounds N` runs the sides in turn N times (klq, ppo, trl, klq, ...)
and keeps each side's round with its fastest iteration: on a VM whose speed drifts over minutes, one round
can give one side the fast minutes and the other the slow ones.

The update's achieved FLOP/s counts the matmul FLOPs each side needs: per epoch `6 * N_layers * B*T`
plus attention `12 * L * B * T^2 * d` (fwd+bwd; full T^2, as both sides compute it) plus the LM head
`6 * d*V` per position where logits are made (TRL: all T; ours: the N that predict response tokens);
TRL's value backbone doubles the layer terms; recomputation (remat) is not counted. The CPU's matmul
throughput is a jitted fp32 2048^3 `jnp.dot` (best of 5), and the same product through numpy's BLAS,
measured in each of our processes before its set-up and after its iterations; each side's update is
compared with the mean of its own two (TRL's with KLQ's), against `jnp.dot` (`*_update_mm_fraction`) and
against the better of the two (`*_update_best_mm_fraction`: XLA's kernel is not the CPU's fastest on
every machine).

    python benchmarks/iteration.py [--new_tokens 128] [--epochs 1] [--iterations 3] [--sides klq,ppo,trl] [--rounds 1]
        [--compute_dtype bfloat16] [--matmul_dtype bfloat16] [--trl_python /work/venv-bench/bin/python] [--policy HF_FOLDER]
        [--decode_kernel auto|native|xla] [--frozen_matmul_kernel auto|native|xla] [--cache_dtype auto|float32|bfloat16]
        [--trl_device cpu|cuda] [--overlap_reference auto|on|off] [--replay_gate_up auto|on|off]
        [--replay_attention off|on] [--replay_probs off|on]

On a GPU machine ours runs on JAX's default backend (the GPU) and `--trl_device cuda` puts TRL there too (its
phases timed after a `torch.cuda.synchronize()`); each side then also reports its allocator's peak on the device
(JAX: `memory_stats()["peak_bytes_in_use"]`; torch: `max_memory_allocated()`), the matmul references are
8192^3 (2048^3 is launch overhead on a GPU), and RESULT gains `device_peak_ratio`. At JAX's default precision
an fp32 matmul on a GPU runs in TF32 (torch's default: true fp32); see README's GPU results.

Prints a table and a last line `RESULT speedup_vs_trl=... rss_ratio=... ...` (speedup: TRL's iteration
time over ours, KLQ; rss_ratio: our peak RSS over TRL's, KLQ).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstat import rss_gib  # this folder is the script's: sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH / the installed package: a patched copy can be benchmarked
sys.path.insert(0, str(ROOT / "configs"))

PHASES = ("sample", "reward", "reference", "forward", "targets", "update")
DEFAULT_TRL_PYTHON = "/work/venv-bench/bin/python"


# ----------------------------------------------------------------------------------------------------
# Shared preparation (parent process).


def reward_model_folder(policy_path: Path) -> Path:
    """SmolLM2 with a fresh score head (seed 0), exported once as an HF sequence-classification folder."""
    from klq_jax.models.gguf import cache_root
    from klq_jax.models.hf import export_model, load_model

    folder = cache_root() / f"bench-{policy_path.name}-score"
    if not (folder / "model.safetensors").is_file():
        export_model(load_model(policy_path, score_head=True, seed=0), folder, tokenizer_from=policy_path)
    return folder


def make_config(args, algo: str, reward_path: str):
    import dialogue

    c = dialogue.get_config("")
    c.algo = algo
    if args.policy:
        c.model.policy = args.policy
    c.batch_size = args.batch
    c.data.max_examples = args.batch            # the first `batch` prompts: each iteration uses all of them
    c.sampling.max_new_tokens = args.new_tokens
    c.sampling.prompt_bucket = args.prompt_bucket
    c.rl.epochs = args.epochs
    c.rl.num_minibatches = 1
    c.rl.num_microbatches = 1
    c.rl.temperature = 1.0
    c.reward.kind = "hf"
    c.reward.path = reward_path
    c.reward.chat = True
    c.model.param_dtype = args.param_dtype
    c.model.compute_dtype = args.compute_dtype
    c.model.matmul_dtype = args.matmul_dtype
    c.model.matmul_precision = args.matmul_precision
    c.model.reference_dtype = args.ref_dtype or c.model.reference_dtype
    c.reward.dtype = args.reward_dtype or c.reward.dtype
    c.reward.matmul_dtype = c.reward.matmul_dtype if args.reward_matmul_dtype is None else args.reward_matmul_dtype
    c.model.remat = args.remat
    c.sampling.policy_stats = not args.policy_forward
    c.sampling.decode_kernel = args.decode_kernel
    c.model.frozen_matmul_kernel = args.frozen_matmul_kernel
    c.sampling.cache_dtype = args.cache_dtype
    c.reward.overlap_reference = args.overlap_reference
    c.rl.replay_sampler_forward = args.replay_sampler_forward
    c.rl.replay_gate_up = args.replay_gate_up
    c.rl.replay_attention = args.replay_attention
    c.rl.replay_probs = args.replay_probs
    return c


def prompt_ids(args, reward_path: str) -> list[list[int]]:
    import json as _json

    from klq_jax import trainer
    from klq_jax.data.datasets import load_prompts

    config = make_config(args, "klq", reward_path)
    path = trainer.resolve_model_path(config.model.policy)
    vocab = _json.loads((path / "config.json").read_text())["vocab_size"]
    tokenizer = trainer.load_tokenizer(path, vocab)
    examples = load_prompts(config.data.source, config.data.train_split, config.data.task,
                            max_examples=config.data.max_examples)
    return [p.ids for p in trainer.encode_prompts(examples, tokenizer, config)]


# ----------------------------------------------------------------------------------------------------
# Our side (child process).


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed warm-up call (compilation, page faults)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Square `n` matmuls: jitted `jnp.dot` in fp32 and bf16 (fp32 accumulation), and numpy's BLAS in fp32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flop = 2 * n**3
    out = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        out[name] = flop / _best_seconds(lambda: f(a, b).block_until_ready(), repeats) / 1e9
    # XLA's kernel is not the CPU's fastest everywhere (on an AVX2-only EPYC it ran at 0.65-0.91x numpy's
    # OpenBLAS in the benchmark's runs), so the update is also compared with the better of the two.
    n_host = min(n, 2048)  # the host CPU's: the size of the CPU runs whatever the accelerator's
    a = np.asarray(jax.random.normal(jax.random.key(0), (n_host, n_host), jnp.float32))
    out["fp32_numpy"] = 2 * n_host**3 / _best_seconds(lambda: a @ a, repeats) / 1e9
    return out


def stream_gbs(mib: int = 256, repeats: int = 5) -> float:
    """What a jitted `jnp.sum` reads per second from a buffer 8x this CPU's L3 or more: the bandwidth a
    memory-bound decode step (it streams every weight once) could reach at best."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    seconds = _best_seconds(lambda: f(x).block_until_ready(), repeats)
    return x.nbytes / seconds / 1e9


def run_ours(args) -> dict:
    import jax
    import numpy as np

    from klq_jax import sharding, trainer
    from klq_jax.data.datasets import PromptStream
    from klq_jax.rl import loop as rl_loop
    from klq_jax.rl.train_step import make_optimizer

    on_accelerator = jax.default_backend() != "cpu"
    mm_n = 8192 if on_accelerator else 2048  # 2048^3 takes ~20 us on a GPU: launch overhead, not its matmul rate
    config = make_config(args, args.side, args.reward_path)
    trainer.apply_matmul_precision(config)  # (build applies it too) the fp32 matmul reference at the same precision
    mm_before = matmul_gflops(mm_n)
    setup = trainer.build(config)
    # No EOS stop: an id that never occurs, so every response has exactly new_tokens tokens (as TRL's).
    setup.sampler = dataclasses.replace(setup.sampler, eos_ids=(-1,))
    rl = trainer.rl_config(config)
    optimizer = make_optimizer(config.optim)
    mesh = sharding.make_mesh(config.mesh)
    replay, gate_up_choice = trainer.replay_sampler_forward(config, mesh), trainer.replay_gate_up_choice(config)
    attention_choice, probs_choice = trainer.replay_attention_choice(config), trainer.replay_probs_choice(config, mesh)
    sampler = dataclasses.replace(setup.sampler, record_layers=replay, replay_gate_up=gate_up_choice,  # make_fns's
                                  replay_attention=attention_choice, replay_probs=probs_choice)
    replays_gate_up, replays_attention = sampler.records_gate_up(setup.policy), sampler.records_attention(setup.policy)
    state, ref_params = trainer.place_on_mesh(setup, optimizer, rl.kl_coef, mesh)  # as the trainer does
    stream = PromptStream(setup.train_prompts, config.batch_size, seed=config.seed)
    apply_fn, sample_fn, reward_fn = trainer.make_fns(setup, mesh, policy_stats=config.sampling.policy_stats,
                                                      replay=replay, replay_gate_up=gate_up_choice,
                                                      replay_attention=attention_choice, replay_probs=probs_choice)
    ref_logprob_fn = trainer.make_ref_logprob_fn(setup, ref_params, rl.temperature)  # as the trainer does
    rss_setup = rss_gib()
    with jax.set_mesh(mesh):
        iterations, curves = _iterate(args, config, rl, state, optimizer, apply_fn, sample_fn, reward_fn,
                                      ref_logprob_fn, stream, mesh)
    rss_peak = rss_gib("VmHWM")
    # The matmul reference of this side's update: measured in this process before its set-up and after its
    # iterations, and averaged, so that each side is compared with the CPU as it was around its own run (a
    # shared machine's throughput drifts over the minutes between the sides). Its arrays fit in the freed
    # update block: `rss_peak_after_matmul_gib` beside `rss_peak_self_gib` in results.json shows the peak
    # RSS unchanged.
    # The accelerator's own peak (XLA's allocator: what buffers held at most), read before the matmuls' arrays.
    device_peak = ({"device": jax.devices()[0].device_kind,
                    "device_peak_gib": jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30}
                   if on_accelerator else {"device": "cpu"})
    mm_after = matmul_gflops(mm_n)
    mm = {k: (mm_before[k] + mm_after[k]) / 2 for k in mm_before}
    stream = stream_gbs()  # after the peak was read: its buffer fits in the freed update block
    return {
        **device_peak, "matmul_n": mm_n, "overlap_reference": trainer.overlap_reference(config, mesh),
        "replay_sampler_forward": replay, "replay_gate_up": replays_gate_up, "replay_attention": replays_attention,
        "replay_probs": replay and config.sampling.policy_stats and probs_choice == "on",
        "side": f"ours-{args.side}", "iterations": iterations, "curves": curves,
        "matmul_gflops_jax": mm, "matmul_gflops_jax_before": mm_before, "matmul_gflops_jax_after": mm_after,
        "stream_gbs": stream,
        "rss_setup_gib": rss_setup, "rss_peak_self_gib": rss_peak, "rss_peak_after_matmul_gib": rss_gib("VmHWM"),
        "batch": args.batch, "prompt_len": setup.prompt_length, "response_len": args.new_tokens,
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
    }


def _iterate(args, config, rl, state, optimizer, apply_fn, sample_fn, reward_fn, ref_logprob_fn, stream, mesh):
    import jax

    from klq_jax import trainer
    from klq_jax.rl import loop as rl_loop

    iterations, curves = [], []
    cpu = time.process_time()
    for state, metrics in rl_loop.run(
            state=state, apply_fn=apply_fn, optimizer=optimizer, algo_cfg=rl, sample_fn=sample_fn,
            reward_fn=reward_fn, ref_logprob_fn=ref_logprob_fn, prompts=stream, rng=jax.random.key(config.seed),
            num_iterations=args.iterations, overlap_reference=trainer.overlap_reference(config, mesh)):
        times = {p: metrics[f"time/{p}"] for p in PHASES + ("scoring",)}
        times["iteration"] = metrics["time/iteration"]
        times["cpu"], cpu = time.process_time() - cpu, time.process_time()
        iterations.append(times)
        curves.append({k: metrics[k] for k in ("rollout/reward", "rollout/kl", "rollout/entropy",
                                                "rollout/logp_mismatch", "train/loss", "train/approx_kl")
                       if k in metrics})
        assert metrics["rollout/response_length"] == args.new_tokens, metrics["rollout/response_length"]
    return iterations, curves


def check_dtypes(args) -> None:
    """What storing the frozen reference and the reward model in bf16 changes, on real rollouts of the
    fp32 policy: per-sequence KL (k1, the quantity in the objective and the targets) and rewards."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from klq_jax import trainer
    from klq_jax.reward_models import HFRewardModel
    from klq_jax.rl import loop as rl_loop

    config = make_config(args, "klq", args.reward_path)
    config.model.compute_dtype = config.model.param_dtype = "float32"
    setup = trainer.build(config)
    setup.sampler = dataclasses.replace(setup.sampler, eos_ids=(-1,))
    from klq_jax import sharding

    apply_fn, sample_fn, _ = trainer.make_fns(setup, sharding.make_mesh(config.mesh))
    forward = rl_loop.make_policy_forward(apply_fn, 1.0)
    # fp32; bf16 storage computing in fp32; bf16 storage with bf16 matmul operands (fp32 accumulation).
    rewards = {name: HFRewardModel(args.reward_path, chat=True, batch_size=args.batch, param_dtype=trainer.DTYPES[dt],
                                   dtype=jnp.float32, matmul_dtype=mm)
               for name, dt, mm in (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                                    ("bfloat16_mm", "bfloat16", jnp.bfloat16))}
    ref16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), setup.ref_params)
    kl_d, r_d, r_ref, r16, rmm_d, r16mm = [], [], [], [], [], []
    for i in range(args.check_batches):
        batch = sample_fn(setup.params, setup.train_prompts[:args.batch], jax.random.key(100 + i))
        logp = forward(setup.params, batch)[0]
        mask = np.asarray(batch.response_mask_bt)
        kls = {}
        for name, params in (("fp32", setup.ref_params), ("bf16", ref16)):
            ref = trainer.make_ref_logprob_fn(setup, params, 1.0)(
                batch.tokens_bt, batch.positions_bt, batch.attention_mask_bt, batch.first_action)
            kls[name] = np.sum(np.where(mask, np.asarray(logp - ref), 0.0), axis=1)
        # The policy has not moved from the reference: KL(fp32) is ~0 and KL(bf16) is bf16's error alone.
        # Compare it with the KL one update makes (rollout/kl of the benchmark's later iterations).
        kl_d.append(np.abs(kls["bf16"] - kls["fp32"]))
        texts = trainer.decode_responses(setup, batch.tokens_bt, batch.response_mask_bt)
        prompts = [p.text for p in setup.train_prompts[:args.batch]]
        scores = {dt: np.asarray(rm(prompts, texts, [None] * len(texts))) for dt, rm in rewards.items()}
        r_d.append(np.abs(scores["bfloat16"] - scores["float32"]))
        r_ref.append(scores["float32"])
        r16.append(scores["bfloat16"])
        rmm_d.append(np.abs(scores["bfloat16_mm"] - scores["float32"]))
        r16mm.append(scores["bfloat16_mm"])
    kl_d, r_d, r_ref, r16, rmm_d, r16mm = map(np.concatenate, (kl_d, r_d, r_ref, r16, rmm_d, r16mm))
    print(f"bf16 reference: |KL_seq(bf16 ref) - KL_seq(fp32 ref)| mean {kl_d.mean():.4f}, max {kl_d.max():.4f} nats "
          f"over {len(kl_d)} sequences of {args.new_tokens} tokens")
    print(f"bf16 reward model: |r(bf16) - r(fp32)| mean {r_d.mean():.4f}, max {r_d.max():.4f}; fp32 rewards: "
          f"std {r_ref.std():.4f}, range {r_ref.min():.3f}..{r_ref.max():.3f}; rank correlation "
          f"bf16 vs fp32 {_spearman(r_ref, r16):.3f}")
    print(f"bf16 reward model with bf16 matmuls (reward.matmul_dtype): |r - r(fp32)| mean {rmm_d.mean():.4f}, max "
          f"{rmm_d.max():.4f}; rank correlation vs fp32 {_spearman(r_ref, r16mm):.3f}")
    print(f"RESULT kl_seq_abs_err={kl_d.mean():.4g} reward_abs_err={r_d.mean():.4g} "
          f"reward_err_over_std={r_d.mean() / max(r_ref.std(), 1e-9):.4g} "
          f"reward_bf16_mm_abs_err={rmm_d.mean():.4g} "
          f"reward_bf16_mm_err_over_std={rmm_d.mean() / max(r_ref.std(), 1e-9):.4g}")


def _spearman(a, b) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------------------------------
# Parent: run the sides, read their peak RSS, print the table.


def run_child(cmd: list[str], log: Path) -> dict:
    """Runs one side; returns its SIDE_JSON dict with `rss_peak_gib` from `wait4` (the child's ru_maxrss)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in stdout.splitlines() if line.startswith("SIDE_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); its stderr is in {log}:\n"
                           + log.read_text()[-3000:])
    result = json.loads(lines[-1][len("SIDE_JSON "):])
    result["rss_peak_gib"] = usage.ru_maxrss / 2**20
    result["wall_s"] = time.perf_counter() - start
    return result


def fastest_round(rounds: list[dict]) -> dict:
    """One side's result from several rounds (`--rounds`): the round with its fastest iteration after the first
    (what `best` reports), with `rss_peak_gib` the highest of all rounds and `rounds` the count."""
    kept = dict(min(rounds, key=lambda r: best(r)["iteration"]))
    kept["rss_peak_gib"] = max(r["rss_peak_gib"] for r in rounds)
    kept["rounds"] = len(rounds)
    return kept


def model_dims(policy_path: Path) -> dict:
    c = json.loads((policy_path / "config.json").read_text())
    d, f, L, h, k = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                     c["num_key_value_heads"])
    hd = c.get("head_dim") or d // h
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
    return {"layers": L, "d": d, "layer_params": L * per_layer, "lm_head": d * c["vocab_size"], "attn_dim": h * hd,
            "kv_dim": k * hd}


def update_flops(dims: dict, batch: int, seq: int, epochs: int, backbones: int = 1,
                 head_positions: int | None = None) -> float:
    """Matmul FLOPs of the update: fwd+bwd (x3 of 2 per MAC) over B*T tokens, per epoch; the LM head over
    `head_positions` positions per row (all T by default: TRL's; ours computes the N that predict a
    response token, `logits_to = T - 1`). Recomputation (remat) is not counted."""
    tokens = batch * seq
    layers = 6 * dims["layer_params"] * tokens + 12 * dims["layers"] * batch * seq * seq * dims["attn_dim"]
    head_tokens = batch * (seq if head_positions is None else head_positions)
    return epochs * (backbones * layers + 6 * dims["lm_head"] * head_tokens)


def phase_floors(dims: dict, batch: int, prompt_len: int, new_tokens: int, epochs: int, matmul_gflops: float,
                 stream_gbs: float, weight_bytes: int = 4, reward_gflops: float | None = None,
                 decode_weight_bytes: int | None = None) -> dict[str, float]:
    """The least time each of our phases could take on this CPU: its matmul FLOPs at `matmul_gflops`, and for
    the decode, per step the larger of its FLOPs and its reads (every weight once, and the KV cache so far)
    at `stream_gbs`. Work any implementation must do, nothing that ours adds (padding, recomputation):
    prefill over the prompts with logits at the last position; the reward and reference forwards over
    prompt + response (the reference's LM head at the response's positions, the reward's score head free);
    the update as `update_flops`. The sum is the fastest iteration this machine allows our design.
    `reward_gflops`: the reward model's matmul throughput where it differs (bf16 operands).
    `decode_weight_bytes`: bytes per weight a decode step reads where its matmul operands are narrower than the
    stored weights (bf16 matmuls of fp32 weights: 2, plus one pass over the stored weights per rollout to round
    them); default `weight_bytes`."""
    seq = prompt_len + new_tokens
    forward = 2 * dims["layer_params"]  # FLOPs per token through the layers
    attention = 4 * dims["layers"] * dims["attn_dim"]  # per token per attended position (QK^T and PV)
    peak = matmul_gflops * 1e9
    prefill = batch * (forward * prompt_len + attention * prompt_len**2 + 2 * dims["lm_head"]) / peak
    decode_weight_bytes = decode_weight_bytes or weight_bytes
    step_bytes = decode_weight_bytes * (dims["layer_params"] + dims["lm_head"])
    kv_bytes_per_pos = 2 * dims["layers"] * dims["kv_dim"] * batch * weight_bytes
    decode = 0.0
    if decode_weight_bytes < weight_bytes:  # read the stored weights and write their narrow copies, once
        decode += (weight_bytes + decode_weight_bytes) * (dims["layer_params"] + dims["lm_head"]) / (stream_gbs * 1e9)
    for t in range(1, new_tokens):  # the first response token comes from the prefill's logits
        step_flops = batch * (forward + 2 * dims["lm_head"] + attention * (prompt_len + t))
        decode += max(step_flops / peak, (step_bytes + kv_bytes_per_pos * (prompt_len + t)) / (stream_gbs * 1e9))
    attend = attention * batch * seq**2  # full T^2, as `update_flops` counts it (both sides compute it)
    return {
        "sample": prefill + decode,
        "reward": (forward * batch * seq + attend) / (reward_gflops * 1e9 if reward_gflops else peak),
        "reference": (forward * batch * seq + attend + 2 * dims["lm_head"] * batch * new_tokens) / peak,
        "update": update_flops(dims, batch, seq, epochs, head_positions=new_tokens) / peak,
    }


def best_matmul(mm: dict) -> float:
    """The CPU's fp32 matmul throughput: the better of XLA's (jnp) and numpy's BLAS, measured in the same process."""
    return max(mm["fp32"], mm["fp32_numpy"])


def best(result: dict) -> dict:
    """The fastest iteration after the first (the first of ours compiles), with `scoring` (reward and reference
    together: their sum where they run one after the other, as TRL's do) filled in where the side has none."""
    its = result["iterations"]
    steady = its[1:] if len(its) > 1 else its
    fastest = dict(min(steady, key=lambda t: t["iteration"]))
    fastest.setdefault("scoring", fastest["reward"] + fastest["reference"])
    return fastest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompt_bucket", type=int, default=16,
                        help="our prompt padding multiple (16: the 39-48-token prompts pad to 48, TRL's length)")
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--compute_dtype", default="float32")
    parser.add_argument("--matmul_dtype", default="", help="config model.matmul_dtype: the operands of the matmuls "
                        "of our policy, reference and reward model (empty: compute_dtype); with bfloat16 the update is "
                        "compared with the bf16 x bf16 -> fp32 matmul")
    parser.add_argument("--matmul_precision", default="default", help="config model.matmul_precision: how fp32 "
                        "matmuls run (default: JAX's, TF32 on NVIDIA GPUs; highest: full fp32)")
    parser.add_argument("--ref_dtype", default="", help="the frozen reference's storage dtype "
                        "(config model.reference_dtype; default: the config's)")
    parser.add_argument("--reward_dtype", default="", help="the reward model's storage dtype (config reward.dtype; "
                        "default: the config's)")
    parser.add_argument("--reward_matmul_dtype", default=None, help="the reward model's matmul operands (config "
                        "reward.matmul_dtype; '' follows --matmul_dtype; default: the config's)")
    parser.add_argument("--remat", default="full", help="config model.remat: none, full, dots")
    parser.add_argument("--policy_forward", action="store_true", help="recompute old logprobs/values in a policy "
                        "forward instead of taking them from the sampler (config sampling.policy_stats=False)")
    parser.add_argument("--decode_kernel", default="auto", help="config sampling.decode_kernel: auto, native (the "
                        "decode step as one native call, models/cpu_decode.py), xla")
    parser.add_argument("--frozen_matmul_kernel", default="auto", help="config model.frozen_matmul_kernel: auto, "
                        "native (the reference's and reward model's layer matmuls as AMX tile products on weights "
                        "packed once, cpu_decode.packed_matmul), xla")
    parser.add_argument("--cache_dtype", default="auto", help="config sampling.cache_dtype: auto (the compute dtype), "
                        "float32, bfloat16")
    parser.add_argument("--overlap_reference", default="auto", help="config reward.overlap_reference: auto (on for "
                        "one CPU device), on (the reference forward on a second thread while the reward scores), off")
    parser.add_argument("--replay_sampler_forward", default="auto", help="config rl.replay_sampler_forward: auto (on "
                        "for one update step per rollout on one device), on (the update replays the layer states "
                        "the sampler recorded instead of running its forward over the layers), off")
    parser.add_argument("--replay_gate_up", default="auto", help="config rl.replay_gate_up: auto (with bf16 "
                        "matmuls), on (fp32 too: the sampler records the MLPs' gate|up in bf16 and the update's "
                        "backward replays them), off")
    parser.add_argument("--replay_attention", default="off", help="config rl.replay_attention: on (where the gate|up "
                        "is replayed, the attention's q|k|v and output projection too), off")
    parser.add_argument("--replay_probs", default="off", help="config rl.replay_probs: on (where the head replays the "
                        "sampler's log-probabilities, its backward reads the sampler's onehot - softmax in bf16 "
                        "instead of recomputing the logits), off")
    parser.add_argument("--sides", default="klq,ppo,trl")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides in turn this many times (klq, ppo, trl, klq, ...), each side's figures "
                             "from its round with the fastest iteration (peak RSS: the highest of its rounds): on a "
                             "machine whose speed drifts over minutes every side then meets its fast minutes")
    parser.add_argument("--policy", help="an HF folder of a Llama-family LM used as policy, reference and (with a "
                        "fresh score head) reward model on both sides; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--trl_python", default=DEFAULT_TRL_PYTHON)
    parser.add_argument("--trl_device", default="cpu", choices=("cpu", "cuda"),
                        help="TRL's device; ours runs on JAX's default backend (on a GPU machine: the GPU)")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="TRL's default (off here: it also disables TRL's KV cache in generation)")
    parser.add_argument("--trl_bf16", action="store_true",
                        help="TRL in torch's bf16 mixed precision (autocast around every forward, fp32 weights): "
                             "the peer of --matmul_dtype bfloat16")
    parser.add_argument("--check_dtypes", action="store_true",
                        help="instead of timing: what a bf16 reference / reward model changes (KL, rewards)")
    parser.add_argument("--check_batches", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)           # internal: run one of our sides
    parser.add_argument("--reward_path", help=argparse.SUPPRESS)    # internal
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds: {args.rounds}; accepted: a whole number of at least 1")

    if args.side:  # child: set up as `python -m klq_jax.main` is
        from klq_jax.allocator import keep_freed_memory, restart_with_huge_pages

        restart_with_huge_pages([str(Path(__file__).resolve()), *sys.argv[1:]])
        keep_freed_memory()
        print("SIDE_JSON " + json.dumps(run_ours(args)), flush=True)
        return

    from klq_jax.models.gguf import embedded_smollm2_path

    policy_path = Path(args.policy).resolve() if args.policy else embedded_smollm2_path()
    args.policy = str(policy_path)
    reward_path = reward_model_folder(policy_path)
    if args.check_dtypes:
        args.reward_path = str(reward_path)
        check_dtypes(args)
        return
    prompts = prompt_ids(args, str(reward_path))
    work = Path(tempfile.mkdtemp(prefix="klq_iteration_bench_"))
    (work / "prompts.json").write_text(json.dumps(prompts))
    common = ["--new_tokens", str(args.new_tokens), "--epochs", str(args.epochs),
              "--iterations", str(args.iterations)]
    ours_flags = common + ["--batch", str(args.batch), "--prompt_bucket", str(args.prompt_bucket),
                           "--param_dtype", args.param_dtype, "--compute_dtype", args.compute_dtype,
                           "--matmul_dtype", args.matmul_dtype, "--matmul_precision", args.matmul_precision,
                           "--ref_dtype", args.ref_dtype, "--reward_dtype", args.reward_dtype,
                           *(["--reward_matmul_dtype", args.reward_matmul_dtype] if args.reward_matmul_dtype is not None else []),
                           "--remat", args.remat, "--reward_path", str(reward_path), "--policy", args.policy,
                           "--decode_kernel", args.decode_kernel, "--frozen_matmul_kernel", args.frozen_matmul_kernel,
                           "--cache_dtype", args.cache_dtype, "--overlap_reference", args.overlap_reference,
                           "--replay_sampler_forward", args.replay_sampler_forward,
                           "--replay_gate_up", args.replay_gate_up, "--replay_attention", args.replay_attention,
                           "--replay_probs", args.replay_probs]
    ours_flags += ["--policy_forward"] if args.policy_forward else []
    commands = {}
    for side in args.sides.split(","):
        if side in ("klq", "ppo"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side] + ours_flags
        elif side == "trl":
            cmd = [args.trl_python, str(ROOT / "benchmarks" / "trl_ppo_iteration.py"), "--model", str(policy_path),
                   "--reward_model", str(reward_path), "--prompts", str(work / "prompts.json")] + common
            cmd += ["--gradient_checkpointing"] if args.trl_gradient_checkpointing else []
            cmd += ["--bf16"] if args.trl_bf16 else []
            cmd += ["--device", args.trl_device]
        else:
            raise SystemExit(f"--sides: unknown side {side!r}; accepted: klq, ppo, trl")
        commands[side] = cmd
    rounds = {side: [] for side in commands}
    for r in range(args.rounds):  # the sides in turn, so each meets the machine's fast and slow minutes alike
        for side, cmd in commands.items():
            print(f"running {side} ..." + (f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""),
                  file=sys.stderr, flush=True)
            rounds[side].append(run_child(cmd, work / f"{side}-{r + 1}.log"))
    results = {side: fastest_round(runs) for side, runs in rounds.items()}
    cpu = _cpu_name()
    (work / "results.json").write_text(json.dumps({**results, "cpu": cpu, "all_rounds": rounds}, indent=1))

    dims = model_dims(policy_path)
    cols = [s for s in ("klq", "ppo", "trl") if s in results]
    names = {"klq": "ours KLQ", "ppo": "ours PPO", "trl": "TRL PPO"}
    rows = {s: best(results[s]) for s in cols}
    mm = next((results[s]["matmul_gflops_jax"] for s in ("klq", "ppo") if s in results), None)
    effective = make_config(args, "klq", str(reward_path))
    print(f"One iteration: {args.batch} prompts x {args.new_tokens} response tokens, {args.epochs} epoch(s), "
          f"1 minibatch; {policy_path.name} policy/reference/reward (TRL: + value model); "
          f"params {args.param_dtype}, compute {args.compute_dtype}, matmuls {args.matmul_dtype or args.compute_dtype}"
          + (f" at precision {args.matmul_precision}" if args.matmul_precision != "default" else "") + ", "
          f"reference {effective.model.reference_dtype}, decode {args.decode_kernel}, "
          f"frozen matmuls {args.frozen_matmul_kernel}, KV cache {args.cache_dtype}, "
          f"reward {effective.reward.dtype} (matmuls {_reward_matmuls(effective)}); "
          + (f"TRL {'bf16 autocast matmuls, fp32 weights' if args.trl_bf16 else 'fp32'}; " if "trl" in results else "")
          + f"{cpu}, {os.cpu_count()} cores")
    devices = {s: results[s].get("device", "cpu") for s in cols}
    on_gpu = {s for s in cols if devices[s] != "cpu"}
    if on_gpu:
        print("devices: " + ", ".join(f"{names[s]} on {devices[s]}" for s in cols))
    header = f"{'phase (s)':<22}" + "".join(f"{names[s]:>12}" for s in cols)
    if "trl" in cols:
        header += "".join(f"{'TRL/' + names[s].split()[1]:>11}" for s in cols if s != "trl")
    overlapped = [names[s] for s in cols if results[s].get("overlap_reference")]
    if overlapped:
        print(f"{', '.join(overlapped)}: the reference forward ran on a second thread beside the reward "
              "(reward.overlap_reference); their rows overlap, reward+reference is their joint time")
    replayed = [names[s] for s in cols if results[s].get("replay_sampler_forward")]
    if replayed:
        print(f"{', '.join(replayed)}: the update replayed the layer states and log-probabilities the sampler "
              "recorded instead of running its own forward over the layers and the LM head "
              "(rl.replay_sampler_forward)")
    gate_up = [names[s] for s in cols if results[s].get("replay_gate_up")]
    if gate_up:
        print(f"{', '.join(gate_up)}: the update's MLPs replayed the gate|up projections the sampler recorded in bf16 "
              "(rl.replay_gate_up)")
    attention = [names[s] for s in cols if results[s].get("replay_attention")]
    if attention:
        print(f"{', '.join(attention)}: and their attention the q|k|v and output projections (rl.replay_attention)")
    probs = [names[s] for s in cols if results[s].get("replay_probs")]
    if probs:
        print(f"{', '.join(probs)}: the update's LM-head backward read the sampler's onehot - softmax in bf16 instead "
              "of recomputing the logits (rl.replay_probs)")
    if args.rounds > 1:
        print(f"{args.rounds} rounds of the sides in turn; each side's figures are from its round with the fastest "
              "iteration, its peak RSS the highest of its rounds")
    print(header)
    labels = {"cpu": "iteration CPU-s", "scoring": "reward+reference"}
    for phase in PHASES[:3] + ("scoring",) + PHASES[3:] + ("iteration", "cpu"):
        label = labels.get(phase, phase)
        line = f"{label:<22}" + "".join(f"{rows[s][phase]:>12.2f}" for s in cols)
        if "trl" in cols:
            line += "".join(f"{rows['trl'][phase] / rows[s][phase]:>11.1f}" if rows[s][phase] >= 0.05 else
                            f"{'-':>11}" for s in cols if s != "trl")  # no ratio to a skipped phase
        print(line)
    for s in cols:
        if s != "trl":
            print(f"{'first iteration ' + s:<22}{results[s]['iterations'][0]['iteration']:>12.2f}"
                  "   (includes compilation)")
    line = f"{'peak RSS (GiB)':<22}" + "".join(f"{results[s]['rss_peak_gib']:>12.2f}" for s in cols)
    if "trl" in cols:
        line += "".join(f"{results['trl']['rss_peak_gib'] / results[s]['rss_peak_gib']:>11.1f}"
                        for s in cols if s != "trl")
    print(line)
    print(f"{'RSS after setup (GiB)':<22}" + "".join(f"{results[s]['rss_setup_gib']:>12.2f}" for s in cols))
    if on_gpu:  # each side's own allocator's peak on its accelerator (JAX's BFC; torch's caching allocator)
        line = f"{'device peak (GiB)':<22}" + "".join(
            f"{results[s]['device_peak_gib']:>12.2f}" if s in on_gpu else f"{'-':>12}" for s in cols)
        if "trl" in on_gpu:
            line += "".join(f"{results['trl']['device_peak_gib'] / results[s]['device_peak_gib']:>11.1f}"
                            if s in on_gpu else f"{'-':>11}" for s in cols if s != "trl")
        print(line)
    summary = {}
    seq = {s: results[s]["prompt_len"] + args.new_tokens for s in cols}
    for s in cols:
        flops = update_flops(dims, args.batch, seq[s], args.epochs, backbones=2 if s == "trl" else 1,
                             head_positions=None if s == "trl" else args.new_tokens)
        gflops = flops / rows[s]["update"] / 1e9
        side_mm = results[s].get("matmul_gflops_jax", mm)  # ours: its own; TRL: ours (the same jnp matmul)
        frac = (f", {gflops / side_mm['fp32']:.0%} of jnp fp32 matmul ({side_mm['fp32']:.0f}), "
                f"{gflops / best_matmul(side_mm):.0%} of the better of jnp and numpy" if mm else "")
        if mm and s != "trl" and args.matmul_dtype == "bfloat16":
            frac += f"; {gflops / side_mm['bf16']:.0%} of jnp's bf16 x bf16 -> fp32 matmul ({side_mm['bf16']:.0f})"
        print(f"update {names[s]}: T={seq[s]}, {flops / 1e12:.2f} TFLOP, {gflops:.0f} GFLOP/s{frac}")
        summary[s] = gflops
    if mm:
        n = next(results[s].get("matmul_n", 2048) for s in cols if s != "trl")
        print(f"matmul {n}^3 (same run; ours: each side's own, the mean of before and after its iterations): "
              f"fp32 {mm['fp32']:.0f} GFLOP/s, bf16 {mm['bf16']:.0f} GFLOP/s; numpy fp32 {mm['fp32_numpy']:.0f} GFLOP/s"
              + (f"; torch fp32 {results['trl']['matmul_gflops_torch_fp32']:.0f} GFLOP/s" if "trl" in cols else "")
              + (f", bf16 {results['trl']['matmul_gflops_torch_bf16']:.0f} GFLOP/s"
                 if "matmul_gflops_torch_bf16" in results.get("trl", {}) else ""))
    floors = {}
    for s in cols:
        if s == "trl" or "stream_gbs" not in results[s]:
            continue
        side_mm = results[s]["matmul_gflops_jax"]
        peak = max(best_matmul(side_mm), side_mm["bf16"] if args.matmul_dtype == "bfloat16" else 0)
        reward_peak = max(peak, side_mm["bf16"] if _reward_matmuls(effective).startswith("bfloat16") else 0)
        floors[s] = phase_floors(dims, args.batch, results[s]["prompt_len"], args.new_tokens, args.epochs, peak,
                                 results[s]["stream_gbs"], weight_bytes=4 if args.param_dtype == "float32" else 2,
                                 decode_weight_bytes=2 if args.matmul_dtype == "bfloat16" else None,
                                 reward_gflops=reward_peak)
        floors[s]["iteration"] = sum(floors[s].values())
        floors[s]["scoring"] = floors[s]["reward"] + floors[s]["reference"]
        print(f"floors {names[s]} (the least time each phase's work takes here: matmuls at {peak:.0f} GFLOP/s, the "
              f"better of jnp and numpy; decode reads at {results[s]['stream_gbs']:.1f} GB/s, a jitted jnp.sum):")
        print(f"{'  phase':<22}{'time (s)':>10}{'floor (s)':>11}{'floor/time':>12}")
        for phase in ("sample", "reward", "reference", "scoring", "update", "iteration"):
            print(f"{'  ' + labels.get(phase, phase):<22}{rows[s][phase]:>10.2f}{floors[s][phase]:>11.2f}"
                  f"{floors[s][phase] / rows[s][phase]:>12.0%}")
        if "trl" in cols:
            print(f"  at its floor, {names[s]} would be {rows['trl']['iteration'] / floors[s]['iteration']:.2f}x "
                  f"TRL's {rows['trl']['iteration']:.1f} s on this machine")
    for s in cols:
        v = results[s]["versions"]
        print(f"{names[s]}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
        if results[s].get("curves"):
            c = results[s]["curves"]
            print(f"  reward {[round(x['rollout/reward'], 3) for x in c]}, kl {[round(x['rollout/kl'], 4) for x in c]}")
    print(f"(raw results: {work / 'results.json'})")

    out = {}
    if "trl" in cols:
        for s in ("klq", "ppo"):
            if s in cols:
                key = "" if s == "klq" else "_ppo"
                out[f"speedup_vs_trl{key}"] = rows["trl"]["iteration"] / rows[s]["iteration"]
                out[f"rss_ratio{key}"] = results[s]["rss_peak_gib"] / results["trl"]["rss_peak_gib"]
        out["trl_iteration_s"] = rows["trl"]["iteration"]
        out["trl_rss_gib"] = results["trl"]["rss_peak_gib"]
        if "trl" in on_gpu:
            out["trl_device_peak_gib"] = results["trl"]["device_peak_gib"]
        out["trl_bf16"] = float(args.trl_bf16)
        out["rounds"] = args.rounds
        for s in ("klq", "ppo"):
            if s in on_gpu and "trl" in on_gpu:
                key = "" if s == "klq" else "_ppo"
                out[f"device_peak_ratio{key}"] = results[s]["device_peak_gib"] / results["trl"]["device_peak_gib"]
    for s in ("klq", "ppo"):
        if s in cols:
            out[f"{s}_iteration_s"] = rows[s]["iteration"]
            out[f"{s}_rss_gib"] = results[s]["rss_peak_gib"]
            if s in on_gpu:
                out[f"{s}_device_peak_gib"] = results[s]["device_peak_gib"]
            if mm:
                out[f"{s}_update_mm_fraction"] = summary[s] / results[s]["matmul_gflops_jax"]["fp32"]
                out[f"{s}_update_best_mm_fraction"] = summary[s] / best_matmul(results[s]["matmul_gflops_jax"])
                out[f"{s}_matmul_fp32_gflops"] = results[s]["matmul_gflops_jax"]["fp32"]
                out[f"{s}_numpy_matmul_fp32_gflops"] = results[s]["matmul_gflops_jax"]["fp32_numpy"]
            if s in floors:
                out[f"{s}_floor_s"] = floors[s]["iteration"]
                out[f"{s}_floor_over_iteration"] = floors[s]["iteration"] / rows[s]["iteration"]
                if "trl" in cols:
                    out[f"{s}_max_speedup_vs_trl"] = rows["trl"]["iteration"] / floors[s]["iteration"]
            if mm:
                if args.matmul_dtype == "bfloat16":  # the update's matmuls are bf16 x bf16 -> fp32: that is its peak
                    out[f"{s}_update_bf16_mm_fraction"] = summary[s] / results[s]["matmul_gflops_jax"]["bf16"]
                    out[f"{s}_matmul_bf16_gflops"] = results[s]["matmul_gflops_jax"]["bf16"]
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in out.items()))


def _reward_matmuls(config) -> str:
    """The reward model's matmul operand dtype the config resolves to on this machine ("auto" included)."""
    import jax.numpy as jnp

    from klq_jax import trainer

    dtype = trainer._reward_matmul_dtype(config)
    name = jnp.dtype(dtype).name if dtype is not None else config.model.compute_dtype
    return f"{name}, from 'auto'" if config.reward.matmul_dtype == "auto" else name


def _amd_zen(family: int, model: int) -> str | None:
    """AMD's core generation from the CPUID family and model (/proc/cpuinfo's decimal values)."""
    if family == 23:
        return "Zen 2" if model >= 0x30 else "Zen/Zen+"
    if family == 25:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    if family == 26:
        return "Zen 5"
    return None


def _cpu_name() -> str:
    """The CPU's model name, its core generation and its widest vector ISA. The same model name ("AMD EPYC")
    covers VMs on Zen 3 (AVX2 only), Zen 4 (AVX-512 on 256-bit units) and faster AVX-512 hosts, on which XLA's
    and torch's kernels, and so the ratios, differ."""
    name, flags, family, model = "CPU", set(), None, None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and name == "CPU":
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu family" and family is None:
                family = int(value)
            elif key == "model" and model is None:
                model = int(value)
    except (OSError, ValueError):
        return name
    parts = [name]
    if family is not None and model is not None:
        zen = _amd_zen(family, model) if "AMD" in name else None
        parts.append(f"family {family} model {model}" + (f" ({zen})" if zen else ""))
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    if isa:
        # what bf16 dots run on: AVX-512 BF16 (~2x XLA's fp32 matmul on Zen 4 and 5), AMX (3.4-4.8x on stop 18's Xeon)
        isa += "".join(f" + {label}" for flag, label in (("avx512_bf16", "BF16"), ("amx_bf16", "AMX-BF16"))
                       if flag in flags)
        parts.append(isa)
    return ", ".join(parts)


if __name__ == "__main__":
    main()
