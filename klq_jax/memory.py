"""Per-device memory of a training run: an estimate from shapes, and (on any backend, CPU included) XLA's
own numbers for the compiled programs.

    python -m klq_jax.memory --model pythia-1b --batch 64 --prompt 512 --response 53 --mesh 1,4,1 \
        --minibatches 4 --dtype bfloat16 [--reward-model pythia-1b] [--measure]

What one device holds (bytes per device; `B` the rollout batch, `P` the padded prompt, `T = P + N` with
`N` new tokens, `n = data*fsdp` the batch split, `tp` the tensor size, `a` the compute dtype's bytes, `h, k,
f, V` heads, KV heads, MLP width and vocabulary divided by `tp` where it divides them):

    resident  policy params + AdamW moments (mu in `optim.mu_dtype`, bf16 by default; nu in the params'
              dtype; both with the params' sharding) + reference params,
              exact: the sharding rules of `klq_jax.sharding` applied to the abstract models; + the
              reward model's params (`HFRewardModel` keeps them whole on one device of each host
              unless `--reward-sharded`) + the rollout batch.
    update    gradients (x2 with microbatches: the running sum and the current one; + one parameter-sized
              buffer XLA keeps at the optimiser step when autodiff writes the layers' backward, i.e.
              without remat "full") + the activations of one microbatch of
              `b = B / (minibatches * microbatches * n)` rows, per layer the residuals kept for the
              backward pass, per token:
                  none  (3a+4)*d + 2a*(h+2k)*hd + (8+a)*h*T + {4 gated, 2 plain}*a*f
                  dots  2a*d + a*(h+2k)*hd + {2 gated, 1 plain}*a*f    (matmul outputs)
                  full  a*d                                          (the layer input)
              (with remat, plus one layer's full residuals while it is recomputed), the float32
              logits `b*N*V*4` twice (the logits, then the softmax turned into their gradient in place:
              only the positions that predict a response token, `Rollout.first_action`), and with
              `fsdp > 1` the all-gathered weights: the output-vocabulary matrix and two layers. With
              remat "full" (`transformer.remat_layer_scan`) the gradient buffers exist only after the
              LM head's backward: the larger of gradients and logits counts, not their sum.
    forward   old logprobs/values and reference logprobs over `B/n` rows at once: the largest of one
              layer's activations (+ two gathered layers), the `N` positions' local logits (+ the
              gathered vocabulary matrix) and two float32 copies of those logits, one of
              them over the whole vocabulary when `tensor > 1`: the layers are done before the logits
              exist.
    sample    the KV cache `2*L*(B/n)*T*k*hd*a`, the prefill over `P` (the float32 logits of its last
              position, attention scores, two f-wide MLP tensors, a few d-wide tensors) and with FSDP the gathered
              vocabulary matrix twice (the prefill's and the one hoisted out of the decode loop).

    peak = resident + max(update, forward, sample)

The phases run one after another, so their temporaries do not add up (on one CPU device the reward runs beside
the reference forward, `reward.overlap_reference`: its model's temporaries, not counted here, then add to the
forward's; with one update step per rollout on one device the sampler's recorded layer states,
`rl.replay_sampler_forward`, L x B x T x d in the checkpoint dtype (bf16 with `rl.replay_attention="on"`) plus
B x T x d fp32, and with bf16 matmuls (or `rl.replay_gate_up="on"`) and the native decode step the gate|up
projections, B x L x T x 2f bf16 (with `rl.replay_attention="on"` B x L x T x (2f + (h + 2k) hd + d)), and with
`rl.replay_probs="on"` each action's onehot - softmax, V x N x B bf16, live from the rollout to the update: not
counted either, and they stand in for the update forward's own saved layer inputs). `--measure` compiles the real
update step, policy forward and sampler on abstract inputs (nothing is allocated, so the
full-size models work on a laptop) over fake CPU devices and prints XLA's
per-device argument and temporary sizes next to the estimate. For float32 programs without remat the estimate
is within -13%..+21% of XLA:CPU's temporaries,
with remat "full" the update within -3%..+6%; remat "dots" updates and remat forwards are overestimated by up
to 1.6x (docs/scaling.md has the comparison); bfloat16
programs cannot be checked on CPU, which computes bfloat16 dots in float32 from converted copies (TPUs and
GPUs compute in bfloat16 natively).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from klq_jax.models.config import ModelConfig, from_hf_config

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Architectures of the models the configs name (their HF config.json), so no download is needed.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, rotary_dim=16),
    "smollm2-135m": ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                max_position_embeddings=8192, tie_embeddings=True, rope_theta=100000.0,
                                rotary_dim=64),
    "pythia-160m": ModelConfig(family="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
                               num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                               max_position_embeddings=2048, attention_bias=True, output_bias=True, mlp_bias=True,
                               activation="gelu", rotary_dim=16, parallel_residual=True),
    "pythia-1b": ModelConfig(family="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                             num_layers=16, num_heads=8, num_kv_heads=8, head_dim=256, max_position_embeddings=2048,
                             attention_bias=True, output_bias=True, mlp_bias=True, activation="gelu", rotary_dim=64,
                             parallel_residual=True),
    "pythia-2.8b": ModelConfig(family="gpt_neox", vocab_size=50304, hidden_size=2560, intermediate_size=10240,
                               num_layers=32, num_heads=32, num_kv_heads=32, head_dim=80,
                               max_position_embeddings=2048, attention_bias=True, output_bias=True, mlp_bias=True,
                               activation="gelu", rotary_dim=20, parallel_residual=True),
    "pythia-6.9b": ModelConfig(family="gpt_neox", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
                               num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                               max_position_embeddings=2048, attention_bias=True, output_bias=True, mlp_bias=True,
                               activation="gelu", rotary_dim=32, parallel_residual=True),
    "llama3-8b": ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                             rope_theta=500000.0, rotary_dim=128,
                             rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                           ("original_max_position_embeddings", 8192))),
}

# HBM per device (GiB) of accelerators the launch scripts know (one JAX device per chip).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "a100-40gb": 40, "a100-80gb": 80, "h100": 80, "h200": 141}


def model_config(name: str) -> ModelConfig:
    """A preset name, an HF folder with config.json, or a config.json path."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model={name!r}: not a preset or a config.json; accepted: {sorted(PRESETS)} or an HF "
                         "folder / config.json path")
    return from_hf_config(json.loads(path.read_text()))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the run does with the model (global sizes; the mesh splits them)."""

    batch_size: int = 64            # rollout batch (episodes), global
    prompt_len: int = 512           # padded prompt length P
    response_len: int = 53          # max new tokens N; T = P + N
    num_minibatches: int = 4
    num_microbatches: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    reference: bool = True          # a separate reference model (always, in this project)
    reward_model: ModelConfig | None = None  # a learned reward model (score head)
    reward_dtype: str | None = None          # its parameter dtype (default: float32, HFRewardModel's default)
    reward_sharded: bool = False    # False: HFRewardModel's params on one device per host

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


@dataclasses.dataclass
class Estimate:
    """Bytes per device, by component and phase."""

    params: int
    optimizer: int
    reference: int
    reward_model: int
    batch: int
    gradients: int
    activations: int
    logits: int
    gathered: int
    forward: int
    kv_cache: int
    sample_temps: int
    # remat="full" (`remat_layer_scan`): the gradient buffers are made after the LM head's backward, so
    # the logits and the gradients are not alive at once.
    gradients_after_logits: bool = False

    @property
    def resident(self) -> int:
        return self.params + self.optimizer + self.reference + self.reward_model + self.batch

    @property
    def update(self) -> int:
        if self.gradients_after_logits:
            return max(self.gradients, self.logits) + self.activations + self.gathered
        return self.gradients + self.activations + self.logits + self.gathered

    @property
    def sample(self) -> int:
        return self.kv_cache + self.sample_temps

    @property
    def peak(self) -> int:
        return self.resident + max(self.update, self.forward, self.sample)

    def rows(self) -> list[tuple[str, int]]:
        return [("policy params", self.params), ("AdamW moments", self.optimizer), ("reference params", self.reference),
                ("reward model params", self.reward_model), ("rollout batch", self.batch),
                ("= resident", self.resident),
                ("update: gradients (+update temps)", self.gradients), ("update: activations", self.activations),
                ("update: logits", self.logits), ("update: FSDP-gathered weights", self.gathered),
                ("= update temporaries", self.update),
                ("forward temporaries", self.forward),
                ("sample: KV cache", self.kv_cache), ("sample: prefill temps", self.sample_temps),
                ("= sample temporaries", self.sample),
                ("peak = resident + max(update, forward, sample)", self.peak)]

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(resident=self.resident, update=self.update, sample=self.sample, peak=self.peak)
        return out


def _mesh_sizes(mesh) -> dict[str, int]:
    from klq_jax.sharding import MESH_AXES, axis_sizes

    if isinstance(mesh, (tuple, list)):
        return dict(zip(MESH_AXES, mesh))
    return axis_sizes(mesh)


def abstract_model(cfg: ModelConfig, *, value_head=False, score_head=False, param_dtype="float32",
                   compute_dtype="float32", remat="none"):
    """`(graphdef, abstract params)` of a CausalLM, without allocating."""
    import jax.numpy as jnp
    from flax import nnx

    from klq_jax.models.transformer import CausalLM

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    model = nnx.eval_shape(lambda: CausalLM(cfg, lm_head=not score_head, value_head=value_head,
                                            score_head=score_head, param_dtype=dt[param_dtype],
                                            dtype=dt[compute_dtype], remat=remat, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _split(n: int, by: int) -> float:
    """Per-device share of a dimension of size n split `by` ways (replicated if it does not divide)."""
    return n / by if by > 1 and n % by == 0 else float(n)


def estimate(cfg: ModelConfig, work: Workload, mesh) -> Estimate:
    """Per-device bytes of a run of `work` with policy/reference `cfg` on `mesh` (a Mesh, an AbstractMesh,
    `{axis: size}` or `(data, fsdp, tensor)`). Parameters and optimiser state are exact (the sharding rules
    applied to the abstract model); activations follow the formulas in the module docstring."""
    import jax

    from klq_jax.rl.train_step import default_optim_config, make_optimizer
    from klq_jax.sharding import check_batch, per_device_bytes, weights_whole

    sizes = _mesh_sizes(mesh)
    check_batch(work.batch_size, sizes, num_minibatches=work.num_minibatches,
                num_microbatches=work.num_microbatches, process_count=1)
    n, tp = sizes.get("data", 1) * sizes.get("fsdp", 1), sizes.get("tensor", 1)
    _, policy = abstract_model(cfg, value_head=True, param_dtype=work.param_dtype)
    params = per_device_bytes(policy, sizes)
    opt_state = jax.eval_shape(make_optimizer(default_optim_config()).init, policy)
    optimizer = per_device_bytes(opt_state, sizes)
    reference = per_device_bytes(abstract_model(cfg, param_dtype=work.param_dtype)[1], sizes) if work.reference else 0
    reward = 0
    if work.reward_model is not None:
        _, rm = abstract_model(work.reward_model, score_head=True, param_dtype=work.reward_dtype or "float32")
        reward = per_device_bytes(rm, sizes) if work.reward_sharded else per_device_bytes(rm, {})

    a = DTYPE_BYTES[work.compute_dtype]
    B, P, T = work.batch_size, work.prompt_len, work.seq_len
    d, f, L, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size, cfg.head_dim
    h_l, k_l, f_l, v_l = _split(cfg.num_heads, tp), _split(cfg.num_kv_heads, tp), _split(f, tp), _split(V, tp)
    # Rollout split over the batch axes: [B, T] fields 2 int32 + 2 bool + 7 float32, [B] fields 2 bool + 1 float32.
    batch = int(B / n * (T * (2 * 4 + 2 * 1 + 7 * 4) + 2 * 1 + 4))

    # One layer's residuals for the backward pass, per token (bytes).
    mlp_tensors = 4 if cfg.family == "llama" else 2
    full_layer = ((3 * a + 4) * d + 2 * a * (h_l + 2 * k_l) * hd + (4 + a) * h_l * T + mlp_tensors * a * f_l)
    train_layer = full_layer + 4 * h_l * T  # + the float32 attention probabilities kept for the backward
    saved = {"none": train_layer,
             "dots": 2 * a * d + a * (h_l + 2 * k_l) * hd + (2 if cfg.family == "llama" else 1) * a * f_l,
             "full": a * d}[work.remat]
    b = B / (work.num_minibatches * work.num_microbatches * n)
    activations = b * T * (L * saved + (train_layer if work.remat != "none" else 0))
    N = T - P  # logit positions of a rollout forward: P-1..T-2, those that predict a response token
    logits = 2 * b * N * v_l * 4  # the logits, then the softmax turned into their gradient in place
    # Gradients (+ the running sum with microbatches). `clipped_adamw` writes the moments and the parameters in
    # place as it reads them, but with the layers' backward written by autodiff (remat "none"/"dots") XLA keeps
    # one more parameter-sized buffer at the optimiser step (measured on XLA:CPU, docs/scaling.md).
    gradients = params * ((2 if work.num_microbatches > 1 else 1) + (0 if work.remat == "full" else 1))

    # FSDP: a weight split over `fsdp` is all-gathered (to its tensor share) where it is used. XLA keeps the
    # output-vocabulary matrix whole for a phase (in the sampler twice: the prefill's copy and the one
    # hoisted out of the decode loop) and gathers the layers one at a time (two in flight).
    p_bytes = DTYPE_BYTES[work.param_dtype]
    vocab_mat = d * v_l * (p_bytes + (a if a != p_bytes else 0))
    layer_full = (d * (h_l + 2 * k_l) * hd + h_l * hd * d + (3 if cfg.family == "llama" else 2) * d * f_l) * p_bytes
    fsdp = sizes.get("fsdp", 1) > 1
    gathered_vocab, gathered_layers = (vocab_mat, 2 * layer_full) if fsdp else (0, 0)

    # Inference forwards over `B/n` rows: the layers run one at a time, then the float32 logits (and their
    # log-softmax/entropy, partly fused: two copies) live after the layers are done; the peak is the larger.
    rows = B / n
    # With `tensor > 1` the log-softmax gathers the vocabulary: one copy is whole.
    logits_fwd = rows * N * (v_l + (V if tp > 1 else v_l)) * 4
    # The gathered vocabulary matrix lives while the (local) logits are made, not while they are gathered.
    forward = max(rows * T * full_layer + gathered_layers, logits_fwd, rows * N * v_l * 4 + gathered_vocab)
    # With whole weights per device the sampler also holds a per-layer copy of the blocks' weights
    # (`CausalLM.unstack_layers`: decode steps read them in place).
    kv_cache = 2 * L * rows * T * k_l * hd * a
    blocks_local = 0
    if weights_whole(sizes):  # the decode loop's per-layer copies (as `sharding.global_sample` decides)
        blocks_local = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(policy["blocks"]))
    sample_temps = (rows * (v_l * 4 + P * ((4 + a) * h_l * T + 4 * a * d + 2 * a * f_l)) + 2 * gathered_vocab
                    + gathered_layers
                    + blocks_local)
    return Estimate(params=int(params), optimizer=int(optimizer), reference=int(reference), reward_model=int(reward),
                    batch=batch, gradients=int(gradients), activations=int(activations), logits=int(logits),
                    gathered=int(gathered_vocab + gathered_layers), forward=int(forward), kv_cache=int(kv_cache),
                    sample_temps=int(sample_temps), gradients_after_logits=work.remat == "full")


# ----------------------------------------------------------------------------- measurement


def measure(cfg: ModelConfig, work: Workload, mesh) -> dict[str, Any]:
    """XLA's per-device sizes for the compiled update step, policy forward and sampler on `mesh` (a Mesh
    with enough devices; the inputs are abstract, so nothing is allocated). Keys: `<phase>/arguments`,
    `<phase>/temps`, `<phase>/outputs`, `<phase>/aliased`, `resident` (the train state + batch) and `platform`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from klq_jax import sharding as shd
    from klq_jax.models import sampler as sampler_lib
    from klq_jax.rl import loop
    from klq_jax.rl.train_step import (Rollout, TrainState, default_algo_config, default_optim_config,
                                       make_optimizer, make_train_step)

    graphdef, policy = abstract_model(cfg, value_head=True, param_dtype=work.param_dtype,
                                      compute_dtype=work.compute_dtype, remat=work.remat)
    optimizer = make_optimizer(default_optim_config())
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, 0.05), policy)
    state_sh = shd.param_shardings(state, mesh)
    abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),  # noqa
                                             tree, sh)
    state_in = abstract(state, state_sh)

    def apply_fn(p, tokens_bt, positions_bt, mask_bt, logits_from=0, logits_to=None):
        out = nnx.merge(graphdef, p)(tokens_bt, positions_bt, mask_bt, logits_from=logits_from, logits_to=logits_to)
        return out.logits_btv, out.values_bt

    algo = default_algo_config()
    algo.num_microbatches = work.num_microbatches
    B, T = work.batch_size, work.seq_len
    mb = B // work.num_minibatches

    def rollout(rows):
        i, f, bo = jnp.int32, jnp.float32, jnp.bool_
        shapes = dict(tokens_bt=((rows, T), i), positions_bt=((rows, T), i), attention_mask_bt=((rows, T), bo),
                      response_mask_bt=((rows, T), bo), sample_logp_bt=((rows, T), f), eos_b=((rows,), bo),
                      truncated_b=((rows,), bo), rewards_b=((rows,), f), old_logp_bt=((rows, T), f),
                      ref_logp_bt=((rows, T), f), old_values_bt=((rows, T), f), advantages_bt=((rows, T), f),
                      targets_bt=((rows, T), f), entropy_bt=((rows, T), f))
        return Rollout(**{k: jax.ShapeDtypeStruct(s, d, sharding=shd.batch_sharding(mesh))
                          for k, (s, d) in shapes.items()}, first_action=work.prompt_len)

    out: dict[str, Any] = {}

    def record(name, compiled):
        m = compiled.memory_analysis()
        out[f"{name}/arguments"] = int(m.argument_size_in_bytes)
        out[f"{name}/temps"] = int(m.temp_size_in_bytes)
        out[f"{name}/outputs"] = int(m.output_size_in_bytes)
        out[f"{name}/aliased"] = int(m.alias_size_in_bytes)

    with jax.set_mesh(mesh):
        step = shd.shard_train_step(make_train_step(apply_fn, algo, optimizer, jit=False), state, mesh)
        record("update", step.lower(state_in, rollout(mb)).compile())
        full = rollout(B)
        forward = loop.make_policy_forward(apply_fn, 1.0)
        record("forward", forward.lower(state_in.params, full).compile())
        P = work.prompt_len
        prompt = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=shd.batch_sharding(mesh))
        prompt_mask = jax.ShapeDtypeStruct((B, P), jnp.bool_, sharding=shd.batch_sharding(mesh))
        key = jax.eval_shape(lambda: jax.random.key(0))
        dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[work.compute_dtype]
        lowered = sampler_lib._generate.lower(
            graphdef, state_in.params, prompt, prompt_mask, key, jnp.float32(1.0), jnp.float32(1.0),
            max_new_tokens=work.response_len, top_k=0, eos_ids=(0,), pad_id=0, cache_dtype=dt,
            unstack_layers=shd.weights_whole(mesh))
        record("sample", lowered.compile())
    out["platform"] = mesh.devices.flat[0].platform
    n = shd.batch_divisor(mesh)
    out["resident"] = shd.per_device_bytes(state, mesh) + sum(
        math.prod(x.shape) * x.dtype.itemsize // n for x in jax.tree.leaves(rollout(B)))
    return out


# ----------------------------------------------------------------------------- CLI


def _fmt(n: float) -> str:
    return f"{n / GIB:8.3f} GiB" if n >= 0.1 * GIB else f"{n / 2 ** 20:8.1f} MiB"


def report(cfg: ModelConfig, work: Workload, mesh_shape: tuple[int, ...], est: Estimate,
           measured: dict[str, int] | None = None, hbm_gib: float | None = None) -> str:
    lines = [f"model: {cfg.family} {cfg.num_params() / 1e9:.2f}B params, mesh data,fsdp,tensor={mesh_shape}, "
             f"batch={work.batch_size} T={work.seq_len} (prompt {work.prompt_len} + response {work.response_len}), "
             f"minibatches={work.num_minibatches} microbatches={work.num_microbatches} params={work.param_dtype} "
             f"compute={work.compute_dtype} remat={work.remat}", "per device:"]
    lines += [f"  {name:48s} {_fmt(v)}" for name, v in est.rows()]
    if hbm_gib:
        lines.append(f"  {'device memory':48s} {hbm_gib:8.3f} GiB  ({100 * est.peak / (hbm_gib * GIB):.0f}% used)")
    if measured:
        lines.append("measured (XLA, compiled on this backend):")
        for phase in ("update", "forward", "sample"):
            lines.append(f"  {phase:8s} arguments {_fmt(measured[f'{phase}/arguments'])}  temps "
                         f"{_fmt(measured[f'{phase}/temps'])}  outputs {_fmt(measured[f'{phase}/outputs'])}")
        lines.append(f"  estimate vs measured temporaries: update {_fmt(est.update)} vs "
                     f"{_fmt(measured['update/temps'])}, forward {_fmt(est.forward)} vs "
                     f"{_fmt(measured['forward/temps'])}, sample {_fmt(est.sample)} vs "
                     f"{_fmt(measured['sample/temps'])}")
        if work.compute_dtype != "float32" and measured.get("platform") == "cpu":
            lines.append("  note: XLA:CPU computes bfloat16 matmuls in float32 from converted copies, so its "
                         "temporaries overstate a TPU's or GPU's; compare float32 programs on CPU (docs/scaling.md)")
    return "\n".join(lines)


def workload_from_config(config, *, reward_model: ModelConfig | None = None, reward_dtype: str | None = None,
                         reward_sharded: bool = False) -> Workload:
    """The Workload of an ml_collections training config (`configs/*.py`)."""
    bucket = config.sampling.prompt_bucket
    prompt = -(-config.data.max_prompt_tokens // bucket) * bucket
    return Workload(batch_size=config.batch_size, prompt_len=prompt, response_len=config.sampling.max_new_tokens,
                    num_minibatches=config.rl.num_minibatches, num_microbatches=config.rl.num_microbatches,
                    param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                    remat=config.model.remat, reward_model=reward_model, reward_dtype=reward_dtype,
                    reward_sharded=reward_sharded)


def load_config(spec: str):
    """`configs/x.py[:arg]` -> `(config, module)`, as `--config` of `klq_jax.main` reads it."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ValueError(f"--config={spec!r}: no such file; accepted: a config file such as configs/scale.py:variant")
    module_spec = importlib.util.spec_from_file_location(f"_klq_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return (module.get_config(arg) if arg else module.get_config()), module


def config_estimate(spec: str, *, reward_sharded: bool = False):
    """Estimate for a variant of a config file with a `HARDWARE` table (configs/scale.py):
    `(estimate, workload, mesh shape, hardware entry)`."""
    from klq_jax.sharding import mesh_shape

    config, module = load_config(spec)
    arg = spec.partition(":")[2]
    hw = getattr(module, "HARDWARE", {}).get(arg)
    if hw is None:
        raise ValueError(f"--config={spec!r} has no HARDWARE entry; pass --model and --devices with the other flags")
    rm = PRESETS[hw["reward_model"]] if hw.get("reward_model") else None
    work = workload_from_config(config, reward_model=rm, reward_dtype=config.reward.dtype or config.model.compute_dtype,
                                reward_sharded=reward_sharded)
    shape = mesh_shape(config.mesh, hw["devices"])
    return estimate(PRESETS[hw["model"]], work, shape), work, shape, hw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klq_jax.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None,
                        help="configs/scale.py:<variant>: model, batch, mesh and machine from the config")
    parser.add_argument("--model", default="pythia-1b", help=f"preset {sorted(PRESETS)} or an HF config.json")
    parser.add_argument("--batch", type=int, default=64, help="rollout batch size (global)")
    parser.add_argument("--prompt", type=int, default=512, help="padded prompt length")
    parser.add_argument("--response", type=int, default=53, help="max new tokens")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the remaining devices)")
    parser.add_argument("--devices", type=int, default=None, help="device count (default: this machine's)")
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="parameter and compute dtype: float32 or bfloat16")
    parser.add_argument("--param-dtype", default=None, help="parameter dtype (overrides --dtype)")
    parser.add_argument("--remat", default="none", choices=["none", "dots", "full"])
    parser.add_argument("--reward-model", default=None, help="a preset or config.json of a learned reward model")
    parser.add_argument("--reward-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the reward model's parameter dtype (HFRewardModel loads float32)")
    parser.add_argument("--reward-sharded", action="store_true", help="reward model sharded like the policy")
    parser.add_argument("--hbm", default=None, help=f"device memory in GiB or a name {sorted(HBM_GIB)}")
    parser.add_argument("--measure", action="store_true",
                        help="also compile the programs (fake CPU devices if needed) and print XLA's sizes")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    args = parser.parse_args(argv)

    from klq_jax.sharding import MeshError, mesh_shape

    try:
        cfg = model_config(args.model)
        rm = model_config(args.reward_model) if args.reward_model else None
        for name, value in (("--dtype", args.dtype), ("--param-dtype", args.param_dtype or args.dtype)):
            if value not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={value!r}; accepted: float32, bfloat16")
        devices = args.devices
        if devices is None:
            import jax

            devices = jax.device_count()
        shape = mesh_shape(args.mesh, devices)
        hbm = None
        if args.hbm:
            hbm = HBM_GIB[args.hbm] if args.hbm in HBM_GIB else float(args.hbm)
    except (ValueError, KeyError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.config:
        try:
            est, work, shape, hw = config_estimate(args.config, reward_sharded=args.reward_sharded)
        except (ValueError, KeyError, MeshError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cfg = PRESETS[hw["model"]]
        hbm = hbm or (HBM_GIB.get(hw["chip"]) if hw.get("chip") else None)
        measured = measure_on_fake_devices(cfg, work, shape) if args.measure else None
        if args.json:
            print(json.dumps({"mesh": shape, "estimate": est.as_dict(), "measured": measured, "hardware": hw}))
        else:
            print(f"{args.config}: {hw['accelerator']}, {hw['devices']} devices on {hw['hosts']} host(s)")
            print(report(cfg, work, shape, est, measured, hbm))
        return 0
    work = Workload(batch_size=args.batch, prompt_len=args.prompt, response_len=args.response,
                    num_minibatches=args.minibatches, num_microbatches=args.microbatches,
                    param_dtype=args.param_dtype or args.dtype, compute_dtype=args.dtype, remat=args.remat,
                    reward_model=rm, reward_dtype=args.reward_dtype, reward_sharded=args.reward_sharded)
    try:
        est = estimate(cfg, work, shape)
    except MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measured = None
    if args.measure:
        measured = measure_on_fake_devices(cfg, work, shape)
    if args.json:
        print(json.dumps({"mesh": shape, "estimate": est.as_dict(), "measured": measured}))
    else:
        print(report(cfg, work, shape, est, measured, hbm))
    return 0


def measure_on_fake_devices(cfg: ModelConfig, work: Workload, shape: tuple[int, ...]) -> dict[str, Any]:
    """`measure` on this machine's devices if there are enough, else in a subprocess with fake CPU ones."""
    import jax

    from klq_jax.sharding import make_mesh

    if jax.device_count() == math.prod(shape):
        return measure(cfg, work, make_mesh(shape))
    import subprocess

    payload = json.dumps({"cfg": dataclasses.asdict(cfg), "work": {
        k: (dataclasses.asdict(v) if isinstance(v, ModelConfig) else v)
        for k, v in dataclasses.asdict(work).items()}, "shape": list(shape)})
    # LLVM's optimisation level changes code speed, not XLA's buffer sizes: compile fast.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={math.prod(shape)} "
                         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, "-m", "klq_jax.memory", "--_measure-worker", payload], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_worker(payload: str) -> None:
    from klq_jax.sharding import make_mesh

    data = json.loads(payload)
    cfg = _model_config_from_dict(data["cfg"])
    work = dict(data["work"])
    if work.get("reward_model"):
        work["reward_model"] = _model_config_from_dict(work["reward_model"])
    print(json.dumps(measure(cfg, Workload(**work), make_mesh(tuple(data["shape"])))))


def _model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(tuple(x) for x in d["rope_scaling"])
    return ModelConfig(**d)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_measure-worker":
        _measure_worker(sys.argv[2])
    else:
        sys.exit(main())
