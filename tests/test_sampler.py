"""The jit sampler: greedy equals transformers' generate, cached decoding equals a full forward, EOS
stopping and masks, top-k/top-p filtering, one compilation per shape bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from klq_jax.models import sampler as sampler_lib  # noqa: E402
from klq_jax.models.hf import load_model  # noqa: E402
from klq_jax.models.sampler import (Sampler, categorical_with_stats, filter_logits, greedy,  # noqa: E402
                                    sample_categorical)
from klq_jax.models.transformer import KVCache, positions_from_mask, recorded_width  # noqa: E402
from klq_jax.trainer import lm_apply_fn  # noqa: E402

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                                   eos_token_id=EOS, bos_token_id=2)
    torch_model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so greedy choices are far from ties
        torch_model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny")
    torch_model.save_pretrained(path)
    return torch_model, load_model(path)


PROMPTS = [[5, 9, 14], [7, 3, 22, 41, 8, 19, 30], [11]]


def test_greedy_matches_transformers_generate(tiny):
    torch_model, model = tiny
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=12, bucket=8)
    out = greedy(sampler, nnx.state(model), PROMPTS)
    p = out.prompt_len
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        ref_new = ref[0, len(prompt):].tolist()
        ours = np.asarray(out.tokens_bt[row, p:])[np.asarray(out.response_mask_bt[row, p:])].tolist()
        assert ours == ref_new


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_logprobs_equal_full_forward(tiny, temperature):
    """The KV-cached loop's log-probabilities equal a plain forward over the sampled sequences."""
    _, model = tiny
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=10, bucket=8,
                                temperature=temperature)
    out = sampler(nnx.state(model), PROMPTS, jax.random.key(3))
    mask = out.attention_mask_bt
    logits = model(out.tokens_bt, positions_from_mask(mask), mask).logits_btv
    logp_all = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    ref = jnp.take_along_axis(logp_all, out.tokens_bt[:, 1:, None], axis=-1)[..., 0]
    resp = np.asarray(out.response_mask_bt[:, 1:])
    np.testing.assert_allclose(np.asarray(out.logprobs_bt[:, 1:])[resp], np.asarray(ref)[resp], atol=2e-5)
    assert np.all(np.asarray(out.logprobs_bt)[~np.asarray(out.response_mask_bt)] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_values_and_entropy_equal_policy_forward(tiny, tmp_path, temperature):
    """What the RL loop's policy forward computes (old logprobs, V(s_t), entropy, aligned to actions) the
    sampler returns from its own decode steps, so the loop can skip that forward."""
    from klq_jax.rl import losses

    torch_model, _ = tiny
    torch_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, value_head=True)
    model.value_w_d.value = jax.random.normal(jax.random.key(1), model.value_w_d.value.shape)
    model.value_b.value = jnp.float32(0.3)
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=10, bucket=8,
                                temperature=temperature)
    out = sampler(nnx.state(model), PROMPTS * 2, jax.random.key(5))
    mask = out.attention_mask_bt
    fwd = model(out.tokens_bt, positions_from_mask(mask), mask)
    logp_bt, values_bt = losses.shift_to_actions(fwd.logits_btv, fwd.values_bt, out.tokens_bt, temperature)
    entropy_bt = losses.action_entropy(fwd.logits_btv, temperature)
    resp = np.asarray(out.response_mask_bt)
    assert resp.sum(1).min() >= 1 and np.asarray(values_bt)[resp].std() > 0.1  # a real check
    for ours, ref in ((out.logprobs_bt, logp_bt), (out.values_bt, values_bt), (out.entropy_bt, entropy_bt)):
        np.testing.assert_allclose(np.asarray(ours)[resp], np.asarray(ref)[resp], atol=2e-5, rtol=1e-5)
        assert np.all(np.asarray(ours)[~resp] == 0)


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_response_only_logits_leave_the_update_unchanged(tiny, tmp_path, algo):
    """A sampled rollout marked `first_action = prompt_len` (the trainer's) gets the same loss, metrics and
    gradient as the same rollout with logits at every position, and the same reference logprobs."""
    from klq_jax.rl import loop
    from klq_jax.rl.train_step import Rollout, compute_targets, default_algo_config, make_loss_fn

    torch_model, _ = tiny
    torch_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, value_head=True)
    model.value_w_d.value = jax.random.normal(jax.random.key(1), model.value_w_d.value.shape)
    graphdef, params = nnx.split(model)

    def apply_fn(p, tokens_bt, positions_bt, mask_bt, logits_from=0, logits_to=None):
        out = nnx.merge(graphdef, p)(tokens_bt, positions_bt, mask_bt, logits_from=logits_from, logits_to=logits_to)
        return out.logits_btv, out.values_bt

    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=10, bucket=8)
    out = sampler(params, PROMPTS * 2, jax.random.key(3))
    assert out.prompt_len == 8
    algo_cfg = default_algo_config()
    algo_cfg.algo = algo
    ref_params = jax.tree.map(lambda x: x * 1.01, params)
    results = []
    for first_action in (1, out.prompt_len):
        batch = Rollout.from_samples(out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt,
                                     out.response_mask_bt, out.logprobs_bt, out.eos_b, first_action=first_action)
        ref_fn = loop.make_ref_logprob_fn(lambda p, *a, **k: apply_fn(p, *a, **k)[0], ref_params, 1.0)
        ref_logp = ref_fn(batch.tokens_bt, batch.positions_bt, batch.attention_mask_bt, batch.first_action)
        old_logp, old_values, entropy = loop.make_policy_forward(apply_fn, 1.0)(params, batch)
        batch = batch.replace(rewards_b=jnp.linspace(-1.0, 1.0, 6), ref_logp_bt=ref_logp, old_logp_bt=old_logp,
                              old_values_bt=old_values, entropy_bt=entropy)
        batch = compute_targets(batch, 0.1, algo_cfg)
        perturbed = jax.tree.map(lambda x: x * 0.98, params)  # away from the rollout policy: ratios != 1
        grads, metrics = jax.grad(make_loss_fn(apply_fn, algo_cfg), has_aux=True)(perturbed, batch, 0.1)
        results.append((ref_logp, old_logp, entropy, grads, metrics))
    (ref1, old1, h1, g1, m1), (ref2, old2, h2, g2, m2) = results
    p = out.prompt_len
    for a, b in ((ref1, ref2), (old1, old2), (h1, h2)):  # equal on the response slots, 0 on the prompt's
        np.testing.assert_allclose(np.asarray(b[:, p:]), np.asarray(a[:, p:]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(b[:, :p]), 0.0)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # float32 sums in another order: relative to
        scale = float(jnp.abs(a).max())                             # the leaf's largest entry
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)
    assert float(m1["loss"].total) != 0.0 and max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 0


