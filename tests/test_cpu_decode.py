"""The native CPU decode step (`models/cpu_decode.py`, `kernels/decode_cpu.cc`) against XLA's: packing bit for
bit, one step's logits, hidden states and cache, and whole rollouts through the sampler; and who may use it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klq_jax.models import cpu_decode
from klq_jax.models.config import ModelConfig
from klq_jax.models.sampler import Sampler, greedy, use_native_decode
from klq_jax.models.transformer import CausalLM, KVCache, dense, rope_cos_sin

# The kernel with fp32 matmuls (AVX-512 or AVX2); bf16 matmuls also need AVX-512 BF16 (`skip_without_bf16`).
needs_kernel = pytest.mark.skipif(cpu_decode.machine_unsupported(None) is not None,
                                  reason=f"native decode: {cpu_decode.machine_unsupported(None)}")
# The matmul operands of the tests that are not about them: bf16 where the kernel runs them, else fp32.
SOME_MATMULS = jnp.bfloat16 if cpu_decode.machine_unsupported(jnp.bfloat16) is None else None
MATMUL_DTYPES = pytest.mark.parametrize("matmul_dtype", [jnp.bfloat16, None], ids=["bf16", "fp32"])
ISAS = pytest.mark.parametrize("isa", list(cpu_decode.ISAS))


def skip_without_bf16(matmul_dtype):
    if matmul_dtype is not None and cpu_decode.machine_unsupported(matmul_dtype) is not None:
        pytest.skip(f"native decode: {cpu_decode.machine_unsupported(matmul_dtype)}")


def skip_unless_runs(isa, packed_dtype=jnp.float32):
    if not cpu_decode.isa_runs_here(isa):
        pytest.skip(f"the {isa} build does not run on this CPU")
    if isa == "avx512" and packed_dtype == jnp.bfloat16 and "avx512_bf16" not in cpu_decode.this_cpu_flags():
        pytest.skip("no AVX-512 BF16 on this CPU")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6,
                num_kv_heads=2, head_dim=16, max_position_embeddings=64, rotary_dim=16, tie_embeddings=True,
                norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(cfg, seed=0, matmul_dtype=jnp.bfloat16, value_head=True):
    model = CausalLM(cfg, matmul_dtype=matmul_dtype, value_head=value_head, rngs=nnx.Rngs(seed))
    # non-trivial norms and value head, so that a wrong scale or a missing norm shows
    rng = np.random.default_rng(seed)
    for name in ("ln1_scale", "ln2_scale"):
        p = getattr(model.blocks, name)
        p.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(p.get_value().shape), jnp.float32))
    model.final_scale.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(cfg.hidden_size), jnp.float32))
    if value_head:
        model.value_w_d.set_value(jnp.asarray(rng.standard_normal(cfg.hidden_size), jnp.float32))
    return model


def test_pack_layouts():
    w_lio = jnp.asarray(np.random.default_rng(0).standard_normal((3, 10, 70)), jnp.float32)
    packed = np.asarray(cpu_decode.pack_io(w_lio)).astype(np.float32)
    assert packed.shape == (3, 3, 5, 32, 2)
    # bf16: tile t, pair k, lane j holds W[32t + j, 2k : 2k + 2]; rows past O are zero
    w_oi = np.asarray(jnp.swapaxes(w_lio, 1, 2).astype(jnp.bfloat16)).astype(np.float32)
    assert np.array_equal(packed[1, 2, 3, 5], w_oi[1, 64 + 5, 6:8])
    assert not packed[:, 2, :, 6:].any()
    # fp32: tile t, input i, lane j holds W[32t + j, i]
    packed32 = np.asarray(cpu_decode.pack_io(w_lio, jnp.float32))
    assert packed32.shape == (3, 3, 10, 32)
    assert packed32[1, 2, 7, 5] == np.asarray(w_lio)[1, 7, 69] and not packed32[:, 2, :, 6:].any()


@needs_kernel
@ISAS
@pytest.mark.parametrize("packed_dtype", [jnp.bfloat16, jnp.float32], ids=["to_bf16", "to_fp32"])
@pytest.mark.parametrize("input_major", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 96), (2, 64, 100), (96, 64), (40, 32)])
def test_native_pack_equals_jnp_pack(input_major, dtype, shape, packed_dtype, isa):
    """Both builds pack like jnp, to the bit (the AVX2 build's bf16 rounding is scalar code, the AVX-512 build's
    vcvtneps2bf16)."""
    skip_unless_runs(isa, packed_dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(shape), dtype)
    ref = (cpu_decode.pack_io if input_major else cpu_decode.pack_oi)(w, packed_dtype)
    got = jax.jit(lambda w: cpu_decode.pack_native(w, input_major, packed_dtype, isa=isa))(w)
    assert got.shape == ref.shape and got.dtype == packed_dtype
    bits = np.uint16 if packed_dtype == jnp.bfloat16 else np.uint32
    assert np.array_equal(np.asarray(got).view(bits), np.asarray(ref).view(bits))


def _prefill_then_step(model, cfg, mask_bp, slots, cache_dtype=jnp.float32):
    b, p = mask_bp.shape
    rng = np.random.default_rng(2)
    tokens_bp = jnp.asarray(rng.integers(2, cfg.vocab_size, (b, p)), jnp.int32)
    positions_bp = jnp.maximum(jnp.cumsum(mask_bp, 1) - 1, 0)
    kv_mask_bs = jnp.concatenate([mask_bp, jnp.zeros((b, slots - p), bool)], 1)
    prefill = model(tokens_bp, positions_bp, kv_mask_bs, cache=KVCache.zeros(cfg, b, slots, cache_dtype), cache_pos=0)
    token_b = jnp.asarray(rng.integers(2, cfg.vocab_size, (b,)), jnp.int32)
    kv_mask_bs = kv_mask_bs.at[:, p].set(True)
    position_b = jnp.sum(mask_bp, 1)
    return prefill.cache, token_b, position_b, kv_mask_bs


def _kernel_path(path, matmul_dtype):
    """`(amx, isa)` of a test's kernel path ("amx", "avx512" or "avx2"); skips the cases this CPU or build cannot run."""
    amx, isa = path == "amx", "avx2" if path == "avx2" else "avx512"
    if amx and (not cpu_decode.has_amx() or matmul_dtype is None):
        pytest.skip("no AMX on this CPU, or fp32 matmuls")
    if isa == "avx2" and matmul_dtype is not None:
        pytest.skip("the AVX2 build runs fp32 matmuls only")
    skip_unless_runs(isa, matmul_dtype or jnp.float32)
    return amx, isa


