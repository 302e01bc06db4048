// One decode step of a Llama-family LM on x86 CPUs with AVX-512 or AVX2, as one XLA FFI custom call.
//
// Why: a token's decode step reads every weight once and does little else, so its floor is the time to
// stream the weights. XLA:CPU runs it as ~780 thunks, each with a fixed cost, and the step took ~2x the
// weights' streaming time (docs/performance.md, item 43). Here the whole step (the layers, the final norm and
// the LM head) is one call on weights packed once per rollout, on the caller and helpers borrowed from XLA's
// thread pool. bf16 matmuls: AMX tile products where the CPU has them, else AVX-512 BF16 dot products
// (vdpbf16ps); fp32 matmuls: AVX-512 FMAs, or AVX2 FMAs in the AVX2 build.
//
// `PackedMatmul` (AVX-512 build, AMX): x W^T for weights packed once in the same tiles, the layer matmuls of a frozen
// model's forward (the reference, a reward model).
//
// Two builds of this file: with AVX-512 (+ BF16, AMX) flags, and with AVX2 + FMA only (`__AVX512F__` undefined),
// for CPUs without AVX-512 (most laptops); the AVX2 build runs fp32 matmuls only.
//
// The arithmetic is the feature-major XLA step's (`Block.decode_feature_major`): with bf16 matmuls, activations
// rounded to bf16 (round to nearest even) as matmul operands, fp32 accumulation; RMS norms, RoPE, attention over
// the cache (fp32, or bf16 widened as it is read), softmax and SiLU in fp32. Values differ from XLA's only by
// summation order.
//
// Packed weights: a matrix W [O, I] (out, in) is stored in tiles of 32 outputs (O padded to a multiple of 32 with
// zero rows). bf16: [O/32][I/2][32][2] (I even), each pair of inputs (2k, 2k+1) holding the 32 outputs' weights
// as adjacent bf16 pairs, so one 64-byte load feeds 16 outputs; fp32: [O/32][I][32]. Each tile is one contiguous
// stream.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 32;  // outputs per packed tile
constexpr int kRows = 8;   // activation rows per pass over a tile (16 accumulators)
constexpr int kPrefetch = 16;  // pairs ahead (2 KiB of the tile): 17-19 -> 18-24 GB/s against 8 on a 2-core Xeon
// and into L2 further ahead (8 KiB: into the next tile near a tile's end): two threads streaming SmolLM2's 270 MB of
// decode weights through this loop, a scratch on the Zen 4 VM: 8.6-9.2 -> 8.1-8.4 ms (31-33 -> 33-35 GB/s)
constexpr int kPrefetchL2 = 64;

// Vectors of fp32 for the step's elementwise work: 16 lanes (AVX-512) or 8 (AVX2). `*_first(.., n)` touch the
// first n lanes only (n may exceed the width).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vfloat = __m512;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vset(float a) { return _mm512_set1_ps(a); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vfloat vclamp(vfloat x, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline __m128 vhalves(vfloat v) {  // the 4 partial sums of v's 128-bit quarters, added lane by lane
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));  // AVX-512F only
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline __mmask16 first_lanes(int n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
inline vfloat vload_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline void vstore_first(float* p, vfloat v, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
inline vfloat vkeep_first(vfloat v, int n) { return _mm512_maskz_mov_ps(first_lanes(n), v); }
inline vfloat vround(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vfloat vscale2(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
#else
constexpr int kLanes = 8;
using vfloat = __m256;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vset(float a) { return _mm256_set1_ps(a); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }
inline vfloat vclamp(vfloat x, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}
inline __m128 vhalves(vfloat v) { return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vfloat vload_first(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline void vstore_first(float* p, vfloat v, int n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
inline vfloat vkeep_first(vfloat v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n))); }
inline vfloat vround(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for whole n in [-126, 127] (a normal float's exponent: vexp's clamp keeps n there).
inline vfloat vscale2(vfloat p, vfloat n) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// The sums of 4 vectors' lanes, as one 4-lane vector: 4 horizontal sums in one reduction tree.
inline __m128 vsum4(vfloat a, vfloat b, vfloat c, vfloat d) {
  return _mm_hadd_ps(_mm_hadd_ps(vhalves(a), vhalves(b)), _mm_hadd_ps(vhalves(c), vhalves(d)));
}

// exp lane by lane (Cephes' expf polynomial, ~1 ulp over the clamped range); inputs below -87.3 give ~0.
inline vfloat vexp(vfloat x) {
  x = vclamp(x, -87.3f, 88.3f);
  const vfloat n = vround(vmul(x, vset(1.44269504088896341f)));
  vfloat r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vfloat p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vscale2(p, n);
}

inline uint16_t to_bf16(float f) {  // round to nearest even (XLA's f32 -> bf16 convert; no NaN inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX512F__)
// to_bf16 on 16 floats, bit for bit (integer ops: AVX-512 BF16's convert flushes denormals, XLA's does not).
inline __m256i to_bf16x16(const float* p) {
  const __m512i u = _mm512_loadu_si512(p);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// The first `rows` rows of a tile's results c [kRows][32] into y[r, o0..], cut at `out`.
inline void store_rows(const float (*c)[kTile], float* y, int y_stride, int o0, int out, int rows) {
  const int n = std::min(kTile, out - o0);
  for (int r = 0; r < rows; ++r) std::memcpy(y + static_cast<int64_t>(r) * y_stride + o0, c[r], sizeof(float) * n);
}

#if defined(__AVX512F__)  // the AVX-512 build: bf16 matmuls on AVX-512 BF16 and AMX

// x [rows, in] fp32 -> pairs [groups of kRows rows][in/2] as uint32 (two bf16), rows past `rows` zero.
void pack_rows(const float* x, int rows, int in, int x_stride, uint32_t* pairs) {
  const int in2 = in / 2;
  const int padded = (rows + kRows - 1) / kRows * kRows;
  for (int r = 0; r < padded; ++r) {
    uint32_t* dst = pairs + static_cast<int64_t>(r) * in2;
    if (r >= rows) {
      std::memset(dst, 0, sizeof(uint32_t) * in2);
      continue;
    }
    const float* src = x + static_cast<int64_t>(r) * x_stride;
    // A pair (2k, 2k+1) as one uint32 is the two bf16 in memory order (little-endian): 16 at a time.
    auto* dst16 = reinterpret_cast<uint16_t*>(dst);
    int i = 0;
    for (; i + 16 <= 2 * in2; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst16 + i), to_bf16x16(src + i));
    for (; i < 2 * in2; ++i) dst16[i] = to_bf16(src[i]);
  }
}

// The first `rows` rows of a tile's accumulators (8 rows x 32 outputs) into y[r, o0..], cut at `out`.
inline void store_tile(const __m512 (&acc)[kRows][2], float* y, int y_stride, int o0, int out, int rows) {
  const int n = std::min(kTile, out - o0);
  for (int r = 0; r < rows; ++r) {
    float* dst = y + static_cast<int64_t>(r) * y_stride + o0;
    if (n == kTile) {
      _mm512_storeu_ps(dst, acc[r][0]);
      _mm512_storeu_ps(dst + 16, acc[r][1]);
    } else {
      alignas(64) float tmp[kTile];
      _mm512_store_ps(tmp, acc[r][0]);
      _mm512_store_ps(tmp + 16, acc[r][1]);
      std::memcpy(dst, tmp, sizeof(float) * n);
    }
  }
}

// y[r, o0 + j] = sum_i x[r, i] * W[o0 + j, i] for the 32 outputs of one tile and kRows rows of pairs.
inline void tile_dot(const uint16_t* w_tile, const uint32_t* pairs, int in2, float* y, int y_stride, int o0,
                     int out, int rows) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int k = 0; k < in2; ++k) {
    const __m512i w0 = _mm512_loadu_si512(w_tile + 64 * k);
    const __m512i w1 = _mm512_loadu_si512(w_tile + 64 * k + 32);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + 64 * (k + kPrefetch)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + 64 * (k + kPrefetch) + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + 64 * (k + kPrefetchL2)), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + 64 * (k + kPrefetchL2) + 32), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(pairs[r * in2 + k]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)xb);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w1, (__m512bh)xb);
    }
  }
  store_tile(acc, y, y_stride, o0, out, rows);
}