def test_eos_stops_and_masks(tiny):
    _, model = tiny
    sampler = Sampler.for_model(model, eos_ids=(EOS, 7), pad_id=PAD, max_new_tokens=30, bucket=8)
    out = sampler(nnx.state(model), PROMPTS * 4, jax.random.key(0))
    p = out.prompt_len
    tokens, resp, eos = (np.asarray(x) for x in (out.tokens_bt[:, p:], out.response_mask_bt[:, p:], out.eos_b))
    for row in range(tokens.shape[0]):
        n_valid = resp[row].sum()
        assert resp[row, :n_valid].all() and not resp[row, n_valid:].any()  # contiguous response
        assert (tokens[row, n_valid:] == PAD).all()
        hit = np.isin(tokens[row, :n_valid], [EOS, 7])
        assert eos[row] == hit.any()
        if hit.any():  # stops right at the first EOS
            assert hit.argmax() == n_valid - 1
        else:
            assert n_valid == 30


def _numpy_filter(logits, temperature, top_k, top_p):
    x = logits.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b])
        keep = order[:top_k] if top_k else order
        full = np.exp(x[b, keep] - x[b, keep].max())
        full /= full.sum()
        cum = np.cumsum(full)
        n = np.searchsorted(cum, top_p) + 1 if top_p < 1.0 else len(keep)
        out[b, keep[:n]] = x[b, keep[:n]]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (10, 0.5), (1, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 2
    ours = np.asarray(filter_logits(jnp.asarray(logits), 0.8, top_k, jnp.float32(top_p)))
    ref = _numpy_filter(logits, 0.8, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_frequencies_match_distribution():
    """Draw frequencies of each row follow softmax(logits / T) restricted by top-k; removed tokens never."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, 0.0], [-1.0, 0.0, 3.0, 0.2, 0.1]])
    filtered = filter_logits(logits, 0.5, 3, jnp.float32(1.0))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws_nb = np.asarray(jax.vmap(lambda k: sample_categorical(k, filtered))(keys))
    expected_bv = np.asarray(jax.nn.softmax(filtered, axis=-1))
    for row in range(2):
        freq = np.bincount(draws_nb[:, row], minlength=5) / len(draws_nb)
        assert np.all(freq[expected_bv[row] == 0] == 0)
        np.testing.assert_allclose(freq, expected_bv[row], atol=0.015)


def _blocky_logits():
    """Two rows over 300 entries (three 128-entry blocks, the last padded), with zero-probability entries at block
    starts and ends, and a whole zero-mass block in the second row."""
    logits = np.random.default_rng(3).normal(size=(2, 300)).astype(np.float32) * 1.5
    logits[0, [0, 127, 128, 129, 255, 256, 297, 298, 299]] = -np.inf
    logits[1, 128:256] = -np.inf
    return jnp.asarray(logits)


def test_two_level_draws_follow_the_distribution():
    """`categorical_with_stats` across several blocks: frequencies follow the softmax, zero-probability entries
    (and a zero-mass block) are never drawn, and the returned log-probabilities and entropies are the softmax's."""
    logits = _blocky_logits()
    keys = jax.random.split(jax.random.key(1), 40000)
    tokens_nb, logp_nb, entropy_nb = jax.vmap(lambda k: categorical_with_stats(k, logits))(keys)
    probs_bv = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    tokens_nb = np.asarray(tokens_nb)
    for row in range(2):
        freq = np.bincount(tokens_nb[:, row], minlength=300) / len(tokens_nb)
        assert np.all(freq[probs_bv[row] == 0] == 0)
        # each entry's count within 5 standard deviations of its binomial mean
        sd = np.sqrt(probs_bv[row] * (1 - probs_bv[row]) / len(tokens_nb))
        assert np.all(np.abs(freq - probs_bv[row]) <= 5 * sd + 1e-6)
        with np.errstate(divide="ignore"):  # log 0 = -inf for the removed entries, never drawn
            logp_v = np.log(probs_bv[row])
        np.testing.assert_allclose(np.asarray(logp_nb)[:, row], logp_v[tokens_nb[:, row]], atol=2e-5)
        entropy = -np.sum(probs_bv[row][probs_bv[row] > 0] * logp_v[probs_bv[row] > 0])
        np.testing.assert_allclose(np.asarray(entropy_nb)[:, row], entropy, rtol=1e-5)


def test_draws_with_the_gradient_of_their_log_probability():
    """`with_logp_grad`: `onehot(token) - softmax` of each row, float64 numpy's to fp32 rounding (the drawn entry `1 - p`
    made in fp32, before the sampler rounds the array to bf16), 0 at removed entries; the draw and its statistics
    unchanged."""
    logits = _blocky_logits().at[0, 5].set(12.0)  # row 0 draws entry 5 with p ~ 1
    key = jax.random.key(7)
    token_b, logp_b, entropy_b, lse_b, grad_bv = categorical_with_stats(key, logits, with_logsumexp=True,
                                                                        with_logp_grad=True)
    for got, want in zip((token_b, logp_b, entropy_b), categorical_with_stats(key, logits)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_bv = np.eye(300)[np.asarray(token_b)] - probs
    np.testing.assert_allclose(np.asarray(grad_bv), want_bv, rtol=1e-5, atol=1e-7)
    assert int(token_b[0]) == 5 and 0 < want_bv[0, 5] < 1e-2
    np.testing.assert_allclose(float(grad_bv[0, 5]), want_bv[0, 5], rtol=1e-4)
    assert not np.asarray(grad_bv)[~np.isfinite(z)].any()
    np.testing.assert_allclose(np.asarray(lse_b), np.log(np.exp(z).sum(-1)), rtol=1e-6)


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24])
def test_two_level_draw_at_the_uniforms_ends(u, monkeypatch):
    """A uniform of 0 draws each row's first entry with mass, one just below 1 its last: never an entry (or block)
    without mass, whatever the rounding of the running sums."""
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape: jnp.full(shape, u, jnp.float32))
    logits = _blocky_logits()
    token_b = np.asarray(categorical_with_stats(jax.random.key(0), logits)[0])
    positive_bv = np.isfinite(np.asarray(logits))
    want = [np.flatnonzero(row)[0 if u == 0.0 else -1] for row in positive_bv]
    np.testing.assert_array_equal(token_b, want)


