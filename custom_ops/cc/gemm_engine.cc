// The CPU accumulation engine (see gemm_engine.h).
//
// Work is split into tiles of kTileRows x kTileCols outputs. A tile keeps its partial
// sums in registers for the whole length K, so each output sees its products strictly
// in order k = 0, 1, ..., K-1 whatever the tiling and thread count. The per-lane code is
// branch-free so the compiler vectorizes across the kTileCols outputs; it is compiled
// for several instruction sets (target_clones) and the loader picks the best one the
// processor has, so no instruction the processor lacks is ever executed.
#include "gemm_engine.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

// Function multiversioning: one clone per x86-64 level, chosen when the library loads.
#if defined(__x86_64__)
#define TFACCUM_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TFACCUM_MULTIVERSION
#endif

namespace tfaccum {
namespace {

// TensorFlow runs kernels with flush-to-zero and denormals-are-zero set, which would turn
// float32 subnormal operands and results into zeros. The model needs gradual underflow,
// so every thread of the engine runs under this guard.
class KeepDenormals {
 public:
  KeepDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~(0x8000u | 0x0040u));  // clear FTZ (bit 15) and DAZ (bit 6)
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t cleared = saved_ & ~(uint64_t{1} << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(cleared));
#endif
  }
  ~KeepDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  KeepDenormals(const KeepDenormals&) = delete;
  KeepDenormals& operator=(const KeepDenormals&) = delete;

 private:
#if defined(__aarch64__)
  uint64_t saved_ = 0;
#else
  unsigned int saved_ = 0;
#endif
};

constexpr int kTileRows = kMaxPanelRows;
constexpr int kTileVecs = 2;                  // vectors of kLanes outputs per tile row
constexpr int kTileCols = kTileVecs * kLanes;  // 16 outputs

#define TFACCUM_INLINE inline __attribute__((always_inline))

typedef float VecF __attribute__((vector_size(sizeof(float) * kLanes)));
using TileD = VecD[kTileRows][kTileVecs];
using TileU = VecU[kTileRows][kTileVecs];

// One rounding in the tile loop. The checked form applies the range rules (subnormal
// flush, overflow policy, NaN/Inf) at every step. The unchecked form skips them and
// instead records in `ok` whether every result was finite and in range, in which case
// the range rules were the identity (when no format flushes subnormals): the caller then
// keeps the tile, and otherwise recomputes it checked. Overflow and NaN/Inf are rare, so
// the common case saves the range logic on every addition.
template <int R, bool kChecked>
struct TileRounding {
  VecD check = {};  // stays 0 while every unchecked result is in range (see range_check)

  TFACCUM_INLINE VecD quantize(VecD x, const FormatParams& f, VecU rbits) {
    if (kChecked) return tfaccum::quantize<R>(x, f, rbits);
    const VecD r = round_to_grid<R>(x, f, rbits);
    check += range_check(r, f);
    return r;
  }
  TFACCUM_INLINE VecD accumulate(VecD s, VecD p, const FormatParams& f, VecU rbits) {
    return quantize(add_round_to_odd(s, p), f, rbits);
  }
  TFACCUM_INLINE bool all_ok() const {
    bool all = true;
    for (int lane = 0; lane < kLanes; ++lane) all &= check[lane] == 0.0;
    return all;
  }
};

// Accumulates one tile; returns false when an unchecked run must be redone checked.
// a_panel: kTileRows x K; b_packed: K x ldb (float32, widened exactly on load: half the
// memory traffic of binary64, which matters for the long sums of filter gradients),
// starting at the tile's first column.
// keys: the generator key of each output (stochastic only).
template <int R, bool kRoundedProducts, bool kChecked>
TFACCUM_INLINE bool AccumulateTile(const AccumParams& params, int64_t K,
                                   const double* __restrict a_panel,
                                   const float* __restrict b_packed, int64_t ldb,
                                   const TileU& keys, TileD& out) {
  constexpr bool kRandom = (R == kStochastic);
  TileRounding<R, kChecked> rounding;
  const bool chunked = params.chunk_size > 0;
  const int64_t chunk = chunked ? params.chunk_size : K;
  const VecU no_bits = {};
  TileD total = {};
  int64_t chunk_index = 0;
  for (int64_t k0 = 0; k0 < K; k0 += chunk, ++chunk_index) {
    const int64_t k1 = std::min(K, k0 + chunk);
    TileD partial = {};
    for (int64_t k = k0; k < k1; ++k) {
      VecD b_row[kTileVecs];
      for (int v = 0; v < kTileVecs; ++v) {
        VecF narrow;
        __builtin_memcpy(&narrow, b_packed + k * ldb + v * kLanes, sizeof narrow);
        b_row[v] = __builtin_convertvector(narrow, VecD);
      }
#pragma GCC unroll 16
      for (int r = 0; r < kTileRows; ++r) {
        const double a = a_panel[r * K + k];
#pragma GCC unroll 16
        for (int v = 0; v < kTileVecs; ++v) {
          VecD p = a * b_row[v];  // exact
          if (kRoundedProducts) {
            p = rounding.quantize(
                p, params.product,
                kRandom ? random_bits24(keys[r][v], product_counter(k)) : no_bits);
          }
          partial[r][v] = rounding.accumulate(
              partial[r][v], p, params.accumulator,
              kRandom ? random_bits24(keys[r][v], accumulate_counter(k)) : no_bits);
        }
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int v = 0; v < kTileVecs; ++v) {
        total[r][v] =
            chunked ? rounding.accumulate(
                          total[r][v], partial[r][v], params.chunk_accumulator,
                          kRandom ? random_bits24(keys[r][v], chunk_counter(chunk_index)) : no_bits)
                    : partial[r][v];
      }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int v = 0; v < kTileVecs; ++v) out[r][v] = total[r][v];
  return kChecked || rounding.all_ok();
}

struct TileJob {
  const AccumParams* params;
  int64_t K;
  const double* a_panel;
  const float* b_packed;
  int64_t ldb;
  const TileU* keys;
  TileD* out;
};

// The only function compiled per instruction set; everything it calls is inlined.
TFACCUM_MULTIVERSION void RunTile(const TileJob& job) {
  const AccumParams& p = *job.params;
  const TileU& keys = *job.keys;
  TileD& out = *job.out;
  // One instantiation per rounding mode, product handling and range checking.
#define TFACCUM_TILE(R, PRODUCT)                                                          \
  if (!p.flushes_subnormals &&                                                            \
      AccumulateTile<R, PRODUCT, false>(p, job.K, job.a_panel, job.b_packed, job.ldb, keys, \
                                        out))                                             \
    return;                                                                               \
  AccumulateTile<R, PRODUCT, true>(p, job.K, job.a_panel, job.b_packed, job.ldb, keys, out); \
  return
  switch (p.rounding * 2 + (p.has_product ? 1 : 0)) {
    case kNearestEven * 2: TFACCUM_TILE(kNearestEven, false);
    case kNearestEven * 2 + 1: TFACCUM_TILE(kNearestEven, true);
    case kTowardZero * 2: TFACCUM_TILE(kTowardZero, false);
    case kTowardZero * 2 + 1: TFACCUM_TILE(kTowardZero, true);
    case kStochastic * 2: TFACCUM_TILE(kStochastic, false);
    default: TFACCUM_TILE(kStochastic, true);
  }
#undef TFACCUM_TILE
}

}  // namespace