def _step_and_xla_step(model, cfg, amx, isa, native_pack=True, cache_dtype=jnp.float32, state_rows=None):
    """One decode step of 9 left-padded rows (a full group of 8 and one more) after a 5-token prefill into a cache
    of `cache_dtype`, on the kernel and on XLA: `(kernel (logits, h, k, v, layer states, gate|up bits, input bits),
    XLA's model output)`. `state_rows`: the states buffer's second axis (None: L + 1)."""
    mask_bp = np.ones((9, 5), bool)
    mask_bp[0, :2] = mask_bp[3, :4] = mask_bp[7, :1] = False
    cache, token_b, position_b, kv_mask_bs = _prefill_then_step(model, cfg, jnp.asarray(mask_bp), slots=9,
                                                                cache_dtype=cache_dtype)
    assert cache.k_lbksh.dtype == cache_dtype
    ref = model(token_b[:, None], position_b[:, None], kv_mask_bs, cache=cache, cache_pos=5, record_layers=True,
                record_gate_up=True)
    weights = jax.jit(lambda m: cpu_decode.pack_weights(m, native=native_pack, isa=isa))(model)
    cos_br, sin_br = (c[:, 0] for c in rope_cos_sin(cfg, position_b[:, None]))
    x_bd = jnp.take(model.embed_vd[...], token_b, axis=0)
    states = jnp.full((3, state_rows or cfg.num_layers + 1, *x_bd.shape), 7.0, jnp.float32)  # written at index 1
    # and the gate|up projections and the layer inputs at its slot (5) only
    gate_up = jnp.full((x_bd.shape[0], cfg.num_layers, 9, 2 * cfg.intermediate_size), 7, jnp.uint16)
    inputs = jnp.full((x_bd.shape[0], cfg.num_layers, 9, cfg.hidden_size), 7, jnp.uint16)
    out = jax.jit(lambda *a: cpu_decode.decode_step(weights, cfg, *a[:-3], amx=amx, isa=isa, states=a[-3],
                                                    states_step=1, gate_up=a[-2], inputs=a[-1]))(
        x_bd, cos_br, sin_br, kv_mask_bs, jnp.int32(5), cache.k_lbksh, cache.v_lbksh, states, gate_up, inputs)
    return out, ref


