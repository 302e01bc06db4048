"""Decoder-only LMs in Flax NNX: Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2), GPT-NeoX (Pythia),
GPT-2; one block definition, layers stacked and run with `jax.lax.scan`; optional value and score heads.

Conventions (see docs/architecture.md): `logits_btv[:, t]` predicts token `t+1`; `values_bt[:, t]` is the
value of the state made of tokens `0..t`. Attention takes a key mask over cache slots (`kv_mask_bs`), so
left-padded prompts, KV-cached decoding and plain forwards share one code path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from klq_jax.models import cpu_decode
from klq_jax.models.config import ModelConfig
from klq_jax.sharding import shard

_NEG_INF = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax instead of NaN


@struct.dataclass
class KVCache:
    """Per-layer keys and values, `k_lbksh`, `v_lbksh` [L, B, K, S, hd]: stacked arrays (the layer scan),
    or tuples of L arrays [B, K, S, hd] (the unrolled decode path, see `CausalLM.unstack_layers`).

    Heads before slots: the attention dots batch over (B, K), so this layout is read in place; with slots
    before heads, XLA:CPU transposed each layer's whole cache at every decode step.

    `keys_hs`: the keys are stored [.., hd, S] instead (`keys_feature_major`), for the feature-major decode
    step, whose score dot then reads them in place; XLA:CPU's YNNPACK transposed them at every step otherwise."""

    k_lbksh: jax.Array | tuple[jax.Array, ...]
    v_lbksh: jax.Array | tuple[jax.Array, ...]
    keys_hs: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def unstacked(self) -> "KVCache":
        return KVCache(tuple(self.k_lbksh), tuple(self.v_lbksh), self.keys_hs)

    def keys_feature_major(self) -> "KVCache":
        """The same cache with its keys stored [.., hd, S] (for `CausalLM.__call__(..., layers_oi=True)`)."""
        if self.keys_hs:
            return self
        swap = lambda k: k.swapaxes(-1, -2)  # noqa: E731
        keys = tuple(map(swap, self.k_lbksh)) if isinstance(self.k_lbksh, tuple) else swap(self.k_lbksh)
        return KVCache(keys, self.v_lbksh, keys_hs=True)


@struct.dataclass
class ModelOutput:
    logits_btv: jax.Array | None
    values_bt: jax.Array | None
    scores_b: jax.Array | None
    hidden_btd: jax.Array
    cache: KVCache | None
    # With `record_layers`: each layer's input, then the last layer's output (the final norm's input), fp32.
    layer_states_lbtd: jax.Array | None = None
    # With `record_gate_up`: each layer's gate|up projections [L, B, T, 2F], bf16.
    gate_up_lbtf: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------
# Pure pieces.


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies over `rotary_dim`, with Llama 3 frequency-dependent scaling if set."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.rotary_dim, 2, dtype=jnp.float32) / cfg.rotary_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = dict(cfg.rope_scaling)
    factor, low, high, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs_btf = positions_bt[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    emb_btr = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return jnp.cos(emb_btr), jnp.sin(emb_btr)


def _rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array, axis: int) -> jax.Array:
    """Rotates the first `cos.shape[axis]` entries of `axis` (HF's rotate-half layout; the rest pass through);
    `cos`/`sin` broadcast against that slice of `x`."""
    rot = cos.shape[axis]
    x_rot = jax.lax.slice_in_dim(x, 0, rot, axis=axis).astype(_at_least_f32(x.dtype))
    x_pass = jax.lax.slice_in_dim(x, rot, x.shape[axis], axis=axis)
    x1, x2 = jnp.split(x_rot, 2, axis=axis)
    out = x_rot * cos + jnp.concatenate([-x2, x1], axis=axis) * sin
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=axis)


