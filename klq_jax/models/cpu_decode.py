"""The sampler's decode step as one native call on x86 CPUs with AVX-512 or AVX2 (`kernels/decode_cpu.cc`).

A decode step reads every weight once and does little else. XLA:CPU runs it as ~780 thunks with a fixed cost
each, and SmolLM2-135M's 8-row bf16 step took ~2x the time to stream its weights (docs/performance.md, item
43). `decode_step` runs the whole step (layers, final norm, LM head) as one XLA FFI custom call on weights
packed once per rollout (`pack_weights`), with the arithmetic of the feature-major XLA step for the model's
matmul operands (bf16: AMX tiles or AVX-512 BF16; fp32: AVX-512 or AVX2 FMAs): the same values up to summation
order.

The kernel is compiled from source with the machine's C++ compiler on first use, into the klq_jax cache
(`cache.cache_root() / "kernels"`), one process at a time (`cache.filling`), in one of two builds (`ISAS`):
"avx512" (AVX-512, AVX-512 BF16 and AMX instructions; each runs only where the CPU has it) and "avx2" (AVX2 and
FMA only: CPUs without AVX-512, most laptops; fp32 matmuls only). Where it cannot run (no AVX2; bf16 matmuls
without AVX-512 BF16; no compiler; not a Llama-family model) `model_unsupported` and `machine_unsupported` say
why, and the sampler keeps XLA's step (`sampler.use_native_decode`).

The AVX-512 build also holds `packed_matmul`: `x @ W^T` on AMX tile products for weights packed once in the same
tiles, the layer matmuls of frozen models (`transformer.pack_frozen`; config `model.frozen_matmul_kernel`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from klq_jax.hardware import this_cpu_flags
from klq_jax.models.cache import cache_root, filling
from klq_jax.models.config import ModelConfig

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "decode_cpu.cc"
TILE = 32  # outputs per packed tile (kTile in the source)
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# The builds: their instruction-set flags, and the CPU flags (/proc/cpuinfo) a machine needs to run them. Not
# -march=native: the cache folder may be shared between machines. In the AVX-512 build, BF16 instructions run
# only with bf16 weights, AMX only where `has_amx` (the call's attribute `amx`).
ISAS = {
    "avx512": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16"),
               frozenset({"avx512f", "avx512bw", "avx512vl", "fma"})),
    "avx2": (("-mavx2", "-mfma"), frozenset({"avx2", "fma"})),
}


def _build_for(isa: str | None, matmul_dtype) -> str:
    """`isa`, or where None the build this CPU runs for these matmul operands; a ValueError naming what is
    accepted, or why none runs here."""
    if isa is None:
        isa = kernel_isa(matmul_dtype)
        if isa is None:
            raise ValueError(f"the CPU decode kernel cannot run here: {machine_unsupported(matmul_dtype)}")
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}; accepted: {', '.join(map(repr, ISAS))}")
    return isa


def targets(isa: str) -> tuple[str, str, str, str]:
    """The XLA FFI targets of one build: its decode step, its packing, its packed matmul (`packed_matmul`) and its
    16-bit transposition (`transpose_bits`)."""
    return f"klq_decode_step_{isa}", f"klq_pack_tiles_{isa}", f"klq_packed_matmul_{isa}", f"klq_transpose16_{isa}"


def isa_runs_here(isa: str) -> bool:
    """Whether this CPU can run that build (x86-64 with its instruction sets)."""
    return platform.machine() in ("x86_64", "AMD64") and ISAS[isa][1] <= this_cpu_flags()


def kernel_isa(matmul_dtype=jnp.bfloat16) -> str | None:
    """The build this CPU runs for these matmul operands: "avx512" where it has AVX-512 (and AVX-512 BF16 for bf16
    operands), else "avx2" for fp32 operands; None where neither can."""
    if isa_runs_here("avx512") and (weight_dtype(matmul_dtype) != jnp.bfloat16 or "avx512_bf16" in this_cpu_flags()):
        return "avx512"
    if isa_runs_here("avx2") and weight_dtype(matmul_dtype) == jnp.float32:
        return "avx2"
    return None


def has_amx() -> bool:
    """Whether this CPU has AMX with bf16 tiles (Sapphire Rapids and later): the kernel's matmuls then run as tile
    products (the kernel also asks Linux for the tile state, and keeps to AVX-512 BF16 if refused)."""
    return {"amx_tile", "amx_bf16"} <= this_cpu_flags()


def weight_dtype(matmul_dtype) -> jnp.dtype | None:
    """The kernel's packed weights for these matmul operands: bf16 for bf16, fp32 for fp32 (or None: the compute
    dtype, fp32 here); None where the kernel has no such matmul (fp16)."""
    mdt = jnp.dtype(jnp.float32 if matmul_dtype is None else matmul_dtype)
    return mdt if mdt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) else None


def model_unsupported(cfg: ModelConfig, dtype, matmul_dtype, cache_dtype) -> str | None:
    """Why this model's decode cannot run on the kernel (None: it can): the kernel is the Llama family's step
    (RMSNorm, gated SiLU MLP, RoPE, no biases, sequential residual) with bf16 or fp32 matmul operands, fp32
    activations and an fp32 or bf16 cache."""
    if cfg.family != "llama" or cfg.parallel_residual or cfg.activation != "silu":
        return f"family {cfg.family!r} (the kernel runs Llama-family models)"
    if cfg.attention_bias or cfg.output_bias or cfg.mlp_bias:
        return "biases in the attention or MLP"
    if jnp.dtype(dtype) != jnp.float32:
        return f"activations {jnp.dtype(dtype)} (the kernel keeps them in float32)"
    if jnp.dtype(cache_dtype) not in (jnp.float32, jnp.bfloat16):
        return f"cache {jnp.dtype(cache_dtype)} (the kernel's cache is float32 or bfloat16)"
    if weight_dtype(matmul_dtype) is None:
        return f"matmul dtype {jnp.dtype(matmul_dtype)} (the kernel's dots take bfloat16 or float32 operands)"
    odd = cfg.hidden_size % 2 or cfg.intermediate_size % 2 or (cfg.num_heads * cfg.head_dim) % 2
    if (odd and weight_dtype(matmul_dtype) == jnp.bfloat16) or cfg.rotary_dim % 2:
        return "an odd matmul input size or rotary dimension"
    return None


def machine_unsupported(matmul_dtype=jnp.bfloat16) -> str | None:
    """Why this machine cannot run the kernel with these matmul operands (None: it can): JAX on CPU, x86-64 Linux
    with AVX-512 and AVX-512 BF16 for bf16 operands, AVX-512 or AVX2 for fp32 ones (`kernel_isa`), a C++ compiler
    (`$CXX`, else g++)."""
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()} (the kernel is for XLA:CPU)"
    if kernel_isa(matmul_dtype) is None:
        if weight_dtype(matmul_dtype) == jnp.bfloat16:
            return "no AVX-512 BF16 on this CPU (bfloat16 matmuls)"
        return "no AVX-512 or AVX2 with FMA on this CPU"
    if _compiler() is None:
        return "no C++ compiler (g++, or $CXX)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _library_path(isa: str) -> Path:
    """Where the kernel built from this source with these flags and this JAX's FFI headers lives."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(CXX_FLAGS + ISAS[isa][0]).encode())
    digest.update(jax.ffi.include_dir().encode())
    digest.update(jax.__version__.encode())
    return cache_root() / "kernels" / f"decode_cpu-{isa}-{digest.hexdigest()[:16]}.so"


