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
#include <atomic>
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
// a_rows: kTileRows rows of K values (rows past the end of A repeat a real row; their
// results are dropped); b_packed: K x ldb (float32, widened exactly on load: half the
// memory traffic of binary64, which matters for the long sums of filter gradients),
// starting at the tile's first column (see AccumulateGemm for the last column tile).
// keys: the generator key of each output (stochastic only).
template <int R, bool kRoundedProducts, bool kChecked>
TFACCUM_INLINE bool AccumulateTile(const AccumParams& params, int64_t K,
                                   const double* const* a_rows,
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
        const double a = a_rows[r][k];
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
  const double* a_rows[kTileRows];
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
      AccumulateTile<R, PRODUCT, false>(p, job.K, job.a_rows, job.b_packed, job.ldb, keys, \
                                        out))                                             \
    return;                                                                               \
  AccumulateTile<R, PRODUCT, true>(p, job.K, job.a_rows, job.b_packed, job.ldb, keys, out); \
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

// count * size bytes; INT64_MAX, which no allocator can provide, when that overflows.
int64_t ScratchBytes(int64_t count, int64_t size) {
  return count > INT64_MAX / size ? INT64_MAX : count * size;
}

}  // namespace

bool AccumulateGemm(const AccumParams& params, int64_t M, int64_t N, int64_t K,
                    const RowGather& gather_a, const float* b, int64_t b_stride_k,
                    int64_t b_stride_n, float* c, uint64_t element_offset,
                    const EngineContext& context) {
  if (M <= 0 || N <= 0) return true;
  if (K <= 0) {
    // Every sum is empty: +0 (numerics.md §3), whatever the formats and the rounding.
    // Returned here so that an empty sum costs one write per output, with no scratch.
    std::fill(c, c + M * N, 0.0f);
    return true;
  }
  const int64_t col_tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows;

  // B as float32 rows of N values, without the padding to whole column tiles that cost
  // 16x the size of B for N = 1. A tile reads kTileCols columns, so when N is not a
  // multiple of kTileCols the last column tile is shifted left to end at column N: it
  // recomputes some columns of the tile before (bit for bit the same values, same keys)
  // and writes only its new ones. Only N < kTileCols leaves lanes past N: they read the
  // following row of B (kTileCols zeros of slack after the last one) and their results
  // are dropped; a non-finite value there costs at most a checked recompute of the tile.
  // B is used in place when it already is rows of N >= kTileCols float32 values.
  const int64_t ldb = N;
  const float* b_rows = b;
  if (!(b_stride_k == N && b_stride_n == 1 && N >= kTileCols)) {
    const int64_t floats = K * N + kTileCols;  // K * N <= elements of b: no overflow
    float* packed = static_cast<float*>(context.scratch(ScratchBytes(floats, 4), "the B operand"));
    if (packed == nullptr) return false;
    std::fill(packed + K * N, packed + floats, 0.0f);
    context.parallel_for(K, N * 2, [&](int64_t k_begin, int64_t k_end, int) {
      KeepDenormals keep_denormals;  // a float copy, but keep it exact whatever the codegen
      for (int64_t k = k_begin; k < k_end; ++k)
        for (int64_t j = 0; j < N; ++j) packed[k * ldb + j] = b[k * b_stride_k + j * b_stride_n];
    });
    b_rows = packed;
  }

  // One A panel per worker that runs (at most one per row tile), handed out on first use.
  // A GEMM with fewer than kTileRows rows gets panels of M rows: the tile's other rows
  // repeat row 0 (see AccumulateTile), so an M = 1 GEMM needs K values, not 4K.
  const int64_t panel_rows = std::min<int64_t>(kTileRows, M);
  const int64_t panels = std::min<int64_t>(row_tiles, std::max(1, context.workers));
  double* panel_memory = static_cast<double*>(
      context.scratch(ScratchBytes(panels * panel_rows, K * 8), "the A panels"));
  if (panel_memory == nullptr) return false;
  std::vector<int64_t> panel_of_worker(static_cast<size_t>(std::max(1, context.workers)), -1);
  std::atomic<int64_t> next_panel{0};

  const bool stochastic = params.rounding == kStochastic;
  const ElementIndex index = element_index(params, N);  // the generator's element of (i, j)
  // Roughly 30 vector instructions per product per 8 lanes.
  const int64_t cost_per_row_tile = K * col_tiles * kTileCols * kTileRows * 4;
  context.parallel_for(row_tiles, cost_per_row_tile, [&](int64_t tile_begin, int64_t tile_end,
                                                         int worker) {
    KeepDenormals keep_denormals;
    int64_t& panel_index = panel_of_worker[worker];
    if (panel_index < 0) panel_index = next_panel.fetch_add(1);
    double* panel = panel_memory + panel_index * panel_rows * K;
    TileJob job{&params, K, {}, nullptr, ldb, nullptr, nullptr};
    TileU keys = {};
    TileD out;
    job.keys = &keys;
    job.out = &out;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kTileRows;
      const int64_t rows = std::min<int64_t>(kTileRows, M - row0);
      std::fill(panel, panel + rows * K, 0.0);
      gather_a(row0, rows, panel);
      // Rows past M repeat row 0 (their results are dropped), as in a panel of M rows.
      for (int r = 0; r < kTileRows; ++r) job.a_rows[r] = panel + (r < rows ? r : 0) * K;
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t first_new = ct * kTileCols;  // the columns this tile adds
        const int64_t col0 = std::max<int64_t>(0, std::min(first_new, N - kTileCols));
        if (stochastic) {
          for (int r = 0; r < kTileRows; ++r)
            for (int w = 0; w < kTileCols; ++w)
              keys[r][w / kLanes][w % kLanes] = element_key(
                  params.seed, element_offset + index.offset +
                                   static_cast<uint64_t>(row0 + r) * index.row_stride +
                                   static_cast<uint64_t>(col0 + w));
        }
        job.b_packed = b_rows + col0;
        RunTile(job);
        const int64_t w_end = std::min<int64_t>(kTileCols, N - col0);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t w = first_new - col0; w < w_end; ++w)
            c[(row0 + r) * N + col0 + w] = static_cast<float>(out[r][w / kLanes][w % kLanes]);
      }
    }
  });
  return true;
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
                   int32_t rounding, uint64_t seed, const EngineContext& context) {
  context.parallel_for(n, 40, [&](int64_t begin, int64_t end, int) {
    KeepDenormals keep_denormals;
    QuantizeRange(x, y, begin, end, format, rounding, seed);
  });
}

}  // namespace tfaccum