def test_one_compilation_per_bucket(tiny):
    _, model = tiny
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=6, bucket=16)
    state = nnx.state(model)
    sampler(state, [[3, 4]], jax.random.key(0))  # warm this shape
    before = sampler_lib._generate._cache_size()
    for prompts in ([[3, 4, 5]], [[9] * 15], [[1, 2, 3, 4, 5, 6]]):  # all within the 16-token bucket
        sampler(state, prompts, jax.random.key(1))
    assert sampler_lib._generate._cache_size() == before
    sampler(state, [[3] * 17], jax.random.key(0))  # the next bucket compiles once
    assert sampler_lib._generate._cache_size() == before + 1


def test_prompt_too_long_is_rejected(tiny):
    _, model = tiny
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens; at most 8 accepted"):
        sampler(nnx.state(model), [[2] * 9], jax.random.key(0), prompt_length=8)


def test_compile_ahead_compiles_then_releases_then_runs(tiny, monkeypatch):
    """`compile_ahead`: a new shape is compiled on its own, what compiling freed is handed back, then the program
    runs without compiling again (jit's cache); a shape seen before is neither compiled nor released again. The
    samples equal those of a sampler without it."""
    _, model = tiny
    state = nnx.state(model)
    compiles, events = [], []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    monkeypatch.setattr(sampler_lib, "release_freed_memory", lambda: events.append(f"release after {len(compiles)}"))
    try:
        sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=5, bucket=8,
                                    compile_ahead=True, temperature=0.9)  # max_new_tokens=5: no other test compiles it
        before = len(compiles)
        first = sampler(state, PROMPTS, jax.random.key(4))
        after_first = len(compiles)
        second = sampler(state, PROMPTS, jax.random.key(5))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert after_first - before >= 1 and events == [f"release after {after_first}"], (before, after_first, events)
    assert len(compiles) == after_first  # the second call compiled nothing and released nothing
    plain = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=5, bucket=8, temperature=0.9)
    for out, key in ((first, 4), (second, 5)):
        ref = plain(state, PROMPTS, jax.random.key(key))
        np.testing.assert_array_equal(np.asarray(out.tokens_bt), np.asarray(ref.tokens_bt))


