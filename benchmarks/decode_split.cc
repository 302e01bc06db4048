// A SmolLM2 decode step's 121 fp32 matvecs (8 rows: 30 layers of qkv, o, gate|up, down, then the head) through the
// native kernel's own tile loop (`tile_dot_f32`), two threads claiming runs of tiles from a counter with a spinning
// barrier per matvec as the kernel's team does, in four ways taking turns: runs of at most 16 tiles (two per thread,
// the split before item 68), one run per thread, one run per thread with the next matrix's first tile streamed into
// L2 (the kernel's AVX2 split since item 68), and one flat stream over the same bytes (no matvec boundaries: the
// bound). Built and run by decode_split.py; prints each round and the medians of the paired ratios.
#include KERNEL_SOURCE
#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <thread>
struct Mat { int in, out; const float* w; };
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 20;
  std::vector<std::pair<int,int>> shapes;
  for (int l = 0; l < 30; ++l) { shapes.push_back({576, 960}); shapes.push_back({576, 576}); shapes.push_back({576, 3072}); shapes.push_back({1536, 576}); }
  shapes.push_back({576, 49152});
  size_t total = 0; for (auto& s : shapes) total += (size_t)s.first * ((s.second + 31) / 32 * 32);
  float* w = (float*)aligned_alloc(2 << 20, (total * 4 + (2 << 20)) / (2 << 20) * (2 << 20)); madvise(w, total * 4, MADV_HUGEPAGE);
  for (size_t i = 0; i < total; ++i) w[i] = (i % 13) * 0.01f;
  std::vector<Mat> mats; size_t off = 0; for (auto& s : shapes) { mats.push_back({s.first, s.second, w + off}); off += (size_t)s.first * ((s.second + 31) / 32 * 32); }
  std::vector<float> x(8 * 1536, 0.3f), y(8 * 49152);
  std::atomic<int> claim{0}, done{0}, gen{0}; std::atomic<bool> quit{false};
  std::function<void(int)> fn; int ntasks = 0;
  auto run_tasks = [&] { for (;;) { int t = claim.fetch_add(1); if (t >= ntasks) break; fn(t); done.fetch_add(1); } };
  std::thread helper([&] { int seen = 0; while (!quit) { int g = gen.load(); if (g == seen) { _mm_pause(); continue; } run_tasks(); seen = g; } });
  auto parallel = [&](int n, std::function<void(int)> f) { fn = std::move(f); ntasks = n; done = 0; claim = 0; gen.fetch_add(1); run_tasks(); while (done.load() < n) _mm_pause(); };
  auto per = [](int tiles, int mode) { return mode == 0 ? std::max(1, std::min(16, (tiles + 3) / 4)) : (tiles + 1) / 2; };
  auto step = [&](int mode) {
    for (size_t i = 0; i < mats.size(); ++i) {
      const Mat& m = mats[i]; const Mat* nx = i + 1 < mats.size() ? &mats[i + 1] : nullptr;
      const int tiles = (m.out + 31) / 32, pt = per(tiles, mode); const int64_t te = (int64_t)m.in * 32;
      parallel((tiles + pt - 1) / pt, [&, tiles, pt, te](int task) {
        const int end = std::min(tiles, (task + 1) * pt);
        for (int t = task * pt; t < end; ++t) {
          const float* next = nullptr; int nin = m.in;
          if (t + 1 < end) next = m.w + (t + 1) * te;
          else if (mode == 2 && nx) { const int ntl = (nx->out + 31) / 32, npt = per(ntl, mode); if (task * npt < ntl) { next = nx->w + (int64_t)task * npt * nx->in * 32; nin = nx->in; } }
          tile_dot_f32(m.w + t * te, x.data(), m.in, y.data(), m.out, t * 32, m.out, 8, next, nin);
        }
      });
    }
  };
  auto flat = [&] {
    const int64_t tiles = total / (576 * 32);
    parallel(2, [&](int h) { int64_t lo = tiles * h / 2, hi = tiles * (h + 1) / 2; float yy[8 * 32];
      for (int64_t t = lo; t < hi; ++t) tile_dot_f32(w + t * 576 * 32, x.data(), 576, yy, 32, 0, 32, 8, t + 1 < hi ? w + (t + 1) * 576 * 32 : nullptr, 576); });
  };
  std::vector<double> r[4], ms[4];
  for (int rd = 0; rd < rounds; ++rd) {
    double t[4];
    for (int k = 0; k < 4; ++k) { int mode = (k + rd) % 4; double t0 = now(); for (int j = 0; j < 3; ++j) (mode < 3 ? step(mode) : flat()); t[mode] = (now() - t0) / 3; }
    for (int k = 0; k < 4; ++k) { r[k].push_back(t[k] / t[0]); ms[k].push_back(t[k] * 1e3); }
  }
  const char* names[4] = {"runs of <= 16 tiles", "one run each", "one run each + next matrix", "one flat stream"};
  const char* keys[4] = {"runs16", "one_run", "one_run_next", "flat"};
  printf("SmolLM2 decode step's fp32 matvecs, 8 rows, 2 threads, %d rounds of 3 steps each way\n", rounds);
  printf("%-28s%12s%14s%22s\n", "split", "best ms", "median ms", "/ runs <= 16 (median)");
  for (int k = 0; k < 4; ++k) {
    std::sort(r[k].begin(), r[k].end()); std::sort(ms[k].begin(), ms[k].end());
    printf("%-28s%12.1f%14.1f%15.3f (%.3f-%.3f)\n", names[k], ms[k][0], ms[k][rounds / 2], r[k][rounds / 2], r[k][rounds / 4], r[k][3 * rounds / 4]);
  }
  printf("RESULT");
  for (int k = 1; k < 4; ++k) printf(" %s_over_runs16=%.3f", keys[k], r[k][rounds / 2]);
  printf(" runs16_ms=%.1f\n", ms[0][rounds / 2]);
  quit = true; gen.fetch_add(1); helper.join();
}