@needs_kernel
@MATMUL_DTYPES
@pytest.mark.parametrize("path", ["amx", "avx512", "avx2"])
@pytest.mark.parametrize("tied,head_dim,ffn,native_pack,kv_heads,hidden", [
    (True, 16, 96, True, 2, 64), (False, 8, 80, True, 2, 64), (False, 16, 96, False, 2, 64),
    (True, 16, 112, True, 2, 64), (True, 16, 96, True, 1, 64), (True, 32, 88, True, 2, 72)])
def test_one_step_equals_xla(tied, head_dim, ffn, native_pack, kv_heads, hidden, path, matmul_dtype):
    """Logits, final hidden states (value head) and both caches equal XLA's bf16-matmul step under left padding
    and grouped-query attention, for 9 rows (a full group of 8 and one more); q|k|v and gate|up in whole tiles
    (packed apart, concatenated) and not (head_dim 8: 48 query outputs; 80-wide MLP), packed natively or by jnp;
    with AMX tile products (where the CPU has them) and with AVX-512 BF16 dot products only. The 112-wide MLP's
    down projection has 56 input pairs: AMX's 16-pair tiles leave 8 to the AVX-512 loop. fp32 matmuls: fp32 tiles
    and FMAs, against XLA's fp32 step (AMX plays no part), in the AVX-512 build and in the AVX2 one (8-lane
    vectors: its own tile loop, exp, softmax tails and head_dim 8 in one vector). The attention: 3 query heads per KV
    head (their outputs in registers; with head_dim 8 in the AVX-512 build, the per-head loop) and 6 (one KV head:
    the per-head loop). Head_dim 32 rotates 16 entries per half, whole vectors of the step's RoPE; a 72-wide
    model and an 88-wide MLP leave its norms and its bf16 packing of activations a tail past whole vectors."""
    amx, isa = _kernel_path(path, matmul_dtype)
    cfg = tiny_cfg(tie_embeddings=tied, rope_theta=500.0, head_dim=head_dim, rotary_dim=head_dim,
                   intermediate_size=ffn, num_kv_heads=kv_heads, hidden_size=hidden)
    model = tiny_model(cfg, matmul_dtype=matmul_dtype)
    (logits, h, k, v, states, gate_up, inputs), ref = _step_and_xla_step(model, cfg, amx, isa,
                                                                         native_pack=native_pack)
    ref_logits = np.asarray(ref.logits_btv[:, 0])
    # The dots sum their products in another order (the AVX-512 loop pairwise per lane; XLA's and the kernel's AMX
    # tiles agree to the bit here): 2.2e-5 of the logits' scale at most on these models. A wrong weight, norm or
    # rotation moves them by more than 1e-2 of it.
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=5e-5 * np.abs(ref_logits).max())
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref.hidden_btd[:, 0]), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(k), np.asarray(ref.cache.k_lbksh), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v), np.asarray(ref.cache.v_lbksh), rtol=0, atol=1e-5)
    # each layer's input and the last layer's output (what the update replays), as XLA's step records them, written
    # at the step's index of the buffer and nowhere else
    ref_states = np.asarray(ref.layer_states_lbtd[:, :, 0])
    np.testing.assert_allclose(np.asarray(states[1]), ref_states, rtol=0, atol=2e-5 * np.abs(ref_states).max())
    np.testing.assert_array_equal(np.asarray(states[::2]), 7.0)
    # each layer's gate|up projections in bf16 (what the update's MLPs replay), as XLA's forward records them, at the
    # step's slot and nowhere else: bf16 roundings of sums that differ in order, one bf16 step apart at most
    ref_gate_up = np.asarray(ref.gate_up_lbtf[:, :, 0].astype(jnp.float32)).swapaxes(0, 1)
    ours = np.asarray(jax.lax.bitcast_convert_type(gate_up[:, :, 5], jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(ours, ref_gate_up, rtol=0, atol=2 ** -8 * np.abs(ref_gate_up).max())
    np.testing.assert_array_equal(np.asarray(gate_up[:, :, :5]), 7)
    np.testing.assert_array_equal(np.asarray(gate_up[:, :, 6:]), 7)
    # each layer's input as bf16 bits at the step's slot and nowhere else: the fp32 states' rounding to nearest even
    # (XLA's convert), to the bit
    want_bits = jax.lax.bitcast_convert_type(states[1, :-1].astype(jnp.bfloat16), jnp.uint16).swapaxes(0, 1)
    np.testing.assert_array_equal(np.asarray(inputs[:, :, 5]), np.asarray(want_bits))
    np.testing.assert_array_equal(np.asarray(inputs[:, :, :5]), 7)
    np.testing.assert_array_equal(np.asarray(inputs[:, :, 6:]), 7)
    # a states buffer of one row records the last output only (the inputs going to their bits)
    (_, _, _, _, last, _, inputs_again), _ = _step_and_xla_step(model, cfg, amx, isa, native_pack=native_pack,
                                                                state_rows=1)
    np.testing.assert_array_equal(np.asarray(last[1, 0]), np.asarray(states[1, -1]))
    np.testing.assert_array_equal(np.asarray(last[::2]), 7.0)
    np.testing.assert_array_equal(np.asarray(inputs_again), np.asarray(inputs))


@needs_kernel
@MATMUL_DTYPES
@pytest.mark.parametrize("path", ["amx", "avx512", "avx2"])
@pytest.mark.parametrize("head_dim,kv_heads", [(16, 2), (8, 2), (16, 1)])
def test_one_step_on_a_bf16_cache_equals_xla(head_dim, kv_heads, path, matmul_dtype):
    """With a bf16 KV cache (config `sampling.cache_dtype`) the step reads the prefill's bf16 keys and values,
    writes this step's rounded to nearest even, and its logits, hidden states and caches equal XLA's step on the
    same bf16 cache: the register path (3 query heads per KV head), head_dim 8 (AVX-512: the per-slot loop) and
    one KV head for 6 query heads, in each build."""
    amx, isa = _kernel_path(path, matmul_dtype)
    cfg = tiny_cfg(rope_theta=500.0, head_dim=head_dim, rotary_dim=head_dim, num_kv_heads=kv_heads)
    model = tiny_model(cfg, matmul_dtype=matmul_dtype)
    (logits, h, k, v, *_), ref = _step_and_xla_step(model, cfg, amx, isa, cache_dtype=jnp.bfloat16)
    assert k.dtype == v.dtype == jnp.bfloat16
    ref_logits = np.asarray(ref.logits_btv[:, 0])
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=5e-5 * np.abs(ref_logits).max())
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref.hidden_btd[:, 0]), rtol=0, atol=2e-5)
    for got, want in ((k, ref.cache.k_lbksh), (v, ref.cache.v_lbksh)):
        got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
        np.testing.assert_array_equal(np.delete(got, 5, axis=3), np.delete(want, 5, axis=3))  # the prefill's
        # this step's: rounded from fp32 values that differ in summation order, so at most one bf16 step apart
        np.testing.assert_allclose(got[:, :, :, 5], want[:, :, :, 5], rtol=2.0 ** -7, atol=1e-6)