@pytest.mark.parametrize("matmul_dtype,replay_gate_up,replay_attention,replay_probs", [
    (None, "auto", "off", "off"), (jnp.bfloat16, "auto", "off", "off"), (None, "on", "off", "off"),
    (None, "on", "on", "on"), (jnp.bfloat16, "auto", "on", "on")])
@pytest.mark.parametrize("decode", ["xla", "native", "xla-stacked"])
def test_recorded_layer_states_replay_the_update(tiny, tmp_path, decode, matmul_dtype, replay_gate_up,
                                                 replay_attention, replay_probs):
    """The sampler's recorded layer states (`record_layers`) are a forward's at every real slot, and an update that
    replays them (`Rollout.replay`, `CausalLM.__call__(replay=...)`) gets the loss, metrics and gradients of the one
    that runs its own forward, at the sampling parameters, with the XLA decode step (feature-major; row-major stacked
    layers, as on a mesh) and the native one. fp32 matmuls: equal up to summation order. bf16 matmuls: the sampler's
    and a forward's bf16 roundings differ where their fp32 sums do, so the replay is held to the forward's own
    accuracy: no further from fp32 matmuls' loss, metrics and gradients than the forward it replaces. fp32 matmuls
    with the gate|up replayed (`replay_gate_up="on"`, native step): the loss and metrics as fp32's, the gradients
    within the MLP's bf16 rounding of them, and nearer to them than bf16 matmuls' forward; the same with the
    attention's q|k|v and output projection replayed too (`replay_attention="on"`). The loss runs the trainer's
    way (`next_token_logprobs`), so the LM head replays the sampler's log-probabilities and log-normalisers too
    (`Rollout.replay_head`), and with `replay_probs="on"` its backward reads the sampler's `onehot - softmax` in bf16
    (a forward's to within its bf16 rounding) instead of recomputing the logits."""
    from klq_jax.models import cpu_decode
    from klq_jax.rl.train_step import (Rollout, TrainState, compute_targets, default_algo_config,
                                       default_optim_config, make_loss_fn, make_optimizer, make_update)

    torch_model, _ = tiny
    torch_model.save_pretrained(tmp_path)
    value_w = jax.random.normal(jax.random.key(1), (torch_model.config.hidden_size,))

    def loaded(**kw):
        model = load_model(tmp_path, value_head=True, **kw)
        model.value_w_d.value = value_w
        return model

    model = loaded(remat="full", matmul_dtype=matmul_dtype)
    if decode == "native":
        reason = cpu_decode.model_unsupported(model.cfg, model.dtype, model.matmul_dtype, jnp.float32) \
            or cpu_decode.machine_unsupported(model.matmul_dtype)
        if reason is not None or not cpu_decode.available(model.matmul_dtype):
            pytest.skip(f"no native decode here: {reason}")
    graphdef, params = nnx.split(model)

    def apply_fn_of(graphdef):  # the trainer's with the replay: the head's log-probabilities too are replayed
        return lm_apply_fn(graphdef, head_logprobs=True)

    apply_fn = apply_fn_of(graphdef)
    sampler = Sampler.for_model(model, eos_ids=(EOS,), pad_id=PAD, max_new_tokens=10, bucket=8, record_layers=True,
                                decode_kernel="xla" if decode.startswith("xla") else "native",
                                unstack_layers=decode != "xla-stacked", replay_gate_up=replay_gate_up,
                                replay_attention=replay_attention, replay_probs=replay_probs)
    out = sampler(params, PROMPTS * 2, jax.random.key(3))
    L, (b, t), d = model.cfg.num_layers, out.tokens_bt.shape, model.cfg.hidden_size
    assert out.layer_inputs_bltd.shape == (b, L, t, d) and out.layer_output_btd.shape == (b, t, d)
    # bf16 inputs as their bits (uint16) in every decode path, as the update reads them; bf16 with bf16 matmuls, or
    # with the attention's projections recorded too (the native step)
    bf16_inputs = matmul_dtype is not None or sampler.records_attention(model)
    assert out.layer_inputs_bltd.dtype == (jnp.uint16 if bf16_inputs else jnp.float32)
    mask = np.asarray(out.attention_mask_bt)
    assert mask.sum(1).min() < t - 4 and not mask.all()  # left padding and rows that stopped at EOS

    resp = np.asarray(out.response_mask_bt)
    assert out.logsumexp_bt.shape == (b, t) and not np.asarray(out.logsumexp_bt)[~resp].any()
    p, v = out.prompt_len, model.cfg.vocab_size
    if replay_probs == "on":  # [V, N, B] bf16 bits: each step's onehot - softmax, a forward's to within bf16 rounding
        assert out.logp_grad_vtb.shape == (v, t - p, b) and out.logp_grad_vtb.dtype == jnp.uint16
        grad_btv = np.asarray(jax.lax.bitcast_convert_type(out.logp_grad_vtb, jnp.bfloat16).astype(jnp.float32))
        grad_btv = grad_btv.transpose(2, 1, 0)
        fwd = loaded(matmul_dtype=matmul_dtype)(out.tokens_bt, positions_from_mask(out.attention_mask_bt),
                                                out.attention_mask_bt)
        want_btv = np.asarray(jax.nn.one_hot(out.tokens_bt[:, p:], v) - jax.nn.softmax(fwd.logits_btv[:, p - 1:-1]))
        # one bf16 step where the sampler's and the forward's sums differ; bf16 matmuls: their logits' own gap
        rtol, atol = (2 ** -8, 1e-6) if matmul_dtype is None else (2 ** -5, 1e-3)
        np.testing.assert_allclose(grad_btv[resp[:, p:]], want_btv[resp[:, p:]], rtol=rtol, atol=atol)
        np.testing.assert_allclose(grad_btv[resp[:, p:]].sum(-1), 0.0, atol=v * 2 ** -9)  # rows sum to 0
    else:
        assert out.logp_grad_vtb is None
    # The native step with bf16 matmuls (or `replay_gate_up="on"`) records the gate|up projections too (bf16), the
    # prefill's and every step's, and with bf16 matmuls writes the layer inputs as bf16 at their slots: a forward's
    # (over the whole rollout through a cache, which records) to within their bf16 rounding.
    # With `replay_attention="on"` the attention's q|k|v and output projection follow each layer's gate|up.
    if decode == "native" and (matmul_dtype is not None or replay_gate_up == "on"):
        attention = replay_attention == "on"
        f2 = recorded_width(model.cfg, attention)
        assert sampler.records_gate_up(model) and sampler.records_attention(model) == attention
        assert out.gate_up_bltf.shape == (b, L, t, f2) and out.gate_up_bltf.dtype == jnp.uint16  # bf16 bits
        ref_model = loaded(matmul_dtype=matmul_dtype)
        cache = KVCache.zeros(ref_model.cfg, b, t, jnp.float32)
        fwd = ref_model(out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt, cache=cache,
                        cache_pos=0, record_layers=True, record_gate_up=True, record_attention=attention)
        def widened(bits):
            return np.asarray(jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32))

        recorded = [("gate|up (and attention)", out.gate_up_bltf, fwd.gate_up_lbtf)]
        if bf16_inputs:
            recorded.append(("inputs", out.layer_inputs_bltd, fwd.layer_states_lbtd[:L]))
        for name, ours, ref_lbtx in recorded:
            ours, ref = widened(ours), np.asarray(ref_lbtx.astype(jnp.bfloat16).astype(jnp.float32)).swapaxes(0, 1)
            for l in range(L):  # equal on this model (0.0); a rounding of one bf16 step at the scale allowed
                scale = np.abs(ref[:, l][mask]).max()
                np.testing.assert_allclose(ours[:, l][mask], ref[:, l][mask], rtol=0, atol=2 ** -8 * scale,
                                           err_msg=f"{name}, layer {l}")
    else:
        assert out.gate_up_bltf is None and not sampler.records_attention(model)
    if matmul_dtype is None:  # the states are a forward's (no remat: it records) at every real slot
        fwd = loaded()(out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt,
                       record_layers=True)
        # and the log-normalisers, the logits' (temperature 1) at the slot before each response token's
        lse_bt = np.asarray(jax.nn.logsumexp(fwd.logits_btv, axis=-1))
        np.testing.assert_allclose(np.asarray(out.logsumexp_bt)[:, 1:][resp[:, 1:]], lse_bt[:, :-1][resp[:, 1:]],
                                   rtol=1e-5)
        ref_lbtd = np.asarray(fwd.layer_states_lbtd)
        ours = {L: np.asarray(out.layer_output_btd)}
        if not bf16_inputs:  # (as bf16 bits, with the attention's: compared above)
            ours.update(enumerate(np.asarray(out.layer_inputs_bltd).swapaxes(0, 1)))
        for l, ours_btd in ours.items():
            scale = np.abs(ref_lbtd[l][mask]).max()
            np.testing.assert_allclose(ours_btd[mask], ref_lbtd[l][mask], rtol=0, atol=2e-5 * scale,
                                       err_msg=f"layer {l}")

    algo_cfg = default_algo_config()
    algo_cfg.algo = "klq"
    with_states = Rollout.from_samples(
        out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt, out.response_mask_bt,
        out.logprobs_bt, out.eos_b, values_bt=out.values_bt, entropy_bt=out.entropy_bt, first_action=out.prompt_len,
        layer_inputs_bltd=out.layer_inputs_bltd, layer_output_btd=out.layer_output_btd, logsumexp_bt=out.logsumexp_bt,
        gate_up_bltf=out.gate_up_bltf, logp_grad_vtb=out.logp_grad_vtb)
    assert len(with_states.replay_head()) == 2 + (replay_probs == "on")
    assert len(with_states.replay()) == 2 + (out.gate_up_bltf is not None)
    with_states = compute_targets(with_states.replace(rewards_b=jnp.linspace(-1.0, 1.0, b),
                                                      ref_logp_bt=out.logprobs_bt * 1.1), 0.1, algo_cfg)
    without = with_states.without_layer_states()

    def grads(apply_fn, params, batch):
        return jax.jit(jax.grad(make_loss_fn(apply_fn, algo_cfg), has_aux=True))(params, batch, 0.1)

    (g_replay, m_replay), (g_fwd, m_fwd) = grads(apply_fn, params, with_states), grads(apply_fn, params, without)
    assert float(jnp.abs(m_fwd["loss"].total)) > 0
    if with_states.layer_gate_up_bltf is not None:  # the backward reads the recorded gate|up: zeroed, it moves
        g_zeroed, _ = grads(apply_fn, params, with_states.replace(
            layer_gate_up_bltf=jnp.zeros_like(with_states.layer_gate_up_bltf)))
        assert any(float(jnp.abs(a - z).max()) > 0
                   for a, z in zip(jax.tree.leaves(g_replay), jax.tree.leaves(g_zeroed)))
    if with_states.sample_logp_grad_vtb is not None:  # the head's backward reads the recorded onehot - softmax
        g_zeroed, _ = grads(apply_fn, params, with_states.replace(
            sample_logp_grad_vtb=jnp.zeros_like(with_states.sample_logp_grad_vtb)))
        assert any(float(jnp.abs(a - z).max()) > 0
                   for a, z in zip(jax.tree.leaves(g_replay), jax.tree.leaves(g_zeroed)))
    if matmul_dtype is None:  # the loss and metrics (a replayed gate|up does not enter them: the recorded output does)
        for a, r in zip(jax.tree.leaves(m_replay), jax.tree.leaves(m_fwd)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
    if matmul_dtype is None and (with_states.layer_gate_up_bltf is not None
                                 or with_states.sample_logp_grad_vtb is not None):
        # fp32 matmuls, the MLPs' gate|up (and the attention's projections), or the head's onehot - softmax, replayed
        # in bf16: the gradients move by their bf16 rounding, less than bf16 matmuls move them
        model16 = loaded(remat="full", matmul_dtype=jnp.bfloat16)
        g16, _ = grads(apply_fn_of(nnx.graphdef(model16)), nnx.state(model16), without)
        for (path, a), r, h in zip(jax.tree_util.tree_leaves_with_path(g_replay), jax.tree.leaves(g_fwd),
                                   jax.tree.leaves(g16)):
            scale, err_replay, err_bf16 = (float(jnp.abs(r).max()), float(jnp.abs(a - r).max()),
                                           float(jnp.abs(h - r).max()))
            assert err_replay <= 2 ** -8 * scale and err_replay <= err_bf16, jax.tree_util.keystr(path)
    elif matmul_dtype is None:
        for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(g_replay), jax.tree.leaves(g_fwd)):
            scale = float(jnp.abs(r).max())
            assert scale > 0, path
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-4 * scale,
                                       err_msg=jax.tree_util.keystr(path))
    else:
        model32 = loaded(remat="full")
        g32, m32 = grads(apply_fn_of(nnx.graphdef(model32)), nnx.state(model32), without)
        # KL(old || new) at the sampling parameters is 0; the replay's log-probabilities are the sampler's (the old
        # ones), so it reads ~0 where a forward's reads the sampler/forward gap (fp32 matmuls' too)
        assert abs(float(m_replay["approx_kl"].total)) < 1e-3 * float(m32["approx_kl"].total)
        for key in sorted(set(m32) - {"approx_kl"}):
            err_replay = abs(float(m_replay[key].total) - float(m32[key].total))
            err_fwd = abs(float(m_fwd[key].total) - float(m32[key].total))
            assert err_replay <= 2 * err_fwd + 1e-5 * abs(float(m32[key].total)) + 1e-6, key
        for (path, a), f, r in zip(jax.tree_util.tree_leaves_with_path(g_replay), jax.tree.leaves(g_fwd),
                                   jax.tree.leaves(g32)):
            err_replay, err_fwd = float(jnp.abs(a - r).max()), float(jnp.abs(f - r).max())
            assert err_replay <= 2 * err_fwd + 1e-6 * float(jnp.abs(r).max()), jax.tree_util.keystr(path)

    # A one-step update replays them; more steps per rollout are refused.
    optimizer = make_optimizer(default_optim_config())
    update = make_update(apply_fn, algo_cfg, optimizer)
    new_replay, _ = update(TrainState.create(jax.tree.map(jnp.copy, params), optimizer, 0.1), with_states,
                           jax.random.key(0), 1, 1)
    new_fwd, _ = update(TrainState.create(jax.tree.map(jnp.copy, params), optimizer, 0.1), without,
                        jax.random.key(0), 1, 1)
    moved = [float(jnp.abs(r - p).max()) for r, p in zip(jax.tree.leaves(new_fwd.params), jax.tree.leaves(params))]
    assert max(moved) > 0
    for a, r, step in zip(jax.tree.leaves(new_replay.params), jax.tree.leaves(new_fwd.params), moved):
        # Adam's first step moves every weight by about the learning rate whatever its gradient's size: the two
        # agree to within two such steps (a gradient near zero may differ in sign), most of them exactly
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=2 * step + 1e-7)
        assert np.mean(np.abs(np.asarray(a) - np.asarray(r)) > 0.5 * step) < 0.01
    with pytest.raises(ValueError, match="one step only"):
        update(TrainState.create(params, optimizer, 0.1), with_states, jax.random.key(0), 2, 1)
