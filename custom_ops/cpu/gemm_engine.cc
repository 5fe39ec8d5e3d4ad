// The CPU accumulation engine (see gemm_engine.h).
//
// Work is split into tiles of kTileRows x kTileCols outputs. A tile keeps its partial
// sums in registers for the whole length K, so each output sees its products strictly
// in order k = 0, 1, ..., K-1 whatever the tiling and thread count. The per-lane code is
// branch-free so the compiler vectorizes across the kTileCols outputs; it is compiled
// for several instruction sets (target_clones) and the loader picks the best one the
// processor has, so no instruction the processor lacks is ever executed.
//
// Two lane types (docs/numerics.md section 6):
// - binary64 lanes, exact for every configuration: 8 outputs per 512-bit vector;
// - binary32 lanes, exact under the preconditions of rounding_f32.h (FP8-like operands,
//   m <= 21, nearest-even or toward zero): 16 outputs per vector, no widening of B. Each
//   row tile checks its operands and takes this path when they qualify; a tile whose
//   values leave the path's range is recomputed in binary64.
// Three instruction-set paths, chosen once (EnginePaths below):
// - avx512: round-to-odd sums from two directed-rounding adds (AVX-512 embedded
//   rounding) instead of TwoSum;
// - avx2 and generic: the portable code compiled for x86-64-v3 and for the baseline.
// A fused adder (numerics.md section 7, AccumParams::fused_terms) runs its own binary64
// tile (core/fused_adder.h); the binary32 lanes do not apply to it.
#include "gemm_engine.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../core/fused_adder.h"
#include "../core/rounding_f32.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__x86_64__)
#define TFACCUM_HAVE_X86_PATHS 1
#define TFACCUM_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define TFACCUM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define TFACCUM_HAVE_X86_PATHS 0
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

#define TFACCUM_INLINE inline __attribute__((always_inline))

constexpr int kPanelRows = kMaxPanelRows;  // rows of A gathered together (one row tile)
constexpr int kTileRows = 4;               // rows of a two-vector tile
constexpr int kTallRows = 8;               // rows of a one-vector binary32 tile
constexpr int kTileVecs = 2;                        // vectors per tile row
constexpr int kTileCols = kTileVecs * kLanes;       // binary64 tile: 16 outputs per row
constexpr int kTileCols32 = kTileVecs * kLanesF32;  // binary32 tile: 32 outputs per row
constexpr int kMaxTileCols = kTileCols32;

typedef float VecF8 __attribute__((vector_size(sizeof(float) * kLanes)));
using TileD = VecD[kTileRows][kTileVecs];
using TileU = VecU[kTileRows][kTileVecs];

// The exponent fields a binary64 tile may round without a checked recompute: below
// 2^emax of the format (see Round64 in gemm_tiles.inc).
struct TileLimits {
  uint64_t accumulator, product, chunk_accumulator;
};
inline uint64_t ExponentLimit(const FormatParams& f) {
  return ((to_bits(f.max_value) >> 52) - 1) << 52;  // the field of 2^(emax - 1)
}

template <class U>
TFACCUM_INLINE bool WithinLimit(const U& record, uint64_t limit) {
  bool ok = true;
  for (unsigned lane = 0; lane < sizeof(U) / sizeof(record[0]); ++lane) ok &= record[lane] <= limit;
  return ok;
}

// One binary64 tile: kTileRows rows of A (float32 panels, widened exactly on use; rows
// past the end of A repeat a real row and their results are dropped) times kTileCols
// columns of B (float32 rows of ldb values, widened exactly on load). keys: the
// generator key of each output (stochastic only). A fused adder also reads the operand
// scales 2^e(x) of fused_operand_scale (core/fused_adder.h), laid out as the operands.
struct TileJob {
  const AccumParams* params;
  TileLimits limits;
  int64_t K;
  const float* a_rows[kTileRows];
  const float* b;
  int64_t ldb;
  const TileU* keys;
  TileD* out;
  const float* a_scales[kTileRows];  // fused only
  const float* b_scales;             // fused only
};