@needs_kernel
def test_a_row_with_no_real_token_averages_all_slots_as_xla_does():
    cfg = tiny_cfg()
    model = tiny_model(cfg, matmul_dtype=SOME_MATMULS)
    cache, token_b, position_b, kv_mask_bs = _prefill_then_step(model, cfg, jnp.ones((2, 4), bool), slots=6)
    kv_mask_bs = kv_mask_bs.at[1].set(False)  # row 1 sees no key at all
    ref = model(token_b[:, None], position_b[:, None], kv_mask_bs, cache=cache, cache_pos=4)
    weights = cpu_decode.pack_weights(model)
    cos_br, sin_br = (c[:, 0] for c in rope_cos_sin(cfg, position_b[:, None]))
    logits, *_ = jax.jit(lambda *a: cpu_decode.decode_step(weights, cfg, *a))(
        jnp.take(model.embed_vd[...], token_b, axis=0), cos_br, sin_br, kv_mask_bs, jnp.int32(4), cache.k_lbksh,
        cache.v_lbksh)
    ref_logits = np.asarray(ref.logits_btv[:, 0])
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=2e-5 * np.abs(ref_logits).max())


@needs_kernel
@pytest.mark.parametrize("matmul_dtype,kernel,cache_dtype", [
    (jnp.bfloat16, "native", jnp.float32), (None, "native", jnp.float32), (None, "native-avx2", jnp.float32),
    (jnp.bfloat16, "native", jnp.bfloat16), (None, "native-avx2", jnp.bfloat16)],
    ids=["bf16", "fp32", "fp32-avx2", "bf16-bf16cache", "fp32-avx2-bf16cache"])