// AMX (Sapphire Rapids and later): one tile product C[8 x 16] += A[8 x 32] B[32 x 16] per 16 input pairs, so the
// matvec is bound by memory alone; with prefetching 48 pairs ahead it read 26-47 GB/s on two cores of a Xeon VM,
// against 17-24 for the AVX-512 BF16 loop (a scratch harness on SmolLM2's shapes). Tiles: C0, C1 (the tile's
// two halves of 16 outputs), A (8 rows of activation pairs), B0, B1 (16 pairs x 16 outputs each).
constexpr int kAmxPrefetch = 48;

struct alignas(64) TileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX's tile data state only on request (XLA:CPU's own AMX kernels make the same one).
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// Each thread configures its tiles once per call and puts back the configuration it found when it leaves, so
// XLA's own AMX kernels on the same threads find theirs.
struct AmxThreadState {
  uint64_t call = 0;
  TileConfig saved;
};
thread_local AmxThreadState amx_state;

// `gemm`: the tiles of `gemm_block` (8 tiles of 16 rows), else those of `tile_dot_amx`.
inline void amx_enter(uint64_t call, bool gemm = false) {
  if (amx_state.call == call) return;
  _tile_storeconfig(&amx_state.saved);
  TileConfig cfg;
  cfg.palette = 1;
  if (gemm) {
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
  } else {
    for (int t = 0; t < 5; ++t) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = kRows;
    cfg.rows[3] = cfg.rows[4] = 16;
  }
  _tile_loadconfig(&cfg);
  amx_state.call = call;
}

inline void amx_leave(uint64_t call) {
  if (call == 0 || amx_state.call != call) return;
  if (amx_state.saved.palette == 0) {
    _tile_release();
  } else {
    _tile_loadconfig(&amx_state.saved);
  }
  amx_state.call = 0;
}

// tile_dot on AMX: the first in2 - in2 % 16 pairs as tile products, the rest as AVX-512 BF16 dot products.
inline void tile_dot_amx(const uint16_t* w_tile, const uint32_t* pairs, int in2, float* y, int y_stride, int o0,
                         int out, int rows) {
  const int in2_tiles = in2 - in2 % 16;
  _tile_zero(0);
  _tile_zero(1);
  for (int k = 0; k < in2_tiles; k += 16) {
    // every 64-byte line of the 16 pairs 48 ahead (2 KiB: a pair is 128 bytes; one prefetch per pair, every other
    // line, left the rest to the hardware: 8 x 128-token bf16 rollouts 2.16-2.27 s against 2.02-2.10 now)
    for (int q = 0; q < 32; ++q)
      _mm_prefetch(reinterpret_cast<const char*>(w_tile + 64 * (k + kAmxPrefetch) + 32 * q), _MM_HINT_T0);
    _tile_loadd(2, pairs + k, in2 * 4);
    _tile_loadd(3, w_tile + 64 * k, 128);
    _tile_loadd(4, w_tile + 64 * k + 32, 128);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  alignas(64) float c[kRows][kTile];
  _tile_stored(0, &c[0][0], sizeof(float) * kTile);
  _tile_stored(1, &c[0][16], sizeof(float) * kTile);
  for (int k = in2_tiles; k < in2; ++k) {
    const __m512i w0 = _mm512_loadu_si512(w_tile + 64 * k);
    const __m512i w1 = _mm512_loadu_si512(w_tile + 64 * k + 32);
    for (int r = 0; r < kRows; ++r) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(pairs[r * in2 + k]));
      _mm512_store_ps(&c[r][0], _mm512_dpbf16_ps(_mm512_load_ps(&c[r][0]), (__m512bh)w0, (__m512bh)xb));
      _mm512_store_ps(&c[r][16], _mm512_dpbf16_ps(_mm512_load_ps(&c[r][16]), (__m512bh)w1, (__m512bh)xb));
    }
  }
  store_rows(c, y, y_stride, o0, out, rows);
}

// C [32 x 32] (fp32, row stride c_stride floats) = 32 rows of x (bf16, row stride k) times one packed tile of W
// (32 outputs, k2 = k/2 input pairs), on AMX: tiles C0-C3 (2 x 2 blocks of 16 rows x 16 outputs), A0, A1 (16 rows
// x 16 pairs each), B0, B1 (16 pairs x 16 outputs). The pairs past the last whole 16 (k2 % 16) are added by
// AVX-512 BF16 dot products.
inline void gemm_block(const uint16_t* x, int64_t k, const uint16_t* w_tile, int k2, float* c, int64_t c_stride) {
  const int k2_tiles = k2 - k2 % 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int p = 0; p < k2_tiles; p += 16) {
    _tile_loadd(4, x + 2 * p, k * 2);
    _tile_loadd(5, x + 16 * k + 2 * p, k * 2);
    _tile_loadd(6, w_tile + 64 * p, 128);
    _tile_loadd(7, w_tile + 64 * p + 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride * 4);
  _tile_stored(1, c + 16, c_stride * 4);
  _tile_stored(2, c + 16 * c_stride, c_stride * 4);
  _tile_stored(3, c + 16 * c_stride + 16, c_stride * 4);
  for (int p = k2_tiles; p < k2; ++p) {
    const __m512i w0 = _mm512_loadu_si512(w_tile + 64 * p);
    const __m512i w1 = _mm512_loadu_si512(w_tile + 64 * p + 32);
    for (int r = 0; r < 32; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * k + 2 * p, 4);
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(pair));
      float* row = c + r * c_stride;
      _mm512_storeu_ps(row, _mm512_dpbf16_ps(_mm512_loadu_ps(row), (__m512bh)w0, (__m512bh)xb));
      _mm512_storeu_ps(row + 16, _mm512_dpbf16_ps(_mm512_loadu_ps(row + 16), (__m512bh)w1, (__m512bh)xb));
    }
  }
}

#else  // the AVX2 build: no bf16 matmuls, no AMX

bool amx_permitted() { return false; }
inline void amx_enter(uint64_t, bool = false) {}
inline void amx_leave(uint64_t) {}

#endif

// The step's parallel loops run on the caller and on helpers borrowed from XLA:CPU's intra-op thread pool (no
// threads of our own to compete with XLA's). Each loop's tasks are claimed one at a time from a counter that
// also holds the loop's number and size, so a helper that starts late, or never, only changes who does the
// work: the caller runs whatever is left and waits only for tasks already claimed.
class Team {
 public:
  // A team of the caller and up to `max_helpers` tasks scheduled on XLA's pool. Nobody waits for a helper to
  // start: one that starts after the work (a busy pool) leaves at once, and one that `Schedule` runs inline on
  // the caller (no pool) returns at once. The shared pointer keeps the team alive for a late one.
  static std::shared_ptr<Team> Gather(ffi::ThreadPool& pool, int64_t max_helpers, bool amx = false) {
    static std::atomic<uint64_t> calls{0};
    auto team = std::make_shared<Team>();
    team->amx_call_ = amx ? ++calls : 0;
    const auto caller = std::this_thread::get_id();
    const int64_t helpers = std::min<int64_t>(max_helpers, pool.num_threads());
    team->size_ = 1 + static_cast<int>(helpers);
    for (int64_t i = 0; i < helpers; ++i) {
      pool.Schedule([team, caller] {
        if (std::this_thread::get_id() != caller) team->Help();
      });
    }
    return team;
  }

  // Runs fn(0) .. fn(ntasks - 1), some on helpers; returns when all have finished.
  void parallel_for(int ntasks, const std::function<void(int)>& fn) {
    if (ntasks <= 0) return;
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    ++loop_;
    claim_.store(Pack(loop_, ntasks, 0), std::memory_order_release);
    Work();
    while (done_.load(std::memory_order_acquire) < ntasks) _mm_pause();
  }

  // No more loops: returns once no helper is inside the team (those that enter later leave at once), and the
  // caller's tiles are configured as they were.
  void Finish() {
    finished_.store(true);  // sequentially consistent with `inside_`: see Help
    while (inside_.load() > 0) _mm_pause();
    amx_leave(amx_call_);
  }

  // The caller and the helpers asked for (some may never come).
  int size() const { return size_; }

  // Nonzero: the loops run AMX tile products under this call's number (`amx_enter`).
  uint64_t amx_call() const { return amx_call_; }

 private:
  // A helper's life: run the loops' tasks until `Finish`. Entering before reading `finished_` (both sequentially
  // consistent) means Finish either waits for this helper or this helper sees it finished.
  void Help() {
    inside_.fetch_add(1);
    while (!finished_.load()) {
      if (!Work()) _mm_pause();
    }
    amx_leave(amx_call_);
    inside_.fetch_sub(1);
  }

