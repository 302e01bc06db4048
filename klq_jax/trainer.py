"""The trainer: builds models, tokenizer, prompts, reward and the online loop from a config, and runs it
with checkpoints, logs and the final HF export. `klq_jax.main` is a thin CLI over `train`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax import hardware, sharding
from klq_jax.allocator import release_freed_memory
from klq_jax.data.datasets import DataError, PromptExample, PromptStream, load_prompts, to_messages, to_text
from klq_jax.models.hf import CheckpointError, export_model, load_model, resolve_checkpoint
from klq_jax.models.sampler import DECODE_KERNELS, Sampler, bucket_length, use_native_decode
from klq_jax.models.transformer import (REPLAY_ATTENTION, REPLAY_GATE_UP, REPLAY_PROBS, CausalLM,
                                       check_frozen_matmul_kernel, pack_frozen, positions_from_mask)
from klq_jax.rewards import Reward, make_reward
from klq_jax.rl import loop as rl_loop
from klq_jax.rl.train_step import Rollout, make_optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A config value the trainer cannot use."""


@dataclasses.dataclass
class Prompt:
    """A tokenised prompt with what the reward needs."""

    ids: list[int]
    text: str
    reference: str | None


def resolve_model_path(name: str) -> Path:
    if name == "embedded":
        from klq_jax.models.gguf import embedded_smollm2_path

        return embedded_smollm2_path()
    return resolve_checkpoint(name)


def load_tokenizer(path: Path, vocab_size: int):
    from klq_jax.tokenizer import load_tokenizer as load

    try:
        tokenizer = load(path)  # torch-free for a folder with tokenizer.json (klq_jax/tokenizer.py)
    except (OSError, ValueError) as e:  # no tokenizer files, malformed files
        raise CheckpointError(str(e)) from None
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"tokenizer of {str(path)!r} has {len(tokenizer)} tokens but the model's vocabulary "
                              f"is {vocab_size}; accepted: a tokenizer whose ids fit the model")
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer of {str(path)!r} has no EOS token; accepted: a tokenizer with eos_token")
    return tokenizer


def _dtype(name: str, key: str, also: tuple[str, ...] = ()):
    """`DTYPES[name]`; else a ConfigError naming `key`, the value and what is accepted (`also`: the key's other
    accepted values, listed first)."""
    if name not in DTYPES:
        accepted = ", ".join([*also, *map(repr, sorted(DTYPES))]) if also else sorted(DTYPES)
        raise ConfigError(f"{key}={name!r}; accepted: {accepted}")
    return DTYPES[name]


def _choice(name: str, key: str, accepted: tuple[str, ...]) -> str:
    """`name` if it is one of `accepted`; else a ConfigError naming `key`, the value and the accepted values."""
    if name not in accepted:
        raise ConfigError(f"{key}={name!r}; accepted: " + ", ".join(map(repr, accepted)))
    return name


def _cache_dtype(config, compute_dtype):
    """`sampling.cache_dtype`: the rollouts' KV cache; "auto": the compute dtype. bfloat16 halves the cache, and the
    native decode step reads it widened (SmolLM2, 8 x 128 tokens, bf16 matmuls: 0.97-0.99x the rollout's time;
    XLA's step reads a bf16 cache slower, 1.25x)."""
    name = config.sampling.get("cache_dtype", "auto")
    return compute_dtype if name == "auto" else _dtype(name, "sampling.cache_dtype", also=("'auto'",))


# `model.matmul_precision`: JAX's names for how XLA runs matmuls of fp32 operands.
MATMUL_PRECISIONS = ("default", "high", "highest")


def apply_matmul_precision(config) -> None:
    """`model.matmul_precision`, set process-wide before anything compiles. "default" leaves JAX's setting as it
    stands: its per-backend default (full fp32 on CPU; TF32 on NVIDIA GPUs since Ampere: on an H200, fp32 logits
    of SmolLM2-135M's shape were 1.4e-3 relative from transformers' fp32 ones, argmax equal at 99.5% of
    positions; one bf16 pass on TPU), or `JAX_DEFAULT_MATMUL_PRECISION`. "highest": full fp32 everywhere (the
    parity tests' setting; torch's default on GPU). "high": TF32 on GPU, three bf16 passes on TPU. Matmuls of bf16
    operands (`model.matmul_dtype=bfloat16`) are unaffected."""
    name = _choice(config.model.get("matmul_precision", "default"), "model.matmul_precision", MATMUL_PRECISIONS)
    if name != "default":
        jax.config.update("jax_default_matmul_precision", name)