def test_sampler_rollouts_equal_xla(matmul_dtype, kernel, cache_dtype):
    """Greedy rollouts are the same tokens, and sampled ones the same tokens with the same log-probabilities,
    values and entropies (to fp32 summation order), on and off the kernel, with bf16 and fp32 matmuls, on the
    AVX2 build, and on a bf16 KV cache."""
    skip_without_bf16(matmul_dtype)
    if kernel == "native-avx2":
        skip_unless_runs("avx2")
    cfg = tiny_cfg(num_layers=3)
    model = tiny_model(cfg, seed=3, matmul_dtype=matmul_dtype)
    model.embed_vd.set_value(model.embed_vd[...] * 4.0)  # sharper logits: greedy choices far from ties
    state = nnx.state(model)
    prompts = [[5, 9, 14], [7, 3, 22, 41, 8, 19, 30], [11], [4, 4, 4, 4]]
    kw = dict(eos_ids=(1,), pad_id=0, max_new_tokens=12, bucket=8, cache_dtype=cache_dtype)
    native, xla = (Sampler.for_model(model, decode_kernel=k, **kw) for k in (kernel, "xla"))
    g_native, g_xla = greedy(native, state, prompts), greedy(xla, state, prompts)
    assert np.array_equal(np.asarray(g_native.tokens_bt), np.asarray(g_xla.tokens_bt))
    s_native, s_xla = native(state, prompts, jax.random.key(7)), xla(state, prompts, jax.random.key(7))
    assert np.array_equal(np.asarray(s_native.tokens_bt), np.asarray(s_xla.tokens_bt))
    assert np.array_equal(np.asarray(s_native.response_mask_bt), np.asarray(s_xla.response_mask_bt))
    # A bf16 cache rounds keys and values computed in another summation order: where the two fp32 values straddle
    # a rounding boundary the cached entries differ by one bf16 step (2^-8 relative), and the later steps read them.
    # Such a step moves a later output in proportion to the output's scale, not to the output itself (the value
    # head is linear in the hidden state, so a value near 0 moves as much as a large one), by a few steps at most
    # as the later layers carry it: measured 6e-3 nats on log-probabilities of scale 6 and 0.042 on values of scale
    # 16 (0.27% of it; a Zen 4 VM's AVX-512 BF16 loop), 1.3% of one value on an Intel VM's AMX loop. With an fp32
    # cache the two agree to fp32 summation order. The tokens stay the same.
    for name in ("logprobs_bt", "values_bt", "entropy_bt"):
        ours, ref = np.asarray(getattr(s_native, name)), np.asarray(getattr(s_xla, name))
        atol = 1e-4 if cache_dtype == jnp.float32 else 4 * 2.0**-8 * np.abs(ref).max()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol, err_msg=name)