  static uint64_t Pack(uint64_t loop, uint64_t ntasks, uint64_t next) {
    return (loop << 48) | (ntasks << 24) | next;
  }

  // Claims and runs tasks of the current loop; false if there was none to claim.
  bool Work() {
    bool worked = false;
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t ntasks = (v >> 24) & 0xffffff, next = v & 0xffffff;
      if (next >= ntasks) return worked;
      if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // A claimed task keeps its loop alive (the caller waits for it), so fn_ is that loop's.
      (*fn_)(static_cast<int>(next));
      done_.fetch_add(1, std::memory_order_release);
      worked = true;
      v = claim_.load(std::memory_order_acquire);
    }
  }

  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0};
  std::atomic<int> inside_{0};
  std::atomic<bool> finished_{false};
  const std::function<void(int)>* fn_ = nullptr;
  uint64_t loop_ = 0;
  uint64_t amx_call_ = 0;
  int size_ = 1;
};

// Tiles per claimed run when a team splits `tiles` tiles: about two runs per member, at most 16 tiles each (few
// claims for the head's 1536 tiles), or with `one_run_each` one run per member (see `kF32OneRunEach`). A run is one
// contiguous stream of weights, where the prefetches run on into the next tile; one tile per claim had the two
// threads take turns, each tile a fresh stream (a scratch matvec over SmolLM2's 270 MB: 23-25 GB/s against 29-30 in
// runs of 16; the decode step 11.8-12.4 -> 11.4-11.7 ms at slot 110).
inline int run_tiles(const Team& team, int tiles, bool one_run_each) {
  if (one_run_each) return std::max(1, (tiles + team.size() - 1) / team.size());
  const int runs = 2 * team.size();
  return std::max(1, std::min(16, (tiles + runs - 1) / runs));
}

// Runs tile(t, r0, next_in_run, task) for every tile t of `out` outputs and every group of kRows rows from r0, the
// tiles split over the team in runs of `run_tiles(team, tiles, one_run_each)` adjacent tiles (task: the run's number;
// next_in_run: whether t + 1 is in this run).
template <typename TileFn>
void over_tiles(Team& team, int rows, int out, bool one_run_each, const TileFn& tile) {
  const int tiles = (out + kTile - 1) / kTile;
  const int per_task = run_tiles(team, tiles, one_run_each);
  team.parallel_for((tiles + per_task - 1) / per_task, [&](int task) {
    const int run_end = std::min(tiles, (task + 1) * per_task);
    for (int t = task * per_task; t < run_end; ++t) {
      for (int r0 = 0; r0 < rows; r0 += kRows) tile(t, r0, t + 1 < run_end, task);
    }
  });
}

#if defined(__AVX512F__)
// y [rows, out] (row stride y_stride) = x W^T with W packed in bf16 ([ceil(out/32)][in/2][32][2]), on AMX tiles
// where the team runs them. `pairs`: x from `pack_rows`.
void matvec(Team& team, const uint16_t* w_packed, const uint32_t* pairs, int rows, int in, int out, float* y,
            int y_stride) {
  const int in2 = in / 2;
  const int64_t tile_elems = static_cast<int64_t>(in2) * 64;
  const uint64_t amx_call = team.amx_call();
  over_tiles(team, rows, out, false, [&](int t, int r0, bool, int) {
    if (amx_call) amx_enter(amx_call);
    (amx_call ? tile_dot_amx : tile_dot)(w_packed + t * tile_elems, pairs + static_cast<int64_t>(r0) * in2, in2,
                                         y + static_cast<int64_t>(r0) * y_stride, y_stride, t * kTile, out,
                                         std::min(kRows, rows - r0));
  });
}
#endif

// fp32 weights (fp32 matmuls): a tile is [in][32] fp32, 128 bytes per input, and each row's input is broadcast
// into 16 FMA accumulators (8 rows x 32 outputs). `x_rows`: kRows rows of `in` floats (zero rows past `rows`).
constexpr int kF32Prefetch = 24;  // inputs ahead (3 KiB of the tile): 8 x 128 fp32 rollouts 5.3-5.5 -> 5.1 s against 8

