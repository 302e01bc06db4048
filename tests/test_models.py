"""Logits parity with transformers' PyTorch models for tiny random configs of every family, export round
trips, and the one-line errors for bad checkpoints."""

import functools
import json
import re

import jax
from flax import nnx
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from klq_jax.models.config import ModelConfigError  # noqa: E402
from klq_jax.models.hf import CheckpointError, export_model, load_model, read_safetensors, write_safetensors  # noqa: E402
from klq_jax.models.transformer import CausalLM, KVCache, positions_from_mask  # noqa: E402

VOCAB = 97
PAD = 0

TINY = {
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, tie_word_embeddings=False),
    "llama3_rope_scaling_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, pad_token_id=PAD, tie_word_embeddings=True, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0),
    "qwen2_qkv_bias": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, tie_word_embeddings=False, use_sliding_window=False),
    "gpt_neox_parallel_partial_rotary": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, pad_token_id=PAD, use_parallel_residual=True),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.5, pad_token_id=PAD, use_parallel_residual=False),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=PAD),
}


def _randomise(model):
    """Random norms and biases too, so a mapping that drops or misplaces them cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def _batch(seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding of different lengths, as rollouts have
        mask[1, :4] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


def _ours(model, ids, mask):
    mask_np = mask.numpy().astype(bool)
    out = model(jnp.asarray(ids.numpy()), positions_from_mask(jnp.asarray(mask_np)), jnp.asarray(mask_np))
    return out, mask_np


def _torch_f64_grads(model, ids, mask, weights_btv):
    """transformers' float64 gradients of `sum(weights * tanh(logits))` by state-dict name, tied names included (a
    copy of `model`)."""
    import copy

    model64 = copy.deepcopy(model).double()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model64(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    (torch.from_numpy(weights_btv) * torch.tanh(logits)).sum().backward()
    return {name: p.grad.numpy() for name, p in model64.state_dict(keep_vars=True).items() if p.grad is not None}


def _torch_logits(model, ids, mask):
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY[request.param]()).eval()
    _randomise(model)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(tiny_checkpoint, padded):
    _, path, torch_model = tiny_checkpoint
    ours = load_model(path)
    ids, mask = _batch(padded=padded)
    out, mask_np = _ours(ours, ids, mask)
    ref = _torch_logits(torch_model, ids, mask)
    assert np.abs(np.asarray(out.logits_btv) - ref)[mask_np].max() <= 1e-4


def test_export_round_trip(tiny_checkpoint, tmp_path):
    _, path, torch_model = tiny_checkpoint
    ours = load_model(path, value_head=True)  # the value head is ours alone and is not exported
    exported = export_model(ours, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids, mask = _batch(seed=1)
    np.testing.assert_allclose(_torch_logits(reloaded, ids, mask), _torch_logits(torch_model, ids, mask),
                               atol=1e-5, rtol=0)
    again, mask_np = _ours(load_model(exported), ids, mask)
    first, _ = _ours(ours, ids, mask)
    np.testing.assert_array_equal(np.asarray(again.logits_btv), np.asarray(first.logits_btv))


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt_neox_parallel_partial_rotary", "gpt2"])
def test_score_head_matches_sequence_classification(name, tmp_path):
    torch.manual_seed(1)
    cfg = TINY[name]()
    cfg.num_labels = 1
    rm = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    _randomise(rm)
    rm.save_pretrained(tmp_path)
    ours = load_model(tmp_path, score_head=True)
    ids, mask = _batch(seed=2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # GPT-2's learned positions need explicit ids under left padding
    with torch.no_grad():
        ref = rm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0].numpy()
    out, _ = _ours(ours, ids, mask)
    assert out.logits_btv is None
    assert np.abs(np.asarray(out.scores_b) - ref).max() <= 1e-4
    # Export as a sequence-classification folder and back.
    rm2 = transformers.AutoModelForSequenceClassification.from_pretrained(export_model(ours, tmp_path / "x")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(rm2(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0].numpy(), ref, atol=1e-5)


def test_value_head_shape_and_zero_init(tiny_checkpoint):
    _, path, _ = tiny_checkpoint
    ours = load_model(path, value_head=True)
    out, _ = _ours(ours, *_batch())
    assert out.values_bt.shape == (3, 9)
    np.testing.assert_array_equal(np.asarray(out.values_bt), 0.0)


def test_logits_from_is_the_tail_of_the_logits(tiny_checkpoint):
    _, path, _ = tiny_checkpoint
    ours = load_model(path, value_head=True)
    ids, mask = _batch()
    full, mask_np = _ours(ours, ids, mask)
    args = (jnp.asarray(ids.numpy()), positions_from_mask(jnp.asarray(mask_np)), jnp.asarray(mask_np))
    tail = ours(*args, logits_from=5)
    assert tail.logits_btv.shape == (3, 4, VOCAB)
    np.testing.assert_array_equal(np.asarray(tail.logits_btv), np.asarray(full.logits_btv[:, 5:]))
    np.testing.assert_array_equal(np.asarray(tail.values_bt), np.asarray(full.values_bt))
    middle = ours(*args, logits_from=5, logits_to=8)
    assert middle.logits_btv.shape == (3, 3, VOCAB)
    np.testing.assert_array_equal(np.asarray(middle.logits_btv), np.asarray(full.logits_btv[:, 5:8]))


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_next_token_logprobs_equal_the_logits_log_softmax(tiny_checkpoint, matmul_dtype):
    """`CausalLM.next_token_logprobs` (the head and the log-softmax a chunk of positions at a time, padded to whole
    chunks) gives what `losses.shift_to_actions` takes from the logits, tied and untied heads, from the first slot
    and from a later one, at a temperature; and the reference's loop function built on it gives the same as the
    one built on the logits."""
    from klq_jax.rl import loop
    from klq_jax.rl.losses import shift_to_actions

    _, path, _ = tiny_checkpoint
    ours = load_model(path, matmul_dtype=matmul_dtype)
    g = np.random.default_rng(0)
    tokens = jnp.asarray(g.integers(1, VOCAB, (2, 45)), jnp.int32)  # 44 positions: chunks of 32 (bf16 16), padded
    mask = jnp.ones(tokens.shape, bool).at[1, :3].set(False)
    positions = positions_from_mask(mask)
    graphdef, params = nnx.split(ours)

    def apply_fn(params, *args, **kwargs):
        return nnx.merge(graphdef, params)(*args, **kwargs).logits_btv

    def next_token_logprobs(params, tokens, positions, mask, logits_from, temperature):
        return nnx.merge(graphdef, params).next_token_logprobs(tokens, positions, mask, logits_from=logits_from,
                                                               temperature=temperature)

    for first_action in (1, 7):
        want = loop.make_ref_logprob_fn(apply_fn, params, 0.7)(tokens, positions, mask, first_action)
        got = loop.make_ref_next_token_logprob_fn(next_token_logprobs, params, 0.7)(tokens, positions, mask,
                                                                                   first_action)
        assert got.shape == want.shape == tokens.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(got)[:, :first_action])
    logits = ours(tokens, positions, mask, logits_from=4, logits_to=44).logits_btv
    want = shift_to_actions(logits, None, tokens, 1.0, first_action=5)[0][:, 5:]
    np.testing.assert_allclose(np.asarray(ours.next_token_logprobs(tokens, positions, mask, logits_from=4)),
                               np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_from=44"):
        ours.next_token_logprobs(tokens, positions, mask, logits_from=44)


def _assert_same_frozen_outputs(ours, reference, seed):
    """`ours` gives `reference`'s next-token log-probabilities and logits to the bit on two 40-token rows (one
    left-padded); returns the forward's arguments."""
    g = np.random.default_rng(seed)
    tokens = jnp.asarray(g.integers(1, VOCAB, (2, 40)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool).at[1, :4].set(False)
    args = (tokens, positions_from_mask(mask), mask)
    np.testing.assert_array_equal(np.asarray(ours.next_token_logprobs(*args, logits_from=6)),
                                  np.asarray(reference.next_token_logprobs(*args, logits_from=6)))
    np.testing.assert_array_equal(np.asarray(ours(*args).logits_btv), np.asarray(reference(*args).logits_btv))
    return args


def test_matmul_weights_stored_in_bf16_leave_a_frozen_model_unchanged(tiny_checkpoint):
    """`store_matmul_weights` with bf16 matmuls (the trainer's reference): the next-token log-probabilities and the
    logits equal the fp32-stored model's to the bit, as every use rounds those weights to bf16 anyway; exactly the
    `MATMUL_WEIGHTS` become bf16 (norms, biases, the looked-up embedding stay fp32), and the bytes saved are
    reported. With fp32 matmuls nothing changes."""
    _, path, _ = tiny_checkpoint
    fp32_stored, ours = (load_model(path, matmul_dtype=jnp.bfloat16) for _ in range(2))
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.iter_graph(fp32_stored) if isinstance(v, nnx.Param)}
    half = sum(x.nbytes // 2 for k, x in params.items() if k.split("/")[-1] in CausalLM.MATMUL_WEIGHTS)
    assert half > 0 and ours.store_matmul_weights() == half
    for p, v in nnx.iter_graph(ours):
        if isinstance(v, nnx.Param):
            want = jnp.bfloat16 if p[-1] in CausalLM.MATMUL_WEIGHTS else jnp.float32
            assert v.get_value().dtype == want, p
    _assert_same_frozen_outputs(ours, fp32_stored, seed=1)
    assert load_model(path).store_matmul_weights() == 0  # fp32 matmuls: the weights stay as they are


@pytest.mark.parametrize("matmul_dtype", [jnp.bfloat16, None])
def test_layers_stored_as_bits_read_in_place(tiny_checkpoint, matmul_dtype):
    """`store_layers_as_bits` (the trainer's reference and HF reward models): a frozen model whose layers hold bf16
    weights (bf16 matmul weights, `store_matmul_weights`; or bf16 storage) computes the same log-probabilities and
    logits to the bit with their bit patterns stored instead, and its compiled forward's temporaries shrink by about
    its weight matrices' bytes: a bf16 argument is bitcast with a copy of every layer. fp32 layers and bf16 compute
    stay as they are."""
    _, path, _ = tiny_checkpoint
    kw = dict(matmul_dtype=matmul_dtype, param_dtype=jnp.float32 if matmul_dtype else jnp.bfloat16, dtype=jnp.float32)
    bf16_stored, ours = (load_model(path, **kw) for _ in range(2))
    for model in (bf16_stored, ours):
        model.store_matmul_weights()
    bf16_leaves = [v.get_value() for _, v in nnx.iter_graph(bf16_stored.blocks)
                   if isinstance(v, nnx.Param) and v.get_value().dtype == jnp.bfloat16]
    assert ours.store_layers_as_bits() == len(bf16_leaves) > 0
    assert not any(v.get_value().dtype == jnp.bfloat16 for _, v in nnx.iter_graph(ours.blocks)
                   if isinstance(v, nnx.Param))
    args = _assert_same_frozen_outputs(ours, bf16_stored, seed=2)

    def temp_bytes(model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s).next_token_logprobs(*a, logits_from=6))
        return forward.lower(state, *args).compile().memory_analysis().temp_size_in_bytes

    # XLA copies each bitcast argument unless it folds the bitcast into a use: the saving measured 1.0-1.06x the
    # stacked weight matrices' bytes on these models, 0.87x and 0.94x for GPT-NeoX's bf16 storage (all of
    # SmolLM2-135M's matrices, 0.2 GiB, in the trainer's reference and reward forwards); ~0 without the bits
    matrix_bytes = sum(x.nbytes for x in bf16_leaves if x.ndim >= 3)
    assert temp_bytes(bf16_stored) - temp_bytes(ours) >= 0.85 * matrix_bytes
    assert load_model(path).store_layers_as_bits() == 0  # fp32 layers
    assert load_model(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16).store_layers_as_bits() == 0  # bf16 compute