def test_who_may_use_the_kernel():
    cfg = tiny_cfg()
    assert cpu_decode.model_unsupported(cfg, jnp.float32, jnp.bfloat16, jnp.float32) is None
    assert cpu_decode.model_unsupported(cfg, jnp.float32, None, jnp.float32) is None
    assert "matmul dtype float16" in cpu_decode.model_unsupported(cfg, jnp.float32, jnp.float16, jnp.float32)
    assert "family" in cpu_decode.model_unsupported(tiny_cfg(family="gpt_neox", parallel_residual=True),
                                                    jnp.float32, jnp.bfloat16, jnp.float32)
    assert "biases" in cpu_decode.model_unsupported(tiny_cfg(attention_bias=True), jnp.float32, jnp.bfloat16,
                                                    jnp.float32)
    assert cpu_decode.model_unsupported(cfg, jnp.float32, jnp.bfloat16, jnp.bfloat16) is None  # a bf16 cache
    assert "cache float16" in cpu_decode.model_unsupported(cfg, jnp.float32, jnp.bfloat16, jnp.float16)
    assert "activations bfloat16" in cpu_decode.model_unsupported(cfg, jnp.bfloat16, jnp.bfloat16, jnp.float32)
    model = tiny_model(cfg)
    assert not use_native_decode("auto", model, jnp.float16, True)  # an fp16 cache
    assert not use_native_decode("xla", model, jnp.float32, True)
    with pytest.raises(ValueError, match="decode_kernel='native' cannot run here: cache float16"):
        use_native_decode("native", model, jnp.float16, True)
    with pytest.raises(ValueError, match="decode_kernel='triton'; accepted: auto, native, native-avx512, "
                                         "native-avx2, xla"):
        use_native_decode("triton", model, jnp.float32, True)
    if cpu_decode.kernel_isa(jnp.bfloat16) == "avx512" and cpu_decode.isa_runs_here("avx2"):
        with pytest.raises(ValueError, match="'native-avx2' cannot run here: the avx2 build has no bfloat16"):
            use_native_decode("native-avx2", model, jnp.float32, True)
        assert use_native_decode("native-avx2", tiny_model(cfg, matmul_dtype=None), jnp.float32, True)
    if cpu_decode.machine_unsupported() is None:
        assert use_native_decode("auto", model, jnp.float32, True)
        assert use_native_decode("auto", tiny_model(cfg, matmul_dtype=None), jnp.float32, True)
        assert not use_native_decode("auto", model, jnp.float32, False)  # split weights


@needs_kernel
def test_xla_matmuls_after_the_kernel_are_right():
    """The kernel's threads put back the AMX tile configuration they found: XLA:CPU's own bf16 dots (AMX tiles
    on CPUs that have them) on the same threads, right after a step, still compute the product."""
    skip_without_bf16(jnp.bfloat16)
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    cache, token_b, position_b, kv_mask_bs = _prefill_then_step(model, cfg, jnp.ones((8, 4), bool), slots=6)
    weights = cpu_decode.pack_weights(model)
    cos_br, sin_br = (c[:, 0] for c in rope_cos_sin(cfg, position_b[:, None]))
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((512, 384)), jnp.bfloat16)
    expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    @jax.jit
    def step_then_matmul(x_bd, k, v):
        logits = cpu_decode.decode_step(weights, cfg, x_bd, cos_br, sin_br, kv_mask_bs, jnp.int32(4), k, v)[0]
        return logits, jnp.dot(a, b, preferred_element_type=jnp.float32)

    for _ in range(3):
        _, product = step_then_matmul(jnp.take(model.embed_vd[...], token_b, axis=0), cache.k_lbksh, cache.v_lbksh)
        np.testing.assert_allclose(np.asarray(product), expected, rtol=0, atol=1e-3)
        np.testing.assert_allclose(np.asarray(jax.jit(jnp.dot, static_argnames="preferred_element_type")(
            a, b, preferred_element_type=jnp.float32)), expected, rtol=0, atol=1e-3)


def dialogue_config():
    """`configs/dialogue.py`'s `get_config("")`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "dialogue.py"
    spec = importlib.util.spec_from_file_location("dialogue", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def test_cache_dtype_setting():
    """"auto": the compute dtype; a named dtype as it is."""
    from klq_jax import trainer

    config = dialogue_config()
    assert trainer._cache_dtype(config, jnp.float32) == jnp.float32
    assert trainer._cache_dtype(config, jnp.bfloat16) == jnp.bfloat16
    config.sampling.cache_dtype = "bfloat16"
    assert trainer._cache_dtype(config, jnp.float32) == jnp.bfloat16


@pytest.mark.parametrize("key,bad,accepted", [
    ("sampling.decode_kernel", "triton", "'auto', 'native', 'native-avx512', 'native-avx2', 'xla'"),
    ("sampling.cache_dtype", "float16", "'auto', 'bfloat16', 'float32'"),
    ("model.frozen_matmul_kernel", "onednn", "'auto', 'native', 'xla'")])
def test_bad_kernel_setting_is_a_config_error(key, bad, accepted):
    """Each setting of the native kernels (auto by default) refuses a bad value with one line, before any model
    loads."""
    from klq_jax import trainer

    config = dialogue_config()
    section, name = key.split(".")
    assert config[section][name] == "auto"
    config[section][name] = bad
    with pytest.raises(trainer.ConfigError, match=f"{key}='{bad}'; accepted: {accepted}$"):
        trainer.build(config)


@needs_kernel
def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    """A kernel that cannot be built (here: a cache folder that is a file) is a RuntimeError naming the folder, and
    "auto" then keeps XLA's step."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KLQ_JAX_CACHE", str(blocker))
    cpu_decode.register.cache_clear()
    cpu_decode.available.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not be built or loaded under .*cache/kernels"):
            cpu_decode.register(cpu_decode.kernel_isa(None))
        assert not cpu_decode.available(None)
    finally:
        cpu_decode.register.cache_clear()
        cpu_decode.available.cache_clear()