def _matmul_dtype(config):
    """`model.matmul_dtype`: the operands of the models' matmuls (accumulated in fp32); empty: the compute dtype."""
    name = config.model.matmul_dtype
    return _dtype(name, "model.matmul_dtype") if name else None


def _reward_matmul_dtype(config):
    """`reward.matmul_dtype`: the HF reward model's matmul operands; empty: `model.matmul_dtype`'s choice;
    "auto": bf16 where bf16 matmuls are the faster kind (`hardware.bf16_matmul_is_fast`), else as empty."""
    name = config.reward.matmul_dtype
    if name == "auto":
        return jnp.bfloat16 if hardware.this_bf16_matmul_is_fast() else _matmul_dtype(config)
    if not name:
        return _matmul_dtype(config)
    return _dtype(name, "reward.matmul_dtype", also=("'auto'", "'' (model.matmul_dtype)"))


def encode_prompts(examples: list[PromptExample], tokenizer, config) -> list[Prompt]:
    """Chat template (when the tokenizer has one and the config asks for it) or plain text; prompts
    longer than `data.max_prompt_tokens` are an error, or dropped with `data.drop_long_prompts`."""
    task, limit = config.data.task, config.data.max_prompt_tokens
    use_chat = config.data.chat_template and bool(getattr(tokenizer, "chat_template", None))
    prompts, too_long = [], []
    for i, ex in enumerate(examples):
        text = ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"]
        if use_chat:
            ids = tokenizer.apply_chat_template(to_messages(ex, task), add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        else:
            ids = tokenizer(to_text(ex, task))["input_ids"]
        if len(ids) > limit:
            too_long.append((i, len(ids)))
            continue
        prompts.append(Prompt(list(ids), text, ex.reference))
    if too_long and not config.data.drop_long_prompts:
        i, n = too_long[0]
        raise DataError(f"prompt {i} has {n} tokens, over data.max_prompt_tokens={limit} ({len(too_long)} prompts "
                        "are); accepted: raise data.max_prompt_tokens or set data.drop_long_prompts=True")
    if not prompts:
        raise DataError(f"empty prompt set: all {len(examples)} prompts exceed data.max_prompt_tokens={limit}")
    return prompts


def build_reward(config) -> Reward:
    kind = config.reward.kind
    if kind == "similarity":
        return make_reward("similarity")
    if kind == "callable":
        return make_reward(config.reward.path)
    if kind == "hf":
        from klq_jax.reward_models import HFRewardModel

        if not config.reward.path:
            raise ConfigError("reward.kind='hf' needs reward.path (an HF sequence-classification folder or hub id)")
        # Every process scores its own rows; its weights are sharded over the process's local devices.
        mesh = sharding.local_mesh() if jax.local_device_count() > 1 else None
        # One call scores this process's rows of the batch (the model's default pads every call to 16 rows).
        # `reward.dtype`: its storage (default: the compute dtype); it computes in `model.compute_dtype`, so a bf16
        # scorer next to an fp32 policy holds half the memory and rounds only its weights. `reward.matmul_dtype`
        # ("auto": bf16 where bf16 dots are the fast kind): its weights are bf16 already, so bf16 operands round
        # only the activations, and its dots run at XLA:CPU's bf16 -> fp32 speed (about 2x fp32 with AVX-512
        # BF16; ~0.7x on AVX2 alone, hence fp32 there).
        storage = config.reward.dtype or config.model.compute_dtype
        return HFRewardModel(config.reward.path, chat=config.reward.chat,
                             batch_size=max(config.batch_size // jax.process_count(), 1),
                             param_dtype=_dtype(storage, "reward.dtype"),
                             dtype=_dtype(config.model.compute_dtype, "model.compute_dtype"),
                             matmul_dtype=_reward_matmul_dtype(config),
                             matmul_kernel=config.model.get("frozen_matmul_kernel", "auto"), mesh=mesh)
    raise ConfigError(f"reward.kind={kind!r}; accepted: 'similarity', 'hf', 'callable'")


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the loop starts (`policy`, `params` and `ref_params` are
    dropped once the train state and the placed reference hold the weights)."""

    policy: CausalLM | None
    graphdef: Any
    params: Any
    ref_params: Any
    ref_graphdef: Any
    tokenizer: Any
    policy_path: Path
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    sampler: Sampler
    reward: Reward
    prompt_length: int
    matmul_dtype: Any = None  # the models' matmul operands (`model.matmul_dtype`; None: the compute dtype)


OVERLAP_REFERENCE = ("auto", "on", "off")


def _overlap_reference_choice(config) -> str:
    choice = _choice(config.reward.get("overlap_reference", "auto"), "reward.overlap_reference", OVERLAP_REFERENCE)
    if choice == "on" and jax.process_count() > 1:
        raise ConfigError(f"reward.overlap_reference='on' needs one process (this run has {jax.process_count()}); "
                          "accepted here: 'auto', 'off'")
    return choice


def overlap_reference(config, mesh) -> bool:
    """`reward.overlap_reference`: whether the loop runs the reference forward on a second thread while the reward
    scores the rollout (`rl_loop.run(overlap_reference=...)`). "auto": on a single CPU device in one process,
    where two programs side by side fill each other's idle core (SmolLM2 on a 2-core Zen 4: reference + reward in
    0.88-0.91x their time one after the other, docs/performance.md, item 53); on a GPU they would queue on one stream,
    and on a mesh of several devices their collectives would share the devices. "on" needs one process: each
    process's two threads could order the two programs' collectives differently."""
    choice = _overlap_reference_choice(config)
    return choice == "on" or (choice == "auto" and jax.process_count() == 1 and mesh.size == 1
                              and jax.default_backend() == "cpu")


REPLAY_SAMPLER_FORWARD = ("auto", "on", "off")


def _update_steps(config) -> int:
    """Optimiser steps per rollout."""
    return config.rl.epochs * config.rl.num_minibatches


def _replay_choice(config) -> str:
    choice = _choice(config.rl.get("replay_sampler_forward", "auto"), "rl.replay_sampler_forward",
                     REPLAY_SAMPLER_FORWARD)
    if choice == "on":
        steps = _update_steps(config)
        if steps != 1:
            raise ConfigError(f"rl.replay_sampler_forward='on' needs one update step per rollout (rl.epochs * "
                              f"rl.num_minibatches = {steps}); accepted here: 'auto', 'off'")
        if config.model.remat != "full":
            raise ConfigError(f"rl.replay_sampler_forward='on' needs model.remat='full' (got {config.model.remat!r}); "
                              "accepted here: 'auto', 'off'")
        if jax.process_count() > 1:
            raise ConfigError(f"rl.replay_sampler_forward='on' needs one process (this run has "
                              f"{jax.process_count()}); accepted here: 'auto', 'off'")
    return choice


def replay_gate_up_choice(config) -> str:
    """`rl.replay_gate_up` (with `replay_sampler_forward`): whether the sampler also records the MLPs' gate|up
    projections (bf16) and the update's backward replays them instead of recomputing them
    (`CausalLM.replays_gate_up`). "auto": with bf16 matmuls (item 59); "on": with fp32 matmuls too (the MLP's backward
    then reads them rounded to bf16; SmolLM2 fp32 update on a 2-core Zen 1: 0.87x the time for +0.2 GiB, item 66);
    "off"."""
    return _choice(config.rl.get("replay_gate_up", "auto"), "rl.replay_gate_up", REPLAY_GATE_UP)


def replay_attention_choice(config) -> str:
    """`rl.replay_attention` (where the gate|up is replayed: `replay_gate_up_choice`): "on", the sampler records each
    layer's attention q|k|v (before the rotation) and output projection after its gate|up (bf16), and the update's
    backward replays them instead of recomputing those four matmuls; the attention itself (scores, softmax, values)
    is still recomputed from them. With fp32 matmuls the attention's backward then reads them rounded to bf16, and
    the layers' inputs are recorded in bf16 too (they then feed only the norms, whose outputs are the projections'
    weight-gradient operands: -49 MB for SmolLM2's 8 x 176 tokens, item 72).
    SmolLM2 fp32 update on a 2-core Zen 1: 0.92x the time for +0.12 GiB (docs/performance.md, item 67). "off"."""
    return _choice(config.rl.get("replay_attention", "off"), "rl.replay_attention", REPLAY_ATTENTION)


def replay_probs_choice(config, mesh=None) -> str:
    """`rl.replay_probs` (with `replay_sampler_forward`, where the head replays the sampler's log-probabilities): "on",
    the sampler records each drawn token's `onehot - softmax` (bf16, [V, N, B]: 0.1 GiB for SmolLM2's 8 x 128
    tokens) and the update's LM-head backward reads it instead of recomputing the logits, one of the head's three
    matmuls (with fp32 matmuls that backward then reads it rounded to bf16; docs/performance.md, item 71). On one
    device (`mesh.size == 1`): the array leads with the vocabulary, not the batch. "off"."""
    choice = _choice(config.rl.get("replay_probs", "off"), "rl.replay_probs", REPLAY_PROBS)
    return choice if mesh is None or mesh.size == 1 else "off"


def replay_sampler_forward(config, mesh) -> bool:
    """`rl.replay_sampler_forward`: whether the sampler records every layer's input at every slot and the update
    replays them instead of running the policy's forward over the layers (`CausalLM.__call__(replay=...)`). They are
    that forward's values (up to summation order) only at the sampling parameters, so only for one update step per
    rollout (`rl.epochs * rl.num_minibatches == 1`), and the update's backward must recompute each layer from its
    input (`model.remat="full"`). "auto": then, on one device in one process (the recorded states are not split over
    a mesh). SmolLM2-135M, 8 x 176 tokens, bf16 matmuls, 2-core Zen 4: the update 5.21 -> 3.61 s (docs/performance.md,
    item 55). Where the sampler draws from the policy itself (no top-k / top-p), the update's LM head also replays
    the sampler's log-probabilities and log-normalisers (`Rollout.replay_head`): 3.61 -> 3.35 s (item 56)."""
    choice = _replay_choice(config)
    single_step = _update_steps(config) == 1 and config.model.remat == "full"
    return choice == "on" or (choice == "auto" and single_step and jax.process_count() == 1 and mesh.size == 1)


def build(config) -> Setup:
    if config.algo not in ("klq", "ppo"):
        raise ConfigError(f"algo={config.algo!r}; accepted: 'klq', 'ppo'")
    _overlap_reference_choice(config)  # a bad value stops before anything loads
    _replay_choice(config)
    replay_gate_up_choice(config)
    replay_attention_choice(config)
    replay_probs_choice(config)
    decode_kernel = _choice(config.sampling.get("decode_kernel", "auto"), "sampling.decode_kernel", DECODE_KERNELS)
    try:
        frozen_kernel = check_frozen_matmul_kernel(config.model.get("frozen_matmul_kernel", "auto"))
    except ValueError as err:
        raise ConfigError(f"model.{err}") from None
    apply_matmul_precision(config)
    param_dtype = _dtype(config.model.param_dtype, "model.param_dtype")
    compute_dtype = _dtype(config.model.compute_dtype, "model.compute_dtype")
    cache_dtype = _cache_dtype(config, compute_dtype)  # before any model loads
    policy_path = resolve_model_path(config.model.policy)
    # `model.matmul_dtype` applies to the policy, the reference and an HF reward model alike: the KL's two
    # log-probabilities are then computed the same way (equal while the policy equals the reference).
    matmul_dtype = _matmul_dtype(config)
    policy = load_model(policy_path, value_head=True, param_dtype=param_dtype, dtype=compute_dtype,
                        matmul_dtype=matmul_dtype, remat=config.model.remat, seed=config.seed)
    ref_path = resolve_model_path(config.model.reference) if config.model.reference else policy_path
    # The frozen reference is stored in `model.reference_dtype` (bf16 halves it; it still computes in
    # `compute_dtype`): no optimizer state, so nothing needs its fp32 copy.
    ref_dtype = _dtype(config.model.reference_dtype, "model.reference_dtype")
    reference = load_model(ref_path, param_dtype=ref_dtype, dtype=compute_dtype, matmul_dtype=matmul_dtype)
    # With 16-bit matmuls the reference's matmul-only weights are stored in that dtype: the same log-probabilities
    # (every use rounds them so), 0.2 GiB less for SmolLM2-135M and no rounding at every call.
    reference.store_matmul_weights()
    # ... and with bf16 matmuls on a CPU with AMX, packed once into the native matmul's tiles (the same bytes):
    # each reference forward 0.54 -> 0.47 s for SmolLM2-135M, 8 x 176 tokens (docs/performance.md, item 45).
    try:
        pack_frozen(reference, frozen_kernel, devices=jax.device_count())
    except ValueError as err:
        raise ConfigError(f"model.{err}") from None
    # ... and what stays bf16 in its layers stored as bits, which its forward reads in place (item 60).
    reference.store_layers_as_bits()
    if reference.cfg.vocab_size != policy.cfg.vocab_size:
        raise CheckpointError(f"reference vocabulary {reference.cfg.vocab_size} differs from the policy's "
                              f"{policy.cfg.vocab_size}; accepted: a reference with the policy's tokenizer")
    tokenizer = load_tokenizer(policy_path, policy.cfg.vocab_size)
    examples = load_prompts(config.data.source, config.data.train_split, config.data.task,
                            prompt_field=config.data.prompt_field or None,
                            reference_field=config.data.reference_field or None,
                            max_examples=config.data.max_examples or None)
    prompts = encode_prompts(examples, tokenizer, config)
    eval_prompts = []
    if config.eval.num_prompts:
        eval_examples = load_prompts(config.data.source, config.data.eval_split, config.data.task,
                                     prompt_field=config.data.prompt_field or None,
                                     reference_field=config.data.reference_field or None,
                                     max_examples=config.eval.num_prompts)
        eval_prompts = encode_prompts(eval_examples, tokenizer, config)
    prompt_length = bucket_length(max(len(p.ids) for p in prompts + eval_prompts), config.sampling.prompt_bucket)
    total = prompt_length + config.sampling.max_new_tokens
    if total > policy.cfg.max_position_embeddings:
        raise ConfigError(f"prompt ({prompt_length}) + sampling.max_new_tokens ({config.sampling.max_new_tokens}) "
                          f"= {total} tokens exceeds the model context {policy.cfg.max_position_embeddings}")
    eos_ids = {tokenizer.eos_token_id}
    if policy.cfg.eos_token_id is not None:
        eos_ids.add(policy.cfg.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    graphdef, params = nnx.split(policy)
    ref_graphdef, ref_params = nnx.split(reference)
    if decode_kernel.startswith("native"):  # asked for: say now, not at the first rollout, if it cannot run
        try:
            use_native_decode(decode_kernel, policy, cache_dtype, unstack_layers=True)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"sampling.{err}") from None
    sampler = Sampler(graphdef=graphdef, eos_ids=tuple(sorted(eos_ids)), pad_id=pad_id,
                      max_new_tokens=config.sampling.max_new_tokens, temperature=config.rl.temperature,
                      bucket=config.sampling.prompt_bucket, cache_dtype=cache_dtype,
                      compile_ahead=True, decode_kernel=decode_kernel)
    return Setup(policy, graphdef, params, ref_params, ref_graphdef, tokenizer, policy_path, prompts, eval_prompts,
                 sampler, build_reward(config), prompt_length, _matmul_dtype(config))


def lm_apply_fn(graphdef, *, head_logprobs: bool):
    """The update's `apply_fn(params, tokens_bt, positions_bt, mask_bt, logits_from, logits_to, replay)
    -> (logits_btv, values_bt)` for an LM policy split as `graphdef`. With `head_logprobs` it also carries
    `apply_fn.next_token_logprobs` (`CausalLM.next_token_logprobs(with_values=True)`): the loss then takes the
    actions' log-probabilities from the head a block of vocabulary at a time, and with a rollout's replays
    (`Rollout.replay_head`) the head replays the sampler's instead of running its forward."""
    def apply_fn(params, tokens_bt, positions_bt, mask_bt, logits_from: int = 0, logits_to: int | None = None,
                 replay=None):
        out = nnx.merge(graphdef, params)(tokens_bt, positions_bt, mask_bt, logits_from=logits_from,
                                          logits_to=logits_to, replay=replay)
        return out.logits_btv, out.values_bt

    def next_token_logprobs(params, tokens_bt, positions_bt, mask_bt, logits_from: int, temperature, replay=None,
                            replay_head=None):
        model = nnx.merge(graphdef, params)
        return model.next_token_logprobs(tokens_bt, positions_bt, mask_bt, logits_from=logits_from,
                                         temperature=temperature, with_values=True, replay=replay,
                                         replay_head=replay_head)

    if head_logprobs:
        apply_fn.next_token_logprobs = next_token_logprobs
    return apply_fn


def make_fns(setup: Setup, mesh, *, policy_stats: bool = True, replay: bool = False, replay_gate_up: str = "auto",
             replay_attention: str = "off", replay_probs: str = "off"):
    """The injected functions of the loop for an LM policy (the reference's: `make_ref_logprob_fn`).
    `policy_stats` (config `sampling.policy_stats`): the rollout carries the sampler's logprobs, values and
    entropy as the policy's (no policy forward). `replay` (`replay_sampler_forward`): it also carries the sampler's
    layer states, which the policy forward and the update replay; `replay_gate_up` (`replay_gate_up_choice`): the
    MLPs' gate|up projections among them where `CausalLM.replays_gate_up(replay_gate_up)`, and with them the
    attention's q|k|v and output projections where `replay_attention` (`replay_attention_choice`) is "on", and each
    action's `onehot - softmax` where `replay_probs` (`replay_probs_choice`) is "on"."""
    graphdef = setup.graphdef
    sampler = dataclasses.replace(setup.sampler, record_layers=replay, replay_gate_up=replay_gate_up,
                                  replay_attention=replay_attention, replay_probs=replay_probs)
    policy_stats = policy_stats and sampler.top_k == 0 and sampler.top_p >= 1.0

    # With 16-bit matmuls the update's loss takes the actions' log-probabilities from it, never making the logits
    # (train_step.policy_logprobs; docs/performance.md, item 42). Its backward recomputes the logits: one more LM-head
    # matmul, which fp32 matmuls pay for more than the rest saves (SmolLM2's fp32 update 6.60 -> 6.81 s). With the
    # replay its forward is the sampler's (item 56): no more head matmuls than the logits' path, whatever the dtype.
    apply_fn = lm_apply_fn(graphdef, head_logprobs=bool(
        replay or (setup.matmul_dtype is not None and jnp.dtype(setup.matmul_dtype).itemsize == 2)))

    def sample_fn(params, prompt_batch: list[Prompt], rng):
        out = sharding.global_sample(sampler, params, [p.ids for p in prompt_batch], rng, mesh,
                                     prompt_length=setup.prompt_length)
        # The trainer's sampler draws from the policy itself (temperature rl.temperature, no top-k/top-p), so
        # its logprobs, values and entropy are those of the policy forward the loop would otherwise run.
        stats = dict(values_bt=out.values_bt, entropy_bt=out.entropy_bt) if policy_stats else {}
        return Rollout.from_samples(out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt,
                                    out.response_mask_bt, out.logprobs_bt, out.eos_b, first_action=out.prompt_len,
                                    layer_inputs_bltd=out.layer_inputs_bltd, layer_output_btd=out.layer_output_btd,
                                    logsumexp_bt=out.logsumexp_bt, gate_up_bltf=out.gate_up_bltf,
                                    logp_grad_vtb=out.logp_grad_vtb, **stats)

    def reward_fn(prompt_batch: list[Prompt], batch: Rollout):
        texts = decode_responses(setup, batch.tokens_bt, batch.response_mask_bt)
        return setup.reward([p.text for p in prompt_batch], texts, [p.reference for p in prompt_batch])

    # The rollout is global; each process decodes and scores its own rows (those of its prompt_batch).
    return apply_fn, sample_fn, sharding.global_reward_fn(reward_fn, mesh)


def make_ref_logprob_fn(setup: Setup, ref_params, temperature: float) -> rl_loop.RefLogprobFn:
    """The loop's `ref_logprob_fn` for an LM reference: `CausalLM.next_token_logprobs`, whose LM head and
    log-softmax run a chunk of positions at a time (the reference's vocabulary-wide logits are never made)."""
    ref_graphdef = setup.ref_graphdef

    def next_token_logprobs(params, tokens_bt, positions_bt, mask_bt, logits_from: int, temperature):
        return nnx.merge(ref_graphdef, params).next_token_logprobs(tokens_bt, positions_bt, mask_bt,
                                                                   logits_from=logits_from, temperature=temperature)

    return rl_loop.make_ref_next_token_logprob_fn(next_token_logprobs, ref_params, temperature)


def decode_responses(setup: Setup, tokens_bt, response_mask_bt) -> list[str]:
    tokens, resp = np.asarray(tokens_bt), np.asarray(response_mask_bt)
    return [setup.tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(tokens, resp)]


def evaluate_reward(setup: Setup, params, batch_size: int = 16) -> dict[str, float]:
    """Greedy responses of the policy `params` to the held-out prompts: mean reward, length, EOS rate."""
    greedy = dataclasses.replace(setup.sampler, top_k=1)
    rewards, lengths, eos = [], [], []
    for start in range(0, len(setup.eval_prompts), batch_size):
        chunk = setup.eval_prompts[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape: one compilation
        out = greedy(params, [p.ids for p in padded], jax.random.key(0), prompt_length=setup.prompt_length)
        out = sharding.gather_to_host(out)  # whole on every process (a collective: all processes evaluate)
        texts = decode_responses(setup, out.tokens_bt, out.response_mask_bt)[:len(chunk)]
        rewards.extend(setup.reward([p.text for p in chunk], texts, [p.reference for p in chunk]).tolist())
        lengths.extend(np.asarray(out.response_mask_bt).sum(1)[:len(chunk)].tolist())
        eos.extend(np.asarray(out.eos_b)[:len(chunk)].tolist())
    return {"eval/reward": float(np.mean(rewards)), "eval/response_length": float(np.mean(lengths)),
            "eval/eos_rate": float(np.mean(eos)), "eval/num_prompts": float(len(rewards))}


def rl_config(config):
    rl = config.rl.copy_and_resolve_references()
    with rl.unlocked():
        rl.algo = config.algo
    return rl


def write_config(config, workdir: Path) -> None:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _say(message: str) -> None:
    """Run events on stdout, one line each (the progress bar is on stderr)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) a training run in `workdir`; returns the last iteration's metrics."""
    from klq_jax import checkpoints, compile_cache

    try:  # before anything compiles: JAX decides once per process whether it uses the cache
        compile_cache.enable(config.get("compile_cache", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None

    workdir = Path(workdir)
    ckpt = checkpoints.CheckpointManager(workdir, config=config, save_every=config.checkpoint.every,
                                         keep=config.checkpoint.keep)
    try:  # the manager's background writer must be shut down whatever happens
        return _train(config, workdir, ckpt)
    finally:
        ckpt.close()


def place_on_mesh(setup: Setup, optimizer, kl_coef, mesh):
    """`(state, ref_params)`: the train state and the reference placed on `mesh` (committed arrays, so the
    updated state keeps the first one's shardings and nothing recompiles at the second iteration).

    Placing copies the weights: `setup.policy`, `params` and `ref_params` are dropped (1 GiB for SmolLM2-135M)
    and what loading and converting the checkpoints freed is handed back."""
    state = sharding.create_train_state(setup.params, optimizer, kl_coef, mesh)
    ref_params = sharding.place_state(setup.ref_params, mesh)
    setup.policy = setup.params = setup.ref_params = None
    release_freed_memory()
    return state, ref_params


def _train(config, workdir: Path, ckpt) -> dict[str, float]:
    setup = build(config)
    write_config(config, workdir)
    rl = rl_config(config)
    optimizer = make_optimizer(config.optim)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh, num_minibatches=rl.num_minibatches,
                         num_microbatches=rl.num_microbatches)
    # Built on the mesh before `abstract_state`, so a restored checkpoint lands in the same shardings.
    state, ref_params = place_on_mesh(setup, optimizer, rl.kl_coef, mesh)
    with jax.set_mesh(mesh):
        return _train_on_mesh(config, workdir, ckpt, setup, rl, optimizer, state, ref_params, mesh)


def _train_on_mesh(config, workdir, ckpt, setup, rl, optimizer, state, ref_params, mesh):
    from klq_jax import checkpoints, logs

    stream = PromptStream(setup.train_prompts, config.batch_size, seed=config.seed,
                          process_index=jax.process_index(), process_count=jax.process_count())
    rng = jax.random.key(config.seed)
    start = 0
    restored = ckpt.restore_latest(checkpoints.abstract_state(state))
    if restored is not None:
        state, meta = restored
        stream.restore(meta.data_state)
        start = meta.iteration
        _say(f"resumed from checkpoint {start} in {workdir}")
    evals_path = workdir / "eval.json"
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    if setup.eval_prompts and start == 0:
        evals = {"initial": evaluate_reward(setup, state.params)}
        _say(f"held-out reward of the initial policy: {evals['initial']['eval/reward']:.4f}")
        if jax.process_index() == 0:
            evals_path.write_text(json.dumps(evals, indent=2))
    apply_fn, sample_fn, reward_fn = make_fns(setup, mesh, policy_stats=config.sampling.policy_stats,
                                              replay=replay_sampler_forward(config, mesh),
                                              replay_gate_up=replay_gate_up_choice(config),
                                              replay_attention=replay_attention_choice(config),
                                              replay_probs=replay_probs_choice(config, mesh))
    ref_logprob_fn = make_ref_logprob_fn(setup, ref_params, rl.temperature)
    metrics: dict[str, float] = {}
    with logs.MetricsLogger(workdir, start_iteration=start, total_iterations=config.num_iterations) as logger:
        for state, metrics in rl_loop.run(
                state=state, apply_fn=apply_fn, optimizer=optimizer, algo_cfg=rl, sample_fn=sample_fn,
                reward_fn=reward_fn, ref_logprob_fn=ref_logprob_fn, prompts=stream, rng=rng,
                num_iterations=max(config.num_iterations - start, 0), start_iteration=start,
                overlap_reference=overlap_reference(config, mesh)):
            it = int(metrics["iteration"])
            logger.log(it, metrics)
            if ckpt.save(it + 1, state, data_state=stream.state(), force=it + 1 == config.num_iterations):
                _say(f"iteration {it}: saving checkpoint {it + 1}")
    ckpt.wait()
    if setup.eval_prompts:
        evals["final"] = evaluate_reward(setup, state.params)
        _say(f"held-out reward of the trained policy: {evals['final']['eval/reward']:.4f}")
        if jax.process_index() == 0:
            evals_path.write_text(json.dumps(evals, indent=2))
    final_params = sharding.gather_to_host(state.params) if config.export_policy else None  # collective
    if jax.process_index() == 0:
        logs.plot_curves({config.algo: workdir / "metrics.jsonl"}, workdir / "curves.png")
        if config.export_policy:
            final = nnx.merge(setup.graphdef, final_params)
            export_model(final, workdir / "policy_hf", tokenizer_from=setup.policy_path)
    return metrics


def default_workdir(config, config_name: str) -> Path:
    """runs/<task>-<algo>-<config hash>: a new folder per config, the same one when a command is rerun
    (so rerunning resumes)."""
    from klq_jax.checkpoints import config_fingerprint

    digest = config_fingerprint(config)["hash"][:8]
    return Path("runs") / f"{Path(config_name).stem}-{config.algo}-{digest}"