def test_chunked_token_logprobs_never_make_the_logits():
    """The point of the chunks: the program's temporaries hold one chunk's logits, not [B, T, V]; the head is read
    as the left operand of each chunk's dot."""
    from klq_jax.models.transformer import chunked_token_logprobs

    b, t, d, v = 8, 128, 64, 8192
    g = np.random.default_rng(0)
    h = jnp.asarray(g.normal(size=(b, t, d)), jnp.float32)
    head_vd = jnp.asarray(g.normal(size=(v, d)) / 8, jnp.float32)
    targets = jnp.asarray(g.integers(0, v, (b, t)), jnp.int32)
    fn = jax.jit(chunked_token_logprobs, static_argnames="matmul_dtype")
    compiled = fn.lower(h, head_vd, targets, 1.0).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < b * t * v * 4 / 4
    # The head is the left operand of the chunk's dot (read in place by XLA:CPU's YNNPACK), bf16 operands too.
    for matmul_dtype, dtype in ((None, "f32"), (jnp.bfloat16, "bf16")):
        dots = _dots_on(fn.lower(h, head_vd, targets, 1.0, matmul_dtype=matmul_dtype).compile().as_text(), rows=v)
        assert dots == [({dtype}, (v, d))], dots
    logits = jnp.einsum("btd,vd->btv", h, head_vd)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(fn(h, head_vd, targets, 1.0)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_chunked_token_logprobs_backward_reads_the_whole_head_in_place(monkeypatch, matmul_dtype):
    """The backward's two vocabulary-block loops (halves of the blocks) each take the whole head and its transpose
    and slice a block per step: no copy of a half of either goes in (fp32 SmolLM2: two of 113 MB, item 70). With
    bf16 matmuls both go in as their bits: XLA:CPU widens a bf16 loop input to fp32 before the loop. Each loop's
    only array of a half's blocks is the head's gradient (fp32)."""
    import re

    from klq_jax.models import transformer

    monkeypatch.setattr(transformer, "LOGPROB_VOCAB_BLOCK", 1024)
    b, t, d, v = 4, 32, 64, 8192  # 8 blocks: two loops of 4
    g = np.random.default_rng(0)
    h = jnp.asarray(g.normal(size=(b, t, d)), jnp.float32)
    head_vd = jnp.asarray(g.normal(size=(v, d)) / 8, jnp.float32)
    targets = jnp.asarray(g.integers(0, v, (b, t)), jnp.int32)
    grad = jax.jit(jax.grad(lambda h, w: transformer.chunked_token_logprobs(h, w, targets, 1.0,
                                                                            matmul_dtype=matmul_dtype).sum(), (0, 1)))
    hlo = grad.lower(h, head_vd).compile().as_text()
    sizes = {4 * 1024 * d: "half", v * d: "whole"}
    loops = []
    for line in hlo.splitlines():
        if " while(" not in line:
            continue
        carried = re.findall(r"\b(f32|bf16|u16)\[([\d,]+)\]", line.split(" while(")[0])
        heads = sorted(f"{sizes[n]} {dtype}[{dims}]" for dtype, dims in carried
                       if (n := int(np.prod([int(x) for x in dims.split(",")]))) in sizes)
        if any(x.startswith("half") for x in heads):
            loops.append(heads)
    head = "u16" if matmul_dtype == jnp.bfloat16 else "f32"
    assert loops == [["half f32[4,1024,64]", f"whole {head}[64,8192]", f"whole {head}[8192,64]"]] * 2, loops


@pytest.mark.parametrize("vocab_block", [48, 4096])
@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_chunked_token_logprobs_gradients(monkeypatch, matmul_dtype, vocab_block):
    """The backward by vocabulary blocks (the last one padded) gives autodiff's gradients of the plain
    log-softmax of the logits, for the hidden states and the head, with the head's matmul on the same operands
    (bf16: `tied_head`'s bf16 dots and `losses.token_logprobs`, the update's path before it), at a temperature.
    With one block (a vocabulary of at most `LOGPROB_VOCAB_BLOCK`) too, whose bf16 backward XLA:CPU once failed to
    run ("BF16 x BF16 = F32" unsupported)."""
    from klq_jax.models import transformer
    from klq_jax.rl.losses import token_logprobs

    # 97 tokens: blocks of 48, 48 and 1 (+ 47 padding), or one block
    monkeypatch.setattr(transformer, "LOGPROB_VOCAB_BLOCK", vocab_block)
    b, t, d = 3, 21, 16  # 21 positions: chunks of 64 // 3 = 21 (bf16: 32 // 3 = 10, padded to 30)
    g = np.random.default_rng(0)
    h = jnp.asarray(g.normal(size=(b, t, d)), jnp.float32)
    head_vd = jnp.asarray(g.normal(size=(VOCAB, d)) / 2, jnp.float32)
    targets = jnp.asarray(g.integers(0, VOCAB, (b, t)), jnp.int32)
    weights = jnp.asarray(g.normal(size=(b, t)), jnp.float32)

    def chunked(h, head_vd):
        return jnp.sum(weights * transformer.chunked_token_logprobs(h, head_vd, targets, 0.7, matmul_dtype=matmul_dtype))

    def plain(h, head_vd):
        return jnp.sum(weights * token_logprobs(transformer.tied_head(h, head_vd, matmul_dtype), targets, 0.7))

    (value, grads), (want_value, want_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, head_vd)
                                                for f in (chunked, plain))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):  # the same dots on the same operands: only the sums' order differs
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_replayed_token_logprobs_return_the_record_and_the_heads_gradients(monkeypatch, matmul_dtype):
    """`replayed_token_logprobs` returns the recorded log-probabilities as they are, and given the log-normalisers
    of the logits the head makes (from the same operands) its gradients are `chunked_token_logprobs`'s; a position
    whose log-normaliser is +inf passes no gradient through the softmax (finite, where a 0 would overflow)."""
    from klq_jax.models import transformer

    monkeypatch.setattr(transformer, "LOGPROB_VOCAB_BLOCK", 48)
    b, t, d = 3, 21, 16
    g = np.random.default_rng(1)
    h = jnp.asarray(g.normal(size=(b, t, d)) * 3, jnp.float32).at[:, :4].multiply(3)  # logits over 89 there
    head_vd = jnp.asarray(g.normal(size=(VOCAB, d)), jnp.float32)
    targets = jnp.asarray(g.integers(0, VOCAB, (b, t)), jnp.int32)
    weights = jnp.asarray(g.normal(size=(b, t)), jnp.float32)
    mdt = matmul_dtype or jnp.float32
    logits_btv = jnp.einsum("btd,vd->btv", h.astype(mdt), head_vd.astype(mdt), preferred_element_type=jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv / 0.7, axis=-1)
    recorded_bt = jnp.asarray(-g.uniform(0.5, 4, (b, t)), jnp.float32)  # not the head's: returned as it is

    def chunked(h, head_vd):
        return jnp.sum(weights * transformer.chunked_token_logprobs(h, head_vd, targets, 0.7, matmul_dtype=matmul_dtype))

    def replayed(h, head_vd, lse_bt=lse_bt):
        return jnp.sum(weights * transformer.replayed_token_logprobs(h, head_vd, targets, 0.7, recorded_bt, lse_bt,
                                                                     matmul_dtype=matmul_dtype))

    logp_bt = jax.jit(transformer.replayed_token_logprobs, static_argnames="matmul_dtype")(
        h, head_vd, targets, 0.7, recorded_bt, lse_bt, matmul_dtype=matmul_dtype)
    np.testing.assert_array_equal(logp_bt, recorded_bt)
    grads = jax.jit(jax.grad(replayed, argnums=(0, 1)))(h, head_vd)
    want_grads = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, head_vd)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

    weights = weights.at[:, :4].set(0.0)  # slots the loss does not read: +inf there, and 0 would overflow
    assert float(jnp.max(logits_btv[:, :4] / 0.7)) > 89
    grads = jax.grad(replayed, argnums=(0, 1))(h, head_vd, lse_bt.at[:, :4].set(jnp.inf))
    want_grads = jax.grad(chunked, argnums=(0, 1))(h, head_vd)
    assert float(jnp.max(jnp.abs(grads[0][:, :4]))) == 0
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("vocab_block", [48, 4096])
def test_replayed_token_logprobs_backward_from_the_recorded_logp_grad(monkeypatch, matmul_dtype, vocab_block):
    """Given the sampler's `onehot - softmax` ([V, T, B], `logp_grad_vtb`) the head's backward makes no logits and
    its gradients are those of that array: against a float64 numpy product of the same operands (the recorded array
    as given, fp32 or rounded to bf16; the dots' operands rounded as the matmul dtype rounds them), over whole and
    partial vocabulary blocks (97 tokens in blocks of 48; one block of all of them). With the exact fp32 array, the
    gradients are `chunked_token_logprobs`'s. A position whose log-normaliser is +inf (one the loss does not read)
    gets none, whatever the array holds there; an array of another shape is refused."""
    from klq_jax.models import transformer

    monkeypatch.setattr(transformer, "LOGPROB_VOCAB_BLOCK", vocab_block)
    b, t, d, temperature = 3, 21, 16, 0.7
    g = np.random.default_rng(2)
    h = jnp.asarray(g.normal(size=(b, t, d)), jnp.float32)
    head_vd = jnp.asarray(g.normal(size=(VOCAB, d)), jnp.float32)
    targets = jnp.asarray(g.integers(0, VOCAB, (b, t)), jnp.int32)
    weights = jnp.asarray(g.normal(size=(b, t)), jnp.float32)
    mdt = matmul_dtype or jnp.float32
    logits_btv = jnp.einsum("btd,vd->btv", h.astype(mdt), head_vd.astype(mdt),
                            preferred_element_type=jnp.float32) / temperature
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    logp_grad_btv = jax.nn.one_hot(targets, VOCAB) - jax.nn.softmax(logits_btv, axis=-1)
    recorded_bt = jnp.take_along_axis(logits_btv, targets[..., None], -1)[..., 0] - lse_bt

    def replayed(h, head_vd, grad_vtb, lse_bt=lse_bt):
        return jnp.sum(weights * transformer.replayed_token_logprobs(
            h, head_vd, targets, temperature, recorded_bt, lse_bt, grad_vtb, matmul_dtype=matmul_dtype))

    def chunked(h, head_vd):
        return jnp.sum(weights * transformer.chunked_token_logprobs(h, head_vd, targets, temperature,
                                                                   matmul_dtype=matmul_dtype))

    def numpy_grads(grad_btv, weights):  # float64, the recorded array and the dots' operands as the backward reads them
        round_mdt = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(mdt).astype(jnp.float32), np.float64)
        dlogits = round_mdt(np.asarray(grad_btv, np.float64) * np.asarray(weights, np.float64)[..., None] / temperature)
        return (np.einsum("btv,vd->btd", dlogits, round_mdt(head_vd)),
                np.einsum("btv,btd->vd", dlogits, round_mdt(h)))

    for name, grad_btv in (("fp32", logp_grad_btv), ("bf16", logp_grad_btv.astype(jnp.bfloat16))):
        grads = jax.jit(jax.grad(replayed, argnums=(0, 1)))(h, head_vd, grad_btv.transpose(2, 1, 0))
        for got, want in zip(grads, numpy_grads(grad_btv.astype(jnp.float32), weights)):
            scale = float(np.max(np.abs(want)))
            # bf16 dlogits: the product's rounding may differ by one bf16 step where fp32 and float64 products differ
            atol = (2 ** -8 if matmul_dtype else 1e-6) * scale
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol, err_msg=name)
        if name == "fp32":
            for got, want in zip(grads, jax.grad(chunked, argnums=(0, 1))(h, head_vd)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

    # Slots the loss does not read: +inf log-normalisers there, and no gradient from what the array holds there
    garbage_btv = logp_grad_btv.at[:, :4].set(5.0)
    grads = jax.grad(replayed, argnums=(0, 1))(h, head_vd, garbage_btv.transpose(2, 1, 0), lse_bt.at[:, :4].set(jnp.inf))
    assert float(jnp.max(jnp.abs(grads[0][:, :4]))) == 0
    for got, want in zip(grads, numpy_grads(logp_grad_btv, weights.at[:, :4].set(0.0))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                                   atol=(2 ** -8 if matmul_dtype else 1e-6) * float(np.max(np.abs(want))))
    with pytest.raises(ValueError, match=r"logp_grad_vtb has shape \(97, 3, 21\); expected"):
        replayed(h, head_vd, logp_grad_btv.transpose(2, 0, 1))


def test_loss_from_next_token_logprobs_equals_the_logits_loss(tiny_checkpoint):
    """An `apply_fn` with `next_token_logprobs` (the trainer's): the KLQ and PPO losses and their gradients equal
    those computed from the logits, with the actions from a later slot."""
    from klq_jax.rl.train_step import Rollout, default_algo_config, make_loss_fn

    _, path, _ = tiny_checkpoint
    graphdef, params = nnx.split(load_model(path, value_head=True))
    g = np.random.default_rng(2)
    b, t, first_action = 3, 24, 6
    tokens = jnp.asarray(g.integers(1, VOCAB, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool).at[1, :2].set(False)
    response = jnp.zeros((b, t), bool).at[:, first_action:].set(True)
    logp = jnp.asarray(-g.uniform(0.5, 4, (b, t)), jnp.float32) * response
    batch = Rollout.from_samples(tokens, positions_from_mask(mask), mask, response, logp, jnp.ones(b, bool),
                                 first_action=first_action)
    batch = batch.replace(ref_logp_bt=logp * 1.1, rewards_b=jnp.asarray(g.normal(size=b), jnp.float32),
                          old_values_bt=jnp.asarray(g.normal(size=(b, t)), jnp.float32) * response,
                          advantages_bt=jnp.asarray(g.normal(size=(b, t)), jnp.float32) * response,
                          targets_bt=jnp.asarray(g.normal(size=(b, t)), jnp.float32) * response)

    def apply_fn(params, *args, **kwargs):
        out = nnx.merge(graphdef, params)(*args, **kwargs)
        return out.logits_btv, out.values_bt

    def fused_apply_fn(params, *args, **kwargs):
        return apply_fn(params, *args, **kwargs)

    fused_apply_fn.next_token_logprobs = lambda params, tokens, positions, mask, logits_from, temperature: (
        nnx.merge(graphdef, params).next_token_logprobs(tokens, positions, mask, logits_from=logits_from,
                                                        temperature=temperature, with_values=True))
    for algo in ("klq", "ppo"):
        cfg = default_algo_config()
        cfg.algo, cfg.temperature = algo, 0.8
        (loss, _), grads = jax.value_and_grad(make_loss_fn(apply_fn, cfg), has_aux=True)(params, batch, 0.1)
        (fused_loss, _), fused_grads = jax.value_and_grad(make_loss_fn(fused_apply_fn, cfg), has_aux=True)(
            params, batch, 0.1)
        np.testing.assert_allclose(fused_loss, loss, rtol=1e-5)
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads))
        for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


