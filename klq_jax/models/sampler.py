"""Batched sampling with a KV cache, the whole decode loop inside one jit.

Prompts of different lengths are left-padded to a length bucket, so a batch shape compiles once and
later calls with prompts of other lengths in the same bucket reuse it. The loop stops early when every
row has emitted EOS. Returned log-probabilities are those of the distribution actually sampled from
(temperature, then top-k / top-p truncation renormalised); with `top_k=0, top_p=1` they equal the
policy's log-probabilities at that temperature, which is what RL needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from klq_jax.allocator import release_freed_memory
from klq_jax.models import cpu_decode
from klq_jax.models.transformer import CausalLM, KVCache, check_replay_attention, check_replay_probs, rope_cos_sin


@struct.dataclass
class SampleOutput:
    """`tokens_bt` = left-padded prompt (P slots) + response (N slots, pad after EOS).

    attention_mask_bt: real tokens (prompt and response up to and including EOS).
    response_mask_bt: response tokens (the actions).
    logprobs_bt: log-probability of each response token under the sampling distribution (0 elsewhere).
    eos_b: whether the row emitted EOS within `max_new_tokens`.
    values_bt: the value head's V(s_t) of the state in which response token t was chosen (0 elsewhere;
        all 0 for a model without a value head).
    entropy_bt: entropy of the sampling distribution in that state (0 elsewhere).
    With the policy's own distribution (`top_k=0, top_p=1`), logprobs, values and entropy are those a
    forward of the policy over the sampled tokens gives, so the RL loop can skip that forward.
    With `record_layers`: `layer_inputs_bltd` [B, L, T, D], each layer's input at every slot (in the dtype the
    update's remat keeps them, `CausalLM.checkpoint_dtype`, or bf16 where the attention's projections are recorded
    too; bf16 as its bit patterns, uint16, for the reason below),
    and `layer_output_btd` [B, T, D] fp32, the last layer's
    output: what the sampler's prefill and decode steps computed, which an update at the same parameters replays
    instead of running its own forward (`CausalLM.__call__(replay=...)`). Slots after an early stop hold zeros.
    Also with `record_layers`: `logsumexp_bt` [B, T] fp32, the log-normaliser of the sampling distribution's logits
    (after temperature, top-k and top-p) at each response slot (0 elsewhere): with the policy's own distribution,
    what the update's head replays with `logprobs_bt` (`CausalLM.next_token_logprobs(replay_head=...)`).
    With `record_layers`, the native decode step and a model whose update can replay them
    (`CausalLM.replays_gate_up`): `gate_up_bltf` [B, L, T, 2F] uint16, the bf16 bit patterns of each layer's gate|up
    projections at every slot, which the update's MLPs replay in its backward (`replay=(inputs, output, gate_up)`);
    with `replay_attention="on"` [B, L, T, 2F + (H + 2K) hd + D], each layer's attention q|k|v (before the rotation) and
    output projection after its gate|up, which the update's attention replays too (`Block.__call__`); else None.
    Bits, not bf16: XLA:CPU copies an array it bitcasts (0.24 GiB for SmolLM2's 8 x 176 slots), at the sampler's
    output and again at the update's input.
    With `record_layers` and `record_logp_grad`: `logp_grad_vtb` [V, N, B] uint16 (response slots only, step-major),
    the bf16 bit patterns of `onehot(token) - softmax` of each drawn token's distribution (after temperature, top-k
    and top-p; a finished row's discarded draws after its EOS, zeros after the loop stops early), which the
    update's head reads in its backward at the response's slots instead of recomputing the logits
    (`CausalLM.next_token_logprobs(replay_head=...)`); else None.
    """

    tokens_bt: jax.Array
    attention_mask_bt: jax.Array
    response_mask_bt: jax.Array
    logprobs_bt: jax.Array
    eos_b: jax.Array
    values_bt: jax.Array
    entropy_bt: jax.Array
    prompt_len: int = struct.field(pytree_node=False)
    layer_inputs_bltd: jax.Array | None = None
    layer_output_btd: jax.Array | None = None
    logsumexp_bt: jax.Array | None = None
    gate_up_bltf: jax.Array | None = None
    logp_grad_vtb: jax.Array | None = None


def filter_logits(logits_bv: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    """Temperature, then top-k (static k, 0 = off), then nucleus top-p (1.0 = off); removed logits -inf."""
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k:
        kth_bv = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_bv, -jnp.inf, logits_bv)

    def nucleus(logits_bv):
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep_count_b = jnp.sum(cum_bv - jax.nn.softmax(sorted_bv, axis=-1) < top_p, axis=-1)
        threshold_b1 = jnp.take_along_axis(sorted_bv, jnp.maximum(keep_count_b - 1, 0)[:, None], axis=-1)
        return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)

    # The full-vocabulary sort runs only when top-p is on: in the decode loop it cost more than the model
    # step itself (8 x 49152 logits: 14.0 s -> 6.1 s for 8 x 128 tokens on a 2-core CPU).
    return jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits_bv)


CATEGORICAL_BLOCK = 128  # entries per block of `categorical_with_stats`'s two-level inverse transform


def categorical_with_stats(key: jax.Array, logits_bv: jax.Array, block: int = CATEGORICAL_BLOCK, *,
                           with_logsumexp: bool = False, with_logp_grad: bool = False):
    """One draw per row from softmax(logits_bv) (-inf logits never drawn), with its log-probability and the
    distribution's entropy: `(token_b int32, logp_b, entropy_b)`, all from one exponential per entry; with
    `with_logsumexp` also the log-normaliser `logsumexp(logits_bv)` per row (a fourth output), with
    `with_logp_grad` (after it) the gradient of each drawn token's log-probability with respect to the logits,
    `onehot(token) - softmax(logits_bv)` [B, V] fp32.

    The draw is an inverse transform with one uniform per row (`jax.random.categorical` draws a Gumbel per
    vocabulary entry: 8 x 49152 random numbers per decode step, 5.3 ms of a ~35 ms step on a 2-core CPU), in two
    levels: the cumulative masses of blocks of `block` entries pick a block, the cumulative masses inside it the
    entry. A cumulative sum over the whole vocabulary (a reduce-window in XLA:CPU) took 0.5 ms of each ~25 ms
    bf16 decode step here, three exponential passes another ~0.5 ms (docs/performance.md, item 40)."""
    logits_bv = logits_bv.astype(jnp.float32)
    b, v = logits_bv.shape
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    z_bv = logits_bv - max_b1
    e_bv = jnp.exp(z_bv)  # unnormalised probabilities; 0 for -inf logits
    s_b = jnp.sum(e_bv, axis=-1)
    log_s_b = jnp.log(s_b)
    pad = -v % block
    e_bkc = jnp.pad(e_bv, ((0, 0), (0, pad))).reshape(b, -1, block)
    mass_bk = jnp.sum(e_bkc, axis=-1)
    upto_bk = jnp.cumsum(mass_bk, axis=-1)  # mass of blocks 0..k
    u_b = jax.random.uniform(key, (b,)) * upto_bk[:, -1]
    # The first block whose cumulative mass exceeds u: it has mass (a zero-mass block never increases it).
    k_b = jnp.argmax(upto_bk > u_b[:, None], axis=-1)
    # The mass before it, the very sum compared with u (not upto - mass, which rounds differently): u >= before.
    before_bk = jnp.pad(upto_bk[:, :-1], ((0, 0), (1, 0)))
    before_b = jnp.take_along_axis(before_bk, k_b[:, None], axis=-1)[:, 0]
    inner_bc = jnp.take_along_axis(e_bkc, k_b[:, None, None], axis=1)[:, 0]
    crossed_bc = jnp.cumsum(inner_bc, axis=-1) > (u_b - before_b)[:, None]
    # Rounding can leave u above the block's own running sum: its last entry with mass is then the draw.
    last_b = block - 1 - jnp.argmax((inner_bc > 0)[:, ::-1], axis=-1)
    j_b = jnp.where(jnp.any(crossed_bc, axis=-1), jnp.argmax(crossed_bc, axis=-1), last_b)
    token_b = (k_b * block + j_b).astype(jnp.int32)
    logp_b = jnp.take_along_axis(z_bv, token_b[:, None], axis=-1)[:, 0] - log_s_b
    entropy_b = log_s_b - jnp.sum(jnp.where(e_bv > 0, e_bv * z_bv, 0.0), axis=-1) / s_b
    out = (token_b, logp_b, entropy_b) + ((max_b1[:, 0] + log_s_b,) if with_logsumexp else ())
    if with_logp_grad:
        probs_bv = e_bv / s_b[:, None]
        drawn_bv = jax.lax.broadcasted_iota(jnp.int32, (b, v), 1) == token_b[:, None]
        out += (jnp.where(drawn_bv, 1.0 - probs_bv, -probs_bv),)
    return out


def sample_categorical(key: jax.Array, logits_bv: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits_bv) (-inf logits never drawn): `categorical_with_stats`'s token."""
    return categorical_with_stats(key, logits_bv)[0]


# "native-<isa>": one build of the native step (`cpu_decode.ISAS`) where "native" takes the CPU's best, e.g. the AVX2
# build on an AVX-512 CPU (tests, benchmarks).
DECODE_KERNELS = ("auto", "native", *(f"native-{isa}" for isa in cpu_decode.ISAS), "xla")


def native_decode_isa(decode_kernel: str, model: CausalLM, cache_dtype, unstack_layers: bool) -> str | None:
    """The build of the native CPU kernel (`cpu_decode`) the decode loop's step runs on, or None for XLA's step:
    `"native"` requires the kernel (a clear error naming why it cannot run), `"native-<isa>"` that build, `"xla"`
    never, `"auto"` where the model, the machine and the placement allow it (whole weights on one CPU device) and
    the kernel builds."""
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel={decode_kernel!r}; accepted: {', '.join(DECODE_KERNELS)}")
    if decode_kernel == "xla":
        return None
    reason = (cpu_decode.model_unsupported(model.cfg, model.dtype, model.matmul_dtype, cache_dtype)
              or cpu_decode.machine_unsupported(model.matmul_dtype))
    isa = decode_kernel.removeprefix("native-") if decode_kernel.startswith("native-") else None
    if reason is None and isa is not None and isa != cpu_decode.kernel_isa(model.matmul_dtype):
        if not cpu_decode.isa_runs_here(isa):
            reason = f"the {isa} build needs {', '.join(sorted(cpu_decode.ISAS[isa][1]))} on this CPU"
        elif isa == "avx2" and cpu_decode.weight_dtype(model.matmul_dtype) == jnp.bfloat16:
            reason = "the avx2 build has no bfloat16 matmuls"
    if reason is None and (not unstack_layers or jax.device_count() > 1):
        reason = "more than one device (the kernel runs the whole batch on one CPU)"
    if decode_kernel != "auto":
        if reason is not None:
            raise ValueError(f"decode_kernel={decode_kernel!r} cannot run here: {reason}; use 'auto' or 'xla'")
        isa = isa or cpu_decode.kernel_isa(model.matmul_dtype)
        cpu_decode.register(isa)
        return isa
    return cpu_decode.kernel_isa(model.matmul_dtype) if reason is None and cpu_decode.available(
        model.matmul_dtype) else None


def use_native_decode(decode_kernel: str, model: CausalLM, cache_dtype, unstack_layers: bool) -> bool:
    """Whether the decode loop's step runs on the native CPU kernel (`native_decode_isa`)."""
    return native_decode_isa(decode_kernel, model, cache_dtype, unstack_layers) is not None


def _records_gate_up(model: CausalLM, record_layers: bool, native: bool, replay_gate_up: str) -> bool:
    """Whether a rollout records the MLPs' gate|up projections (bf16: 0.24 GiB for SmolLM2's 8 x 176 slots): with its
    layer states, on the native step (the XLA steps do not), where the update replays them
    (`CausalLM.replays_gate_up`)."""
    return record_layers and native and model.replays_gate_up(replay_gate_up)


def bucket_length(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "eos_ids", "pad_id",
                                             "cache_dtype", "unstack_layers", "weights_oi", "decode_kernel",
                                             "record_layers", "replay_gate_up", "replay_attention",
                                             "record_logp_grad"))