def apply_rope(x_btnh: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates the first `rotary_dim` dims of each head (HF's rotate-half layout); the rest pass through."""
    return _rotate_half(x_btnh, cos_btr[:, :, None, :], sin_btr[:, :, None, :], axis=3)


def apply_rope_feature_major(x_hdn: jax.Array, cos_rn: jax.Array, sin_rn: jax.Array) -> jax.Array:
    """`apply_rope` on [heads, hd, N] activations with [rotary_dim, N] tables (the feature-major decode)."""
    return _rotate_half(x_hdn, cos_rn[None], sin_rn[None], axis=1)


def _at_least_f32(dtype):
    """Normalisation and RoPE run in float32 for bf16/fp16 activations (and in float64 for float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _along(v_f: jax.Array, axis: int, ndim: int) -> jax.Array:
    """A per-feature vector shaped to broadcast along `axis` of an `ndim`-D array (features last: as is)."""
    axis = axis % ndim
    return v_f.reshape(v_f.shape + (1,) * (ndim - 1 - axis))


def rms_norm(x, scale, eps, axis: int = -1):
    """RMSNorm over `axis`, the features (the last, or the first in the feature-major decode)."""
    ct = _at_least_f32(x.dtype)
    x32 = x.astype(ct)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return (x32 * _along(scale, axis, x.ndim).astype(ct)).astype(x.dtype)


def layer_norm(x, scale, bias, eps, axis: int = -1):
    ct = _at_least_f32(x.dtype)
    x32 = x.astype(ct)
    mean = jnp.mean(x32, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axis, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * _along(scale, axis, x.ndim).astype(ct) \
        + _along(bias, axis, x.ndim).astype(ct)
    return y.astype(x.dtype)


def activation(name: str, x):
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def _accumulate_dtype(matmul_dtype):
    """Matmuls accumulate and return at least float32 (bf16 operands: fp32 accumulation and result)."""
    return jnp.promote_types(matmul_dtype, jnp.float32)


def matmul(a, b, subscripts: str, matmul_dtype=None, out_dtype=None):
    """`einsum(subscripts, a, b)` on operands rounded to `matmul_dtype` (default: `a`'s dtype), accumulated in
    at least fp32 and returned in `out_dtype` (default: `a`'s dtype).

    XLA:CPU runs a bf16 x bf16 dot with an fp32 result at ~2x the fp32 matmul on CPUs with AVX-512 BF16 (258-313
    against 100-157 GFLOP/s for the update's shapes on a 2-core Zen 4 VM), but one with a bf16 result at fp32
    speed or slower (92-145): the result type, not the operands, picks the kernel.
    """
    mdt = matmul_dtype or a.dtype
    out = jnp.einsum(subscripts, a.astype(mdt), b.astype(mdt), preferred_element_type=_accumulate_dtype(mdt))
    return out.astype(out_dtype or a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def operand_matmul(subscripts: str, a, b, matmul_dtype):
    """`einsum(subscripts, a, b)` on `matmul_dtype` operands, accumulated and returned in fp32 (at least), for
    dots of two activations (the attention's); its backward's two dots also take `matmul_dtype` operands.
    Autodiff would run them on the fp32 cotangent, and so on fp32 copies of both operands. Every index of
    either operand must appear in the other one or in the result."""
    return jnp.einsum(subscripts, a.astype(matmul_dtype), b.astype(matmul_dtype),
                      preferred_element_type=_accumulate_dtype(matmul_dtype))


def _operand_matmul_fwd(subscripts, a, b, matmul_dtype):
    return operand_matmul(subscripts, a, b, matmul_dtype), (a, b)


def _operand_matmul_bwd(subscripts, matmul_dtype, residuals, g):
    a, b = residuals
    in_a, rest = subscripts.split(",")
    in_b, out = rest.split("->")
    g = g.astype(matmul_dtype)
    da = operand_matmul(f"{out},{in_b}->{in_a}", g, b, matmul_dtype).astype(a.dtype)
    db = operand_matmul(f"{out},{in_a}->{in_b}", g, a, matmul_dtype).astype(b.dtype)
    return da, db


operand_matmul.defvjp(_operand_matmul_fwd, _operand_matmul_bwd)


def weight_left_matmul(w_oi: jax.Array, x_in: jax.Array, matmul_dtype=None, out_dtype=None) -> jax.Array:
    """`w @ x` for an [out, in] weight and [in, N] activations, the weight as the dot's left operand, operands
    rounded to `matmul_dtype` (None: `x`'s dtype), accumulated in at least fp32, returned in `out_dtype` (None:
    `x`'s dtype).

    For the feature-major decode: XLA:CPU's YNNPACK packs a dot's right operand at every call (with the 8-row
    decode's weights on the right, a copy of every weight per step) but reads the left one in place."""
    mdt = matmul_dtype or x_in.dtype
    out = jax.lax.dot_general(w_oi.astype(mdt), x_in.astype(mdt), (((1,), (0,)), ((), ())),
                              preferred_element_type=_accumulate_dtype(mdt))
    return out.astype(out_dtype or x_in.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(x_bti: jax.Array, w_io: jax.Array, matmul_dtype=None, out_dtype=None,
          native_transpose: bool = False) -> jax.Array:
    """`x @ w` over the last axis of `x`, with the weight gradient computed as `x^T dy`; operands rounded to
    `matmul_dtype` (None: `x`'s dtype), accumulated in fp32 at least, the result in `out_dtype` (None: `x`'s).
    The backward rounds the cotangent to `matmul_dtype` too: autodiff's transpose of a bf16 dot would return bf16.

    Autodiff's transpose of the matmul computes `dw^T = dy^T x` and transposes it back, which makes XLA:CPU
    transpose the [tokens, out] cotangent (fused with the activation's backward for the MLP) at every layer;
    writing the backward out keeps both cotangents in their natural layout (SmolLM2 update on 2 CPU
    cores, 8 x 176 tokens: -0.45 s of 4.6 s). In fp32, the same values as autodiff. `native_transpose`: the weight
    gradient's `x^T` by the CPU kernel's custom call (`_weight_gradient`).
    """
    return matmul(x_bti, w_io, "...i,io->...o", matmul_dtype, out_dtype)


def _dense_fwd(x_bti, w_io, matmul_dtype, out_dtype, native_transpose):
    return dense(x_bti, w_io, matmul_dtype, out_dtype, native_transpose), (x_bti, w_io)


def _row_major_transpose(x_ni: jax.Array) -> jax.Array:
    """`x.T`, written out in row-major order.

    XLA:CPU folds a transpose into the dot that reads it (`x^T dy` becomes a dot contracting `x`'s first axis),
    and its YNNPACK kernels take no such bf16 dot: it then runs on XLA's own dot, on fp32 copies of the operands
    (the update's [576, 1408] x [1408, 1536] weight gradient: 143 GFLOP/s, against 332 with `x^T` written out,
    on a Zen 4 VM). A transpose alone is turned into a layout change; through a flat array behind an
    optimisation barrier it is a copy (0.7 ms here). The feature-major decode's activations go through it too:
    after a plain `.T` XLA ran every bf16 decode dot but one on fp32 copies of its weights.
    """
    n, i = x_ni.shape
    return jax.lax.optimization_barrier(x_ni.T.reshape(-1)).reshape(i, n)


def _weight_gradient(x_ni, dy_no, matmul_dtype, out_dtype, transposed: bool = False, native_transpose: bool = False):
    """`x^T dy` ([i, o]; `[o, i]` when `transposed`): the weight gradient of `x @ w`, operands in `matmul_dtype`.
    `native_transpose` (bf16 operands): `x^T` by the CPU kernel (`cpu_decode.transpose_bits`), where XLA:CPU would
    fuse `x`'s producer into its transposed copy and read that producer's inputs at the copy's stride (the MLP's
    `silu(gate) * up` from the recorded gate|up: 4.3-4.6 ms per layer and row group against ~0.5 ms)."""
    mdt = jnp.dtype(matmul_dtype or x_ni.dtype)
    if mdt.itemsize != 2:
        dw_io = matmul(x_ni, dy_no, "ni,no->io", mdt, out_dtype)
        return dw_io.T if transposed else dw_io
    # bf16/fp16 operands: `x^T` written out, so that the dot runs on YNNPACK's kernels; and the result's transpose
    # kept out of the dot, which XLA would otherwise fold into it as a dot that YNNPACK refuses too.
    if native_transpose and mdt == jnp.bfloat16:
        x_in = jax.lax.bitcast_convert_type(cpu_decode.transpose_bits(_bf16_bits(x_ni.astype(mdt))), mdt)
    else:
        x_in = _row_major_transpose(x_ni.astype(mdt))
    dw_io = matmul(x_in, dy_no, "in,no->io", mdt, out_dtype)
    return jax.lax.optimization_barrier(dw_io).T if transposed else dw_io


def _dense_bwd(matmul_dtype, out_dtype, native_transpose, residuals, dy_bto):
    x_bti, w_io = residuals
    dx_bti = matmul(dy_bto, w_io, "...o,io->...i", matmul_dtype, out_dtype=x_bti.dtype)
    dw_io = _weight_gradient(x_bti.reshape(-1, x_bti.shape[-1]), dy_bto.reshape(-1, dy_bto.shape[-1]),
                             matmul_dtype, w_io.dtype, native_transpose=native_transpose)
    return dx_bti, dw_io


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def replayed_dense(x_bti: jax.Array, w_io: jax.Array, y_bto: jax.Array, matmul_dtype=None) -> jax.Array:
    """`dense(x, w, matmul_dtype)` whose forward already ran at this `x` and `w`: returns the recorded `y` (in `x`'s
    dtype) without the matmul; the backward is `dense`'s (`dx = dy w^T`, `dw = x^T dy`). The caller vouches that
    `y` is that product (the sampler's, up to summation order and its recording dtype)."""
    del w_io, matmul_dtype
    return y_bto.astype(x_bti.dtype)


def _replayed_dense_fwd(x_bti, w_io, y_bto, matmul_dtype):
    return y_bto.astype(x_bti.dtype), (x_bti, w_io)


def _replayed_dense_bwd(matmul_dtype, residuals, dy_bto):
    return *_dense_bwd(matmul_dtype, None, False, residuals, dy_bto), None


replayed_dense.defvjp(_replayed_dense_fwd, _replayed_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tied_head(h_btd: jax.Array, embed_vd: jax.Array, matmul_dtype=None) -> jax.Array:
    """Float32 logits `h @ embed^T` of a tied LM head (operands in `matmul_dtype`, None: `h`'s dtype), with the
    backward written out.

    Autodiff transposes the [tokens, V] logits cotangent (the largest tensor of an update) to form the
    embedding gradient, and keeps it alive until then; here `d embed = (h^T dlogits)^T` transposes only the
    [d, V] product. Same values as autodiff.
    """
    return matmul(h_btd, embed_vd.T, "btd,dv->btv", matmul_dtype, out_dtype=jnp.float32)


def _tied_head_fwd(h_btd, embed_vd, matmul_dtype):
    return tied_head(h_btd, embed_vd, matmul_dtype), (h_btd, embed_vd)


def _tied_head_bwd(matmul_dtype, residuals, dlogits_btv):
    h_btd, embed_vd = residuals
    mdt = matmul_dtype or h_btd.dtype
    dlogits = dlogits_btv.astype(mdt)
    dh_btd = matmul(dlogits, embed_vd, "btv,vd->btd", mdt, out_dtype=h_btd.dtype)
    h_nd = h_btd.reshape(-1, h_btd.shape[-1])
    dembed_vd = _weight_gradient(h_nd, dlogits.reshape(-1, dlogits.shape[-1]), mdt, jnp.float32, transposed=True)
    return dh_btd, dembed_vd.astype(embed_vd.dtype)


tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)


# Positions (all rows together) per chunk of `chunked_token_logprobs`, by the matmul operands' bytes: the fastest on
# an AVX-512/AMX Xeon for SmolLM2's 49152-token vocabulary (bf16 32: 88 ms, 64: 103; fp32 32: 414, 64: 255, 128: 263).
LOGPROB_CHUNK_ROWS = {2: 32, 4: 64}


# Vocabulary rows per block of `chunked_token_logprobs`'s backward (SmolLM2's 49152 tokens: 12 blocks).
LOGPROB_VOCAB_BLOCK = 4096


def _position_chunks(x_bt_: jax.Array, per_chunk: int) -> jax.Array:
    """[B, T, ...] -> [n, B * per_chunk, ...]: chunk i holds positions i*per_chunk.. of every row (T padded)."""
    b, t = x_bt_.shape[:2]
    n = -(-t // per_chunk)
    x = jnp.pad(x_bt_, [(0, 0), (0, n * per_chunk - t)] + [(0, 0)] * (x_bt_.ndim - 2))
    return x.reshape(b, n, per_chunk, *x_bt_.shape[2:]).swapaxes(0, 1).reshape(n, b * per_chunk, *x_bt_.shape[2:])


def _from_position_chunks(x_n_: jax.Array, b: int, t: int) -> jax.Array:
    """The inverse of `_position_chunks`: [n, B * per_chunk, ...] -> [B, T, ...]."""
    n, r = x_n_.shape[:2]
    per_chunk = r // b
    return x_n_.reshape(n, b, per_chunk, *x_n_.shape[2:]).swapaxes(0, 1).reshape(b, n * per_chunk, *x_n_.shape[2:])[:, :t]


def chunked_token_logprobs(h_btd: jax.Array, head_vd: jax.Array, targets_bt: jax.Array, temperature, *,
                           matmul_dtype=None, rows: int | None = None) -> jax.Array:
    """Float32 `log softmax(h @ head^T / temperature)[targets]` per position ([B, T]) for a [V, D] head (a tied
    embedding, or `CausalLM.lm_head_vd()`), computed `rows // B` positions of every row at a time (default
    `LOGPROB_CHUNK_ROWS` for the operands' dtype), the head as the left operand of each chunk's matmul.

    The [B, T, V] float32 logits are never made: each chunk's [V, rows] logits stay in the CPU's cache between
    the head's matmul and the log-softmax's two passes, and XLA:CPU's YNNPACK reads a left operand in place where
    it packs a right one at every call. For the reference's 8 x 128 log-probabilities of SmolLM2-135M (bf16
    operands): 82-95 against 266-302 ms, 62 against 247 MiB of temporaries; fp32 255 against 423 ms
    (`docs/performance.md`, item 36). The log-softmax's values, up to the matmul's accumulation order.

    Differentiable in `h_btd` and `head_vd` (`temperature` gets no gradient): the backward recomputes the logits
    `LOGPROB_VOCAB_BLOCK` vocabulary rows at a time over all positions, and each block gives its rows of the
    head's gradient whole and adds its part of the hidden states' (a [D, N] sum); its dots run on
    `matmul_dtype` operands, as `tied_head`'s do. The policy's update of the same model: 8 x 128 positions, bf16,
    the head's forward and backward 443-456 against 574-588 ms through `tied_head` and `losses.token_logprobs`,
    which make the logits, their softmax and its cotangent (item 42).
    """
    return _chunked_token_logprobs(h_btd, head_vd, targets_bt, jnp.asarray(temperature, jnp.float32), matmul_dtype,
                                   rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_token_logprobs(h_btd, head_vd, targets_bt, temperature, matmul_dtype, rows):
    return _chunked_token_logprobs_fwd(h_btd, head_vd, targets_bt, temperature, matmul_dtype, rows)[0]


def _chunked_token_logprobs_fwd(h_btd, head_vd, targets_bt, temperature, matmul_dtype, rows):
    b, t, d = h_btd.shape
    mdt = jnp.dtype(matmul_dtype or h_btd.dtype)
    head = head_vd.astype(mdt)  # rounded once, not per chunk
    per_chunk = max(1, (rows or LOGPROB_CHUNK_ROWS.get(mdt.itemsize, 64)) // b)

    def chunk(args):
        h_rd, targets_r = args
        logits_vr = weight_left_matmul(head, _row_major_transpose(h_rd), mdt, jnp.float32) / temperature
        picked_r = jnp.take_along_axis(logits_vr, targets_r[None], axis=0)[0]
        lse_r = jax.nn.logsumexp(logits_vr, axis=0)
        return picked_r - lse_r, lse_r

    logp_nr, lse_nr = jax.lax.map(chunk, (_position_chunks(h_btd, per_chunk), _position_chunks(targets_bt, per_chunk)))
    lse_bt = _from_position_chunks(lse_nr, b, t)
    return _from_position_chunks(logp_nr, b, t), _head_residuals(h_btd, head, head_vd.dtype, targets_bt, temperature,
                                                                  lse_bt)


def _head_residuals(h_btd, head_rounded, head_dtype, targets_bt, temperature, lse_bt):
    """What `_chunked_token_logprobs_bwd` takes: the rounded head, not the head (rounded once, a [V, D] conversion
    on one thread, 20-30 ms for SmolLM2, held only from the head's forward to its backward, which follow each
    other), and an empty array that carries the head's dtype for its gradient."""
    return h_btd, head_rounded, targets_bt, temperature, lse_bt, jnp.zeros((0,), head_dtype)


def _chunked_token_logprobs_bwd(matmul_dtype, rows, residuals, g_bt):
    h_btd, head_vd, targets_bt, temperature, lse_bt, empty_like_head = residuals  # head_vd: the matmuls' dtype
    b, t, d = h_btd.shape
    v = head_vd.shape[0]
    mdt = jnp.dtype(matmul_dtype or h_btd.dtype)
    h_nd = h_btd.reshape(-1, d).astype(mdt)
    h_dn = _row_major_transpose(h_nd)
    lse_n, targets_n = lse_bt.reshape(-1), targets_bt.reshape(-1)
    g_n = g_bt.reshape(-1).astype(jnp.float32) / temperature
    block = min(LOGPROB_VOCAB_BLOCK, v)
    head_pad = jnp.pad(head_vd, ((0, -v % block), (0, 0)))
    # The head goes in as bf16 bit patterns: XLA:CPU widens bf16 loop inputs to fp32 before the loop (SmolLM2's
    # head: an fp32 copy of 113 MB, written on one thread, rounded again block by block).
    head_bits_vd = _bf16_bits(head_pad)

    def dlogits_block(k):
        w_vd = _from_bf16_bits(jax.lax.dynamic_slice_in_dim(head_bits_vd, k * block, block, 0))
        logits_vn = weight_left_matmul(w_vd, h_dn, mdt, jnp.float32) / temperature
        probs_vn = jnp.exp(logits_vn - lse_n[None])
        onehot = jax.lax.broadcasted_iota(jnp.int32, probs_vn.shape, 0) + k * block == targets_n[None]
        return ((onehot.astype(jnp.float32) - probs_vn) * g_n[None]).astype(mdt)

    dh_nd, dhead_vd = _head_block_backward(dlogits_block, head_pad, h_nd, block, mdt)
    return dh_nd.reshape(b, t, d).astype(h_btd.dtype), dhead_vd[:v].astype(empty_like_head.dtype), None, None


def _head_block_backward(dlogits_block: Callable, head_pad_vd: jax.Array, h_nd: jax.Array, block: int, mdt):
    """`(dh_nd fp32, dhead_vd fp32)` of a [V, D] head (V a multiple of `block`, operands in `mdt`) from the logits'
    cotangent `dlogits_block(k)` ([block, N] in `mdt`) of vocabulary block `k`, over two loops of blocks: each block
    gives its rows of the head's gradient whole and adds its part of the hidden states' (a [D, N] sum)."""
    n, d = h_nd.shape
    blocks = head_pad_vd.shape[0] // block
    # [D, V] for the hidden states' gradient (the head as the left operand of its dot): a row-major copy
    # (`_row_major_transpose`'s barrier). Each step slices its block out of the whole array: halves of it as the
    # loops' inputs were copies (of 113 MB for SmolLM2 in fp32, the transposed one a strided gather of one element
    # per cache line), where a block's slice is a 9.4 MB copy into a buffer every step reuses. As bf16 bits, as the
    # callers' head (XLA:CPU widens bf16 loop inputs to fp32 before the loop).
    head_bits_dv = _bf16_bits(_row_major_transpose(head_pad_vd))

    def vocab_block(dh_dn, k):
        w_dv = _from_bf16_bits(jax.lax.dynamic_slice_in_dim(head_bits_dv, k * block, block, 1))
        dlogits_vn = dlogits_block(k)
        dhead_vd = matmul(dlogits_vn, h_nd, "vn,nd->vd", mdt, jnp.float32)
        return dh_dn + weight_left_matmul(w_dv, dlogits_vn, mdt, jnp.float32), dhead_vd

    # Two scans over halves of the blocks, independent until their sums of dh meet: XLA:CPU runs each thunk of a
    # loop body on one thread, and one scan's chain (logits, softmax, cotangent) left the other core idle.
    halves = [(0, blocks // 2), (blocks // 2, blocks)] if blocks > 1 else [(0, blocks)]
    parts = [jax.lax.scan(vocab_block, jnp.zeros((d, n), jnp.float32), jnp.arange(lo, hi)) for lo, hi in halves]
    # The barrier keeps XLA from folding the transpose below into the dot of a single block's scan (a vocabulary of
    # at most LOGPROB_VOCAB_BLOCK, whose one-step loop it inlines) as a column-major result: a bf16 dot YNNPACK
    # refuses and XLA's own dot does not run ("BF16 x BF16 = F32" unsupported).
    dh_dn = jax.lax.optimization_barrier(sum(dh for dh, _ in parts))
    return dh_dn.T, jnp.concatenate([dhead for _, dhead in parts]).reshape(blocks * block, d)


_chunked_token_logprobs.defvjp(_chunked_token_logprobs_fwd, _chunked_token_logprobs_bwd)


def replayed_token_logprobs(h_btd: jax.Array, head_vd: jax.Array, targets_bt: jax.Array, temperature,
                            logp_bt: jax.Array, logsumexp_bt: jax.Array, logp_grad_vtb: jax.Array | None = None, *,
                            matmul_dtype=None) -> jax.Array:
    """`chunked_token_logprobs` of a head whose forward already ran, at these parameters, on these hidden states:
    the sampler's, which computed the logits of every token it drew. Returns the recorded log-probabilities
    `logp_bt`; the backward is `chunked_token_logprobs`'s, recomputing the logits block by block and normalising
    them with the recorded log-normalisers `logsumexp_bt` (`logsumexp(logits / temperature)` at each position). So
    the update skips the head's matmul and its log-softmax pass (SmolLM2, 8 x 128 positions, bf16: 0.25 of the
    head's 0.83 s; docs/performance.md, item 56). A position whose log-normaliser is +inf gets no gradient through
    the softmax (the sampler recorded none there: a position the loss does not read). The recorded values differ
    from a forward's by summation order only; they must be this head's at `head_vd` on `h_btd`, which the caller
    vouches for.

    `logp_grad_vtb` [V, T, B] (bf16 bit patterns, uint16; `SampleOutput.logp_grad_vtb`): the gradient of each
    position's log-probability with respect to its logits after temperature, `onehot(target) - softmax`, recorded
    by the sampler: the backward then reads it instead of recomputing the logits, which leaves two of the head's
    three matmuls (item 71). It must be that of `targets_bt` under the distribution of `logsumexp_bt`; rounded to
    bf16, as the dots' operands are with bf16 matmuls."""
    if logp_grad_vtb is not None and logp_grad_vtb.shape != (head_vd.shape[0], *h_btd.shape[1::-1]):
        raise ValueError(f"logp_grad_vtb has shape {logp_grad_vtb.shape}; expected [V, T, B] = "
                         f"{(head_vd.shape[0], *h_btd.shape[1::-1])}")
    return _replayed_token_logprobs(h_btd, head_vd, targets_bt, jnp.asarray(temperature, jnp.float32),
                                    logp_bt.astype(jnp.float32), logsumexp_bt.astype(jnp.float32),
                                    None if logp_grad_vtb is None else _bf16_bits(logp_grad_vtb), matmul_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _replayed_token_logprobs(h_btd, head_vd, targets_bt, temperature, logp_bt, logsumexp_bt, logp_grad_bits_vtb,
                             matmul_dtype):
    del h_btd, head_vd, targets_bt, temperature, logsumexp_bt, logp_grad_bits_vtb, matmul_dtype
    return logp_bt


def _replayed_token_logprobs_fwd(h_btd, head_vd, targets_bt, temperature, logp_bt, logsumexp_bt, logp_grad_bits_vtb,
                                 matmul_dtype):
    head = head_vd.astype(jnp.dtype(matmul_dtype or h_btd.dtype))  # rounded once, as the forward's
    return logp_bt, (_head_residuals(h_btd, head, head_vd.dtype, targets_bt, temperature, logsumexp_bt),
                     logp_grad_bits_vtb)


def _replayed_token_logprobs_bwd(matmul_dtype, residuals, g_bt):
    residuals, logp_grad_bits_vtb = residuals
    if logp_grad_bits_vtb is None:
        dh, dhead, _, _ = _chunked_token_logprobs_bwd(matmul_dtype, None, residuals, g_bt)
    else:
        dh, dhead = _recorded_logp_grad_bwd(matmul_dtype, residuals, logp_grad_bits_vtb, g_bt)
    return dh, dhead, None, None, None, None, None


def _recorded_logp_grad_bwd(matmul_dtype, residuals, logp_grad_bits_vtb, g_bt):
    """The head's backward from the recorded `onehot - softmax` [V, T, B] (`replayed_token_logprobs`): the logits'
    cotangent of a vocabulary block is its rows times `g / temperature`, and no logits are made."""
    h_btd, head_vd, _, temperature, lse_bt, empty_like_head = residuals  # head_vd: the matmuls' dtype
    b, t, d = h_btd.shape
    v = head_vd.shape[0]
    mdt = jnp.dtype(matmul_dtype or h_btd.dtype)
    # Positions in the recorded array's (t, b) order: each decode step wrote its rows of every vocabulary block.
    h_nd = h_btd.swapaxes(0, 1).reshape(-1, d).astype(mdt)
    g_n = (jnp.where(jnp.isfinite(lse_bt), g_bt.astype(jnp.float32), 0.0) / temperature).T.reshape(-1)
    block = min(LOGPROB_VOCAB_BLOCK, v)
    grad_bits_vn = logp_grad_bits_vtb.reshape(v, t * b)
    if v % block:  # a copy; SmolLM2's 49152 tokens are 12 whole blocks
        grad_bits_vn = jnp.pad(grad_bits_vn, ((0, -v % block), (0, 0)))

    def dlogits_block(k):
        grad_vn = _widen_bf16_bits(jax.lax.dynamic_slice_in_dim(grad_bits_vn, k * block, block, 0))
        return (grad_vn * g_n[None]).astype(mdt)

    head_pad = jnp.pad(head_vd, ((0, -v % block), (0, 0)))
    dh_nd, dhead_vd = _head_block_backward(dlogits_block, head_pad, h_nd, block, mdt)
    dh_btd = dh_nd.reshape(t, b, d).swapaxes(0, 1)
    return dh_btd.astype(h_btd.dtype), dhead_vd[:v].astype(empty_like_head.dtype)


_replayed_token_logprobs.defvjp(_replayed_token_logprobs_fwd, _replayed_token_logprobs_bwd)


FROZEN_MATMUL_KERNELS = ("auto", "native", "xla")


REPLAY_GATE_UP = ("auto", "on", "off")


def recorded_width(cfg: ModelConfig, attention: bool) -> int:
    """The width of a layer's recorded projections (`Block.__call__(record_gate_up=True)`): gate|up (2F), then with
    `attention` q|k|v and the output projection ((H + 2K) hd + D)."""
    return 2 * cfg.intermediate_size + attention * ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                                    + cfg.hidden_size)


# config `rl.replay_attention`: with the gate|up, the attention's q|k|v and output projection ("on") or not
REPLAY_ATTENTION = ("off", "on")


def check_replay_attention(choice: str) -> str:
    """`choice` if it is one of `REPLAY_ATTENTION` (config `rl.replay_attention`; `Sampler.replay_attention`)."""
    if choice not in REPLAY_ATTENTION:
        raise ValueError(f"replay_attention={choice!r}; accepted: {', '.join(map(repr, REPLAY_ATTENTION))}")
    return choice


# config `rl.replay_probs`: with the recorded layer states, each drawn token's `onehot - softmax` ("on") or not
REPLAY_PROBS = ("off", "on")


def check_replay_probs(choice: str) -> str:
    """`choice` if it is one of `REPLAY_PROBS` (config `rl.replay_probs`; `Sampler.replay_probs`)."""
    if choice not in REPLAY_PROBS:
        raise ValueError(f"replay_probs={choice!r}; accepted: {', '.join(map(repr, REPLAY_PROBS))}")
    return choice


def check_replay_gate_up(choice: str) -> str:
    """`choice` if it is one of `REPLAY_GATE_UP` (config `rl.replay_gate_up`; `CausalLM.replays_gate_up`)."""
    if choice not in REPLAY_GATE_UP:
        raise ValueError(f"replay_gate_up={choice!r}; accepted: {', '.join(map(repr, REPLAY_GATE_UP))}")
    return choice


def check_frozen_matmul_kernel(kernel: str) -> str:
    """`kernel` if it is one of `FROZEN_MATMUL_KERNELS`, else a ValueError naming it and what is accepted."""
    if kernel not in FROZEN_MATMUL_KERNELS:
        raise ValueError(f"frozen_matmul_kernel={kernel!r}; accepted: {', '.join(map(repr, FROZEN_MATMUL_KERNELS))}")
    return kernel


def pack_frozen(model: "CausalLM", kernel: str, devices: int = 1) -> bool:
    """Packs a frozen model's layer matmuls for the native kernel as `kernel` asks (config
    `model.frozen_matmul_kernel`): "native" packs them or raises the ValueError saying why it cannot, "auto" packs
    them where it can, "xla" never; returns whether they are packed. `devices`: how many devices the model's
    weights are placed on (the packed matmul runs on one)."""
    if check_frozen_matmul_kernel(kernel) == "xla":
        return False
    try:
        if devices > 1:
            raise ValueError(f"frozen_matmul_kernel={kernel!r}: the packed matmul runs on one device, not {devices}")
        model.pack_frozen_matmul_weights()
    except ValueError:
        if kernel == "native":
            raise
        return False
    return True


class PackedWeight(nnx.Variable):
    """A frozen model's matmul weight as `cpu_decode.packed_matmul`'s bf16 tiles ([.., ceil(O/32), I/2, 32, 2]),
    held as their int16 bit patterns: XLA:CPU passes int16 layer-scan inputs through as they are (bf16 ones it
    widens to fp32 before the loop, the whole stack at once), and `_widen_bf16_bits` leaves them alone. Set by
    `CausalLM.pack_frozen_matmul_weights`; read by `Block._project`."""


def _bf16_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_bf16_bits(x: jax.Array) -> jax.Array:
    """The bf16 array `_bf16_bits` was made from (anything else as it is)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _widen_bf16_bits(x: jax.Array) -> jax.Array:
    """fp32 from `_bf16_bits` (exact: a bf16 is the high half of the fp32 with the same value)."""
    if x.dtype != jnp.uint16:
        return x
    return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)


ATTENTION_QUERY_BLOCK = 64  # query rows per block of the causal attention without a cache (at most 8 blocks)


def causal_query_blocks(t: int, block: int | None = None) -> list[int]:
    """Bounds `[0, .., t]` of the query blocks of a causal attention over `t` positions: `t // block` blocks
    (1 to 8; `block` default `ATTENTION_QUERY_BLOCK`), each of which attends to the keys before its end only.

    The scores of a query block and the keys after it are all masked; skipping them saves ~(n-1)/2n of the
    attention's work, and more of its time: its [T, T] scores and softmax are the largest arrays of a layer's
    attention (SmolLM2-135M, 8 x 176 tokens, bf16 operands, 2 CPU cores: one layer's attention forward and
    backward 8.0 -> 5.1-6.0 ms; at 2 x 512 tokens 41.5 -> 7.8 ms; docs/performance.md, item 41)."""
    n = max(1, min(8, t // (block or ATTENTION_QUERY_BLOCK)))
    return [round(t * i / n) for i in range(n + 1)]


def attention_mask(q_slots_bt: jax.Array, kv_mask_bs: jax.Array) -> jax.Array:
    """[B, T, S] bool: a query at cache slot i sees key slots s <= i that hold real tokens."""
    key_slots_s = jnp.arange(kv_mask_bs.shape[1])
    causal_bts = key_slots_s[None, None, :] <= q_slots_bt[:, :, None]
    return causal_bts & kv_mask_bs[:, None, :]


def _param(rngs: nnx.Rngs, shape, fan_in, dtype, std=None):
    std = std if std is not None else 1.0 / math.sqrt(fan_in)
    return nnx.Param(std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype))


def _zeros(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


def _ones(shape, dtype):
    return nnx.Param(jnp.ones(shape, dtype))


# ----------------------------------------------------------------------------------------------------
# Modules.


class Block(nnx.Module):
    """One transformer layer of any supported family (pre-norm; sequential or parallel residual)."""

    def __init__(self, cfg: ModelConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        p = param_dtype
        self.cfg = cfg
        self.ln1_scale = _ones((d,), p)
        self.ln2_scale = _ones((d,), p)
        layer_norm_family = cfg.family != "llama"
        self.ln1_bias = _zeros((d,), p) if layer_norm_family else None
        self.ln2_bias = _zeros((d,), p) if layer_norm_family else None
        self.wq_dnh = _param(rngs, (d, h, hd), d, p)
        self.wk_dkh = _param(rngs, (d, k, hd), d, p)
        self.wv_dkh = _param(rngs, (d, k, hd), d, p)
        self.wo_nhd = _param(rngs, (h, hd, d), h * hd, p)
        self.bq_nh = _zeros((h, hd), p) if cfg.attention_bias else None
        self.bk_kh = _zeros((k, hd), p) if cfg.attention_bias else None
        self.bv_kh = _zeros((k, hd), p) if cfg.attention_bias else None
        self.bo_d = _zeros((d,), p) if cfg.output_bias else None
        self.w_gate_df = _param(rngs, (d, f), d, p) if cfg.family == "llama" else None
        self.w_up_df = _param(rngs, (d, f), d, p)
        self.w_down_fd = _param(rngs, (f, d), f, p)
        self.b_up_f = _zeros((f,), p) if cfg.mlp_bias else None
        self.b_down_d = _zeros((d,), p) if cfg.mlp_bias else None

    def _project(self, x_bti, name: str, out_features: int, matmul_dtype=None, native_transpose: bool = False):
        """`x @ w` for the layer's weight `name` (viewed as [x's features, `out_features`]: `wo_nhd`'s [H, hd, D]
        as [H*hd, D]), or where it is a `PackedWeight` its tiles' native matmul (bf16 operands, fp32 accumulation:
        the same values up to summation order); returned in `x`'s dtype."""
        w = getattr(self, name)
        if isinstance(w, PackedWeight):
            w_packed = jax.lax.bitcast_convert_type(w[...], jnp.bfloat16)
            return cpu_decode.packed_matmul(x_bti, w_packed, out_features).astype(x_bti.dtype)
        return dense(x_bti, w[...].reshape(x_bti.shape[-1], -1).astype(x_bti.dtype), matmul_dtype, None,
                     native_transpose)

    @property
    def packed(self) -> bool:
        """Whether the layer's matmul weights are `PackedWeight`s (`CausalLM.pack_frozen_matmul_weights`)."""
        return isinstance(self.wq_dnh, PackedWeight)

    def _norm(self, x, scale, bias):
        if bias is None:
            return rms_norm(x, scale[...], self.cfg.norm_eps)
        return layer_norm(x, scale[...], bias[...], self.cfg.norm_eps)

    def _attend(self, q_bkgth, k_bksh, v_bksh, mask_bts, cache_kv, cache_pos, matmul_dtype=None, keys_hs=False):
        """Softmax attention of heads-major queries [B, K, G, T, hd] over keys and values [B, K, T, hd], first
        written into `cache_kv` at `cache_pos` when there is one; returns [B, T, H*hd] and the cache. The two
        dots' operands in `matmul_dtype` (None: the queries' dtype), accumulated in fp32. `keys_hs`: the keys
        (and the cache's, `KVCache.keys_hs`) are [B, K, hd, T]."""
        b, k_heads, g, t, hd = q_bkgth.shape
        dt = q_bkgth.dtype
        mdt = jnp.dtype(matmul_dtype or dt)
        key_slots = 3 if keys_hs else 2
        if cache_kv is not None:  # write this chunk's keys/values at `cache_pos`, attend over all slots
            k_cache, v_cache = cache_kv
            k_bksh = jax.lax.dynamic_update_slice_in_dim(k_cache, k_bksh.astype(k_cache.dtype), cache_pos,
                                                         axis=key_slots)
            v_bksh = jax.lax.dynamic_update_slice_in_dim(v_cache, v_bksh.astype(v_cache.dtype), cache_pos, axis=2)
            cache_kv = (k_bksh, v_bksh)
        score_dot = "bkgth,bkhs->bkgts" if keys_hs else "bkgth,bksh->bkgts"
        half_precision = mdt.itemsize == 2

        def attend(q_bkgth, k_bksh, v_bksh, mask_bts):
            if half_precision:  # bf16 operands, and in the backward too
                scores = operand_matmul(score_dot, q_bkgth, k_bksh, mdt)
            else:
                scores = jnp.einsum(score_dot, q_bkgth, k_bksh.astype(dt), preferred_element_type=jnp.float32)
            scores = scores / math.sqrt(hd)
            scores = jnp.where(mask_bts[:, None, None], scores, _NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1)
            if half_precision:
                return operand_matmul("bkgts,bksh->bkgth", probs, v_bksh, mdt).astype(dt)
            return jnp.einsum("bkgts,bksh->bkgth", probs.astype(dt), v_bksh.astype(dt))

        if cache_kv is not None:
            out_bkgth = attend(q_bkgth, k_bksh, v_bksh, mask_bts)
        else:
            # Without a cache the mask is causal over positions 0..T-1 (`attention_mask`): the queries of the
            # block [lo, hi) see no key at or after hi, so each block skips those keys' scores (exp(-inf)
            # weights: the same attention for every query that sees a key). A fully masked query (left padding)
            # then averages the values of the keys before hi instead of all T; its output feeds nothing.
            bounds = causal_query_blocks(t)
            out_bkgth = jnp.concatenate(
                [attend(q_bkgth[:, :, :, lo:hi], k_bksh[:, :, :hi], v_bksh[:, :, :hi], mask_bts[:, lo:hi, :hi])
                 for lo, hi in zip(bounds[:-1], bounds[1:])], axis=3)
        return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, k_heads * g * hd), cache_kv

    def _attention(self, x_btd, rope, mask_bts, cache_kv, cache_pos, fuse_projections=False, matmul_dtype=None,
                   attention_btp=None):
        """The attention's output, the cache, and its matmuls' outputs before the biases: q|k|v [B, T, (H + 2K) hd]
        and the output projection's [B, T, D]. `attention_btp` [.., (H + 2K) hd + D]: those of a forward that already
        ran on this `x` at these weights (the sampler's), returned by `replayed_dense` in place of the four matmuls,
        whose backward is theirs."""
        cfg, dt = self.cfg, x_btd.dtype
        h, k_heads, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        b, t, d = x_btd.shape
        q_width, kv_width = h * hd, k_heads * hd
        if attention_btp is not None:
            if self.packed:
                raise ValueError("attention_btp: replayed projections need unpacked weights")
            q_rec, k_rec, v_rec, o_rec = jnp.split(attention_btp, [q_width, q_width + kv_width,
                                                                   q_width + 2 * kv_width], axis=-1)
            q, k, v = (replayed_dense(x_btd, w[...].reshape(d, -1).astype(dt), y, matmul_dtype)
                       for w, y in ((self.wq_dnh, q_rec), (self.wk_dkh, k_rec), (self.wv_dkh, v_rec)))
        elif fuse_projections and not self.packed:
            wq, wk, wv = (w[...].reshape(d, -1) for w in (self.wq_dnh, self.wk_dkh, self.wv_dkh))
            qkv = dense(x_btd, jnp.concatenate([wq, wk, wv], axis=1).astype(dt), matmul_dtype)
            q, k, v = jnp.split(qkv, [h * hd, (h + k_heads) * hd], axis=-1)
        else:
            q, k, v = (self._project(x_btd, name, out, matmul_dtype)
                       for name, out in (("wq_dnh", q_width), ("wk_dkh", kv_width), ("wv_dkh", kv_width)))
        qkv_btf = (q, k, v)  # the matmuls' outputs, before the biases and the rotation
        q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, k_heads, hd), v.reshape(b, t, k_heads, hd)
        if self.bq_nh is not None:
            q, k, v = q + self.bq_nh[...].astype(dt), k + self.bk_kh[...].astype(dt), v + self.bv_kh[...].astype(dt)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Heads-major layouts [B, K, ., hd]: the (B, K)-batched dots then read q, k, v and the cache in place.
        q_bkgth = q.reshape(b, t, k_heads, g, hd).transpose(0, 2, 3, 1, 4)
        k_bksh, v_bksh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        # bf16 matmuls: the attention's dots too, except where they read a cache (a decode step would round its
        # whole fp32 cache to bf16 at every step: 31 -> 37 ms per SmolLM2 step, where the update gains 5-8%).
        out_btf, cache_kv = self._attend(q_bkgth, k_bksh, v_bksh, mask_bts, cache_kv, cache_pos,
                                         matmul_dtype if cache_kv is None else None)
        # the output projection as one [H*hd, D] matrix (a free reshape of [H, hd, D])
        if attention_btp is not None:
            out = replayed_dense(out_btf, self.wo_nhd[...].reshape(q_width, d).astype(dt), o_rec, matmul_dtype)
        else:
            out = self._project(out_btf, "wo_nhd", d, matmul_dtype)
        projections = jnp.concatenate([*qkv_btf, out], axis=-1)
        if self.bo_d is not None:
            out = out + self.bo_d[...].astype(dt)
        return out, cache_kv, projections

    def _mlp(self, x_btd, fuse_projections=False, matmul_dtype=None, gate_up_btf=None):
        """The MLP's output and its (gate, up) projections (gate None without one). `gate_up_btf` [.., 2F]: those of a
        forward that already ran on this `x` at these weights (the sampler's), returned by `replayed_dense` in
        place of the two matmuls, whose backward is theirs."""
        dt, f = x_btd.dtype, self.cfg.intermediate_size
        if gate_up_btf is not None:
            if self.w_gate_df is None or self.packed:
                raise ValueError("gate_up_btf: a replayed gate|up needs a gated MLP on unpacked weights")
            gate, up = (replayed_dense(x_btd, w[...].astype(dt), y, matmul_dtype)
                        for w, y in ((self.w_gate_df, gate_up_btf[..., :f]), (self.w_up_df, gate_up_btf[..., f:])))
        elif fuse_projections and self.w_gate_df is not None and not self.packed:
            gate_up = dense(x_btd, jnp.concatenate([self.w_gate_df[...], self.w_up_df[...]], axis=1).astype(dt),
                            matmul_dtype)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = None if self.w_gate_df is None else self._project(x_btd, "w_gate_df", f, matmul_dtype)
            up = self._project(x_btd, "w_up_df", f, matmul_dtype)
        projections = gate, up  # before the bias: the matmuls' outputs
        if self.b_up_f is not None:
            up = up + self.b_up_f[...].astype(dt)
        if gate is not None:
            hidden = jax.nn.silu(gate) * up
        else:
            hidden = activation(self.cfg.activation, up)
        # Replayed gate|up came from the CPU kernel, which then also transposes the down projection's input for its
        # weight gradient (bf16 operands; `_weight_gradient`).
        native_transpose = gate_up_btf is not None and jnp.dtype(matmul_dtype or dt) == jnp.bfloat16
        out = self._project(hidden, "w_down_fd", self.cfg.hidden_size, matmul_dtype, native_transpose)
        if self.b_down_d is not None:
            out = out + self.b_down_d[...].astype(dt)
        return out, projections

    def __call__(self, x_btd, rope, mask_bts, cache_kv=None, cache_pos=None, fuse_projections=False,
                 matmul_dtype=None, gate_up_btf=None, record_gate_up=False, record_attention=False):
        """`fuse_projections`: q|k|v and gate|up as one matmul each, on weights concatenated in the program
        (the unrolled decode path, whose per-layer weights are loop-invariant: XLA hoists the concatenation
        out of the decode loop). Not for sharded weights, whose q and k/v shard over different head counts.
        A layer state of [out, in] copies (`CausalLM.unstack_layers(weights_oi=True)`) runs through
        `decode_feature_major` instead. `gate_up_btf` [.., 2F] or [.., `recorded_width(cfg, True)`]: the MLP
        replays these gate|up projections (`_mlp`), and in the wider layout the attention its q|k|v and output
        projection (`_attention`). `record_gate_up`: a third output, the gate|up projections [B, T, 2F] (a gated
        MLP only), with `record_attention` followed by the attention's ([B, T, recorded_width(cfg, True)]): what
        `gate_up_btf` takes."""
        f2, wide = recorded_width(self.cfg, False), recorded_width(self.cfg, True)
        attention_btp = None
        if gate_up_btf is not None and gate_up_btf.shape[-1] != f2:
            if gate_up_btf.shape[-1] != wide:
                raise ValueError(f"gate_up_btf: {gate_up_btf.shape[-1]} features, expected {f2} or {wide}")
            gate_up_btf, attention_btp = gate_up_btf[..., :f2], gate_up_btf[..., f2:]
        h = self._norm(x_btd, self.ln1_scale, self.ln1_bias)
        attn, cache_kv, attention_proj = self._attention(h, rope, mask_bts, cache_kv, cache_pos, fuse_projections,
                                                         matmul_dtype, attention_btp)
        if not self.cfg.parallel_residual:
            x_btd = x_btd + attn
        mlp, (gate, up) = self._mlp(self._norm(x_btd, self.ln2_scale, self.ln2_bias), fuse_projections,
                                    matmul_dtype, gate_up_btf)
        x_btd = shard(x_btd + attn + mlp if self.cfg.parallel_residual else x_btd + mlp, ("data", None, None))
        if not record_gate_up:
            return x_btd, cache_kv
        if gate is None:
            raise ValueError("record_gate_up: this MLP has no gate")
        return x_btd, cache_kv, jnp.concatenate([gate, up] + ([attention_proj] if record_attention else []), axis=-1)

    def decode_feature_major(self, x_dn, rope_rn, mask_bts, cache_kv, cache_pos, matmul_dtype=None, keys_hs=False):
        """`__call__` on feature-major activations [D, N] (N = B*T rows, batch-major) with a layer state of
        `[out, in]` weight copies (`CausalLM.unstack_layers(weights_oi=True)`); `rope_rn` the [rotary_dim, N]
        tables. Every projection is `weight_left_matmul`, so XLA:CPU reads the weights in place instead of
        packing them at every decode step. `keys_hs`: the cache's keys are stored [B, K, hd, S]
        (`KVCache.keys_feature_major`). Forward only; the same values as `__call__`."""
        cfg, dt = self.cfg, x_dn.dtype
        h, k_heads, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        b, t = mask_bts.shape[:2]

        def norm(x, scale, bias):
            if bias is None:
                return rms_norm(x, scale[...], cfg.norm_eps, axis=0)
            return layer_norm(x, scale[...], bias[...], cfg.norm_eps, axis=0)

        def proj(w, x, bias=None):
            y = weight_left_matmul(w.astype(dt), x, matmul_dtype)
            return y if bias is None else y + bias.reshape(-1, 1).astype(dt)

        # attention: q|k|v in one dot, then this step's rows to the cache's heads-major layout (small copies)
        w_qkv_oi = jnp.concatenate([self.wq_dnh[...], self.wk_dkh[...], self.wv_dkh[...]], axis=0)
        b_qkv = None if self.bq_nh is None else jnp.concatenate(
            [self.bq_nh[...].reshape(-1), self.bk_kh[...].reshape(-1), self.bv_kh[...].reshape(-1)])
        qkv_on = proj(w_qkv_oi, norm(x_dn, self.ln1_scale, self.ln1_bias), b_qkv)
        q, k, v = jnp.split(qkv_on, [h * hd, (h + k_heads) * hd], axis=0)
        q, k, v = q.reshape(h, hd, -1), k.reshape(k_heads, hd, -1), v.reshape(k_heads, hd, -1)
        if rope_rn is not None:
            q, k = apply_rope_feature_major(q, *rope_rn), apply_rope_feature_major(k, *rope_rn)
        q_bkgth = q.reshape(k_heads, g, hd, b, t).transpose(3, 0, 1, 4, 2)
        v_bksh = v.reshape(k_heads, hd, b, t).transpose(2, 0, 3, 1)
        # keys [B, K, hd, T] for a keys_hs cache, else [B, K, T, hd]
        k = k.reshape(k_heads, hd, b, t).transpose((2, 0, 1, 3) if keys_hs else (2, 0, 3, 1))
        out_btf, cache_kv = self._attend(q_bkgth, k, v_bksh, mask_bts, cache_kv, cache_pos, keys_hs=keys_hs)
        attn = proj(self.wo_nhd[...], _row_major_transpose(out_btf.reshape(b * t, h * hd)), self.bo_d)
        if not cfg.parallel_residual:
            x_dn = x_dn + attn
        # MLP: gate|up in one dot
        h_dn = norm(x_dn, self.ln2_scale, self.ln2_bias)
        b_up = None if self.b_up_f is None else self.b_up_f[...]
        if self.w_gate_df is not None:
            gate, up = jnp.split(proj(jnp.concatenate([self.w_gate_df[...], self.w_up_df[...]], axis=0), h_dn), 2,
                                 axis=0)
            up = up if b_up is None else up + b_up.reshape(-1, 1).astype(dt)
            hidden = jax.nn.silu(gate) * up
        else:
            hidden = activation(cfg.activation, proj(self.w_up_df[...], h_dn, b_up))
        mlp = proj(self.w_down_fd[...], hidden, self.b_down_d)
        x_dn = x_dn + attn + mlp if cfg.parallel_residual else x_dn + mlp
        return x_dn, cache_kv


def update_row_groups(rows: int) -> int:
    """Row groups (`in_row_groups`) for the rematerialised layers of an update: 2 where the update runs on one
    CPU device (no mesh, or a one-device mesh, as the trainer's on a laptop) and rows >= 2, else 1. SmolLM2-135M
    KLQ update, 8 x 176 tokens, bf16 matmuls, 2-core Xeon, five alternating pairs: 2.52-2.61 -> 2.39-2.64 s
    (medians 2.54 -> 2.44; docs/performance.md, item 50).
    On a GPU or TPU half-size kernels would only queue one after the other; on a mesh of several devices the rows
    are already split over them."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = jax.device_count() if mesh is None or mesh.empty else mesh.size
    return 2 if jax.default_backend() == "cpu" and devices == 1 and rows >= 2 else 1


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def in_row_groups(layer_fn: Callable, groups: int) -> Callable:
    """`layer_fn(x, params, aux)` run on `groups` slices of the rows (leading axis) of `x` and of every `aux`
    array, its outputs concatenated: for a layer whose rows do not interact (attention stays within a row),
    the same values, as `groups` independent chains of ops.

    XLA:CPU runs independent ops side by side, one per core, and a layer's ops mostly one after the other: in
    the update's backward one core idled while the other ran the layer's elementwise work. Two chains keep both
    busy; the weight gradients become sums of two dots over half the rows each."""
    if groups <= 1:
        return layer_fn

    def grouped(x, params, aux):
        bounds = [round(i * x.shape[0] / groups) for i in range(1, groups)]
        x_parts = jnp.split(x, bounds, axis=0)
        aux_leaves, aux_def = jax.tree.flatten(aux)
        aux_split = [jnp.split(a, bounds, axis=0) for a in aux_leaves]
        aux_parts = [aux_def.unflatten([parts[g] for parts in aux_split]) for g in range(groups)]
        return jnp.concatenate([layer_fn(x_g, params, aux_g) for x_g, aux_g in zip(x_parts, aux_parts)], axis=0)
    return grouped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def remat_layer_scan(layer_fn: Callable, x, stacked_params, aux, checkpoint_dtype=None, row_groups: int = 1,
                     grad_dtype=None):
    """`x <- layer_fn(x, params_l, aux)` for each layer `l` of `stacked_params` (leading axis), keeping only
    each layer's input for the backward, which recomputes the layer: `jax.checkpoint` with nothing saved
    over `lax.scan`, with the backward written out. `checkpoint_dtype`: those inputs are kept rounded to it
    (None: `x`'s dtype), and the backward recomputes each layer from the rounded input. `row_groups`: the
    forward and the backward run each layer `in_row_groups` (rows must not interact in `layer_fn`, and every
    `aux` array has the rows as its leading axis). `grad_dtype`: the stacked weight matrices' gradients are
    collected in it (`_layer_scan_bwd`; None: the parameters' dtype).

    Autodiff's transposed scan collects the layers' weight gradients in buffers that XLA:CPU allocates
    (zeroed) before the forward even runs, so they sit under the LM head's vocabulary-wide logits and their
    gradient (SmolLM2-135M: 0.4 GiB of gradients under 0.4 GiB of logits). Here the gradient buffers are
    made from the incoming cotangent, so they exist only from the start of the backward over the layers.
    Same values as autodiff. `aux` (masks, rotary tables) gets no gradient.
    """
    layer_fn = in_row_groups(layer_fn, row_groups)
    return jax.lax.scan(lambda x, p: (layer_fn(x, p, aux), None), x, stacked_params)[0]


def _remat_layer_scan_fwd(layer_fn, x, stacked_params, aux, checkpoint_dtype, row_groups, grad_dtype):
    # bf16 kept as its raw 16 bits and widened one layer at a time in the backward: XLA:CPU would widen a bf16
    # stack to fp32 before the loop, all layers at once (as `CausalLM.__call__` does for bf16-stored layers).
    keep = (lambda x: x) if checkpoint_dtype is None else (lambda x: _bf16_bits(x.astype(checkpoint_dtype)))
    layer_fn = in_row_groups(layer_fn, row_groups)
    y, inputs_l = jax.lax.scan(lambda x, p: (layer_fn(x, p, aux), keep(x)), x, stacked_params)
    return y, (inputs_l, stacked_params, aux)


def _remat_layer_scan_bwd(layer_fn, checkpoint_dtype, row_groups, grad_dtype, residuals, dy):
    inputs_l, stacked_params, aux = residuals
    return _layer_scan_bwd(layer_fn, row_groups, inputs_l, 0, stacked_params, aux, dy, grad_dtype)


def _layer_scan_bwd(layer_fn, row_groups, inputs, layer_axis: int, stacked_params, aux, dy, grad_dtype=None,
                    gate_up_bltf=None):
    """The backward of a layer stack from each layer's input, `inputs` holding them along `layer_axis` (0: scanned
    over, as remat keeps them; 1: [B, L, T, D], each layer's rows sliced out in its step, no transposed copy).
    `gate_up_bltf` (bf16 bits, [B, L, T, 2F]): each layer's recorded gate|up projections, passed to `layer_fn` as one
    more `aux` entry [B, T, 2F] (fp32), which its MLP replays instead of recomputing them (`Block._mlp`).

    `grad_dtype` (bf16 matmul operands): the weight matrices' gradients are collected and returned in it, each
    layer's rounded once from its fp32-accumulated dot, as torch's autocast rounds its weight gradients (the
    consumers widen them as they read them: `optimizer.global_norm`, `ClippedAdamW`). Widened here instead, the
    fp32 copy would be XLA:CPU's buffer: SmolLM2-135M's update took 80 MiB more temporaries than with fp32
    gradients, not 0.2 GiB fewer."""
    layer_fn = in_row_groups(layer_fn, row_groups)
    # Zero buffers that depend on `dy`: XLA cannot schedule them before the cotangent exists.
    zero = jnp.zeros((), dy.dtype) * dy.reshape(-1)[0]

    # matrices [L, ...] only: the norms' scales and the biases keep their dtype
    collect_dtypes = jax.tree.map(lambda p: grad_dtype if grad_dtype is not None and p.ndim >= 3 else p.dtype,
                                  stacked_params)
    # 16-bit gradients collected as their raw bits: XLA:CPU runs a bf16 dynamic-update-slice in fp32, widening the
    # whole stack and rounding it back at every layer.
    grads0 = jax.tree.map(lambda p, dt: _bf16_bits(jnp.broadcast_to(zero.astype(dt), p.shape)), stacked_params,
                          collect_dtypes)

    def step(carry, layer):
        dx, grads = carry
        if layer_axis == 0:
            index, x_in, params = layer
        else:
            index, params = layer
            x_in = jax.lax.dynamic_index_in_dim(inputs, index, layer_axis, keepdims=False)
        layer_aux = aux
        if gate_up_bltf is not None:  # sliced as bits: XLA:CPU runs a bf16 slice in fp32, on a copy of the stack
            layer_aux = (*aux, _widen_bf16_bits(jax.lax.dynamic_index_in_dim(gate_up_bltf, index, 1, keepdims=False)))
        _, vjp = jax.vjp(lambda x, p: layer_fn(x, p, layer_aux), _widen_bf16_bits(x_in).astype(dy.dtype), params)
        dx, dparams = vjp(dx)
        dparams = jax.tree.map(lambda d, dt: _bf16_bits(d.astype(dt)), dparams, collect_dtypes)
        grads = jax.tree.map(lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d, index, 0), grads, dparams)
        return (dx, grads), None

    num_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    xs = (jnp.arange(num_layers), inputs, stacked_params) if layer_axis == 0 else (jnp.arange(num_layers),
                                                                                   stacked_params)
    (dx, grads), _ = jax.lax.scan(step, (dy, grads0), xs, reverse=True)
    grads = jax.tree.map(_from_bf16_bits, grads)
    return dx, grads, jax.tree.map(lambda a: None, aux)


remat_layer_scan.defvjp(_remat_layer_scan_fwd, _remat_layer_scan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9))
def replayed_layer_scan(layer_fn: Callable, x, stacked_params, aux, inputs_bltd, output_btd, gate_up_bltf=None,
                        checkpoint_dtype=None, row_groups: int = 1, grad_dtype=None):
    """`remat_layer_scan` over layers whose forward already ran, at these parameters, on these rows: the sampler's,
    which computed every layer of every token it drew (`CausalLM.__call__(record_layers=True)`). Returns the recorded
    output `output_btd`; the backward is `remat_layer_scan`'s, recomputing each layer from its recorded input
    (`inputs_bltd`, [B, L, T, D], rounded to `checkpoint_dtype` as the forward would keep it; or bf16 bits as uint16,
    as the sampler records them), and gives `x` its
    gradient as if the stack had run from it. `gate_up_bltf` ([B, L, T, 2F] bf16 or its bits as uint16, or None):
    the recorded gate|up projections too, which the recomputed layers' MLPs replay (`layer_fn` takes them as a third
    `aux` entry). The recorded values differ from a forward's by summation order only (the decode step adds in
    another order) and the gate|up's bf16 rounding; they must be this stack's at `stacked_params` on `x`, which the
    caller vouches for."""
    del layer_fn, x, stacked_params, aux, inputs_bltd, gate_up_bltf, checkpoint_dtype, row_groups, grad_dtype
    return output_btd


def _replayed_layer_scan_fwd(layer_fn, x, stacked_params, aux, inputs_bltd, output_btd, gate_up_bltf,
                             checkpoint_dtype, row_groups, grad_dtype):
    # bf16 as its raw bits, widened one layer's slice at a time in the backward, as remat's; bits as they come (a
    # bitcast of the argument copies it: 46 MiB for SmolLM2's 8 x 176 tokens).
    if inputs_bltd.dtype != jnp.uint16:
        inputs_bltd = _bf16_bits(inputs_bltd.astype(checkpoint_dtype or x.dtype))
    if gate_up_bltf is not None and gate_up_bltf.dtype != jnp.uint16:
        gate_up_bltf = _bf16_bits(gate_up_bltf.astype(jnp.bfloat16))
    return output_btd.astype(x.dtype), (inputs_bltd, stacked_params, aux, gate_up_bltf)


def _replayed_layer_scan_bwd(layer_fn, checkpoint_dtype, row_groups, grad_dtype, residuals, dy):
    inputs_bltd, stacked_params, aux, gate_up_bltf = residuals
    dx, grads, aux_none = _layer_scan_bwd(layer_fn, row_groups, inputs_bltd, 1, stacked_params, aux, dy, grad_dtype,
                                          gate_up_bltf)
    return dx, grads, aux_none, None, None, None


replayed_layer_scan.defvjp(_replayed_layer_scan_fwd, _replayed_layer_scan_bwd)


class CausalLM(nnx.Module):
    """A decoder LM with optional heads: `lm_head` (next-token logits), `value_head` (V(s), KLQ/PPO
    critic on the shared backbone), `score_head` (reward model: score at the last real token)."""

    def __init__(self, cfg: ModelConfig, *, lm_head: bool = True, value_head: bool = False,
                 score_head: bool = False, score_bias: bool = False, param_dtype=jnp.float32,
                 dtype=jnp.float32, matmul_dtype=None, remat: str = "none", rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat={remat!r}; accepted: {sorted(REMAT_POLICIES)}")
        d, p = cfg.hidden_size, param_dtype
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        # The operands of the layers' and the LM head's matmuls (None: `dtype`); they accumulate in fp32 and
        # return `dtype`. bfloat16 with fp32 activations is what JAX's default precision does on TPU.
        self.matmul_dtype = None if matmul_dtype is None else jnp.dtype(matmul_dtype)
        self.embed_vd = _param(rngs, (cfg.vocab_size, d), d, p, std=0.02)
        self.pos_embed_pd = _param(rngs, (cfg.max_position_embeddings, d), d, p, std=0.01) \
            if cfg.family == "gpt2" else None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, param_dtype=p, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_scale = _ones((d,), p)
        self.final_bias = _zeros((d,), p) if cfg.family != "llama" else None
        self.lm_head_dv = _param(rngs, (d, cfg.vocab_size), d, p) \
            if lm_head and not cfg.tie_embeddings else None
        self.has_lm_head = lm_head
        self.value_w_d = _zeros((d,), jnp.float32) if value_head else None
        self.value_b = _zeros((), jnp.float32) if value_head else None
        self.score_w_d = _param(rngs, (d,), d, jnp.float32) if score_head else None
        self.score_b = _zeros((), jnp.float32) if score_head and score_bias else None

    # The weights only ever read as a matmul operand (rounded to `matmul_dtype` at every use); the embedding is also
    # looked up, the norms and biases are added or multiplied in `dtype`.
    MATMUL_WEIGHTS = ("wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd", "w_gate_df", "w_up_df", "w_down_fd", "lm_head_dv")

    def store_matmul_weights(self) -> int:
        """Stores the matmul-only weights (`MATMUL_WEIGHTS`) in the 16-bit `matmul_dtype`, in place; returns the
        bytes saved. For a frozen model (the reference): every use rounds them to that dtype anyway, so its outputs
        do not change (XLA drops the widening and re-rounding), and the rounding at every call goes. With fp32
        matmuls (or none set) nothing changes and 0 is returned; a trained model keeps its fp32 weights."""
        mdt = self.matmul_dtype
        if mdt is None or mdt.itemsize != 2:
            return 0
        saved = 0
        for path, param in nnx.iter_graph(self):
            if isinstance(param, nnx.Param) and path and path[-1] in self.MATMUL_WEIGHTS:
                value = param.get_value()
                if value.dtype.itemsize > mdt.itemsize:
                    saved += value.nbytes - value.size * mdt.itemsize
                    param.set_value(value.astype(mdt))
        return saved

    def store_layers_as_bits(self) -> int:
        """Stores the layers' bf16 weights as their uint16 bit patterns, in place, for a frozen model (the reference,
        an HF reward model) that computes in fp32; returns how many arrays it stored so. `__call__` widens them one
        layer at a time, as it widens bf16 ones, but reads them in place: XLA:CPU bitcasts a bf16 argument to bits
        with a copy of all its layers at every call (SmolLM2-135M: 0.2 GiB of temporaries in each frozen forward;
        docs/performance.md, item 60). Such a model no longer trains, decodes unrolled (`unstack_layers`) or packs
        its weights (`pack_frozen_matmul_weights`: pack first)."""
        if jnp.dtype(self.dtype) != jnp.float32:
            return 0
        stored = 0
        for _, param in nnx.iter_graph(self.blocks):
            if isinstance(param, nnx.Param) and param.get_value().dtype == jnp.bfloat16:  # not a PackedWeight
                param.set_value(jax.lax.bitcast_convert_type(param.get_value(), jnp.uint16))
                stored += 1
        return stored

    # The layers' matmul weights, as `pack_frozen_matmul_weights` packs them.
    BLOCK_MATMUL_WEIGHTS = ("wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd", "w_gate_df", "w_up_df", "w_down_fd")

    def pack_frozen_matmul_weights(self) -> int:
        """Stores the layers' matmul weights as `PackedWeight`s, in place, for a frozen model (the reference, an
        HF reward model) with bf16 matmuls on a CPU with AMX: its forwards then run those matmuls as native AMX
        tile products (`cpu_decode.packed_matmul`) on tiles packed once here, the same bytes as the bf16 weights
        (`store_matmul_weights`). Same outputs up to summation order. Returns the number of weights packed; raises a
        ValueError naming why where it cannot (`packed_matmul_unsupported`: not bf16 matmuls, no AMX, an odd
        input size). Such a model no longer trains, decodes unrolled (`unstack_layers`) or shards its layers."""
        reason = cpu_decode.packed_matmul_unsupported()
        if self.matmul_dtype != jnp.dtype(jnp.bfloat16):
            reason = f"matmul dtype {self.matmul_dtype} (the packed matmul takes bfloat16 operands)"
        cfg = self.cfg
        if cfg.hidden_size % 2 or cfg.intermediate_size % 2 or (cfg.num_heads * cfg.head_dim) % 2:
            reason = "an odd matmul input size"
        if reason is not None:
            raise ValueError(f"frozen_matmul_kernel='native' cannot run here: {reason}")
        pack = jax.jit(lambda w: jax.lax.bitcast_convert_type(cpu_decode.pack_io(w, jnp.bfloat16), jnp.int16))
        lyr = cfg.num_layers
        for name in self.BLOCK_MATMUL_WEIGHTS:
            w = getattr(self.blocks, name, None)
            if w is None or isinstance(w, PackedWeight):
                continue
            value = w.get_value()
            in_features = value.shape[1] * (value.shape[2] if name == "wo_nhd" else 1)
            setattr(self.blocks, name, PackedWeight(pack(value.reshape(lyr, in_features, -1))))
        return sum(isinstance(getattr(self.blocks, n, None), PackedWeight) for n in self.BLOCK_MATMUL_WEIGHTS)

    def unstack_layers(self, weights_oi: bool = False) -> tuple[nnx.State, ...]:
        """The blocks' parameters as one state per layer, for `__call__(..., layers=...)`.

        Decoding one token is memory-bound: with the layer scan, every step dynamic-slices each layer's
        weights out of the stacked [L, ...] arrays, a copy of all weights per token. Unstacked once before
        the decode loop, each layer's weights are read in place.

        `weights_oi`: the matmul weights are stored as 2-D [out, in] copies instead (`wq_dnh` holds [H*hd, D],
        `w_up_df` [F, D], ...; for `__call__(..., layers_oi=True)`, which then runs `Block.decode_feature_major`:
        each weight the left operand of its dot, read in place by XLA:CPU's YNNPACK instead of packed at every
        step (docs/performance.md, items 28-30).
        """
        block_state = nnx.state(self.blocks)
        oi_names = ("wq_dnh", "wk_dkh", "wv_dkh", "w_gate_df", "w_up_df", "w_down_fd")

        def layer(path, x, i):
            name = next(k.key for k in path if isinstance(k, jax.tree_util.DictKey))  # the Block's attribute
            x = x[i]
            if not weights_oi:
                return x
            if name in oi_names:  # [in, ...] -> [out, in]
                return x.reshape(x.shape[0], -1).T
            if name == "wo_nhd":  # [H, hd, D] -> [D, H*hd]
                return x.reshape(-1, x.shape[-1]).T
            return x

        return tuple(jax.tree_util.tree_map_with_path(lambda p, x, i=i: layer(p, x, i), block_state)
                     for i in range(self.cfg.num_layers))

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bs: jax.Array,
                 cache: KVCache | None = None, cache_pos: jax.Array | int | None = None,
                 return_logits: bool = True, layers: tuple[nnx.State, ...] | None = None,
                 logits_from: int = 0, logits_to: int | None = None, layers_oi: bool = False,
                 head_vd: jax.Array | None = None, record_layers: bool = False, record_gate_up: bool = False,
                 record_attention: bool = False, replay: tuple[jax.Array, ...] | None = None) -> ModelOutput:
        """Forward over `tokens_bt` at `positions_bt`.

        Without a cache, `kv_mask_bs` is the attention mask of `tokens_bt` (S == T). With a cache of S
        slots, the tokens are written at slots `cache_pos..cache_pos+T` and `kv_mask_bs` marks which
        slots hold real tokens (after this write). With `layers` (from `unstack_layers`) the layers run
        as an unrolled Python loop on those states, and the cache is the unstacked kind (`KVCache.unstacked`);
        `layers_oi`: they are `unstack_layers(weights_oi=True)`'s, and the cache may hold its keys as [.., hd, S]
        (`KVCache.keys_feature_major`, the sampler's); `head_vd`: an untied LM head as a [V, D] copy
        (`lm_head_vd()`), which the feature-major step then reads in place, as it does a tied head's embedding.
        With `logits_from = s` and `logits_to = e` (static; default 0 and T) the logits are computed for
        positions `s..e-1` only (`logits_btv` is [B, e-s, V]): RL needs them only where they predict a
        response token, and the float32 logits are the largest activation of a forward.
        `record_layers` (with a cache, or without remat): `layer_states_lbtd` holds each layer's input and the last
        layer's output, what `replay` takes back. `record_gate_up` (with a cache, the stacked layers, a gated MLP):
        `gate_up_lbtf` holds each layer's gate|up projections in bf16, with `record_attention` followed by its
        attention's q|k|v and output projections (`Block.__call__`). `replay = (inputs_bltd, output_btd)` or
        `(inputs_bltd, output_btd, gate_up_bltf)` (remat "full", no cache): those of a forward that already ran at
        these parameters on these tokens (the sampler's); the layers are not run again, and their gradients come from
        recomputing each one from its recorded input (`replayed_layer_scan`), the recorded projections replayed.
        """
        cfg, dt = self.cfg, self.dtype
        x = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(dt)
        if self.pos_embed_pd is not None:
            x = x + jnp.take(self.pos_embed_pd[...], positions_bt, axis=0).astype(dt)
        x = shard(x, ("data", None, None))
        t = tokens_bt.shape[1]
        start = 0 if cache is None else cache_pos
        q_slots_bt = jnp.broadcast_to(start + jnp.arange(t)[None, :], tokens_bt.shape)
        mask_bts = attention_mask(q_slots_bt, kv_mask_bs)
        rope = rope_cos_sin(cfg, positions_bt) if cfg.rotary_dim else None

        graphdef = nnx.graphdef(self.blocks)
        logits = None
        if cache is not None and cache.keys_hs and not (layers is not None and layers_oi):
            raise ValueError("a cache with keys stored [.., hd, S] (KVCache.keys_feature_major) is read only by the "
                             "feature-major decode (layers=unstack_layers(weights_oi=True), layers_oi=True)")

        # bf16-stored layers computing in fp32 (a frozen reference or reward model) enter the scan as their raw
        # 16 bits and are widened one layer at a time in the body: XLA:CPU widens bf16 loop state to fp32
        # before the loop, i.e. the whole stack at once (+0.36 GiB for SmolLM2-135M). Stored as bits already
        # (`store_layers_as_bits`), they are read in place; a bf16 argument is bitcast with a copy of every layer.
        block_state = nnx.state(self.blocks)
        widen = jnp.dtype(dt) == jnp.float32 and any(x.dtype in (jnp.bfloat16, jnp.uint16)
                                                     for x in jax.tree.leaves(block_state))
        if widen:
            block_state = jax.tree.map(_bf16_bits, block_state)

        def layer_module(state) -> Block:
            return nnx.merge(graphdef, jax.tree.map(_widen_bf16_bits, state) if widen else state)

        def run_layer(x_btd, state, rope, mask_bts, kv=None, fuse_projections=False, **block_kwargs):
            return layer_module(state)(x_btd, rope, mask_bts, kv, cache_pos, fuse_projections, self.matmul_dtype,
                                       **block_kwargs)

        def body(x_btd, layer):
            state, kv = layer
            if record_gate_up:  # collected as bf16 bits: XLA:CPU runs a bf16 dynamic-update-slice in fp32
                x_out, kv, gate_up = run_layer(x_btd, state, rope, mask_bts, kv, record_gate_up=True,
                                               record_attention=record_attention)
                return x_out, (kv, x_btd, _bf16_bits(gate_up.astype(jnp.bfloat16)))
            x_out, kv = run_layer(x_btd, state, rope, mask_bts, kv)
            return x_out, ((kv, x_btd) if record_layers else kv)

        if replay is not None and not (cache is None and layers is None and self.remat == "full"):
            raise ValueError("replay needs a forward without a cache or unstacked layers, with remat='full'")
        if record_layers and cache is None and layers is None and self.remat == "full":
            raise ValueError("record_layers: a forward with remat='full' keeps no layer states to record")
        if record_gate_up and not (record_layers and cache is not None and layers is None):
            raise ValueError("record_gate_up: with record_layers, on a forward with a cache over the stacked layers")
        if record_attention and not record_gate_up:
            raise ValueError("record_attention: with record_gate_up (recorded after the gate|up projections)")
        states = []  # with record_layers: each layer's input, [B, T, D]

        if layers is not None:  # unrolled: each layer's weights and cache read in place
            # Fused projections: 3 fewer matmuls per layer. A decode step is ~400 small ops, each with a
            # fixed cost on XLA:CPU (165-180 us on a 2-core Zen 4 VM): 75.6 -> 66.7 ms per 8-row step there
            # (docs/performance.md, item 23).
            # `[out, in]` copies run feature-major (`Block.decode_feature_major`): each weight is read in place,
            # not packed per step (docs/performance.md, items 29 and 30). The activations are transposed into
            # row-major [D, N] arrays: a plain `.T` is a layout change, which XLA:CPU's YNNPACK dots refuse as a
            # right operand, and it then runs bf16 dots on fp32 copies of their weights.
            feature_major = layers_oi
            keys_hs = cache is not None and cache.keys_hs
            if feature_major:
                n = tokens_bt.shape[0] * t
                x_dn = _row_major_transpose(x.reshape(n, -1))
                rope_rn = None if rope is None else tuple(c.reshape(n, -1).T for c in rope)
            ks, vs = [], []
            for i, layer_state in enumerate(layers):
                kv = None if cache is None else (cache.k_lbksh[i], cache.v_lbksh[i])
                if record_layers:
                    states.append(x_dn.T.reshape(x.shape) if feature_major else x)
                if feature_major:
                    x_dn, kv = layer_module(layer_state).decode_feature_major(
                        x_dn, rope_rn, mask_bts, kv, cache_pos, self.matmul_dtype, keys_hs=keys_hs)
                else:
                    x, kv = run_layer(x, layer_state, rope, mask_bts, kv, fuse_projections=True)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            if feature_major:
                x = x_dn.T.reshape(x.shape)
                head = self.embed_vd[...] if self.lm_head_dv is None else head_vd
                if self.has_lm_head and return_logits and head is not None:
                    logits = self._logits_feature_major(x_dn, head, tokens_bt.shape[0], logits_from, logits_to)
            new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs), keys_hs)
        elif cache is None and self.remat == "full":
            # rope and the mask go in as `aux`, not closed over: a custom_vjp's function must not close over
            # traced values. With 16-bit matmul operands an RMS-normed model keeps the layers' inputs for the
            # backward in that dtype too (SmolLM2-135M update, 8 x 176 tokens: -46 MiB at the peak). An RMS norm
            # keeps their relative rounding; a LayerNorm's centring can magnify it (a tiny GPT-NeoX's gradients
            # moved by 1.1% of their largest, more than its bf16 matmuls move them), so those stay fp32.
            checkpoint_dtype = self.checkpoint_dtype()
            # aux: (rope, mask) or, where the backward replays the MLPs' gate|up, (rope, mask, gate_up_btf)
            layer_fn = lambda x_btd, state, aux: run_layer(x_btd, state, *aux[:2], gate_up_btf=(  # noqa: E731
                aux[2] if len(aux) > 2 else None))[0]
            row_groups = update_row_groups(tokens_bt.shape[0])
            grad_dtype = self.layer_grad_dtype()
            if replay is None:
                x = remat_layer_scan(layer_fn, x, block_state, (rope, mask_bts), checkpoint_dtype, row_groups,
                                     grad_dtype)
            else:
                inputs_bltd, output_btd, *gate_up_bltf = replay
                x = replayed_layer_scan(layer_fn, x, block_state, (rope, mask_bts), inputs_bltd, output_btd,
                                        (gate_up_bltf or [None])[0], checkpoint_dtype, row_groups, grad_dtype)
            new_cache = None
        else:
            if REMAT_POLICIES[self.remat] is not None:
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
            kv_in = None if cache is None else (cache.k_lbksh, cache.v_lbksh)
            x, kv_out = jax.lax.scan(body, x, (block_state, kv_in))
            if record_gate_up:
                kv_out, states, gate_up_lbtf = kv_out  # [L, B, T, D], [L, B, T, 2F]
            elif record_layers:
                kv_out, states = kv_out  # states: [L, B, T, D]
            new_cache = None if cache is None else KVCache(*kv_out)
        layer_states = None
        if record_layers:
            layer_states = jnp.concatenate([jnp.stack(states) if isinstance(states, list) else states, x[None]])

        h = self._final_norm(x)
        if self.has_lm_head and return_logits and logits is None:
            h_head = h[:, logits_from:logits_to]
            if self.lm_head_dv is None:
                logits = tied_head(h_head, self.embed_vd[...].astype(dt), self.matmul_dtype)
            else:
                logits = dense(h_head, self.lm_head_dv[...].astype(dt), self.matmul_dtype, jnp.float32)
        values = None
        if self.value_w_d is not None:
            values = self.value_head(h)
        scores = None
        if self.score_w_d is not None:  # score at the last real token of each row
            last_b = jnp.max(jnp.where(kv_mask_bs[:, :t], jnp.arange(t)[None, :], 0), axis=1)
            h_last = jnp.take_along_axis(h, last_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)
            scores = h_last @ self.score_w_d[...] + (0.0 if self.score_b is None else self.score_b[...])
        gate_up_lbtf = _from_bf16_bits(gate_up_lbtf) if record_gate_up else None
        return ModelOutput(logits, values, scores, h, new_cache, layer_states, gate_up_lbtf)

    def next_token_logprobs(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bs: jax.Array, *,
                            logits_from: int = 0, temperature=1.0, with_values: bool = False,
                            replay: tuple[jax.Array, ...] | None = None,
                            replay_head: tuple[jax.Array, ...] | None = None):
        """Float32 [B, T - 1 - logits_from]: at each position `p` from `logits_from` (static) to `T - 2`, the
        log-probability of the token at `p + 1` under `softmax(logits[:, p] / temperature)`; what
        `losses.shift_to_actions` takes from the logits of `__call__(..., logits_from, logits_to=T - 1)`, without
        making them (`chunked_token_logprobs`). The reference's log-probabilities, and (differentiable, with
        `with_values`: `(logp, values_bt)`) the policy's in its update (`train_step.policy_logprobs`). `replay`: as
        `__call__`'s. `replay_head = (logp_bt, logsumexp_bt)` [B, T], aligned to tokens (slot `p + 1` holds the
        log-probability of its token and the log-normaliser of the distribution it was drawn from): the sampler's at
        these parameters and this temperature, returned in place of the head's forward (`replayed_token_logprobs`);
        `(logp_bt, logsumexp_bt, logp_grad_vtb)`: with the sampler's `onehot - softmax` at positions `logits_from` to
        `T - 2` ([V, T - 1 - logits_from, B]), which the head's backward reads instead of recomputing the logits."""
        if not self.has_lm_head:
            raise ValueError("next_token_logprobs needs a model with an LM head")
        t = tokens_bt.shape[1]
        if not 0 <= logits_from < t - 1:
            raise ValueError(f"logits_from={logits_from}: expected 0 <= logits_from < T - 1 = {t - 1}")
        out = self(tokens_bt, positions_bt, kv_mask_bs, return_logits=False, replay=replay)
        h_btd, head_vd = out.hidden_btd[:, logits_from:t - 1], self.lm_head_vd().astype(self.dtype)
        if replay_head is None:
            logp = chunked_token_logprobs(h_btd, head_vd, tokens_bt[:, logits_from + 1:], temperature,
                                          matmul_dtype=self.matmul_dtype)
        else:
            logp_bt, logsumexp_bt = (x[:, logits_from + 1:] for x in replay_head[:2])
            logp = replayed_token_logprobs(h_btd, head_vd, tokens_bt[:, logits_from + 1:], temperature, logp_bt,
                                           logsumexp_bt, *replay_head[2:], matmul_dtype=self.matmul_dtype)
        return (logp, out.values_bt) if with_values else logp

    def checkpoint_dtype(self):
        """The dtype remat "full" keeps the layers' inputs in for the backward (None: the compute dtype): 16-bit
        matmul operands on an RMS-normed model (see `__call__`)."""
        if (self.matmul_dtype is not None and self.final_bias is None
                and jnp.dtype(self.matmul_dtype).itemsize < jnp.dtype(self.dtype).itemsize):
            return self.matmul_dtype
        return None

    def layer_grad_dtype(self):
        """The dtype remat "full" collects the layers' weight gradients in (None: the parameters'): bf16 with bf16
        matmul operands and a wider compute dtype, each layer's weight gradient rounded to it once
        (`_layer_scan_bwd`). Not fp16: the summed (not yet averaged) gradients could overflow its range."""
        if (self.matmul_dtype == jnp.dtype(jnp.bfloat16)
                and jnp.dtype(self.matmul_dtype).itemsize < jnp.dtype(self.dtype).itemsize):
            return self.matmul_dtype
        return None

    def replays_gate_up(self, choice: str = "auto") -> bool:
        """Whether an update's backward replays the MLPs' gate|up projections recorded in bf16 by the sampler
        (`SampleOutput.gate_up_bltf`) instead of recomputing them (config `rl.replay_gate_up`, `choice`): a gated MLP
        only. "auto": with bf16 layer gradients (`layer_grad_dtype`), whose matmuls round those projections'
        cotangents and the down projection's input to bf16 anyway (SmolLM2-135M's update, 8 x 176 tokens: ~0.15
        TFLOP fewer; docs/performance.md, item 59). "on": with fp32 matmuls too, where the MLP's backward then reads
        its gate|up rounded to bf16 (the only bf16 in an fp32 update: item 66). "off": never."""
        if check_replay_gate_up(choice) == "off" or self.cfg.family != "llama":
            return False
        return choice == "on" or self.layer_grad_dtype() is not None

    def value_head(self, h_btd: jax.Array) -> jax.Array:
        """V(s) in fp32 from final-normed hidden states [..., D] (`__call__`'s values; the native decode's)."""
        return h_btd.astype(jnp.float32) @ self.value_w_d[...] + self.value_b[...]

    def _final_norm(self, x: jax.Array, axis: int = -1) -> jax.Array:
        if self.final_bias is None:
            return rms_norm(x, self.final_scale[...], self.cfg.norm_eps, axis=axis)
        return layer_norm(x, self.final_scale[...], self.final_bias[...], self.cfg.norm_eps, axis=axis)

    def lm_head_vd(self) -> jax.Array:
        """The LM head as a row-major [V, D] array (the tied embedding itself; a copy of an untied [D, V] head),
        for `__call__(..., layers_oi=True, head_vd=...)`."""
        if self.lm_head_dv is None:
            return self.embed_vd[...]
        return _row_major_transpose(self.lm_head_dv[...])

    def _logits_feature_major(self, x_dn: jax.Array, head_vd: jax.Array, b: int, logits_from: int,
                              logits_to: int | None):
        """Float32 logits [B, T', V] from the feature-major decode's activations [D, B*T]: the head [V, D] as the
        dot's left operand, read in place (as the row-major head's right operand XLA:CPU's YNNPACK packed all of
        it at every decode step: 0.9x the time per bf16 step without it)."""
        h_dn = self._final_norm(x_dn, axis=0)
        d = h_dn.shape[0]
        h_dn = h_dn.reshape(d, b, -1)[:, :, logits_from:logits_to].reshape(d, -1)
        logits_vn = weight_left_matmul(head_vd.astype(self.dtype), h_dn, self.matmul_dtype, jnp.float32)
        # The barrier keeps XLA from folding the transpose into the dot as a column-major result, a bf16 dot
        # YNNPACK refuses (and XLA's own dot does not run).
        logits_nv = _row_major_transpose(jax.lax.optimization_barrier(logits_vn))
        return logits_nv.reshape(b, -1, logits_nv.shape[-1])


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """Position ids that start at 0 on the first real token of each (left-padded) row."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)