def test_decode_step_equals_full_forward(tiny_checkpoint):
    """A cached decode step, by the layer scan (stacked weights) and by the sampler's unrolled path (per-layer
    weights, q|k|v and gate|up fused into one matmul each; as stored, or as [out, in] copies, which run
    feature-major), gives the full forward's logits, values and cache. With bf16 matmuls, the feature-major
    step gives the row-major one's logits, and XLA runs its weight dots on bf16 operands."""
    _, path, _ = tiny_checkpoint
    ours = load_model(path, value_head=True)
    ids, mask = _batch(padded=True)
    tokens, mask_bt = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy().astype(bool))
    positions = positions_from_mask(mask_bt)
    full = ours(tokens, positions, mask_bt)
    b, t = tokens.shape
    kv_mask = mask_bt.at[:, -1].set(False)
    prefill = ours(tokens[:, :-1], positions[:, :-1], kv_mask, cache=KVCache.zeros(ours.cfg, b, t), cache_pos=0)
    step_args = (tokens[:, -1:], positions[:, -1:], mask_bt)
    stacked = ours(*step_args, cache=prefill.cache, cache_pos=t - 1)
    unrolled = ours(*step_args, cache=prefill.cache.unstacked(), cache_pos=t - 1, layers=ours.unstack_layers())
    layers_oi = ours.unstack_layers(weights_oi=True)
    layer = nnx.state(ours.blocks)
    np.testing.assert_array_equal(layers_oi[1]["w_up_df"][...], layer["w_up_df"][...][1].T)
    np.testing.assert_array_equal(layers_oi[1]["wo_nhd"][...], layer["wo_nhd"][...][1].reshape(-1, ours.cfg.hidden_size).T)
    unrolled_oi = ours(*step_args, cache=prefill.cache.unstacked(), cache_pos=t - 1, layers=layers_oi, layers_oi=True,
                       head_vd=ours.lm_head_vd())
    # the sampler's: keys stored [B, K, hd, S]
    unrolled_oi_hs = ours(*step_args, cache=prefill.cache.unstacked().keys_feature_major(), cache_pos=t - 1,
                          layers=layers_oi, layers_oi=True)
    assert unrolled_oi_hs.cache.keys_hs and unrolled_oi_hs.cache.k_lbksh[0].shape == (b, ours.cfg.num_kv_heads,
                                                                                        ours.cfg.head_dim, t)
    np.testing.assert_allclose(np.asarray(unrolled_oi_hs.cache.k_lbksh[-1].swapaxes(-1, -2)),
                               np.asarray(stacked.cache.k_lbksh[-1]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keys_feature_major"):
        ours(*step_args, cache=prefill.cache.keys_feature_major(), cache_pos=t - 1)
    for step in (stacked, unrolled, unrolled_oi, unrolled_oi_hs):
        np.testing.assert_allclose(np.asarray(step.logits_btv[:, 0]), np.asarray(full.logits_btv[:, -1]),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(step.values_bt[:, 0]), np.asarray(full.values_bt[:, -1]),
                                   atol=1e-5, rtol=0)
    # a 3-token chunk through the feature-major path, logits of its middle token only
    prefill3 = ours(tokens[:, :-3], positions[:, :-3], mask_bt.at[:, -3:].set(False),
                    cache=KVCache.zeros(ours.cfg, b, t), cache_pos=0)
    chunk_oi = ours(tokens[:, -3:], positions[:, -3:], mask_bt, cache=prefill3.cache.unstacked(), cache_pos=t - 3,
                    layers=layers_oi, layers_oi=True, logits_from=1, logits_to=2)
    np.testing.assert_allclose(np.asarray(chunk_oi.logits_btv), np.asarray(full.logits_btv[:, -2:-1]),
                               atol=1e-5, rtol=0)
    for step in (unrolled, unrolled_oi):
        for got, want in ((step.cache.k_lbksh, stacked.cache.k_lbksh), (step.cache.v_lbksh, stacked.cache.v_lbksh)):
            np.testing.assert_allclose(np.asarray(got[-1]), np.asarray(want[-1]), atol=1e-5, rtol=0)
    # bf16 matmuls: the same bf16-rounded products as the as-stored (row-major) path
    bf16 = load_model(path, value_head=True, matmul_dtype=jnp.bfloat16)
    cache = bf16(tokens[:, :-1], positions[:, :-1], kv_mask, cache=KVCache.zeros(bf16.cfg, b, t),
                 cache_pos=0).cache.unstacked()
    want = bf16(*step_args, cache=cache, cache_pos=t - 1, layers=bf16.unstack_layers()).logits_btv
    graphdef, state = nnx.split(bf16)

    @jax.jit
    def step_oi(state, layers, cache):
        model = nnx.merge(graphdef, state)
        return model(*step_args, cache=cache, cache_pos=t - 1, layers=layers, layers_oi=True,
                     head_vd=model.lm_head_vd()).logits_btv

    layers_oi = bf16.unstack_layers(weights_oi=True)
    got = step_oi(state, layers_oi, cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * float(np.abs(want).max()), rtol=0)
    # A dot of an [out, in] weight with the step's b rows: bf16 operands. After a layout-only transpose of the
    # activations, XLA:CPU had widened all but one of them to fp32 dots on fp32 copies of the weights.
    weight_dots = _dots_on(step_oi.lower(state, layers_oi, cache).compile().as_text(), rows=b)
    assert len(weight_dots) >= 4 * bf16.cfg.num_layers, weight_dots
    assert all(types == {"bf16"} for types, _ in weight_dots), weight_dots
    # the head [V, D] (a tied head's embedding, an untied head's copy) is the left operand of its dot (read in place)
    assert (bf16.cfg.vocab_size, bf16.cfg.hidden_size) in [lhs for _, lhs in weight_dots], weight_dots


def _dots_on(hlo: str, rows: int) -> list[tuple[set[str], tuple[int, ...]]]:
    """The operand dtypes and the left operand's shape of each dot of two 2-D operands in compiled HLO text, one
    of them with `rows` rows or columns: a decode step's weight (and LM head) dots."""
    shapes, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%[\w.-]+) = (\w+)\[([\d,]*)\]", line)
        if not m:
            continue
        shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
        operands = re.search(r" dot\((%[\w.-]+), (%[\w.-]+)\)", line)
        if operands:
            (type_a, dims_a), (type_b, dims_b) = shapes[operands.group(1)], shapes[operands.group(2)]
            if len(dims_a) == len(dims_b) == 2 and rows in dims_a + dims_b:
                dots.append(({type_a, type_b}, dims_a))
    return dots


def test_sharded_index_and_bf16(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY["llama_gqa_untied"]()).eval()
    model.save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours_bf16 = load_model(tmp_path / "sharded", param_dtype=jnp.bfloat16)
    assert ours_bf16.embed_vd[...].dtype == jnp.bfloat16
    ours_fp32 = load_model(tmp_path / "sharded")  # bf16 on disk, fp32 in memory: exact values of the bf16
    ref = read_safetensors(tmp_path / "fp32" / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(ours_fp32.embed_vd[...]),
                                  ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_safetensors_writer_round_trip(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones((4,), dtype=ml_dtypes.bfloat16), "c": np.array([3], dtype=np.int64)}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    from safetensors.numpy import load_file

    back = read_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    np.testing.assert_array_equal(load_file(tmp_path / "x.safetensors")["a"], tensors["a"])


# --------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear line each.


@pytest.fixture()
def good_folder(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(TINY["llama_gqa_untied"]()).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_error_unsupported_architecture(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["model_type"] = "t5"
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as e:
        load_model(good_folder)
    assert "t5" in _one_line(e) and "llama" in _one_line(e)


def test_error_missing_files(good_folder, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "does-not-exist" / "nor-this" / "x")
    assert "does-not-exist" in _one_line(e)
    (good_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(good_folder)
    assert "model.safetensors" in _one_line(e)
    (good_folder / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(good_folder)
    assert "config.json" in _one_line(e)


def test_error_shape_mismatch(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(good_folder)
    message = _one_line(e)
    assert "blocks.w_" in message and "96" in message and "80" in message and "config implies" in message


def test_error_missing_tensor_and_corrupt_file(good_folder):
    tensors = dict(read_safetensors(good_folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(tensors, good_folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(good_folder)
    assert "model.layers.1.mlp.up_proj.weight" in _one_line(e)
    (good_folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError) as e:
        load_model(good_folder)
    assert "safetensors" in _one_line(e)


@pytest.mark.parametrize("name", ["dense", "tied_head"])
def test_written_out_backward_equals_autodiff(name):
    """`dense` (`x @ w`, weight gradient `x^T dy`) and `tied_head` (logits `h @ embed^T`, embedding gradient
    `(h^T dlogits)^T`) have autodiff's values and gradients."""
    from klq_jax.models import transformer

    rng = np.random.default_rng(0)
    ours = getattr(transformer, name)
    autodiff = {"dense": jnp.matmul, "tied_head": lambda h, e: jnp.einsum("btd,vd->btv", h, e)}[name]
    x = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 3) if name == "dense" else (11, 7)), jnp.float32)
    g = jnp.asarray(rng.normal(size=autodiff(x, w).shape), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(g * jnp.tanh(fn(x, w)))

    np.testing.assert_allclose(ours(x, w), autodiff(x, w), rtol=1e-6)
    grads = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(x, w)
    ref = jax.grad(functools.partial(loss, autodiff), argnums=(0, 1))(x, w)
    for a, b in zip(grads, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subscripts", ["bkgth,bksh->bkgts", "bkgts,bksh->bkgth"])
def test_operand_matmul_rounds_both_dots_of_its_backward(subscripts):
    """`operand_matmul` (the attention's dots with bf16 matmuls): the float64 einsum of the bf16-rounded operands
    forward, and of the rounded cotangent with the rounded other operand for each gradient (summing over the
    query groups for the keys and values), to fp32 accuracy."""
    from klq_jax.models.transformer import operand_matmul

    rng = np.random.default_rng(0)
    sizes = dict(b=2, k=3, g=2, t=5, s=7, h=16)
    in_a, rest = subscripts.split(",")
    in_b, out = rest.split("->")
    a, b, g = (jnp.asarray(rng.normal(size=[sizes[c] for c in spec]), jnp.float32) for spec in (in_a, in_b, out))

    def r(x):  # bf16-rounded, as float64
        return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    y = operand_matmul(subscripts, a, b, jnp.bfloat16)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.einsum(subscripts, r(a), r(b)), rtol=1e-5, atol=1e-5)
    unrounded = np.einsum(subscripts, np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert np.abs(np.asarray(y) - unrounded).max() > 1e-3
    da, db = jax.grad(lambda a, b: jnp.sum(g * operand_matmul(subscripts, a, b, jnp.bfloat16)), argnums=(0, 1))(a, b)
    assert da.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(da, np.einsum(f"{out},{in_b}->{in_a}", r(g), r(b)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, np.einsum(f"{out},{in_a}->{in_b}", r(g), r(a)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "tied_head"])
def test_bf16_matmuls_round_the_operands_and_accumulate_in_fp32(name):
    """With `matmul_dtype=bfloat16`, `dense` and `tied_head` compute the float64 products of the bf16-rounded
    operands (x, w forward; the rounded cotangent and operand backward) to fp32 accuracy: bf16 products are exact
    in fp32, so only the fp32 accumulation rounds."""
    from klq_jax.models import transformer

    rng = np.random.default_rng(0)
    ours = functools.partial(getattr(transformer, name), matmul_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 48) if name == "dense" else (40, 64)), jnp.float32)

    def r(a):  # bf16-rounded, as float64
        return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    w_io = r(w) if name == "dense" else r(w).T  # the head's weight is [V, d]
    y = ours(x, w)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, r(x) @ w_io, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y) - np.asarray(x, np.float64) @ np.asarray(w if name == "dense" else w.T)).max() > 1e-3
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(g * ours(x, w)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, r(g) @ w_io.T, rtol=1e-5, atol=1e-5)
    dw_io = r(x).reshape(-1, 64).T @ r(g).reshape(-1, y.shape[-1])
    np.testing.assert_allclose(dw, dw_io if name == "dense" else dw_io.T, rtol=1e-5, atol=1e-5)


def test_bf16_matmul_model(tiny_checkpoint):
    """`matmul_dtype=bfloat16`: the layers' and the head's dots take bf16 operands and return fp32 (the fast
    kind on CPUs with AVX-512 BF16), forward and backward; the logits stay within bf16's rounding of fp32's."""
    _, path, _ = tiny_checkpoint
    fp32 = load_model(path, value_head=True)
    bf16 = load_model(path, value_head=True, matmul_dtype=jnp.bfloat16, remat="full")
    ids, mask = _batch()
    tokens, mask_bt = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy().astype(bool))
    positions = positions_from_mask(mask_bt)
    want = fp32(tokens, positions, mask_bt).logits_btv
    got = bf16(tokens, positions, mask_bt).logits_btv
    err = np.abs(np.asarray(got - want))[mask.numpy().astype(bool)]
    scale = np.abs(np.asarray(want)).max()
    assert 1e-6 * scale < err.max() < 3e-2 * scale, (err.max(), scale)
    graphdef, params = nnx.split(bf16)

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens, positions, mask_bt)
        return jnp.sum(jnp.where(mask_bt[..., None], out.logits_btv, 0.0) ** 2) + jnp.sum(out.values_bt)

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    bf16_dots = [d for d in dots if d.split("->")[-1].strip().endswith("xf32>") and d.count("xbf16>") == 2]
    assert not [d for d in dots if d.split("->")[-1].strip().endswith("xbf16>")]  # no bf16 result: the slow kind
    # Forward, recomputation and backward of the 6-7 projections, and the head's forward and 2 backward dots.
    assert len(bf16_dots) >= 3 * 7 + 3, "\n".join(dots)
    # The attention's (over [B, K, G, T, hd] queries): 2 in the forward, 2 in the recomputation, 4 in the backward.
    attention_dots = [d for d in dots if re.search(r"tensor<(\d+x){5}", d)]
    assert len(attention_dots) >= 8 and set(attention_dots) <= set(bf16_dots), "\n".join(attention_dots)


def test_bf16_stored_layers_are_widened_one_at_a_time(tiny_checkpoint):
    """A bf16-stored model computing in fp32 (a frozen reference) gives exactly the fp32 forward of the
    bf16-rounded weights, and its compiled forward holds no fp32 copy of the stacked layers."""
    _, path, _ = tiny_checkpoint
    stored = load_model(path, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    rounded = load_model(path)
    graphdef, params = nnx.split(rounded)
    rounded = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
    ids, mask = _batch()
    np.testing.assert_array_equal(np.asarray(_ours(stored, ids, mask)[0].logits_btv),
                                  np.asarray(_ours(rounded, ids, mask)[0].logits_btv))

    def temp_bytes(model):
        graphdef, params = nnx.split(model)
        mask_np = mask.numpy().astype(bool)
        args = (jnp.asarray(ids.numpy()), positions_from_mask(jnp.asarray(mask_np)), jnp.asarray(mask_np))
        forward = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a).logits_btv)
        return forward.lower(params, *args).compile().memory_analysis().temp_size_in_bytes

    layer_bytes_f32 = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(rounded.blocks)))
    # Widening the whole stack before the loop would add about its fp32 size.
    assert temp_bytes(stored) < temp_bytes(rounded) + 0.75 * layer_bytes_f32


def _tanh_loss_grad_fn(model):
    """(fn, params): `fn(params)` = ((loss, logits), parameter gradients) of `sum(w * tanh(logits))` over
    `_batch()` (fixed random `w`), jitted, so callers can also lower it to read the program."""
    ids, mask = _batch()
    mask_np = mask.numpy().astype(bool)
    args = (jnp.asarray(ids.numpy()), positions_from_mask(jnp.asarray(mask_np)), jnp.asarray(mask_np))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, VOCAB)), jnp.float32)
    graphdef, params = nnx.split(model)

    def loss(p):
        logits = nnx.merge(graphdef, p)(*args).logits_btv
        return jnp.sum(weights * jnp.tanh(logits)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params


def test_bf16_remat_checkpoints_round_less_than_the_bf16_matmuls(tiny_checkpoint, monkeypatch):
    """With bf16 matmuls, remat="full" keeps each layer's input in bf16 for an RMS-normed model (as its raw bits, so
    that XLA:CPU does not widen the whole stack before the backward loop): the forward is unchanged, and the
    gradients move from those of fp32 checkpoints (remat none, bf16 matmuls) by less than the bf16 matmuls move
    them from fp32's. LayerNorm models keep fp32 checkpoints (the same gradients as remat none). One row group
    (`update_row_groups`; the groups' own test compares them with one)."""
    from klq_jax.models import transformer
    monkeypatch.setattr(transformer, "update_row_groups", lambda rows: 1)
    _, path, _ = tiny_checkpoint
    rms = load_model(path).final_bias is None

    def loss_and_grads(model):
        fn, params = _tanh_loss_grad_fn(model)
        (loss, _), grads = fn(params)
        return loss, grads

    fp32_loss, fp32_grads = loss_and_grads(load_model(path))
    plain_loss, plain_grads = loss_and_grads(load_model(path, matmul_dtype=jnp.bfloat16))
    model = load_model(path, matmul_dtype=jnp.bfloat16, remat="full")
    remat_fn, remat_params = _tanh_loss_grad_fn(model)
    (remat_loss, _), remat_grads = remat_fn(remat_params)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)

    def error(grads, ref):  # relative to each leaf's largest gradient, the largest over all leaves
        return max(float(jnp.max(jnp.abs(a.astype(b.dtype) - b)) / jnp.max(jnp.abs(b)))
                   for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)))
    checkpoint_error, matmul_error = error(remat_grads, plain_grads), error(plain_grads, fp32_grads)
    text = remat_fn.lower(remat_params).compile().as_text()
    stack = f"[{model.cfg.num_layers},3,9,{model.cfg.hidden_size}]"  # the checkpoints: [L, B, T, D]
    # The layers' weight matrices' gradients come in bf16 (`CausalLM.layer_grad_dtype`), the rest as before.
    bf16_leaves = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(remat_grads)
                   if g.dtype == jnp.bfloat16]
    assert bf16_leaves and all("blocks" in k for k in bf16_leaves), bf16_leaves
    if rms:
        assert 0 < checkpoint_error < matmul_error, (checkpoint_error, matmul_error)
        assert f"u16{stack}" in text and f"f32{stack}" not in text, sorted(set(re.findall(r"\w+\[\d+,3,9,\d+\]", text)))
    else:  # fp32 checkpoints: remat none's gradients, the matrices' rounded once to bf16
        assert f"u16{stack}" not in text
        for a, r in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
            if a.dtype == jnp.bfloat16:
                np.testing.assert_allclose(np.asarray(a, np.float32), r, rtol=2**-8,
                                           atol=1e-6 * float(jnp.abs(r).max()))
            else:
                assert float(jnp.abs(a - r).max()) < 1e-5 * matmul_error * float(jnp.abs(r).max())