@pytest.mark.skipif(not cpu_decode.isa_runs_here("avx2"), reason="not an x86-64 CPU with AVX2")
def test_which_build_a_cpu_runs(monkeypatch):
    """The AVX-512 build where the CPU has AVX-512 (and AVX-512 BF16 for bf16 matmuls), the AVX2 build for fp32
    matmuls on CPUs without AVX-512 (most laptops), none below AVX2 + FMA."""
    def cpu(*flags):
        monkeypatch.setattr(cpu_decode, "this_cpu_flags", lambda: frozenset(flags))

    cpu("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
    assert cpu_decode.kernel_isa(jnp.bfloat16) == cpu_decode.kernel_isa(None) == "avx512"
    cpu("avx2", "fma", "avx512f", "avx512bw", "avx512vl")  # Skylake-X, Ice Lake: no bf16 dots
    assert cpu_decode.kernel_isa(jnp.bfloat16) is None and cpu_decode.kernel_isa(None) == "avx512"
    cpu("avx2", "fma")  # a laptop
    assert cpu_decode.kernel_isa(None) == "avx2" and cpu_decode.kernel_isa(jnp.bfloat16) is None
    assert cpu_decode.machine_unsupported(jnp.bfloat16) == "no AVX-512 BF16 on this CPU (bfloat16 matmuls)"
    cpu("sse2", "avx")
    assert cpu_decode.machine_unsupported(None) == "no AVX-512 or AVX2 with FMA on this CPU"
    with pytest.raises(ValueError, match="the CPU decode kernel cannot run here: no AVX-512 or AVX2 with FMA"):
        cpu_decode.pack_native(jnp.zeros((64, 32)), True, jnp.float32)
    with pytest.raises(ValueError, match="isa='neon'; accepted: 'avx512', 'avx2'"):
        cpu_decode.pack_native(jnp.zeros((64, 32)), True, jnp.float32, isa="neon")


@needs_kernel
def test_transpose_bits_and_the_weight_gradient_it_feeds():
    """`transpose_bits` is `x.T` of 16-bit arrays to the bit, on shapes inside, across and past its 32 x 32 blocks;
    `dense` whose bf16 weight gradient takes `x^T` from it (`native_transpose`, the replayed MLP's down projection)
    gives the same gradients as the plain one, to the bit, from a producer XLA would fuse into its own copy."""
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 3), (37, 70), (64, 32), (704, 96)]:
        x = rng.integers(0, 2**16, shape, dtype=np.uint16)
        np.testing.assert_array_equal(np.asarray(jax.jit(cpu_decode.transpose_bits)(jnp.asarray(x))), x.T)
    with pytest.raises(ValueError, match="uint16"):
        cpu_decode.transpose_bits(jnp.zeros((4, 4), jnp.float32))
    gate_up = jnp.asarray(rng.normal(size=(3, 37, 2 * 70)), jnp.float32)
    w_fd = jnp.asarray(rng.normal(size=(70, 24)) / 8, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(3, 37, 24)), jnp.float32)

    def grads(native):
        def loss(gate_up, w_fd):
            hidden = jax.nn.silu(gate_up[..., :70]) * gate_up[..., 70:]
            return jnp.sum(dense(hidden, w_fd, jnp.bfloat16, None, native) * dy)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(gate_up, w_fd)

    for plain, native in zip(grads(False), grads(True)):
        assert float(jnp.abs(plain).max()) > 0
        np.testing.assert_array_equal(np.asarray(native), np.asarray(plain))