#if defined(__AVX512F__)
inline void tile_dot_f32(const float* w_tile, const float* x_rows, int in, float* y, int y_stride, int o0, int out,
                         int rows, const float* /*next*/, int /*next_in*/) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int i = 0; i < in; ++i) {
    const __m512 w0 = _mm512_loadu_ps(w_tile + kTile * i);
    const __m512 w1 = _mm512_loadu_ps(w_tile + kTile * i + 16);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + kTile * (i + kF32Prefetch)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + kTile * (i + kF32Prefetch) + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + kTile * (i + kPrefetchL2)), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w_tile + kTile * (i + kPrefetchL2) + 16), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 xb = _mm512_set1_ps(x_rows[r * in + i]);
      acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
    }
  }
  store_tile(acc, y, y_stride, o0, out, rows);
}
#else
// AVX2 has 16 vector registers, too few for 8 rows x 32 outputs: the tile is read once per group of 3 rows (12
// accumulators, a weight vector, 3 broadcasts), memory once, cache for the other groups. That first pass alone
// would wait on memory while the other two compute with memory idle, so the first two passes also stream the
// run's next tile into L2 (`next`, null for none), each half its lines: on a Zen 1 VM a scratch of the step's
// matmuls (8 rows, SmolLM2's 540 MB of fp32 weights, two threads) took ~15% less time per step.
template <int NR>
inline void rows_dot_f32(const float* w_tile, const float* x, int in, float (*c)[kTile], const char* next,
                         int next_lines) {
  __m256 acc[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int i = 0; i < in; ++i) {
    const float* w = w_tile + kTile * i;
    _mm_prefetch(reinterpret_cast<const char*>(w + kTile * kF32Prefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kTile * kF32Prefetch + 16), _MM_HINT_T0);
    if (i < next_lines) _mm_prefetch(next + 64 * static_cast<int64_t>(i), _MM_HINT_T1);
    if (i + in < next_lines) _mm_prefetch(next + 64 * static_cast<int64_t>(i + in), _MM_HINT_T1);
    __m256 xb[NR];
    for (int r = 0; r < NR; ++r) xb[r] = _mm256_broadcast_ss(x + r * in + i);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 wq = _mm256_loadu_ps(w + 8 * q);
      for (int r = 0; r < NR; ++r) acc[r][q] = _mm256_fmadd_ps(wq, xb[r], acc[r][q]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int q = 0; q < 4; ++q) _mm256_store_ps(&c[r][8 * q], acc[r][q]);
}

inline void tile_dot_f32(const float* w_tile, const float* x_rows, int in, float* y, int y_stride, int o0, int out,
                         int rows, const float* next, int next_in) {
  alignas(32) float c[kRows][kTile];
  // The next tile's 2 * next_in lines of 64 bytes, split over the first (at most) two passes.
  const int next_lines = next == nullptr ? 0 : 2 * next_in;
  const int passes = std::min(2, (rows + 2) / 3);
  const int per_pass = (next_lines + passes - 1) / passes;
  const char* next_bytes = reinterpret_cast<const char*>(next);
  for (int r0 = 0, pass = 0; r0 < rows; r0 += 3, ++pass) {
    const char* pass_next = next_bytes + 64 * static_cast<int64_t>(per_pass) * pass;
    const int pass_lines = std::max(0, std::min(per_pass, next_lines - per_pass * pass));
    const int group = std::min(3, rows - r0);
    const float* x = x_rows + r0 * in;
    if (group == 3) rows_dot_f32<3>(w_tile, x, in, c + r0, pass_next, pass_lines);
    if (group == 2) rows_dot_f32<2>(w_tile, x, in, c + r0, pass_next, pass_lines);
    if (group == 1) rows_dot_f32<1>(w_tile, x, in, c + r0, pass_next, pass_lines);
  }
  store_rows(c, y, y_stride, o0, out, rows);
}
#endif

// fp32 matvecs split one run per team member on AVX2: a member's run is then its whole share of the matrix, one
// stream, whose last tile also streams into L2 the first tile this member will likely claim of the step's next
// matrix (`w_next`: next_in x next_out, null for none). Over a SmolLM2 step's 121 fp32 matvecs
// (`benchmarks/decode_split.py`; Zen 1 VM, two threads, five runs of 30 alternations) runs of at most 16 tiles took
// 1.06-1.16x the time of one flat stream over the same bytes (the head's 96 runs alone 14.1 against 16.4 GB/s); one
// run each 0.94-0.99x their time, with the next matrix's first tile 0.91-1.02x (median of the five 0.94x); 8 x 128
// rollouts 0.95x (median of 12 alternations).
#if defined(__AVX512F__)
constexpr bool kF32OneRunEach = false;  // not measured on AVX-512 CPUs: their split stays as it was
#else
constexpr bool kF32OneRunEach = true;
#endif

// `matvec` on fp32 tiles ([ceil(out/32)][in][32]); `x_rows` from `pack_rows_f32`.
void matvec_f32(Team& team, const float* w_packed, const float* x_rows, int rows, int in, int out, float* y,
                int y_stride, const float* w_next, int next_in, int next_out) {
  const int64_t tile_elems = static_cast<int64_t>(in) * kTile;
  const int next_tiles = (next_out + kTile - 1) / kTile;
  const int next_per_task = w_next ? run_tiles(team, next_tiles, kF32OneRunEach) : 0;
  over_tiles(team, rows, out, kF32OneRunEach, [&](int t, int r0, bool next_in_run, int task) {
    const float* w_tile = w_packed + t * tile_elems;
    const float* next = nullptr;
    int lines_in = in;
    if (r0 == 0 && next_in_run) {
      next = w_tile + tile_elems;
    } else if (r0 == 0 && w_next && kF32OneRunEach && task * next_per_task < next_tiles) {
      next = w_next + static_cast<int64_t>(task) * next_per_task * next_in * kTile;
      lines_in = next_in;
    }
    tile_dot_f32(w_tile, x_rows + static_cast<int64_t>(r0) * in, in, y + static_cast<int64_t>(r0) * y_stride,
                 y_stride, t * kTile, out, std::min(kRows, rows - r0), next, lines_in);
  });
}

// x [rows, in] (row stride x_stride) -> groups of kRows rows of `in` floats, rows past `rows` zero.
void pack_rows_f32(const float* x, int rows, int in, int x_stride, float* out) {
  const int padded = (rows + kRows - 1) / kRows * kRows;
  for (int r = 0; r < padded; ++r) {
    float* dst = out + static_cast<int64_t>(r) * in;
    if (r >= rows) {
      std::memset(dst, 0, sizeof(float) * in);
    } else {
      std::memcpy(dst, x + static_cast<int64_t>(r) * x_stride, sizeof(float) * in);
    }
  }
}

// The sum of squares in kLanes partial sums (one dependent add per kLanes entries: the step's norms ran
// one scalar add after another, a latency chain of d adds per row).
void rms_norm(const float* x, const float* scale, int d, float eps, float* y) {
  vfloat ss_v = vzero();
  for (int i = 0; i < d; i += kLanes) {
    const vfloat v = vload_first(x + i, d - i);
    ss_v = vfma(v, v, ss_v);
  }
  const float inv = 1.f / std::sqrt(vsum(ss_v) / d + eps);
  const vfloat inv_v = vset(inv);
  for (int i = 0; i < d; i += kLanes)
    vstore_first(y + i, vmul(vmul(vload_first(x + i, d - i), inv_v), vload_first(scale + i, d - i)), d - i);
}

// x[i] += y[i] for i < n.
void add_into(float* x, const float* y, int n) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, vadd(vload(x + i), vload(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

// In place: the first `rot` entries of one head rotated by HF's rotate-half RoPE; the rest pass through.
void rope(float* x, const float* cos, const float* sin, int rot) {
  const int half = rot / 2;
  int j = 0;
  for (; j + kLanes <= half; j += kLanes) {
    const vfloat a = vload(x + j), b = vload(x + j + half);
    vstore(x + j, vfnma(b, vload(sin + j), vmul(a, vload(cos + j))));
    vstore(x + j + half, vfma(a, vload(sin + j + half), vmul(b, vload(cos + j + half))));
  }
  for (; j < half; ++j) {
    const float a = x[j], b = x[j + half];
    x[j] = a * cos[j] - b * sin[j];
    x[j + half] = b * cos[j + half] + a * sin[j + half];
  }
}

struct Dims {
  int layers, batch, d, heads, kv_heads, hd, rot, ffn, vocab, slots, qkv_out;
};

// The KV cache holds fp32 or bf16 (uint16_t bit patterns, widened exactly as they are read; this step's keys and
// values rounded to nearest even as they are written: XLA's convert).
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline vfloat vload_row(const float* p) { return vload(p); }
inline vfloat vload_row(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
#else
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
#endif
}
inline void store_row(float* dst, const float* src, int n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void store_row(uint16_t* dst, const float* src, int n) {
  int j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), to_bf16x16(src + j));
#endif
  for (; j < n; ++j) dst[j] = to_bf16(src[j]);
}

template <typename T>
inline float dot_hd(const float* a, const T* b, int hd) {
  if (hd % kLanes == 0) {
    vfloat acc = vzero();
    for (int j = 0; j < hd; j += kLanes) acc = vfma(vload(a + j), vload_row(b + j), acc);
    return vsum(acc);
  }
  float dot = 0.f;
  for (int j = 0; j < hd; ++j) dot += a[j] * widen(b[j]);
  return dot;
}

// out += p * v over hd entries.
template <typename T>
inline void axpy_hd(float p, const T* v, float* out, int hd) {
  if (hd % kLanes == 0) {
    const vfloat pv = vset(p);
    for (int j = 0; j < hd; j += kLanes) vstore(out + j, vfma(pv, vload_row(v + j), vload(out + j)));
    return;
  }
  for (int j = 0; j < hd; ++j) out[j] += p * widen(v[j]);
}

// probs [G][n_valid] (each head's softmax, normalised) -> out [G][hd] = sum_i probs[g][i] * V[slot_i], with the
// G heads' outputs held in registers (kAttVecs vectors of each at a time) and each value row read once for all G:
// 0.03 -> ~0.02 ms per valid slot of a SmolLM2 step (axpy_hd per head loaded and stored its output at every slot).
constexpr int kAttVecs = kLanes == 16 ? 4 : 2;  // AVX-512: 4 x G <= 16 accumulators; AVX2: 2 x G <= 8

constexpr int kAttPrefetch = 4;  // key rows ahead

template <typename T>
inline void prefetch_row(const T* row, int n) {
  for (int j = 0; j < n; j += 64 / static_cast<int>(sizeof(T)))
    _mm_prefetch(reinterpret_cast<const char*>(row + j), _MM_HINT_T0);
}

template <int G, typename T>
void weighted_values(const float* probs, int stride, const T* v_sh, const int* slots_valid, int n_valid, int hd,
                     float* out_gh) {
  for (int c0 = 0; c0 < hd; c0 += kAttVecs * kLanes) {
    const int nc = std::min(kAttVecs, (hd - c0) / kLanes);
    vfloat acc[G][kAttVecs];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < kAttVecs; ++c) acc[g][c] = vzero();
    for (int i = 0; i < n_valid; ++i) {
      const T* v = v_sh + static_cast<int64_t>(slots_valid[i]) * hd + c0;
      vfloat p[G];
      for (int g = 0; g < G; ++g) p[g] = vset(probs[g * stride + i]);
      for (int c = 0; c < kAttVecs; ++c) {
        if (c >= nc) break;
        const vfloat vv = vload_row(v + c * kLanes);
        for (int g = 0; g < G; ++g) acc[g][c] = vfma(p[g], vv, acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < nc; ++c) vstore(out_gh + g * hd + c0 + c * kLanes, acc[g][c]);
  }
}

// Softmax attention of one row's G query heads of KV head `kh` over its valid cache slots (fp32 arithmetic on
// an fp32 or bf16 cache). `slots_valid` lists the valid slots (n_valid of them); `scores` has room for G x (n_valid
// padded to 16) floats. Each key row is read once for the G heads.
template <typename T>
void attend(const Dims& dm, const float* q_gh, const T* k_sh, const T* v_sh, const int* slots_valid,
            int n_valid, float* out_gh, float* scores) {
  const int g_heads = dm.heads / dm.kv_heads, hd = dm.hd;
  const float scale = std::sqrt(static_cast<float>(hd));
  if (n_valid == 0) {  // every key masked (no real token): XLA's finite mask gives the mean over all slots
    std::fill(out_gh, out_gh + g_heads * hd, 0.f);
    for (int g = 0; g < g_heads; ++g)
      for (int s = 0; s < dm.slots; ++s)
        axpy_hd(1.f / dm.slots, v_sh + static_cast<int64_t>(s) * hd, out_gh + g * hd, hd);
    return;
  }
  const int stride = (n_valid + 15) / 16 * 16;
  int i = 0;
  if (hd % kLanes == 0) {  // 4 slots at a time: 4 independent dot products per head, summed in one tree
    const __m128 scale4 = _mm_set1_ps(scale);
    for (; i + 4 <= n_valid; i += 4) {
      const T* k[4];
      for (int j = 0; j < 4; ++j) {
        k[j] = k_sh + static_cast<int64_t>(slots_valid[i + j]) * hd;
        // the cache rows are short streams (n_valid x hd floats): ask for the keys a few slots ahead, and for
        // these slots' values, which the weighted sum reads next
        if (i + j + kAttPrefetch < n_valid)
          prefetch_row(k_sh + static_cast<int64_t>(slots_valid[i + j + kAttPrefetch]) * hd, hd);
        prefetch_row(v_sh + static_cast<int64_t>(slots_valid[i + j]) * hd, hd);
      }
      for (int g = 0; g < g_heads; ++g) {
        const float* q = q_gh + g * hd;
        vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()};
        for (int c = 0; c < hd; c += kLanes) {
          const vfloat qc = vload(q + c);
          for (int j = 0; j < 4; ++j) acc[j] = vfma(qc, vload_row(k[j] + c), acc[j]);
        }
        _mm_storeu_ps(scores + g * stride + i, _mm_div_ps(vsum4(acc[0], acc[1], acc[2], acc[3]), scale4));
      }
    }
  }
  for (; i < n_valid; ++i) {
    prefetch_row(v_sh + static_cast<int64_t>(slots_valid[i]) * hd, hd);
    const T* k = k_sh + static_cast<int64_t>(slots_valid[i]) * hd;
    for (int g = 0; g < g_heads; ++g) scores[g * stride + i] = dot_hd(q_gh + g * hd, k, hd) / scale;
  }
  const bool vectors = hd % kLanes == 0 && g_heads <= 4;
  for (int g = 0; g < g_heads; ++g) {
    float* sc = scores + g * stride;
    float mx = -INFINITY;
    for (int i = 0; i < n_valid; ++i) mx = std::max(mx, sc[i]);
    vfloat sum_v = vzero();
    const vfloat mx_v = vset(mx);
    for (int i = 0; i < n_valid; i += kLanes) {
      const vfloat e = vexp(vsub(vload_first(sc + i, n_valid - i), mx_v));
      vstore_first(sc + i, e, n_valid - i);
      sum_v = vadd(sum_v, vkeep_first(e, n_valid - i));
    }
    // Normalised here, a vector division per kLanes slots, as XLA's softmax does before its dot (correctly
    // rounded quotients, whatever the width). Dividing the weighted sums instead (stop 41) rounds otherwise: with
    // bf16 matmuls the outputs are then rounded to bf16 for the output projection, and where the two fp32 values
    // straddle a rounding boundary they differ from XLA's by a bf16 step (a log-probability of
    // test_sampler_rollouts_equal_xla[bf16] by 8.7e-4 on a Zen 4 VM).
    const vfloat sum_b = vset(vsum(sum_v));
    for (int i = 0; i < n_valid; i += kLanes)
      vstore_first(sc + i, vdiv(vload_first(sc + i, n_valid - i), sum_b), n_valid - i);
    if (vectors) continue;
    float* out = out_gh + g * hd;
    std::fill(out, out + hd, 0.f);
    for (int i = 0; i < n_valid; ++i) axpy_hd(sc[i], v_sh + static_cast<int64_t>(slots_valid[i]) * hd, out, hd);
  }
  if (!vectors) return;
  switch (g_heads) {
    case 1: return weighted_values<1, T>(scores, stride, v_sh, slots_valid, n_valid, hd, out_gh);
    case 2: return weighted_values<2, T>(scores, stride, v_sh, slots_valid, n_valid, hd, out_gh);
    case 3: return weighted_values<3, T>(scores, stride, v_sh, slots_valid, n_valid, hd, out_gh);
    default: return weighted_values<4, T>(scores, stride, v_sh, slots_valid, n_valid, hd, out_gh);
  }
}

ffi::Error DecodeStep(ffi::Buffer<ffi::F32> x_nd, ffi::Buffer<ffi::F32> cos_nr, ffi::Buffer<ffi::F32> sin_nr,
                      ffi::Buffer<ffi::PRED> kv_mask_ns, ffi::Buffer<ffi::S32> cache_pos,
                      ffi::Buffer<ffi::F32> ln1_ld, ffi::Buffer<ffi::F32> ln2_ld, ffi::Buffer<ffi::F32> final_d,
                      ffi::AnyBuffer w_qkv, ffi::AnyBuffer w_o, ffi::AnyBuffer w_gate_up, ffi::AnyBuffer w_down,
                      ffi::AnyBuffer w_head, ffi::AnyBuffer k_cache_in, ffi::AnyBuffer v_cache_in,
                      ffi::Buffer<ffi::F32> states_in, ffi::Buffer<ffi::S32> states_step,
                      ffi::Buffer<ffi::U16> gate_up_in, ffi::Buffer<ffi::U16> inputs_in,
                      ffi::ResultBuffer<ffi::F32> logits_nv,
                      ffi::ResultBuffer<ffi::F32> h_nd, ffi::Result<ffi::AnyBuffer> k_cache,
                      ffi::Result<ffi::AnyBuffer> v_cache, ffi::ResultBuffer<ffi::F32> states,
                      ffi::ResultBuffer<ffi::U16> gate_up, ffi::ResultBuffer<ffi::U16> inputs, float eps,
                      int64_t num_heads, int64_t rotary_dim, int64_t num_threads, bool amx,
                      ffi::ThreadPool thread_pool) {
  const auto kdims = k_cache->dimensions();  // [L, B, K, S, hd]
  if (kdims.size() != 5) return ffi::Error::InvalidArgument("k_cache: expected [L, B, K, S, hd]");
  Dims dm;
  dm.layers = static_cast<int>(kdims[0]);
  dm.batch = static_cast<int>(kdims[1]);
  dm.kv_heads = static_cast<int>(kdims[2]);
  dm.slots = static_cast<int>(kdims[3]);
  dm.hd = static_cast<int>(kdims[4]);
  dm.d = static_cast<int>(x_nd.dimensions()[1]);
  dm.heads = static_cast<int>(num_heads);
  dm.rot = static_cast<int>(rotary_dim);
  dm.vocab = static_cast<int>(logits_nv->dimensions()[1]);
  // the down projection's inputs: bf16 [L, D/32, F/2, 32, 2], fp32 [L, D/32, F, 32]
  dm.ffn = static_cast<int>(w_down.dimensions()[2]) * (w_down.element_type() == ffi::F32 ? 1 : 2);
  dm.qkv_out = (dm.heads + 2 * dm.kv_heads) * dm.hd;
  const auto wtype = w_qkv.element_type();
  if ((wtype != ffi::BF16 && wtype != ffi::F32) || w_o.element_type() != wtype ||
      w_gate_up.element_type() != wtype || w_down.element_type() != wtype || w_head.element_type() != wtype)
    return ffi::Error::InvalidArgument("packed weights must be all bfloat16 or all float32");
  const bool f32 = wtype == ffi::F32;
#if !defined(__AVX512F__)
  if (!f32) return ffi::Error::InvalidArgument("bfloat16 weights need the AVX-512 build of the kernel");
#endif
  if ((!f32 && (dm.d % 2 || (dm.heads * dm.hd) % 2 || dm.ffn % 2)) || dm.heads % dm.kv_heads)
    return ffi::Error::InvalidArgument("odd matmul input size or heads not a multiple of kv heads");

  const int n = dm.batch, d = dm.d, hf = dm.heads * dm.hd, kvf = dm.kv_heads * dm.hd, f = dm.ffn;
  const int pos = cache_pos.typed_data()[0];
  if (pos < 0 || pos >= dm.slots) return ffi::Error::InvalidArgument("cache_pos outside the cache");
  const int64_t cache_elems = static_cast<int64_t>(dm.layers) * n * dm.kv_heads * dm.slots * dm.hd;
  const auto ctype = k_cache->element_type();
  if ((ctype != ffi::F32 && ctype != ffi::BF16) || v_cache->element_type() != ctype ||
      k_cache_in.element_type() != ctype || v_cache_in.element_type() != ctype)
    return ffi::Error::InvalidArgument("the KV cache must be all float32 or all bfloat16");
  const bool cache_bf16 = ctype == ffi::BF16;
  const size_t cache_bytes = (cache_bf16 ? 2 : 4) * static_cast<size_t>(cache_elems);
  void* kc = k_cache->untyped_data();
  void* vc = v_cache->untyped_data();
  if (kc != k_cache_in.untyped_data()) std::memcpy(kc, k_cache_in.untyped_data(), cache_bytes);
  if (vc != v_cache_in.untyped_data()) std::memcpy(vc, v_cache_in.untyped_data(), cache_bytes);

  const auto* wqkv = static_cast<const char*>(w_qkv.untyped_data());
  const auto* wo = static_cast<const char*>(w_o.untyped_data());
  const auto* wgu = static_cast<const char*>(w_gate_up.untyped_data());
  const auto* wdown = static_cast<const char*>(w_down.untyped_data());
  const auto* whead = static_cast<const char*>(w_head.untyped_data());
  const int64_t welem = f32 ? 4 : 2;  // bytes per packed weight
  auto padded = [](int o) { return static_cast<int64_t>((o + kTile - 1) / kTile * kTile); };
  const int64_t qkv_size = padded(dm.qkv_out) * d, o_size = padded(d) * hf, gu_size = padded(2 * f) * d,
                down_size = padded(d) * f;

  const int rows_padded = (n + kRows - 1) / kRows * kRows;
  std::vector<float> x(x_nd.typed_data(), x_nd.typed_data() + static_cast<int64_t>(n) * d);
  std::vector<float> h(static_cast<size_t>(n) * std::max(d, hf)), qkv(static_cast<size_t>(n) * dm.qkv_out),
      att(static_cast<size_t>(n) * hf), proj(static_cast<size_t>(n) * d), gu(static_cast<size_t>(n) * 2 * f),
      scores(static_cast<size_t>(n) * dm.heads * (dm.slots + 16));
  std::vector<uint32_t> pairs(static_cast<size_t>(rows_padded) * std::max({d, hf, f}) / 2);
  std::vector<float> x_rows(f32 ? static_cast<size_t>(rows_padded) * std::max({d, hf, f}) : 0);
  const float* cosp = cos_nr.typed_data();
  const float* sinp = sin_nr.typed_data();
  const bool* mask = kv_mask_ns.typed_data();
  // Each row's key slots that hold real tokens up to this step's (the same for every layer and head).
  std::vector<int> valid(static_cast<size_t>(n) * dm.slots), n_valid(n, 0);
  for (int r = 0; r < n; ++r)
    for (int s = 0; s <= pos; ++s)
      if (mask[static_cast<int64_t>(r) * dm.slots + s]) valid[static_cast<size_t>(r) * dm.slots + n_valid[r]++] = s;

  auto team = Team::Gather(thread_pool, num_threads - 1, amx && !f32 && amx_permitted());
  // y [n, out] = x [n, in] (row stride x_stride) W^T, W the packed matrix at `w` (bf16 pairs or fp32 tiles).
  // `w_next`: the matrix the step multiplies next (next_in x next_out), whose first tiles the fp32 matvec streams
  // into L2 as it ends (null: none).
  auto project = [&](const char* w, const float* xs, int x_stride, int in, int out, float* y,
                     const char* w_next = nullptr, int next_in = 0, int next_out = 0) {
    if (f32) {
      pack_rows_f32(xs, n, in, x_stride, x_rows.data());
      matvec_f32(*team, reinterpret_cast<const float*>(w), x_rows.data(), n, in, out, y, out,
                 reinterpret_cast<const float*>(w_next), next_in, next_out);
    } else {
#if defined(__AVX512F__)
      pack_rows(xs, n, in, x_stride, pairs.data());
      matvec(*team, reinterpret_cast<const uint16_t*>(w), pairs.data(), n, in, out, y, out);
#endif
    }
  };

  // states [steps, L + 1 or 1, n, d] (updated in place, like the cache; steps 0: nothing recorded): at `states_step`,
  // each layer's input (L + 1 only), then the last layer's output (the update can replay them instead of running its
  // own forward: `CausalLM.__call__(replay=...)`).
  const auto sdims = states->dimensions();
  if (sdims.size() != 4 || (sdims[1] != dm.layers + 1 && sdims[1] != 1) || sdims[2] != n || sdims[3] != d)
    return ffi::Error::InvalidArgument("states: expected [steps, L + 1 or 1, B, D]");
  const int state_rows = static_cast<int>(sdims[1]);
  const size_t states_bytes = sizeof(float) * static_cast<size_t>(sdims[0]) * state_rows * n * d;
  if (states->typed_data() != states_in.typed_data() && states_bytes)
    std::memcpy(states->typed_data(), states_in.typed_data(), states_bytes);
  const int step = states_step.typed_data()[0];
  if (sdims[0] > 0 && (step < 0 || step >= sdims[0])) return ffi::Error::InvalidArgument("states_step outside states");
  float* xs = sdims[0] > 0 ? states->typed_data() + static_cast<int64_t>(step) * state_rows * n * d : nullptr;
  // gate_up [B, L, S, 2F or 2F + A] bf16 bits (updated in place; [B, L, 0, .]: nothing recorded): each layer's
  // gate|up projections of this step's token, at its cache slot, then (width 2F + A, A = qkv_out + D) its q|k|v before
  // the rotation and its output projection (the update's layers can replay them instead of recomputing them:
  // `Block.__call__(gate_up_btf=...)`).
  const auto gdims = gate_up->dimensions();
  const int64_t record_width = gdims.size() == 4 ? gdims[3] : 0;
  const bool record_attention = record_width == 2 * f + dm.qkv_out + d;
  if (gdims.size() != 4 || gdims[0] != n || gdims[1] != dm.layers || (record_width != 2 * f && !record_attention) ||
      (gdims[2] != 0 && gdims[2] != dm.slots))
    return ffi::Error::InvalidArgument("gate_up: expected [B, L, S or 0, 2F or 2F + qkv + D]");
  const int64_t gate_up_elems = static_cast<int64_t>(n) * dm.layers * gdims[2] * record_width;
  if (gate_up->typed_data() != gate_up_in.typed_data() && gate_up_elems)
    std::memcpy(gate_up->typed_data(), gate_up_in.typed_data(), sizeof(uint16_t) * gate_up_elems);
  uint16_t* gus = gdims[2] > 0 ? gate_up->typed_data() : nullptr;
  // inputs [B, L, S, D] bf16 bits (updated in place; [B, L, 0, D]: nothing recorded): each layer's input at this
  // step's cache slot, rounded to nearest even, where the update reads them (`replayed_layer_scan`): half the bytes
  // of fp32 states, and no conversion or transposition after the loop.
  const auto idims = inputs->dimensions();
  if (idims.size() != 4 || idims[0] != n || idims[1] != dm.layers || idims[3] != d ||
      (idims[2] != 0 && idims[2] != dm.slots))
    return ffi::Error::InvalidArgument("inputs: expected [B, L, S or 0, D]");
  const int64_t inputs_elems = static_cast<int64_t>(n) * dm.layers * idims[2] * d;
  if (inputs->typed_data() != inputs_in.typed_data() && inputs_elems)
    std::memcpy(inputs->typed_data(), inputs_in.typed_data(), sizeof(uint16_t) * inputs_elems);
  uint16_t* ins = idims[2] > 0 ? inputs->typed_data() : nullptr;
  for (int l = 0; l < dm.layers; ++l) {
    if (xs && state_rows > 1) std::memcpy(xs + static_cast<int64_t>(l) * n * d, x.data(), sizeof(float) * n * d);
    if (ins)
      for (int r = 0; r < n; ++r)
        store_row(ins + ((static_cast<int64_t>(r) * dm.layers + l) * dm.slots + pos) * d, &x[r * d], d);
    for (int r = 0; r < n; ++r) rms_norm(&x[r * d], ln1_ld.typed_data() + l * d, d, eps, &h[r * d]);
    project(wqkv + l * qkv_size * welem, h.data(), d, d, dm.qkv_out, qkv.data(), wo + l * o_size * welem, hf, d);
    // this layer's recorded projections of row r: [gate|up, q|k|v, o] at its slot
    auto recorded_row = [&](int r) { return gus + ((static_cast<int64_t>(r) * dm.layers + l) * dm.slots + pos) *
                                                      record_width; };
    if (gus && record_attention)
      for (int r = 0; r < n; ++r)
        store_row(recorded_row(r) + 2 * f, &qkv[static_cast<int64_t>(r) * dm.qkv_out], dm.qkv_out);
    for (int r = 0; r < n; ++r) {
      float* row = &qkv[static_cast<int64_t>(r) * dm.qkv_out];
      const float* c = cosp + static_cast<int64_t>(r) * dm.rot;
      const float* s = sinp + static_cast<int64_t>(r) * dm.rot;
      for (int hh = 0; hh < dm.heads + dm.kv_heads; ++hh) rope(row + hh * dm.hd, c, s, dm.rot);
      for (int kh = 0; kh < dm.kv_heads; ++kh) {  // this step's keys and values into slot `pos`
        const int64_t at = ((((static_cast<int64_t>(l) * n + r) * dm.kv_heads + kh) * dm.slots) + pos) * dm.hd;
        if (cache_bf16) {
          store_row(static_cast<uint16_t*>(kc) + at, row + hf + kh * dm.hd, dm.hd);
          store_row(static_cast<uint16_t*>(vc) + at, row + hf + kvf + kh * dm.hd, dm.hd);
        } else {
          store_row(static_cast<float*>(kc) + at, row + hf + kh * dm.hd, dm.hd);
          store_row(static_cast<float*>(vc) + at, row + hf + kvf + kh * dm.hd, dm.hd);
        }
      }
    }
    team->parallel_for(n * dm.kv_heads, [&](int task) {
      const int r = task / dm.kv_heads, kh = task % dm.kv_heads, g = dm.heads / dm.kv_heads;
      const int64_t base = (((static_cast<int64_t>(l) * n + r) * dm.kv_heads + kh) * dm.slots) * dm.hd;
      const float* q = &qkv[static_cast<int64_t>(r) * dm.qkv_out + kh * g * dm.hd];
      float* out = &att[static_cast<int64_t>(r) * hf + kh * g * dm.hd];
      float* sc = &scores[static_cast<size_t>(task) * g * (dm.slots + 16)];
      const int* slots = &valid[static_cast<size_t>(r) * dm.slots];
      if (cache_bf16)
        attend(dm, q, static_cast<const uint16_t*>(kc) + base, static_cast<const uint16_t*>(vc) + base, slots,
               n_valid[r], out, sc);
      else
        attend(dm, q, static_cast<const float*>(kc) + base, static_cast<const float*>(vc) + base, slots, n_valid[r],
               out, sc);
    });
    project(wo + l * o_size * welem, att.data(), hf, hf, d, proj.data(), wgu + l * gu_size * welem, d, 2 * f);
    if (gus && record_attention)
      for (int r = 0; r < n; ++r)
        store_row(recorded_row(r) + 2 * f + dm.qkv_out, &proj[static_cast<int64_t>(r) * d], d);
    add_into(x.data(), proj.data(), n * d);
    for (int r = 0; r < n; ++r) rms_norm(&x[r * d], ln2_ld.typed_data() + l * d, d, eps, &h[r * d]);
    project(wgu + l * gu_size * welem, h.data(), d, d, 2 * f, gu.data(), wdown + l * down_size * welem, f, d);
    if (gus)
      for (int r = 0; r < n; ++r) store_row(recorded_row(r), &gu[static_cast<int64_t>(r) * 2 * f], 2 * f);
    for (int r = 0; r < n; ++r) {  // silu(gate) * up, kLanes at a time
      float* g = &gu[static_cast<int64_t>(r) * 2 * f];
      const float* up = g + f;
      int i = 0;
      for (; i + kLanes <= f; i += kLanes) {
        const vfloat gv = vload(g + i);
        const vfloat sig = vdiv(vset(1.f), vadd(vset(1.f), vexp(vsub(vzero(), gv))));
        vstore(g + i, vmul(vmul(gv, sig), vload(up + i)));
      }
      for (; i < f; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * up[i];
    }
    if (l + 1 < dm.layers)
      project(wdown + l * down_size * welem, gu.data(), 2 * f, f, d, proj.data(), wqkv + (l + 1) * qkv_size * welem, d,
              dm.qkv_out);
    else
      project(wdown + l * down_size * welem, gu.data(), 2 * f, f, d, proj.data(), whead, d, dm.vocab);
    add_into(x.data(), proj.data(), n * d);
  }
  if (xs) std::memcpy(xs + static_cast<int64_t>(state_rows - 1) * n * d, x.data(), sizeof(float) * n * d);
  for (int r = 0; r < n; ++r) rms_norm(&x[r * d], final_d.typed_data(), d, eps, h_nd->typed_data() + r * d);
  project(whead, h_nd->typed_data(), d, d, dm.vocab, logits_nv->typed_data());
  team->Finish();
  return ffi::Error::Success();
}

// y [M, N] fp32 = x [M, K] (bf16, row-major) W^T for W packed in bf16 tiles ([ceil(N/32)][K/2][32][2], as the
// decode step's), on AMX tile products (the caller checks the CPU has them): the matmuls of a forward on weights
// packed once (a frozen model's). Blocks of 32 rows x 32 outputs; a task is a group of up to 8 row blocks (their
// 32K bf16 activations stay in L2) times a few tiles (each read from memory once per group). A block cut by M or
// N goes through a zero-padded copy.
ffi::Error PackedMatmul(ffi::Buffer<ffi::BF16> x_mk, ffi::Buffer<ffi::BF16> w_packed, ffi::ResultBuffer<ffi::F32> y_mn,
                        ffi::ThreadPool thread_pool) {
#if defined(__AVX512F__)
  const auto xd = x_mk.dimensions(), wd = w_packed.dimensions(), yd = y_mn->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || wd[2] != kTile || wd[3] != 2)
    return ffi::Error::InvalidArgument("packed matmul: expected x [M, K], w [N/32, K/2, 32, 2], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], tiles = wd[0], k2 = wd[1];
  if (yd[0] != m || k % 2 || k2 * 2 != k || tiles != (n + kTile - 1) / kTile)
    return ffi::Error::InvalidArgument("packed matmul: shapes of x, w and y disagree");
  if (!amx_permitted()) return ffi::Error::Internal("packed matmul: Linux refused the AMX tile state");
  const auto* x = reinterpret_cast<const uint16_t*>(x_mk.untyped_data());
  const auto* w = reinterpret_cast<const uint16_t*>(w_packed.untyped_data());
  float* y = y_mn->typed_data();
  constexpr int64_t kBlockRows = 32, kGroupBlocks = 8;
  const int64_t blocks = (m + kBlockRows - 1) / kBlockRows, groups = (blocks + kGroupBlocks - 1) / kGroupBlocks;
  const int64_t per_task = std::max<int64_t>(1, std::min<int64_t>(8, tiles / 4));
  const int64_t tile_tasks = (tiles + per_task - 1) / per_task;
  if (m == 0 || n == 0) return ffi::Error::Success();
  auto team = Team::Gather(thread_pool, thread_pool.num_threads(), true);
  const uint64_t call = team->amx_call();
  team->parallel_for(static_cast<int>(groups * tile_tasks), [&](int task) {
    amx_enter(call, /*gemm=*/true);
    const int64_t g = task / tile_tasks, t0 = task % tile_tasks * per_task;
    std::vector<uint16_t> x_pad;  // a cut row block, zero rows after M
    alignas(64) float c[kBlockRows][kTile];
    for (int64_t t = t0; t < std::min(tiles, t0 + per_task); ++t) {
      const uint16_t* w_tile = w + t * k2 * 64;
      const int64_t o0 = t * kTile, cols = std::min<int64_t>(kTile, n - o0);
      for (int64_t b = g * kGroupBlocks; b < std::min(blocks, (g + 1) * kGroupBlocks); ++b) {
        const int64_t r0 = b * kBlockRows, rows = std::min(kBlockRows, m - r0);
        const uint16_t* xb = x + r0 * k;
        if (rows < kBlockRows) {
          x_pad.assign(kBlockRows * k, 0);
          std::memcpy(x_pad.data(), xb, sizeof(uint16_t) * rows * k);
          xb = x_pad.data();
        }
        if (rows == kBlockRows && cols == kTile) {
          gemm_block(xb, k, w_tile, static_cast<int>(k2), y + r0 * n + o0, n);
          continue;
        }
        gemm_block(xb, k, w_tile, static_cast<int>(k2), &c[0][0], kTile);
        store_rows(c, y + r0 * n, static_cast<int>(n), static_cast<int>(o0), static_cast<int>(n),
                   static_cast<int>(rows));
      }
    }
  });
  team->Finish();
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("packed matmul: needs the AVX-512 build of the kernel (AMX)");
#endif
}

// Packs weights into the step's tiles: [..., I, O] (`input_major`, the model's [in, out] storage) or [..., O, I],
// fp32 or bf16, -> bf16 [..., ceil(O/32), I/2, 32, 2] or fp32 [..., ceil(O/32), I, 32] (the result's type; zero
// rows pad O), on the caller and XLA's pool. fp32 -> bf16 rounds to nearest even (vcvtneps2bf16, which reads fp32
// denormals as zero).
ffi::Error PackTiles(ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> packed, bool input_major,
                     ffi::ThreadPool thread_pool) {
  const auto dims = w.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("pack: expected a matrix or a stack of them");
  const bool f32 = w.element_type() == ffi::F32;
  if (!f32 && w.element_type() != ffi::BF16) return ffi::Error::InvalidArgument("pack: fp32 or bf16 weights");
  const int64_t a = dims[dims.size() - 2], b = dims[dims.size() - 1];
  const int64_t in = input_major ? a : b, out = input_major ? b : a;
  if (in % 2 && packed->element_type() == ffi::BF16) return ffi::Error::InvalidArgument("pack: odd input size");
  int64_t lead = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) lead *= dims[i];
  const int64_t tiles = (out + kTile - 1) / kTile, in2 = in / 2;
  const int64_t tile_elems = in2 * 64;
  const bool out_f32 = packed->element_type() == ffi::F32;
  if (!out_f32 && packed->element_type() != ffi::BF16) return ffi::Error::InvalidArgument("pack: bf16 or fp32 tiles");
  auto* dst = reinterpret_cast<uint32_t*>(packed->untyped_data());  // pairs
  auto* dst_f32 = reinterpret_cast<float*>(packed->untyped_data());
  const auto* w32 = f32 ? static_cast<const float*>(w.untyped_data()) : nullptr;
  const auto* w16 = f32 ? nullptr : static_cast<const uint16_t*>(w.untyped_data());
  // One element of W[o, i] of matrix m, as bf16 bits (0 past O).
  auto at = [&](int64_t m, int64_t o, int64_t i) -> uint32_t {
    if (o >= out) return 0;
    const int64_t idx = m * in * out + (input_major ? i * out + o : o * in + i);
    return f32 ? to_bf16(w32[idx]) : w16[idx];
  };
  // One element of W[o, i] of matrix m as fp32 (0 past O).
  auto at_f32 = [&](int64_t m, int64_t o, int64_t i) -> float {
    if (o >= out) return 0.f;
    const int64_t idx = m * in * out + (input_major ? i * out + o : o * in + i);
    if (f32) return w32[idx];
    const uint32_t bits = static_cast<uint32_t>(w16[idx]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  };
  auto pack_tile_f32 = [&](int64_t task) {  // [in][32] fp32
    const int64_t m = task / tiles, t = task % tiles, o0 = t * kTile;
    float* tile = dst_f32 + (m * tiles + t) * in * kTile;
    if (f32 && input_major && o0 + kTile <= out) {
      for (int64_t i = 0; i < in; ++i) std::memcpy(tile + i * kTile, w32 + m * in * out + i * out + o0, 4 * kTile);
      return;
    }
    for (int64_t j = 0; j < kTile; ++j)
      for (int64_t i = 0; i < in; ++i) tile[i * kTile + j] = at_f32(m, o0 + j, i);
  };
  auto pack_tile = [&](int64_t task) {
    if (out_f32) return pack_tile_f32(task);
    const int64_t m = task / tiles, t = task % tiles;
    uint32_t* tile = dst + (m * tiles + t) * (tile_elems / 2);
    const int64_t o0 = t * kTile;
#if defined(__AVX512BF16__)
    if (f32 && input_major && o0 + kTile <= out) {  // rows 2k and 2k+1 of [I, O], 32 outputs: 16 lanes at a time
      const float* base = w32 + m * in * out + o0;
      for (int64_t k = 0; k < in2; ++k) {
        for (int half = 0; half < 2; ++half) {
          const __m512 lo = _mm512_loadu_ps(base + (2 * k) * out + 16 * half);
          const __m512 hi = _mm512_loadu_ps(base + (2 * k + 1) * out + 16 * half);
          const __m512i lo32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
          const __m512i hi32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi)), 16);
          _mm512_storeu_si512(tile + k * kTile + 16 * half, _mm512_or_si512(lo32, hi32));
        }
      }
      return;
    }
    if (f32 && !input_major && o0 + kTile <= out && in2 % 16 == 0) {  // row j's 32 inputs are 16 pairs in order
      const __m512i stride = _mm512_mullo_epi32(_mm512_set1_epi32(kTile), _mm512_set_epi32(
          15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
      for (int64_t j = 0; j < kTile; ++j) {
        const float* row = w32 + m * in * out + (o0 + j) * in;
        for (int64_t k = 0; k < in2; k += 16) {
          const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 2 * k + 16),
                                                             _mm512_loadu_ps(row + 2 * k));
          _mm512_i32scatter_epi32(tile + k * kTile + j, stride, pairs, 4);
        }
      }
      return;
    }
#endif
    for (int64_t j = 0; j < kTile; ++j)
      for (int64_t k = 0; k < in2; ++k)
        tile[k * kTile + j] = at(m, o0 + j, 2 * k) | (at(m, o0 + j, 2 * k + 1) << 16);
  };
  auto team = Team::Gather(thread_pool, thread_pool.num_threads());
  team->parallel_for(static_cast<int>(lead * tiles), [&](int task) { pack_tile(task); });
  team->Finish();
  return ffi::Error::Success();
}