def test_bf16_layer_gradients_take_half_the_update_memory():
    """With bf16 matmul operands and remat "full" the layers' weight gradients are collected in bf16, as their raw
    bits (XLA:CPU runs a bf16 dynamic-update-slice in fp32, on the whole stack), and the clipped AdamW step reads
    them in place (`optimizer.global_norm` sums them a slice of bits at a time): the step's temporaries shrink by
    about half the fp32 stack. Read as in optax (a whole-array widening) they would grow instead."""
    from klq_jax.models.config import ModelConfig
    from klq_jax.rl.optimizer import clipped_adamw
    layers, d, f = 6, 256, 1024
    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=d, intermediate_size=f, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64, rotary_dim=64,
                      tie_embeddings=True, norm_eps=1e-5)
    tokens, mask = jnp.zeros((4, 32), jnp.int32), jnp.ones((4, 32), bool)

    def step_temp_bytes(bf16_gradients: bool) -> int:
        model = CausalLM(cfg, matmul_dtype=jnp.bfloat16, remat="full", rngs=nnx.Rngs(0))
        assert model.layer_grad_dtype() == jnp.bfloat16
        if not bf16_gradients:
            model.layer_grad_dtype = lambda: None
        graphdef, params = nnx.split(model)
        opt = clipped_adamw(1e-3, max_grad_norm=1.0, mu_dtype=jnp.bfloat16)

        def step(params, opt_state):
            def loss(p):
                return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(tokens, positions_from_mask(mask), mask).logits_btv))
            return opt.apply(jax.grad(loss)(params), opt_state, params, 0.5)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    stack_fp32 = layers * (d * (d + 2 * 128) + d * d + 3 * d * f) * 4  # q, k|v, o, gate, up, down
    assert step_temp_bytes(True) < step_temp_bytes(False) - 0.4 * stack_fp32


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(tiny_checkpoint, remat, monkeypatch):
    """Rematerialised layers (remat="full": `remat_layer_scan`, the written-out backward; "dots":
    `jax.checkpoint`) give the plain model's logits and parameter gradients. One row group (`update_row_groups`;
    the groups' own test compares them with one)."""
    from klq_jax.models import transformer
    monkeypatch.setattr(transformer, "update_row_groups", lambda rows: 1)
    _, path, _ = tiny_checkpoint
    fn, params = _tanh_loss_grad_fn(load_model(path))
    (plain_loss, plain_logits), plain_grads = fn(params)
    fn, params = _tanh_loss_grad_fn(load_model(path, remat=remat))
    (loss, logits), grads = fn(params)
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("groups", [2, 3])
def test_update_row_groups_keep_values_and_gradients(tiny_checkpoint, monkeypatch, groups):
    """remat="full" with the layers run in row groups (`in_row_groups`; 3 rows in 2 groups: 1 + 2, in 3: one
    each) gives one group's logits and gradients, up to the order of fp32 sums: a weight's gradient is the sum of
    one dot per group."""
    from klq_jax.models import transformer
    _, path, _ = tiny_checkpoint

    def loss_and_grads(row_groups):
        monkeypatch.setattr(transformer, "update_row_groups", lambda rows: row_groups)
        fn, params = _tanh_loss_grad_fn(load_model(path, remat="full"))
        return fn(params), fn.lower(params).as_text()

    ((one_loss, one_logits), one_grads), one_text = loss_and_grads(1)
    ((loss, logits), grads), text = loss_and_grads(groups)
    np.testing.assert_array_equal(logits, one_logits)  # the forward: each row's ops as before
    np.testing.assert_allclose(loss, one_loss, rtol=1e-6)
    largest = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(one_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * largest)
    assert text.count("concatenate") > one_text.count("concatenate")  # the groups are in the program


