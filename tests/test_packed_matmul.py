"""The native packed matmul (`cpu_decode.packed_matmul`, AMX tile products) against XLA's bf16 x bf16 -> fp32 dot,
and frozen models (the reference, an HF reward model) whose layer matmuls run on it
(`transformer.pack_frozen`, config `model.frozen_matmul_kernel`): the same outputs, and who may use it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klq_jax.models import cpu_decode
from klq_jax.models.transformer import FROZEN_MATMUL_KERNELS, CausalLM, PackedWeight, pack_frozen, positions_from_mask
from tests.test_cpu_decode import tiny_cfg, tiny_model

UNSUPPORTED = cpu_decode.packed_matmul_unsupported()
needs_amx = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"packed matmul: {UNSUPPORTED}")


def xla_matmul(x, w_io):
    return jnp.dot(x.astype(jnp.bfloat16), w_io.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@needs_amx
@pytest.mark.parametrize("m,k,n", [(64, 64, 64),    # whole blocks: results stored in place
                                   (37, 70, 45),    # cut rows and outputs; 35 input pairs, 3 past the tiles
                                   (300, 96, 200),  # two groups of row blocks, several tasks
                                   (5, 32, 8)])
def test_packed_matmul_equals_xla_dot(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w_io = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    got = jax.jit(lambda x, w: cpu_decode.packed_matmul(x, w, n))(x, cpu_decode.pack_io(w_io))
    want = xla_matmul(x, w_io)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # bf16 operands, fp32 sums: equal up to summation order
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@needs_amx
def test_packed_matmul_keeps_leading_axes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    w_io = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    got = cpu_decode.packed_matmul(x, cpu_decode.pack_io(w_io), 96)
    assert got.shape == (2, 3, 96)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_matmul(x, w_io)), rtol=1e-5, atol=1e-4)


@needs_amx
def test_packed_matmuls_from_two_threads_equal_one_after_the_other():
    """`reward.overlap_reference` runs the reference and an HF reward model side by side, each with its layer
    matmuls on this kernel (AMX tiles configured per thread and call), beside XLA's own AMX dots: calls from two
    threads at once give, bit for bit, what they give one after the other."""
    import concurrent.futures

    rng = np.random.default_rng(5)
    cases = []
    for m, k, n in ((300, 96, 200), (64, 128, 96)):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w_io = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        fn = jax.jit(lambda x, w, n=n, w_io=w_io: cpu_decode.packed_matmul(jnp.tanh(x), w, n) + xla_matmul(x, w_io))
        cases.append((fn, x, cpu_decode.pack_io(w_io)))
    alone = [np.asarray(fn(x, w)) for fn, x, w in cases]

    def repeat(case):
        fn, x, w = case
        return [np.asarray(fn(x, w)) for _ in range(20)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(repeat, cases))
    for want, outs in zip(alone, together):
        for got in outs:
            np.testing.assert_array_equal(got, want)


def test_packed_matmul_rejects_weights_of_another_shape():
    w = cpu_decode.pack_io(jnp.zeros((64, 96)))
    with pytest.raises(ValueError, match=r"weights \(3, 32, 32, 2\) bfloat16 do not pack \[96, 48\]"):
        cpu_decode.packed_matmul(jnp.zeros((4, 48)), w, 96)
    with pytest.raises(ValueError, match=r"do not pack \[100, 64\]"):  # 4 tiles needed
        cpu_decode.packed_matmul(jnp.zeros((4, 64)), w, 100)


def _inputs(b=3, t=12, vocab=101):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool).at[0, :4].set(False)  # a left-padded row
    return tokens, positions_from_mask(mask), mask


FAMILIES = {
    "llama": dict(intermediate_size=80),  # 80 outputs: a cut tile
    # biases, LayerNorm, an ungated GELU MLP; parallel residual and partial rotary (GPT-NeoX), learned positions (GPT-2)
    "gpt_neox": dict(family="gpt_neox", num_kv_heads=6, attention_bias=True, output_bias=True, mlp_bias=True,
                     activation="gelu", rotary_dim=8, parallel_residual=True),
    "gpt2": dict(family="gpt2", num_kv_heads=6, attention_bias=True, output_bias=True, mlp_bias=True,
                 activation="gelu_new", rotary_dim=0),
}


@needs_amx
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_a_packed_frozen_model_computes_what_it_did(stored, family):
    """A frozen model's log-probabilities (the reference's) and scores (a reward model's) before and after packing:
    the same up to summation order, whether its weights were stored in fp32 or bf16, in each family."""
    cfg = tiny_cfg(**FAMILIES[family])
    model = CausalLM(cfg, matmul_dtype=jnp.bfloat16, score_head=True, rngs=nnx.Rngs(3))
    if stored == "bfloat16":
        model.store_matmul_weights()
    tokens, positions, mask = _inputs()

    def outputs(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state):
            m = nnx.merge(graphdef, state)
            return (m.next_token_logprobs(tokens, positions, mask, logits_from=2),
                    m(tokens, positions, mask, return_logits=False).scores_b)
        return [np.asarray(x) for x in run(state)]

    before = outputs(model)
    assert pack_frozen(model, "native")
    weights = [getattr(model.blocks, n) for n in model.BLOCK_MATMUL_WEIGHTS]
    assert all(isinstance(w, PackedWeight) for w in weights if w is not None)  # GPT-2 and GPT-NeoX: no gate
    up_tiles = -(-cfg.intermediate_size // 32)
    assert model.blocks.w_up_df.get_value().shape == (cfg.num_layers, up_tiles, cfg.hidden_size // 2, 32, 2)
    after = outputs(model)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_who_may_pack():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="frozen_matmul_kernel='onednn'; accepted: 'auto', 'native', 'xla'"):
        pack_frozen(tiny_model(cfg), "onednn")
    assert FROZEN_MATMUL_KERNELS == ("auto", "native", "xla")
    fp32 = tiny_model(cfg, matmul_dtype=None)
    with pytest.raises(ValueError, match="frozen_matmul_kernel='native' cannot run here: (matmul dtype None|no AMX)"):
        pack_frozen(fp32, "native")
    assert not pack_frozen(fp32, "auto") and not isinstance(fp32.blocks.wq_dnh, PackedWeight)
    model = tiny_model(cfg)
    assert not pack_frozen(model, "xla") and not isinstance(model.blocks.wq_dnh, PackedWeight)
    with pytest.raises(ValueError, match="the packed matmul runs on one device, not 8"):
        pack_frozen(model, "native", devices=8)
    assert not pack_frozen(model, "auto", devices=8)
    assert pack_frozen(model, "auto") == (UNSUPPORTED is None)