def _generate(graphdef, state, prompt_bp, prompt_mask_bp, rng, temperature, top_p, *, max_new_tokens: int,
              top_k: int, eos_ids: tuple[int, ...], pad_id: int, cache_dtype,
              unstack_layers: bool = True, weights_oi: bool = True, decode_kernel: str = "auto",
              record_layers: bool = False, replay_gate_up: str = "auto",
              replay_attention: str = "off", record_logp_grad: bool = False) -> SampleOutput:
    model: CausalLM = nnx.merge(graphdef, state)
    isa = native_decode_isa(decode_kernel, model, cache_dtype, unstack_layers)
    native = isa is not None
    b, p = prompt_bp.shape
    n = max_new_tokens
    kv_mask_bs = jnp.concatenate([prompt_mask_bp, jnp.zeros((b, n), bool)], axis=1)
    prompt_len_b = jnp.sum(prompt_mask_bp, axis=1)
    positions_bp = jnp.maximum(jnp.cumsum(prompt_mask_bp, axis=1) - 1, 0)
    cache = KVCache.zeros(model.cfg, b, p + n, cache_dtype)
    record_gate_up = _records_gate_up(model, record_layers, native, replay_gate_up)
    # and after them the attention's q|k|v and output projection (+0.12 GiB for SmolLM2's 8 x 176 slots)
    record_attention = check_replay_attention(replay_attention) == "on" and record_gate_up
    record_logp_grad = record_logp_grad and record_layers
    inputs_dtype = model.checkpoint_dtype() or jnp.float32
    if record_attention:
        # Every projection replayed, the update's layers read their inputs only for the norms (the projections'
        # weight-gradient operands): kept in bf16 as the projections are (half the bytes: -49 MB for SmolLM2's
        # 8 x 176 slots in fp32).
        inputs_dtype = jnp.bfloat16
    # bf16 layer inputs as bits, written by the native step at their slot in place (as the gate|up); else every
    # step's [L + 1, B, D] fp32 into a buffer converted after the loop.
    record_input_bits = record_layers and native and inputs_dtype == jnp.bfloat16
    out = model(prompt_bp, positions_bp, kv_mask_bs, cache=cache, cache_pos=0, logits_from=p - 1,  # last position
                record_layers=record_layers, record_gate_up=record_gate_up, record_attention=record_attention)
    num_layers, d = model.cfg.num_layers, model.cfg.hidden_size
    last_logits_bv = out.logits_btv[:, -1]
    has_values = out.values_bt is not None
    last_value_b = out.values_bt[:, -1] if has_values else jnp.zeros((b,), jnp.float32)
    eos_v = jnp.asarray(eos_ids)
    # Per-layer weights read in place by every decode step (the layer scan copies each layer's weights out
    # of the stacked arrays at every step): 4.9 -> 4.4 s for 8 x 128 tokens of SmolLM2-135M on 2 CPU cores,
    # for one more copy of the blocks' weights while sampling. Off for FSDP/tensor-sharded weights, where
    # the layer scan gathers one layer at a time.
    # With `weights_oi` those copies are [out, in] matrices (same memory) and the step runs feature-major, each
    # weight the left operand of its dot, which XLA:CPU reads in place instead of packing it at every step
    # (`Block.decode_feature_major`; docs/performance.md, items 28-30).
    weights_oi = weights_oi and unstack_layers and not native
    layers = model.unstack_layers(weights_oi) if unstack_layers and not native else None
    # An untied head as a [V, D] copy, made once per call: the feature-major step reads it in place.
    head_vd = model.lm_head_vd() if weights_oi and model.lm_head_dv is not None else None
    decode_cache = out.cache.unstacked() if layers is not None else out.cache
    if weights_oi:  # keys as [.., hd, S]: the feature-major step's score dot reads them in place
        decode_cache = decode_cache.keys_feature_major()
    # The native step (`cpu_decode`) reads its weights packed into tiles (bf16 or fp32, as the matmuls), once per
    # call, and the prefill's stacked cache as it is.
    packed = cpu_decode.pack_weights(model, isa=isa) if native else None

    def model_step(token_b, positions_b, kv_mask_bs, cache, cache_pos, recorded, step):
        """(logits_bv, values_b or None, cache, recorded) of one decode step; with `record_layers` its layer inputs
        and last output written into `recorded[0]` [n, L + 1, B, D] at `step` (with `record_input_bits` the last output
        only, [n, 1, B, D], and the inputs as bf16 bits into `recorded[-1]` [B, L, P + n, D] at `cache_pos`; with
        `record_gate_up` its gate|up projections into `recorded[1]` [B, L, P + n, 2F], bf16 bits, at `cache_pos`)."""
        states_nlbd = recorded[0] if record_layers else None
        if native:
            x_bd = jnp.take(model.embed_vd[...], token_b, axis=0).astype(jnp.float32)
            if model.cfg.rotary_dim:
                cos_br, sin_br = (c[:, 0] for c in rope_cos_sin(model.cfg, positions_b[:, None]))
            else:
                cos_br = sin_br = jnp.zeros((b, 0), jnp.float32)
            # The kernel writes the states into the carried buffer in place, as it does the cache (an update of
            # the loop's buffer outside the call cost the 8 x 128-token rollout 0.4-0.6 s: copies of it).
            logits_bv, h_bd, k, v, states_nlbd, gate_up, inputs = cpu_decode.decode_step(
                packed, model.cfg, x_bd, cos_br, sin_br, kv_mask_bs, cache_pos, cache.k_lbksh, cache.v_lbksh, isa=isa,
                states=states_nlbd, states_step=step, gate_up=recorded[1] if record_gate_up else None,
                inputs=recorded[-1] if record_input_bits else None)
            values_b = model.value_head(h_bd) if has_values else None
            recorded = ((states_nlbd,) if record_layers else ()) + ((gate_up,) if record_gate_up else ()) + (
                (inputs,) if record_input_bits else ())
            return logits_bv, values_b, KVCache(k, v), recorded
        out = model(token_b[:, None], positions_b[:, None], kv_mask_bs, cache=cache, cache_pos=cache_pos,
                    layers=layers, layers_oi=weights_oi, head_vd=head_vd, record_layers=record_layers)
        if record_layers:
            recorded = (jax.lax.dynamic_update_index_in_dim(states_nlbd, out.layer_states_lbtd[:, :, 0], step, 0),)
        return out.logits_btv[:, 0], (out.values_bt[:, 0] if has_values else None), out.cache, recorded

    def cond(carry):
        i, done_b = carry[0], carry[3]
        return (i < n) & ~jnp.all(done_b)

    def step(carry):
        i, tokens_bn, stats_sbn, done_b, cache, kv_mask_bs, logits_bv, value_b, rng, recorded, logp_grad = carry
        rng, key = jax.random.split(rng)
        filtered_bv = filter_logits(logits_bv, temperature, top_k, top_p)
        token_b, logp_b, entropy_b, lse_b, *logp_grad_bv = categorical_with_stats(
            key, filtered_bv, with_logsumexp=True, with_logp_grad=record_logp_grad)
        active_b = ~done_b
        token_b = jnp.where(active_b, token_b, pad_id)
        tokens_bn = tokens_bn.at[:, i].set(token_b)
        stats = [logp_b, value_b, entropy_b] + ([lse_b] if record_layers else [])
        stats_sbn = stats_sbn.at[:, :, i].set(jnp.where(active_b, jnp.stack(stats), 0.0))
        kv_mask_bs = kv_mask_bs.at[:, p + i].set(active_b)
        done_b = done_b | jnp.isin(token_b, eos_v)
        if record_logp_grad:  # this step's [V, B] column of every vocabulary row (the head's backward reads rows)
            grad_bits_vb = jax.lax.bitcast_convert_type(logp_grad_bv[0].T.astype(jnp.bfloat16), jnp.uint16)
            logp_grad = (jax.lax.dynamic_update_index_in_dim(logp_grad[0], grad_bits_vb, i, 1),)
        next_logits_bv, next_value_b, cache, recorded = model_step(token_b, prompt_len_b + i, kv_mask_bs, cache, p + i,
                                                                   recorded, i)
        next_value_b = next_value_b if has_values else value_b
        return (i + 1, tokens_bn, stats_sbn, done_b, cache, kv_mask_bs, next_logits_bv, next_value_b, rng, recorded,
                logp_grad)

    # With `record_layers`: each step's layer inputs and last output, [n, L + 1, B, D] float32 (with
    # `record_input_bits` the last output only, the inputs as bf16 bits of every slot); with `record_gate_up` the
    # gate|up projections of every slot too, as bf16 bits. The bits' buffers start with the prefill's at their slots.
    def slots_buffer(prefill_lbpx):  # [B, L, P + n, X] bf16 bits, the prefill's at their slots
        bits_blpx = jax.lax.bitcast_convert_type(prefill_lbpx.astype(jnp.bfloat16), jnp.uint16).transpose(1, 0, 2, 3)
        return jnp.concatenate([bits_blpx, jnp.zeros((*bits_blpx.shape[:2], n, bits_blpx.shape[3]), jnp.uint16)],
                               axis=2)

    state_rows = 1 if record_input_bits else num_layers + 1
    recorded = (jnp.zeros((n, state_rows, b, d), jnp.float32),) if record_layers else ()
    if record_gate_up:
        recorded += (slots_buffer(out.gate_up_lbtf),)
    if record_input_bits:
        recorded += (slots_buffer(out.layer_states_lbtd[:num_layers]),)
    num_stats = 4 if record_layers else 3  # logp, value, entropy (and the log-normaliser) per response slot
    # With `record_logp_grad`: [V, n, B] bf16 bits, step i's `onehot - softmax` at [:, i] (8 x 128 slots of SmolLM2's
    # 49152 tokens: 0.1 GiB).
    logp_grad = (jnp.zeros((last_logits_bv.shape[-1], n, b), jnp.uint16),) if record_logp_grad else ()
    init = (jnp.int32(0), jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((num_stats, b, n), jnp.float32),
            jnp.zeros((b,), bool), decode_cache, kv_mask_bs, last_logits_bv, last_value_b, rng, recorded, logp_grad)
    _, tokens_bn, stats_sbn, done_b, _, kv_mask_bs, _, _, _, recorded, logp_grad = jax.lax.while_loop(cond, step, init)
    layer_inputs_bltd = layer_output_btd = gate_up_bltf = None
    if record_gate_up:
        gate_up_bltf = recorded[1]
    if record_layers:
        prefill_lbpd = out.layer_states_lbtd
        if record_input_bits:
            layer_inputs_bltd = recorded[-1]
        else:
            layer_inputs_bltd = jnp.concatenate([prefill_lbpd[:num_layers].transpose(1, 0, 2, 3),
                                                 recorded[0][:, :num_layers].transpose(2, 1, 0, 3)],
                                                axis=2).astype(inputs_dtype)
            if inputs_dtype == jnp.bfloat16:
                layer_inputs_bltd = jax.lax.bitcast_convert_type(layer_inputs_bltd, jnp.uint16)
        layer_output_btd = jnp.concatenate([prefill_lbpd[num_layers], recorded[0][:, -1].transpose(1, 0, 2)], axis=1)
    response_mask_bn = kv_mask_bs[:, p:]
    logps_bt, values_bt, entropy_bt, *logsumexp_bt = (jnp.concatenate([jnp.zeros((b, p), jnp.float32), x_bn], axis=1)
                                                      for x_bn in stats_sbn)
    return SampleOutput(
        tokens_bt=jnp.concatenate([prompt_bp, tokens_bn], axis=1),
        attention_mask_bt=kv_mask_bs,
        response_mask_bt=jnp.concatenate([jnp.zeros((b, p), bool), response_mask_bn], axis=1),
        logprobs_bt=logps_bt, eos_b=done_b, values_bt=values_bt, entropy_bt=entropy_bt, prompt_len=p,
        layer_inputs_bltd=layer_inputs_bltd, layer_output_btd=layer_output_btd,
        logsumexp_bt=logsumexp_bt[0] if record_layers else None, gate_up_bltf=gate_up_bltf,
        logp_grad_vtb=logp_grad[0] if record_logp_grad else None)