def test_update_row_groups_where():
    """Two row groups on one CPU device, with or without a mesh (the trainer runs under a one-device mesh), for
    at least two rows; one on a mesh of several devices (an abstract one: this process has one device)."""
    from klq_jax import sharding
    from klq_jax.models.transformer import update_row_groups
    assert update_row_groups(8) == 2 and update_row_groups(1) == 1
    with jax.set_mesh(sharding.make_mesh()):  # the trainer's mesh from the default config.mesh, on this one device
        assert update_row_groups(8) == 2
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert update_row_groups(8) == 1


def test_causal_query_blocks():
    from klq_jax.models.transformer import causal_query_blocks
    assert causal_query_blocks(100) == [0, 100]  # under two blocks of 64 rows: one block
    assert causal_query_blocks(176) == [0, 88, 176]
    assert causal_query_blocks(9, block=3) == [0, 3, 6, 9]
    assert causal_query_blocks(4096) == [round(4096 * i / 8) for i in range(9)]  # at most 8 blocks


def test_blocked_causal_attention_matches_transformers_and_keeps_gradients(tiny_checkpoint, monkeypatch, tmp_path):
    """Query blocks that skip the keys after them (`causal_query_blocks`): transformers' logits at every real
    position, under left padding, the one-block model's logits, and gradients (those of a loss over the real
    positions: a fully masked query's output, which no real position reads, may differ) as close to
    transformers' float64 gradients as the one-block model's are. One row group (`update_row_groups`; the groups'
    own test compares them with one)."""
    from klq_jax.models import transformer
    monkeypatch.setattr(transformer, "update_row_groups", lambda rows: 1)
    _, path, torch_model = tiny_checkpoint
    ids, mask = _batch(padded=True)
    mask_np = mask.numpy().astype(bool)
    args = (jnp.asarray(ids.numpy()), positions_from_mask(jnp.asarray(mask_np)), jnp.asarray(mask_np))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, VOCAB)) * mask_np[..., None], jnp.float32)

    def loss_and_grads(block):
        monkeypatch.setattr(transformer, "ATTENTION_QUERY_BLOCK", block)
        graphdef, params = nnx.split(load_model(path, remat="full"))

        def loss(p):
            logits = nnx.merge(graphdef, p)(*args).logits_btv
            return jnp.sum(weights * jnp.tanh(logits)), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss, logits), grads = loss_and_grads(3)  # 9 positions: blocks [0, 3), [3, 6), [6, 9)
    ref = _torch_logits(torch_model, ids, mask)
    assert np.abs(np.asarray(logits) - ref)[mask_np].max() <= 1e-4
    (one_loss, one_logits), one_grads = loss_and_grads(64)  # one block
    np.testing.assert_allclose(np.asarray(logits)[mask_np], np.asarray(one_logits)[mask_np], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, one_loss, rtol=1e-5)
    # Two fp32 summation orders of the same gradients: each is off the exact ones by its own rounding, which for the
    # embedding's (a sum over every position) reaches 4e-7 of the largest gradient, above the gap between the two on
    # some CPUs. So both are measured against transformers' gradients in float64, tensor by tensor (ours written out
    # under HF names by `export_model`), and the blocks may err at most twice as much as one block, plus ~1 ulp of
    # the largest gradient: the key bias's gradient is zero in exact arithmetic (a softmax ignores a shift shared by
    # a row's scores), its computed value ~5e-9 of rounding.
    graphdef = nnx.graphdef(load_model(path))
    renamed = {"embed_out.weight": "lm_head.weight"}  # GPT-NeoX's head as transformers 5 names it (it loads both)
    hf = {name: {renamed.get(k, k): v for k, v in read_safetensors(
              export_model(nnx.merge(graphdef, g), tmp_path / name) / "model.safetensors").items()}
          for name, g in (("blocks", grads), ("one", one_grads))}
    exact = _torch_f64_grads(torch_model, ids, mask, np.asarray(weights, np.float64))
    scale = max(np.abs(g).max() for g in exact.values())
    assert set(hf["blocks"]) <= set(exact), set(hf["blocks"]) - set(exact)
    for name, g_exact in exact.items():
        if name not in hf["one"]:  # a tied LM head that the export leaves out: its gradient is the embedding's
            continue
        err_blocks, err_one = (np.abs(hf[k][name] - g_exact).max() for k in ("blocks", "one"))
        assert err_blocks <= 2 * err_one + 1e-7 * scale, (name, err_blocks, err_one, scale)
        assert err_one <= 1e-6 * scale, (name, err_one, scale)  # one block is right: fp32 rounding alone