def build(isa: str) -> Path:
    """The compiled kernel of one build (`ISAS`), built on first use (compiled aside, renamed into place under the
    cache lock)."""
    path = _library_path(isa)
    with filling(path):
        if path.exists():
            return path
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("the CPU decode kernel needs a C++ compiler (g++, or $CXX)")
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            cmd = [compiler, *CXX_FLAGS, *ISAS[isa][0], "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"compiling the CPU decode kernel failed ({' '.join(cmd)}):\n{run.stderr}")
            os.replace(out, path)
    return path


@functools.lru_cache(maxsize=None)
def register(isa: str) -> None:
    """Builds (if needed) and loads one build of the kernel, and registers it with XLA:CPU under `targets(isa)`,
    once. A cache folder that cannot be written or a library that does not load is a RuntimeError naming the
    path."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build(isa)))
    except OSError as err:
        raise RuntimeError(f"the CPU decode kernel could not be built or loaded under {cache_root() / 'kernels'}: "
                           f"{err}") from err
    step, pack, matmul, transpose = targets(isa)
    jax.ffi.register_ffi_target(step, jax.ffi.pycapsule(library.KlqDecodeStep), platform="cpu")
    jax.ffi.register_ffi_target(pack, jax.ffi.pycapsule(library.KlqPackTiles), platform="cpu")
    jax.ffi.register_ffi_target(matmul, jax.ffi.pycapsule(library.KlqPackedMatmul), platform="cpu")
    jax.ffi.register_ffi_target(transpose, jax.ffi.pycapsule(library.KlqTranspose16), platform="cpu")


@functools.lru_cache(maxsize=None)
def available(matmul_dtype=jnp.bfloat16) -> bool:
    """Whether this process can run the kernel with these matmul operands: the machine supports it and its build
    compiles and loads."""
    if machine_unsupported(matmul_dtype) is not None:
        return False
    try:
        register(kernel_isa(matmul_dtype))
    except (RuntimeError, OSError):
        return False
    return True


def packed_shape(w: jax.Array, input_major: bool, dtype=jnp.bfloat16) -> tuple[int, ...]:
    *lead, a, b = w.shape
    i, o = (a, b) if input_major else (b, a)
    if jnp.dtype(dtype) == jnp.float32:
        return (*lead, -(-o // TILE), i, TILE)
    return (*lead, -(-o // TILE), i // 2, TILE, 2)


def pack_native(w: jax.Array, input_major: bool, dtype=jnp.bfloat16, isa: str | None = None) -> jax.Array:
    """`pack_io` (`input_major`) or `pack_oi` as a native call on the caller and XLA's pool: 0.31 -> 0.14 s for
    SmolLM2-135M's weights in bf16 (XLA's transposes took most of the time). fp32 denormals round to zero in bf16
    in the AVX-512 build; other values are the same bits. `isa`: the build (None: `kernel_isa(dtype)`)."""
    isa = _build_for(isa, dtype)
    register(isa)
    call = jax.ffi.ffi_call(targets(isa)[1], jax.ShapeDtypeStruct(packed_shape(w, input_major, dtype), dtype))
    return call(w, input_major=input_major)


def pack_oi(w_oi: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """[..., O, I] weights (out, in) as the kernel's tiles of 32 outputs (zero rows pad O); jnp's reference of
    `pack_native`. bf16: [..., ceil(O/32), I/2, 32, 2], each pair of inputs holding the 32 outputs' weights as
    adjacent bf16 pairs; fp32: [..., ceil(O/32), I, 32]."""
    return pack_io(jnp.swapaxes(w_oi, -1, -2), dtype)


def pack_io(w_io: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """`pack_oi` of [..., I, O] weights (in, out), without materialising the [O, I] transpose first."""
    *lead, i, o = w_io.shape
    pad = -o % TILE
    w = jnp.pad(w_io.astype(dtype), [(0, 0)] * len(lead) + [(0, 0), (0, pad)])
    n = len(lead)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.swapaxes(w.reshape(*lead, i, (o + pad) // TILE, TILE), n, n + 1)
    w = w.reshape(*lead, i // 2, 2, (o + pad) // TILE, TILE)
    return w.transpose(*range(n), n + 2, n, n + 3, n + 1)


@struct.dataclass
class DecodeWeights:
    """A Llama-family model's weights as the kernel reads them: norms fp32 [L, D] and [D]; matmul weights in
    bf16 or fp32 tiles (`pack_oi`), stacked over layers: q|k|v [L, (H+2K)hd, D], o [L, D, H*hd], gate|up [L, 2F, D],
    down [L, D, F], the LM head [V, D]."""

    ln1_ld: jax.Array
    ln2_ld: jax.Array
    final_d: jax.Array
    w_qkv: jax.Array
    w_o: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array
    w_head: jax.Array


def pack_weights(model, native: bool = True, isa: str | None = None) -> DecodeWeights:
    """`DecodeWeights` of a `CausalLM` (stacked blocks, [in, out] weights) for its matmul dtype (`weight_dtype`),
    inside the sampler's jit: one pass per rollout, as the XLA step's per-layer copies were. `native`: packed by
    `pack_native` (of build `isa`), else by jnp."""
    dtype = weight_dtype(model.matmul_dtype)
    if native:
        pack_io_ = functools.partial(pack_native, input_major=True, dtype=dtype, isa=isa)
        pack_oi_ = functools.partial(pack_native, input_major=False, dtype=dtype, isa=isa)
    else:
        pack_io_, pack_oi_ = functools.partial(pack_io, dtype=dtype), functools.partial(pack_oi, dtype=dtype)
    blocks = model.blocks
    lyr, d = blocks.wq_dnh[...].shape[:2]
    flat = lambda w: w[...].reshape(lyr, d, -1)  # noqa: E731  [L, D, out]

    def pack_concatenated(ws_io):  # the outputs of several [L, I, O_i] weights as one packed matrix
        if all(w.shape[-1] % TILE == 0 for w in ws_io):  # whole tiles: concatenate the packed (bf16: half the bytes)
            return jnp.concatenate([pack_io_(w) for w in ws_io], axis=-4 if dtype == jnp.bfloat16 else -3)
        return pack_io_(jnp.concatenate(ws_io, axis=-1))

    head = model.lm_head_vd()
    return DecodeWeights(
        ln1_ld=blocks.ln1_scale[...].astype(jnp.float32), ln2_ld=blocks.ln2_scale[...].astype(jnp.float32),
        final_d=model.final_scale[...].astype(jnp.float32),
        w_qkv=pack_concatenated([flat(blocks.wq_dnh), flat(blocks.wk_dkh), flat(blocks.wv_dkh)]),
        w_o=pack_io_(blocks.wo_nhd[...].reshape(lyr, -1, d)),
        w_gate_up=pack_concatenated([blocks.w_gate_df[...], blocks.w_up_df[...]]),
        w_down=pack_io_(blocks.w_down_fd[...]), w_head=pack_oi_(head))


def decode_step(weights: DecodeWeights, cfg: ModelConfig, x_nd: jax.Array, cos_nr: jax.Array, sin_nr: jax.Array,
                kv_mask_ns: jax.Array, cache_pos: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                num_threads: int | None = None, amx: bool | None = None, isa: str | None = None,
                states: jax.Array | None = None, states_step: jax.Array | int = 0, gate_up: jax.Array | None = None,
                inputs: jax.Array | None = None):
    """One decode step of N = B rows: `x_nd` the embedded tokens [N, D], `cos_nr`/`sin_nr` their RoPE tables
    [N, rotary_dim], `kv_mask_ns` the cache slots holding real tokens after this step's write at `cache_pos`,
    `k_cache`/`v_cache` [L, B, K, S, hd] float32 or bfloat16 (updated in place; bf16: this step's keys and values
    rounded to nearest even, the cache widened exactly as the attention reads it). Returns `(logits_nv, h_nd, k_cache,
    v_cache, states, gate_up, inputs)`: float32 logits, the final-normed hidden states (for a value head), the caches,
    and `states` [steps, L + 1, N, D] float32 (default: none, [0, L + 1, N, D]) with each layer's input then the last
    layer's output written at `states_step` (updated in place, as the caches: what `CausalLM.__call__(record_layers=True)`
    records, step by step; [steps, 1, N, D]: the last output only), then `gate_up` [N, L, S, 2F] uint16 (default: none,
    [N, L, 0, 2F]), the bf16 bits of each layer's gate|up projections written at slot `cache_pos` (updated in place:
    what `CausalLM.__call__(record_gate_up=True)` records), and `inputs` [N, L, S, D] uint16 (default: none, [N, L, 0,
    D]), the bf16 bits of each layer's input (rounded to nearest even) at slot `cache_pos`. `amx` None: where the
    CPU has it (`has_amx`); False: AVX-512 BF16 dot products only. `isa`: the build (None: `kernel_isa` of the
    packed weights' dtype)."""
    isa = _build_for(isa, weights.w_qkv.dtype)
    register(isa)
    n, d = x_nd.shape
    if states is None:
        states = jnp.zeros((0, cfg.num_layers + 1, n, d), jnp.float32)
    if gate_up is None:
        gate_up = jnp.zeros((n, cfg.num_layers, 0, 2 * cfg.intermediate_size), jnp.uint16)
    if inputs is None:
        inputs = jnp.zeros((n, cfg.num_layers, 0, d), jnp.uint16)
    call = jax.ffi.ffi_call(
        targets(isa)[0],
        (jax.ShapeDtypeStruct((n, cfg.vocab_size), jnp.float32), jax.ShapeDtypeStruct(x_nd.shape, jnp.float32),
         jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
         jax.ShapeDtypeStruct(states.shape, jnp.float32), jax.ShapeDtypeStruct(gate_up.shape, jnp.uint16),
         jax.ShapeDtypeStruct(inputs.shape, jnp.uint16)),
        input_output_aliases={13: 2, 14: 3, 15: 4, 17: 5, 18: 6})
    return call(x_nd.astype(jnp.float32), cos_nr, sin_nr, kv_mask_ns, jnp.asarray(cache_pos, jnp.int32),
                weights.ln1_ld, weights.ln2_ld, weights.final_d, weights.w_qkv, weights.w_o, weights.w_gate_up,
                weights.w_down, weights.w_head, k_cache, v_cache, states, jnp.asarray(states_step, jnp.int32), gate_up,
                inputs,
                eps=np.float32(cfg.norm_eps),
                num_heads=np.int64(cfg.num_heads), rotary_dim=np.int64(cfg.rotary_dim),
                num_threads=np.int64(num_threads or len(os.sched_getaffinity(0)) or 1),
                amx=bool(has_amx() if amx is None else amx))


def transpose_bits(x_ni: jax.Array) -> jax.Array:
    """`x.T` of a [N, I] uint16 array (bf16 bit patterns), as the kernel's custom call: a copy XLA:CPU cannot fuse
    `x`'s producer into (`transformer._weight_gradient(native_transpose=True)`). Needs a build this CPU runs
    (`kernel_isa(jnp.float32)`)."""
    isa = kernel_isa(jnp.float32)
    if isa is None or x_ni.dtype != jnp.uint16 or x_ni.ndim != 2:
        raise ValueError(f"transpose_bits: a [N, I] uint16 array on a CPU the kernel runs on (got {x_ni.dtype} "
                         f"{x_ni.shape}, build {isa})")
    register(isa)
    n, i = x_ni.shape
    return jax.ffi.ffi_call(targets(isa)[3], jax.ShapeDtypeStruct((i, n), jnp.uint16))(x_ni)


def packed_matmul_unsupported() -> str | None:
    """Why `packed_matmul` cannot run here (None: it can): it needs what the bf16 decode kernel needs
    (`machine_unsupported`) and AMX's bf16 tiles."""
    reason = machine_unsupported(jnp.bfloat16)
    if reason is None and not has_amx():
        reason = "no AMX bf16 tiles on this CPU"
    return reason


def packed_matmul(x: jax.Array, w_packed: jax.Array, out_features: int) -> jax.Array:
    """Float32 `x @ W^T` ([..., K] -> [..., out_features]) for W [out_features, K] packed in bf16 tiles
    (`pack_io` / `pack_native`: [ceil(out/32), K/2, 32, 2]), `x` rounded to bf16 (round to nearest even),
    accumulated in fp32 on AMX tile products (`packed_matmul_unsupported` says where they run): the bf16 x bf16 ->
    fp32 dot up to summation order. Forward only (no derivative): the matmuls of frozen models, whose weights are
    packed once (`transformer.CausalLM.pack_frozen_matmul_weights`). On SmolLM2-135M's forward shapes (1408 rows) on
    a 2-core Xeon VM: 1.1-1.4x the throughput of XLA:CPU's bf16 dots, 0.82-0.85x the time of the frozen forwards
    (`benchmarks/frozen_matmuls.py`; docs/performance.md, item 45)."""
    *lead, k = x.shape
    tiles, k2, tile, two = w_packed.shape
    if (tile, two) != (TILE, 2) or w_packed.dtype != jnp.bfloat16 or k2 * 2 != k or tiles != -(-out_features // TILE):
        raise ValueError(f"packed_matmul: weights {w_packed.shape} {w_packed.dtype} do not pack [{out_features}, {k}] "
                         f"in bf16 tiles of {TILE} outputs")
    register("avx512")
    m = int(np.prod(lead, dtype=np.int64))
    call = jax.ffi.ffi_call(targets("avx512")[2], jax.ShapeDtypeStruct((m, out_features), jnp.float32))
    return call(x.reshape(m, k).astype(jnp.bfloat16), w_packed).reshape(*lead, out_features)