// One binary32 tile: `rows` rows of A times vecs * kLanesF32 columns: kTileRows x
// kTileCols32, or kTallRows x 16 when N <= 16. out[r * vecs + v].
struct TileJob32 {
  const AccumParams* params;
  int rows, vecs;
  Float32Params accumulator, product, chunk_accumulator;
  int64_t K;
  const float* a_rows[kPanelRows];
  const float* b;
  int64_t ldb;
  VecF* out;
};

// The lane operations of the portable paths: the round-to-odd sum by TwoSum
// (rounding.h); the maximum as a blend of bits (GCC 12 scalarizes the
// conditional form lane by lane).
struct PortableOps {
  // One record per role: with 16 vector registers (AVX2: a VecD is two of them) more
  // records spill the tile to memory.
  static constexpr int kRecords = 1;
  static TFACCUM_INLINE VecD add(VecD s, VecD p) { return add_round_to_odd(s, p); }
  static TFACCUM_INLINE VecF add(VecF s, VecF p) { return add_round_to_odd(s, p); }
  // Compared as signed integers: every value maxed here is below 2^63 (2^31), and AVX2
  // has no unsigned 64-bit compare (GCC lowers one lane by lane).
  static TFACCUM_INLINE VecU max(VecU a, VecU b) {
    const VecU a_greater = reinterpret_cast<VecU>(as_signed(a) > as_signed(b));
    return (a & a_greater) | (b & ~a_greater);
  }
  static TFACCUM_INLINE VecU32 max(VecU32 a, VecU32 b) {
    const VecU32 a_greater = reinterpret_cast<VecU32>(reinterpret_cast<VecI32>(a) >
                                                      reinterpret_cast<VecI32>(b));
    return (a & a_greater) | (b & ~a_greater);
  }
  static TFACCUM_INLINE VecD widen(const float* p) {
    VecF8 narrow;
    __builtin_memcpy(&narrow, p, sizeof narrow);
    return __builtin_convertvector(narrow, VecD);
  }
  // The fused adder's lane operations: maximum and minimum of non-negative non-NaN
  // values, and truncation to an integer of values below 2^52 (core/fused_adder.h).
  static TFACCUM_INLINE VecD max_scale(VecD a, VecD b) { return tfaccum::max_scale(a, b); }
  static TFACCUM_INLINE VecD min_scale(VecD a, VecD b) { return tfaccum::min_scale(a, b); }
  static TFACCUM_INLINE VecD truncate(VecD x) { return truncate_integer(x); }
};

// What the binary32 path needs to know of a set of operands (precondition P1), from
// their float32 bit patterns.
struct OperandStats {
  uint32_t max_field = 0;        // largest exponent field (255: a NaN or Inf)
  uint32_t min_field = 256;      // smallest exponent field of a nonzero (0: a subnormal)
  uint32_t fraction_bits = 0;    // OR of all fraction fields

  void Add(uint32_t bits) {
    const uint32_t field = (bits >> 23) & 0xff;
    max_field = std::max(max_field, field);
    min_field = std::min(min_field, (bits & 0x7fffffffu) != 0 ? field : 256u);
    fraction_bits |= bits;
  }
  void Merge(const OperandStats& other) {
    max_field = std::max(max_field, other.max_field);
    min_field = std::min(min_field, other.min_field);
    fraction_bits |= other.fraction_bits;
  }
  bool Finite() const { return max_field < 255; }
  // No NaN, Inf or binary32 subnormal: the only values the lanes' rule P1 admits.
  bool Admissible() const { return Finite() && (AllZero() || min_field > 0); }
  bool AllZero() const { return min_field == 256; }
  // Significant bits of the widest significand; exponent of the lowest set bit of any
  // value (a lower bound); exponent of the largest value.
  int TrailingZeros() const { return __builtin_ctz((fraction_bits & 0x7fffffu) | (1u << 23)); }
  int SignificantBits() const { return 24 - TrailingZeros(); }
  int LowestBit() const { return static_cast<int>(min_field) - 150 + TrailingZeros(); }
  int Top() const { return static_cast<int>(max_field) - 127; }
};

// ---- The instruction-set paths -------------------------------------------------------
// gemm_tiles.inc is compiled once per path, each under its own target, so that the
// loader-independent choice below (EnginePaths) never runs an instruction the processor
// lacks.