def test_layer_grad_dtype_only_for_bf16_operands_under_a_wider_compute_dtype():
    """bf16 layer gradients need bf16 matmul operands and a wider compute dtype; fp16 operands keep the parameters'
    dtype (a summed gradient could overflow fp16's range), as do fp32 matmuls."""
    from klq_jax.models.config import ModelConfig
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=16, rotary_dim=16, tie_embeddings=True,
                      norm_eps=1e-5)

    def grad_dtype(**kw):
        return CausalLM(cfg, rngs=nnx.Rngs(0), **kw).layer_grad_dtype()
    assert grad_dtype(matmul_dtype=jnp.bfloat16) == jnp.bfloat16
    assert grad_dtype() is None and grad_dtype(matmul_dtype=jnp.float16) is None
    assert grad_dtype(matmul_dtype=jnp.bfloat16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) is None


def test_replays_gate_up_by_choice():
    """`rl.replay_gate_up`: "auto" replays the gate|up with bf16 layer gradients only, "on" with fp32 matmuls too,
    "off" never; a MLP without a gate never; anything else is refused naming the value and the accepted ones."""
    from klq_jax.models.config import ModelConfig
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
              head_dim=16, max_position_embeddings=16, rotary_dim=16, tie_embeddings=True, norm_eps=1e-5)
    llama = ModelConfig(family="llama", **kw)
    fp32, bf16 = CausalLM(llama, rngs=nnx.Rngs(0)), CausalLM(llama, rngs=nnx.Rngs(0), matmul_dtype=jnp.bfloat16)
    assert [fp32.replays_gate_up(c) for c in ("auto", "on", "off")] == [False, True, False]
    assert [bf16.replays_gate_up(c) for c in ("auto", "on", "off")] == [True, True, False]
    assert fp32.replays_gate_up() is False and bf16.replays_gate_up() is True  # "auto" by default
    neox = CausalLM(ModelConfig(family="gpt_neox", **{**kw, "rotary_dim": 4}), rngs=nnx.Rngs(0),
                    matmul_dtype=jnp.bfloat16)
    assert not neox.replays_gate_up("on") and not neox.replays_gate_up("auto")
    with pytest.raises(ValueError, match="replay_gate_up='yes'; accepted: 'auto', 'on', 'off'"):
        fp32.replays_gate_up("yes")