// y [cols, rows] = x [rows, cols]^T of 16-bit values (bf16 bit patterns), in 32 x 32 blocks: the transposed operand
// of a bf16 weight gradient (`transformer._weight_gradient(native_transpose=True)`). XLA:CPU computes such a copy
// with its producer fused in, reading the producer's inputs at the copy's stride (the update's MLP activations:
// 4.3-4.6 ms per layer and row group); as a custom call's operand the producer is written in its own order first.
ffi::Error Transpose16(ffi::Buffer<ffi::U16> x, ffi::ResultBuffer<ffi::U16> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x: expected [rows, cols]");
  const int64_t rows = dims[0], cols = dims[1];
  const uint16_t* src = x.typed_data();
  uint16_t* dst = y->typed_data();
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KlqTranspose16, Transpose16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()  // x
                                  .Ret<ffi::Buffer<ffi::U16>>()); // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(KlqPackTiles, PackTiles,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("input_major")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KlqPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x_mk
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_packed
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y_mn
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KlqDecodeStep, DecodeStep,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_nd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos_nr
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin_nr
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // kv_mask_ns
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cache_pos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln1_ld
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln2_ld
                                  .Arg<ffi::Buffer<ffi::F32>>()   // final_d
                                  .Arg<ffi::AnyBuffer>()          // w_qkv
                                  .Arg<ffi::AnyBuffer>()          // w_o
                                  .Arg<ffi::AnyBuffer>()          // w_gate_up
                                  .Arg<ffi::AnyBuffer>()          // w_down
                                  .Arg<ffi::AnyBuffer>()          // w_head
                                  .Arg<ffi::AnyBuffer>()          // k_cache_in (float32 or bfloat16)
                                  .Arg<ffi::AnyBuffer>()          // v_cache_in
                                  .Arg<ffi::Buffer<ffi::F32>>()   // states_in
                                  .Arg<ffi::Buffer<ffi::S32>>()   // states_step
                                  .Arg<ffi::Buffer<ffi::U16>>()   // gate_up_in
                                  .Arg<ffi::Buffer<ffi::U16>>()   // inputs_in
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logits_nv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_nd
                                  .Ret<ffi::AnyBuffer>()          // k_cache
                                  .Ret<ffi::AnyBuffer>()          // v_cache
                                  .Ret<ffi::Buffer<ffi::F32>>()   // states
                                  .Ret<ffi::Buffer<ffi::U16>>()   // gate_up
                                  .Ret<ffi::Buffer<ffi::U16>>()   // inputs
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("rotary_dim")
                                  .Attr<int64_t>("num_threads")
                                  .Attr<bool>("amx")
                                  .Ctx<ffi::ThreadPool>());