_compiled_ahead: set = set()  # signatures `generate(compile_ahead=True)` has compiled on their own


def _signature(args, kwargs):
    leaves, treedef = jax.tree.flatten(args)
    return (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
            tuple(sorted(kwargs.items())))


def generate(*args, compile_ahead: bool = False, **kwargs) -> SampleOutput:
    """`_generate(*args, **kwargs)`. With `compile_ahead`, a signature not seen before is compiled on its own
    first and what compiling freed is handed back to the OS before the program runs (`release_freed_memory`).

    Compiling the decode program takes ~0.5 GiB of host memory for SmolLM2. With freed memory kept
    (klq_jax/allocator.py) the first call's buffers could land above what the compilation had freed: in the RL
    benchmark the first rollout then peaked 0.5 GiB higher in some runs (3.55 against 3.02-3.03 GiB, bf16
    matmuls), above every later phase. jit's cache serves the call that follows."""
    if compile_ahead:
        key = _signature(args, kwargs)
        if key not in _compiled_ahead:
            _generate.lower(*args, **kwargs).compile()
            release_freed_memory()
            _compiled_ahead.add(key)
    return _generate(*args, **kwargs)


@dataclasses.dataclass
class Sampler:
    """Samples from an NNX CausalLM. `state` may be swapped per call (the policy changes every update)."""

    graphdef: nnx.GraphDef
    eos_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    bucket: int = 32
    cache_dtype: jnp.dtype = jnp.float32
    unstack_layers: bool = True  # decode steps read per-layer weight copies (faster; more memory)
    weights_oi: bool = True  # those copies as [out, in] matrices, for the feature-major decode step (faster
                             # 8-row dots on XLA:CPU; same memory)
    compile_ahead: bool = False  # each new shape compiled on its own first, its freed memory released (`generate`)
    record_layers: bool = False  # outputs record each layer's input and the last output at every slot (replayed by
                                 # an update at the sampling parameters: `SampleOutput`)
    replay_gate_up: str = "auto"  # with `record_layers`, the MLPs' gate|up too, where `CausalLM.replays_gate_up` says
    replay_attention: str = "off"  # "on": with the gate|up, the attention's q|k|v and output projection too
    replay_probs: str = "off"  # "on": with `record_layers`, each drawn token's `onehot - softmax` too (bf16,
                               # `SampleOutput.logp_grad_vtb`), which the update's head backward reads
    decode_kernel: str = "auto"  # the decode step: "native" (one CPU kernel call, `cpu_decode`; "native-avx2" etc.
                                 # for one build), "xla", or "auto" (native where it can run: `native_decode_isa`)

    @classmethod
    def for_model(cls, model: CausalLM, **kwargs) -> "Sampler":
        return cls(graphdef=nnx.graphdef(model), **kwargs)

    def records_gate_up(self, model: CausalLM) -> bool:
        """Whether this sampler's outputs carry the gate|up projections (`SampleOutput.gate_up_bltf`) for `model`."""
        native = use_native_decode(self.decode_kernel, model, self.cache_dtype, self.unstack_layers)
        return _records_gate_up(model, self.record_layers, native, self.replay_gate_up)

    def records_attention(self, model: CausalLM) -> bool:
        """Whether those recorded projections include the attention's (`replay_attention`)."""
        return check_replay_attention(self.replay_attention) == "on" and self.records_gate_up(model)

    def pad_prompts(self, prompts: Sequence[Sequence[int]], length: int | None = None):
        length = length or bucket_length(max(len(x) for x in prompts), self.bucket)
        tokens = np.full((len(prompts), length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), bool)
        for row, prompt in enumerate(prompts):
            if len(prompt) > length:
                raise ValueError(f"prompt {row} has {len(prompt)} tokens; at most {length} accepted")
            if len(prompt):
                tokens[row, length - len(prompt):] = prompt
                mask[row, length - len(prompt):] = True
        return tokens, mask

    def __call__(self, state, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
                 prompt_length: int | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> SampleOutput:
        tokens, mask = self.pad_prompts(prompts, prompt_length)
        return self.generate_padded(state, jnp.asarray(tokens), jnp.asarray(mask), rng,
                                    max_new_tokens=max_new_tokens, temperature=temperature)

    def generate_padded(self, state, prompt_bp, prompt_mask_bp, rng, *, max_new_tokens: int | None = None,
                        temperature: float | None = None, unstack_layers: bool | None = None) -> SampleOutput:
        """`generate` with this sampler's settings on prompts already padded (`pad_prompts`); `unstack_layers`
        None: the sampler's own (`sharding.global_sample` turns it off for split weights)."""
        return generate(self.graphdef, state, prompt_bp, prompt_mask_bp, rng,
                        jnp.float32(self.temperature if temperature is None else temperature),
                        jnp.float32(self.top_p), max_new_tokens=max_new_tokens or self.max_new_tokens,
                        top_k=self.top_k, eos_ids=tuple(self.eos_ids), pad_id=self.pad_id,
                        cache_dtype=self.cache_dtype,
                        unstack_layers=self.unstack_layers if unstack_layers is None else unstack_layers,
                        weights_oi=self.weights_oi, decode_kernel=self.decode_kernel,
                        record_layers=self.record_layers, replay_gate_up=self.replay_gate_up,
                        replay_attention=self.replay_attention,
                        record_logp_grad=check_replay_probs(self.replay_probs) == "on",
                        compile_ahead=self.compile_ahead)


def greedy(sampler: Sampler, state, prompts, max_new_tokens: int | None = None) -> SampleOutput:
    """Greedy decoding: top-1 sampling (temperature irrelevant), for evaluation and parity tests."""
    return dataclasses.replace(sampler, top_k=1, top_p=1.0, record_layers=False)(state, prompts, jax.random.key(0),
                                                            max_new_tokens=max_new_tokens)