def test_block_replays_recorded_projections():
    """A layer given its own recorded projections (`Block.__call__(record_gate_up=True, record_attention=True)`,
    fp32 here) replays them (`gate_up_btf`, 2F wide or with the attention's q|k|v and output projection after
    them): the output and the gradients of the input and every weight are the forward's, up to summation order;
    zeroed attention projections move them, so they are read; a record of another width is refused."""
    from klq_jax.models.config import ModelConfig
    from klq_jax.models.sampler import Sampler
    from klq_jax.models.transformer import Block, attention_mask, recorded_width, rope_cos_sin
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=16, rotary_dim=8, norm_eps=1e-5)
    block = Block(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)  # biasless
    b, t = 2, 6
    x = jax.random.normal(jax.random.key(2), (b, t, cfg.hidden_size))
    kv_mask = jnp.asarray([[False, True, True, True, True, True], [True] * t])
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=1) - 1, 0)
    rope = rope_cos_sin(cfg, positions)
    mask = attention_mask(jnp.broadcast_to(jnp.arange(t)[None], (b, t)), kv_mask)
    _, _, recorded = nnx.merge(graphdef, params)(x, rope, mask, record_gate_up=True, record_attention=True)
    assert recorded.shape == (b, t, recorded_width(cfg, True))
    f2 = recorded_width(cfg, False)
    cot = jax.random.normal(jax.random.key(3), x.shape)

    def run(gate_up_btf):
        out, vjp = jax.vjp(lambda x, p: nnx.merge(graphdef, p)(x, rope, mask, gate_up_btf=gate_up_btf)[0], x, params)
        return out, vjp(cot)

    ref_out, ref_grads = run(None)
    for rec in (recorded[..., :f2], recorded):
        out, grads = run(rec)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5 * float(jnp.abs(r).max()),
                                       err_msg=jax.tree_util.keystr(path))
    _, zeroed = run(recorded.at[..., f2:].set(0.0))
    moved = {jax.tree_util.keystr(path): float(jnp.abs(z - r).max())
             for (path, z), r in zip(jax.tree_util.tree_leaves_with_path(zeroed[1]), jax.tree.leaves(ref_grads[1]))}
    assert all(moved[k] > 1e-3 for k in moved if "wq_dnh" in k or "wo_nhd" in k), moved
    with pytest.raises(ValueError, match="gate_up_btf: 50 features, expected 96 or 192"):
        run(recorded[..., :50])
    with pytest.raises(ValueError, match="replay_attention='yes'; accepted: 'off', 'on'"):
        Sampler(graphdef=None, eos_ids=(1,), pad_id=0, max_new_tokens=1, replay_attention="yes").records_attention(None)