namespace path_generic {
using LaneOps = PortableOps;
#include "gemm_tiles.inc"
}  // namespace path_generic

#if TFACCUM_HAVE_X86_PATHS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace path_avx2 {
// The portable operations, with AVX's truncating round for the fused adder.
struct LaneOps : PortableOps {
  static TFACCUM_INLINE VecD truncate(VecD x) {
    VecD r;
    for (int half = 0; half < 2; ++half) {
      __m256d h;
      __builtin_memcpy(&h, reinterpret_cast<const double*>(&x) + 4 * half, sizeof h);
      h = _mm256_round_pd(h, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      __builtin_memcpy(reinterpret_cast<double*>(&r) + 4 * half, &h, sizeof h);
    }
    return r;
  }
};
#include "gemm_tiles.inc"
}  // namespace path_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
// GCC 12 warns that the embedded-rounding intrinsics read an uninitialized register (the
// undefined pass-through operand they are defined with): a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace path_avx512 {
// Round-to-odd from two directed-rounding adds (AVX-512 embedded rounding, no flags
// raised): when the sum is inexact, its round-down and round-up are adjacent values of
// the same sign (a sum that lands below the normal range is exact), so exactly one of
// them has an odd last bit, and that one is the sum rounded to odd; when it is exact the
// two are equal. NaN and Inf pass through as in the TwoSum form. The forms differ only
// on overflow of the lane type, which cannot happen in binary64 here (sums of float32
// products stay below 2^300) and fails precondition P4 in binary32.
struct LaneOps {
  static constexpr int kRecords = kTileRows;  // 32 vector registers
  static TFACCUM_INLINE VecD add(VecD s, VecD p) {
    const __m512d down = _mm512_add_round_pd(reinterpret_cast<__m512d>(s),
                                             reinterpret_cast<__m512d>(p),
                                             _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512d up = _mm512_add_round_pd(reinterpret_cast<__m512d>(s),
                                           reinterpret_cast<__m512d>(p),
                                           _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __mmask8 down_is_odd =
        _mm512_test_epi64_mask(_mm512_castpd_si512(down), _mm512_set1_epi64(1));
    return reinterpret_cast<VecD>(_mm512_mask_blend_pd(down_is_odd, up, down));
  }
  static TFACCUM_INLINE VecF add(VecF s, VecF p) {
    const __m512 down = _mm512_add_round_ps(reinterpret_cast<__m512>(s),
                                            reinterpret_cast<__m512>(p),
                                            _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 up = _mm512_add_round_ps(reinterpret_cast<__m512>(s),
                                          reinterpret_cast<__m512>(p),
                                          _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __mmask16 down_is_odd =
        _mm512_test_epi32_mask(_mm512_castps_si512(down), _mm512_set1_epi32(1));
    return reinterpret_cast<VecF>(_mm512_mask_blend_ps(down_is_odd, up, down));
  }
  static TFACCUM_INLINE VecU max(VecU a, VecU b) {
    return reinterpret_cast<VecU>(
        _mm512_max_epu64(reinterpret_cast<__m512i>(a), reinterpret_cast<__m512i>(b)));
  }
  static TFACCUM_INLINE VecU32 max(VecU32 a, VecU32 b) {
    return reinterpret_cast<VecU32>(
        _mm512_max_epu32(reinterpret_cast<__m512i>(a), reinterpret_cast<__m512i>(b)));
  }
  static TFACCUM_INLINE VecD widen(const float* p) {
    return reinterpret_cast<VecD>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
  }
  static TFACCUM_INLINE VecD max_scale(VecD a, VecD b) {
    return reinterpret_cast<VecD>(
        _mm512_max_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b)));
  }
  static TFACCUM_INLINE VecD min_scale(VecD a, VecD b) {
    return reinterpret_cast<VecD>(
        _mm512_min_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b)));
  }
  static TFACCUM_INLINE VecD truncate(VecD x) {
    return reinterpret_cast<VecD>(_mm512_roundscale_pd(reinterpret_cast<__m512d>(x),
                                                       _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
  }
};
#include "gemm_tiles.inc"
}  // namespace path_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

struct PathFunctions {
  void (*run_tile64)(const TileJob&);
  bool (*run_tile32)(const TileJob32&);
  OperandStats (*operand_stats)(const float*, int64_t);
  void (*quantize_range)(const float*, float*, int64_t, int64_t, const FormatParams&, int32_t,
                         uint64_t);
  void (*fused_scales)(const float*, float*, int64_t, double);
};

const PathFunctions& FunctionsOf(int isa) {
  static const PathFunctions kGenericPath = {
      path_generic::RunTile64, path_generic::RunTile32, path_generic::OperandStatsOf,
      path_generic::QuantizeRange, path_generic::FusedScalesOf};
#if TFACCUM_HAVE_X86_PATHS
  static const PathFunctions kAvx2Path = {
      path_avx2::RunTile64, path_avx2::RunTile32, path_avx2::OperandStatsOf,
      path_avx2::QuantizeRange, path_avx2::FusedScalesOf};
  static const PathFunctions kAvx512Path = {
      path_avx512::RunTile64, path_avx512::RunTile32, path_avx512::OperandStatsOf,
      path_avx512::QuantizeRange, path_avx512::FusedScalesOf};
  if (isa == kEngineAvx512) return kAvx512Path;
  if (isa == kEngineAvx2) return kAvx2Path;
#endif
  return kGenericPath;
}

int SupportedIsa() {
#if TFACCUM_HAVE_X86_PATHS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kEngineAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kEngineAvx2;
#endif
  return kEngineGeneric;
}

// The path in use. Set when the library loads from TFACCUM_ENGINE_ISA (avx512, avx2 or
// generic: the best the processor has at most) and TFACCUM_ENGINE_FLOAT32 (0 forbids
// the binary32 lanes); SetEnginePath changes it (tests run every path in one process).
struct EngineState {
  std::atomic<int> isa{kEngineGeneric};
  std::atomic<int> float32_lanes{1};
  std::atomic<int64_t> counters[kEngineCounterCount] = {};
  EngineState() {
    isa = SupportedIsa();
    if (const char* name = std::getenv("TFACCUM_ENGINE_ISA")) {
      const int requested = std::strcmp(name, "avx512") == 0  ? kEngineAvx512
                            : std::strcmp(name, "avx2") == 0 ? kEngineAvx2
                            : std::strcmp(name, "generic") == 0 ? kEngineGeneric
                                                                  : -1;
      if (requested >= 0) isa = std::min(requested, SupportedIsa());
    }
    if (const char* flag = std::getenv("TFACCUM_ENGINE_FLOAT32"))
      float32_lanes = std::strcmp(flag, "0") != 0;
  }
};

EngineState& State() {
  static EngineState state;
  return state;
}

void Count(EngineCounter counter, int64_t n = 1) {
  State().counters[counter].fetch_add(n, std::memory_order_relaxed);
}

// Whether every product of a value described by `a` and one described by `b` is exact in
// binary32: at most 24 significant bits, no bit below 2^-149, below 2^128. NaN, Inf and
// subnormal operands take the binary64 path.
bool ProductsExactInFloat32(const OperandStats& a, const OperandStats& b) {
  if (!a.Admissible() || !b.Admissible()) return false;
  if (a.AllZero() || b.AllZero()) return true;
  return a.SignificantBits() + b.SignificantBits() <= 24 &&
         a.LowestBit() + b.LowestBit() >= -149 && a.Top() + b.Top() <= 126;
}

// count * size bytes; INT64_MAX, which no allocator can provide, when that overflows.
int64_t ScratchBytes(int64_t count, int64_t size) {
  return count > INT64_MAX / size ? INT64_MAX : count * size;
}

}  // namespace