void AccumulateGemm(const AccumParams& params, int64_t M, int64_t N, int64_t K,
                    const RowGather& gather_a, const float* b, int64_t b_stride_k,
                    int64_t b_stride_n, float* c, uint64_t element_offset,
                    const ParallelFor& parallel_for) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    // Every sum is empty: +0 (numerics.md §3), whatever the formats and the rounding.
    // Returned here so that an empty sum costs one write per output, with no scratch.
    std::fill(c, c + M * N, 0.0f);
    return;
  }
  const int64_t col_tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t ldb = col_tiles * kTileCols;

  // B in binary64, zero-padded to whole tiles (padding columns are computed, then dropped).
  std::vector<float> b_packed(static_cast<size_t>(std::max<int64_t>(K, 1) * ldb), 0.0f);
  parallel_for(K, N * 2, [&](int64_t k_begin, int64_t k_end) {
    KeepDenormals keep_denormals;
    for (int64_t k = k_begin; k < k_end; ++k)
      for (int64_t j = 0; j < N; ++j)
        b_packed[k * ldb + j] = b[k * b_stride_k + j * b_stride_n];
  });

  const bool stochastic = params.rounding == kStochastic;
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows;
  // Roughly 30 vector instructions per product per 8 lanes.
  const int64_t cost_per_row_tile = std::max<int64_t>(1, K) * ldb * kTileRows * 4;
  parallel_for(row_tiles, cost_per_row_tile, [&](int64_t tile_begin, int64_t tile_end) {
    KeepDenormals keep_denormals;
    std::vector<double> panel(static_cast<size_t>(kTileRows * std::max<int64_t>(K, 1)));
    TileU keys = {};
    TileD out;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kTileRows;
      const int64_t rows = std::min<int64_t>(kTileRows, M - row0);
      std::fill(panel.begin(), panel.end(), 0.0);
      if (K > 0) gather_a(row0, rows, panel.data());
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t col0 = ct * kTileCols;
        if (stochastic) {
          for (int r = 0; r < kTileRows; ++r)
            for (int w = 0; w < kTileCols; ++w)
              keys[r][w / kLanes][w % kLanes] = element_key(
                  params.seed, element_offset + static_cast<uint64_t>((row0 + r) * N + col0 + w));
        }
        TileJob job{&params, K, panel.data(), b_packed.data() + col0, ldb, &keys, &out};
        RunTile(job);
        const int64_t cols = std::min<int64_t>(kTileCols, N - col0);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t w = 0; w < cols; ++w)
            c[(row0 + r) * N + col0 + w] = static_cast<float>(out[r][w / kLanes][w % kLanes]);
      }
    }
  });
}

namespace {
TFACCUM_MULTIVERSION void QuantizeRange(
    const float* x, float* y, int64_t begin, int64_t end, const FormatParams& format,
    int32_t rounding, uint64_t seed) {
  for (int64_t i = begin; i < end; ++i) {
    const double v = static_cast<double>(x[i]);
    uint64_t r = 0;
    if (rounding == kStochastic) r = random_bits24(element_key(seed, static_cast<uint64_t>(i)), 0);
    y[i] = static_cast<float>(quantize_any(v, format, rounding, r));
  }
}
}  // namespace

void QuantizeArray(const float* x, float* y, int64_t n, const FormatParams& format,
                   int32_t rounding, uint64_t seed, const ParallelFor& parallel_for) {
  parallel_for(n, 40, [&](int64_t begin, int64_t end) {
    KeepDenormals keep_denormals;
    QuantizeRange(x, y, begin, end, format, rounding, seed);
  });
}

}  // namespace tfaccum