EnginePath GetEnginePath() {
  EngineState& state = State();
  EnginePath path;
  path.isa = state.isa.load();
  path.supported_isa = SupportedIsa();
  path.float32_lanes = state.float32_lanes.load() != 0;
  for (int i = 0; i < kEngineCounterCount; ++i) path.counters[i] = state.counters[i].load();
  return path;
}

bool SetEnginePath(int isa, bool float32_lanes) {
  if (isa < kEngineGeneric || isa > kEngineAvx512 || isa > SupportedIsa()) return false;
  State().isa = isa;
  State().float32_lanes = float32_lanes ? 1 : 0;
  return true;
}

bool AccumulateGemm(const AccumParams& params, int64_t M, int64_t N, int64_t K,
                    const RowGather& gather_a, const float* b, int64_t b_stride_k,
                    int64_t b_stride_n, float* c, uint64_t element_offset,
                    const EngineContext& context, const OperandValues& a_values) {
  if (M <= 0 || N <= 0) return true;
  if (K <= 0) {
    // Every sum is empty: +0 (numerics.md §3), whatever the formats and the rounding.
    // Returned here so that an empty sum costs one write per output, with no scratch.
    std::fill(c, c + M * N, 0.0f);
    return true;
  }
  const EngineState& state = State();
  const PathFunctions& path = FunctionsOf(state.isa.load());
  const int64_t row_tiles = (M + kPanelRows - 1) / kPanelRows;

  // B as float32 rows of N values, without the padding to whole column tiles that cost
  // 16x the size of B for N = 1. A tile reads kTileCols (kTileCols32) columns, so when N
  // is not a multiple of that the last column tile is shifted left to end at column N:
  // it recomputes some columns of the tile before (bit for bit the same values, same
  // keys, whichever path) and writes them again. Only N below the tile width leaves
  // lanes past N: they read the following row of B (kMaxTileCols zeros of slack after
  // the last one) and their results are dropped; a non-finite value there costs at most
  // a checked recompute of the tile. B is used in place when it already is rows of
  // N >= kMaxTileCols float32 values.
  const int64_t ldb = N;
  const float* b_rows = b;
  if (!(b_stride_k == N && b_stride_n == 1 && N >= kMaxTileCols)) {
    const int64_t floats = K * N + kMaxTileCols;  // K * N <= elements of b: no overflow
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

  // The binary32 lanes (rounding_f32.h): the rounding and formats qualify for the whole
  // call (P2, P3); B's values are checked once here, A's too when the caller gives
  // a_values, else each A panel's with its tile.
  const bool chunked = params.chunk_size > 0;
  TileJob32 job32_template{};
  job32_template.params = &params;
  job32_template.accumulator = float32_params(params.accumulator, params.rounding);
  job32_template.product = float32_params(params.product, params.rounding);
  job32_template.chunk_accumulator = float32_params(params.chunk_accumulator, params.rounding);
  const bool fused = params.fused_terms > 0;
  bool float32 = state.float32_lanes.load() && !fused && params.rounding != kStochastic &&
                 !params.flushes_subnormals && job32_template.accumulator.usable &&
                 (!params.has_product || job32_template.product.usable) &&
                 (!chunked || job32_template.chunk_accumulator.usable);
  // The statistics of n values, read in parallel.
  auto stats_of = [&](const float* values, int64_t n) {
    constexpr int64_t kBlock = 1 << 14;
    std::vector<OperandStats> parts(static_cast<size_t>(std::max(1, context.workers)));
    context.parallel_for((n + kBlock - 1) / kBlock, kBlock, [&](int64_t begin, int64_t end,
                                                                int worker) {
      const int64_t first = begin * kBlock, last = std::min(n, end * kBlock);
      parts[worker].Merge(path.operand_stats(values + first, last - first));
    });
    OperandStats stats;
    for (const OperandStats& part : parts) stats.Merge(part);
    return stats;
  };
  OperandStats b_stats;
  // With a_values, A's check is made here once for every panel.
  const bool a_checked_once = a_values.data != nullptr;
  if (float32) {
    b_stats = stats_of(b_rows, K * N);
    float32 = b_stats.Admissible();  // else no panel can qualify: skip their checks
    if (float32 && a_checked_once)
      float32 = ProductsExactInFloat32(stats_of(a_values.data, a_values.count), b_stats);
  }

  // A fused adder reads every operand's scale 2^e(x) (core/fused_adder.h): B's are
  // computed once here, laid out as b_rows (with the same zero slack after the last row),
  // each A panel's after it is gathered, into the second half of the worker's panel.
  float* b_scales = nullptr;
  if (fused) {
    const int64_t floats = K * N + kMaxTileCols;
    b_scales = static_cast<float*>(context.scratch(ScratchBytes(floats, 4), "the B scales"));
    if (b_scales == nullptr) return false;
    std::fill(b_scales + K * N, b_scales + floats, 0.0f);
    constexpr int64_t kBlock = 1 << 14;
    context.parallel_for((K * N + kBlock - 1) / kBlock, kBlock * 4, [&](int64_t begin,
                                                                        int64_t end, int) {
      KeepDenormals keep_denormals;  // subnormal operands have their own exponents
      const int64_t first = begin * kBlock, last = std::min(K * N, end * kBlock);
      path.fused_scales(b_rows + first, b_scales + first, last - first,
                        params.fused_operand_min);
    });
  }

  // One A panel per worker that runs (at most one per row tile), handed out on first use.
  // A GEMM with fewer than kPanelRows rows gets panels of M rows: a tile's rows past M
  // repeat row 0, so an M = 1 GEMM needs K values, not 16K. Panels are float32, as every
  // operand is: half the memory traffic of binary64, which the long sums of filter
  // gradients are bound by; both lane types read them.
  const int64_t panel_rows = std::min<int64_t>(kPanelRows, M);
  const int64_t panels = std::min<int64_t>(row_tiles, std::max(1, context.workers));
  const int64_t panel_floats = panel_rows * K * (fused ? 2 : 1);  // fused: and their scales
  float* panel_memory = static_cast<float*>(
      context.scratch(ScratchBytes(panels, ScratchBytes(panel_floats, 4)), "the A panels"));
  if (panel_memory == nullptr) return false;
  std::vector<int64_t> panel_of_worker(static_cast<size_t>(std::max(1, context.workers)), -1);
  std::atomic<int64_t> next_panel{0};

  TileLimits limits{ExponentLimit(params.accumulator), ExponentLimit(params.product),
                    ExponentLimit(params.chunk_accumulator)};
  const bool stochastic = params.rounding == kStochastic;
  const ElementIndex index = element_index(params, N);  // the generator's element of (i, j)
  // Roughly 15 vector instructions per product per 8 lanes.
  const int64_t cost_per_row_tile = K * N * kPanelRows * 2;
  context.parallel_for(row_tiles, cost_per_row_tile, [&](int64_t tile_begin, int64_t tile_end,
                                                         int worker) {
    KeepDenormals keep_denormals;
    int64_t& panel_index = panel_of_worker[worker];
    if (panel_index < 0) panel_index = next_panel.fetch_add(1);
    float* panel = panel_memory + panel_index * panel_floats;
    float* panel_scales = panel + panel_rows * K;  // fused only
    TileU keys = {};
    TileD out64;
    TileJob job{&params, limits, K, {}, nullptr, ldb, &keys, &out64};
    VecF out32[kPanelRows];
    TileJob32 job32 = job32_template;
    job32.K = K;
    job32.ldb = ldb;
    job32.out = out32;
    int64_t tiles64 = 0, tiles32 = 0, redone = 0;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kPanelRows;
      const int64_t rows = std::min<int64_t>(kPanelRows, M - row0);
      gather_a(row0, rows, panel);
      if (fused) path.fused_scales(panel, panel_scales, rows * K, params.fused_operand_min);
      // Panel row r of a tile, for r past the panel's rows a real row (results dropped).
      auto panel_row = [&](int64_t r) { return panel + (r < rows ? r : 0) * K; };

      // The binary64 tile of rows [sub0, sub0 + kTileRows) of the panel whose columns
      // start at col0 (col0 + kTileCols <= N unless N is smaller): computes it and writes
      // its outputs inside the matrix.
      auto run64 = [&](int64_t sub0, int64_t col0) {
        for (int r = 0; r < kTileRows; ++r) job.a_rows[r] = panel_row(sub0 + r);
        if (fused) {
          for (int r = 0; r < kTileRows; ++r)
            job.a_scales[r] = panel_scales + (panel_row(sub0 + r) - panel);
          job.b_scales = b_scales + col0;
        }
        if (stochastic) {
          for (int r = 0; r < kTileRows; ++r)
            for (int w = 0; w < kTileCols; ++w)
              keys[r][w / kLanes][w % kLanes] = element_key(
                  params.seed, element_offset + index.offset +
                                   static_cast<uint64_t>(row0 + sub0 + r) * index.row_stride +
                                   static_cast<uint64_t>(col0 + w));
        }
        job.b = b_rows + col0;
        path.run_tile64(job);
        ++tiles64;
        const int64_t r_end = std::min<int64_t>(kTileRows, rows - sub0);
        const int64_t w_end = std::min<int64_t>(kTileCols, N - col0);
        for (int64_t r = 0; r < r_end; ++r)
          for (int64_t w = 0; w < w_end; ++w)
            c[(row0 + sub0 + r) * N + col0 + w] =
                static_cast<float>(out64[r][w / kLanes][w % kLanes]);
      };
      // Binary64 tiles over the columns [col0, col0 + width) (clamped to the matrix) of
      // the panel rows [sub0, sub0 + height).
      auto run64_over = [&](int64_t sub0, int64_t height, int64_t col0, int64_t width) {
        for (int64_t s = sub0; s < std::min<int64_t>(sub0 + height, rows); s += kTileRows)
          for (int64_t first = col0; first < std::min<int64_t>(col0 + width, N);
               first += kTileCols)
            run64(s, std::max<int64_t>(0, std::min<int64_t>(first, N - kTileCols)));
      };
      // The binary32 tile of `height` panel rows from sub0 and width columns from col0;
      // when a value leaves the lanes' range, the same outputs in binary64.
      auto run32 = [&](int64_t sub0, int height, int vecs, int64_t col0) {
        job32.rows = height;
        job32.vecs = vecs;
        for (int r = 0; r < height; ++r) job32.a_rows[r] = panel_row(sub0 + r);
        job32.b = b_rows + col0;
        const int64_t width = vecs * kLanesF32;
        if (!path.run_tile32(job32)) {
          ++redone;
          run64_over(sub0, height, col0, width);
          return;
        }
        ++tiles32;
        const int64_t r_end = std::min<int64_t>(height, rows - sub0);
        const int64_t w_end = std::min<int64_t>(width, N - col0);
        for (int64_t r = 0; r < r_end; ++r)
          for (int64_t w = 0; w < w_end; ++w)
            c[(row0 + sub0 + r) * N + col0 + w] = out32[r * vecs + w / kLanesF32][w % kLanesF32];
      };

      bool tile32 = false;
      if (float32) {
        tile32 = a_checked_once ||
                 ProductsExactInFloat32(path.operand_stats(panel, rows * K), b_stats);
      }
      if (tile32 && N <= kLanesF32) {
        // One vector of columns: tiles of 8 rows, enough independent sums to hide the
        // latency of each rounding (16 would spill registers).
        for (int64_t sub0 = 0; sub0 < rows; sub0 += kTallRows) run32(sub0, kTallRows, 1, 0);
      } else if (tile32) {
        for (int64_t sub0 = 0; sub0 < rows; sub0 += kTileRows)
          for (int64_t first = 0; first < N; first += kTileCols32)
            run32(sub0, kTileRows, kTileVecs,
                  std::max<int64_t>(0, std::min<int64_t>(first, N - kTileCols32)));
      } else {
        run64_over(0, rows, 0, N);
      }
    }
    Count(kEngineTiles64, tiles64);
    Count(kEngineTiles32, tiles32);
    Count(kEngineTiles32Redone, redone);
  });
  return true;
}

void QuantizeArray(const float* x, float* y, int64_t n, const FormatParams& format,
                   int32_t rounding, uint64_t seed, const EngineContext& context) {
  const PathFunctions& path = FunctionsOf(State().isa.load());
  context.parallel_for(n, 10, [&](int64_t begin, int64_t end, int) {
    KeepDenormals keep_denormals;
    path.quantize_range(x, y, begin, end, format, rounding, seed);
  });
}

}  // namespace tfaccum
