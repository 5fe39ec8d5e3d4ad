// The tfaccum rounding core: every rounding tfaccum performs, on CPU and GPU.
//
// One header of small functions, shared verbatim by the C++ kernels and the CUDA kernels
// (it includes no TensorFlow and no CUDA headers). The arithmetic it implements is
// defined in docs/numerics.md; tfaccum/reference.py is the exact rational oracle.
//
// Representation. Partial sums are held in binary64. Every tfaccum format (e <= 8,
// m <= 23) is a subset of binary32, hence of binary64, and the product of two float32
// values is exact in binary64 (48-bit significand, exponent >= -298).
//
// Single rounding of an exact sum. `s + p` is computed as a binary64 sum `hi` plus its
// exact error `lo` (TwoSum, no FMA contraction allowed). The pair is collapsed to `hi`
// rounded *to odd* (sticky last bit). Rounding that value to a format with at most 24
// significant bits gives the correctly rounded exact sum for nearest-even and
// toward-zero (Boldo & Melquiond 2008: round-to-odd to p+k bits, k >= 2, then to p bits),
// and its top 28 fraction bits below the target ulp are exact, more than the 24 bits
// that stochastic rounding reads.
//
// Quantization of a binary64 x to format F: with E_eff = max(exponent(x), emin),
// y = x * 2^(m - E_eff) is exact and the target grid is the integers, so rounding y to
// an integer (rint / trunc / stochastic) and scaling back is exact.
#ifndef TFACCUM_ROUNDING_H_
#define TFACCUM_ROUNDING_H_

#include <stdint.h>


#if defined(__CUDACC__)
#define TFACCUM_HD __host__ __device__ __forceinline__
#else
#define TFACCUM_HD inline __attribute__((always_inline))
#endif

namespace tfaccum {

enum Rounding : int32_t {
  kNearestEven = 0,
  kTowardZero = 1,
  kStochastic = 2,
};

// A format as the user states it (numerics.md section 1).
struct Format {
  int32_t exponent_bits;  // 2..8
  int32_t mantissa_bits;  // 0..23
  int32_t subnormals;     // 1: gradual underflow; 0: flush results below 2^emin
  int32_t overflow_inf;   // 0: saturate to +-max; 1: IEEE overflow to +-Inf
};

// Precomputed constants for quantizing binary64 values to one format in the hot loop.
struct FormatParams {
  int64_t emin_field;    // binary64 biased exponent field of 2^emin
  int64_t magic_offset;  // bits(1.5 * 2^(E - m + 52)) = (E_field << 52) + magic_offset
  int64_t ulp_offset;    // bits(2^(E - m)) = (E_field << 52) - ulp_offset
  int64_t units_offset;  // bits(2^(24 + m - E)) = units_offset - (E_field << 52)
  double max_value;     // largest finite value
  double flush_below;   // results with magnitude below this become signed zeros
  double overflow_value;     // what an overflowing nearest/stochastic rounding gives
  double overflow_probe;     // 2^(1023 - emax): overflows binary64 exactly above max_value
};

// Everything one GEMM needs to know about its accumulation (numerics.md section 3).
struct AccumParams {
  FormatParams accumulator;
  FormatParams product;
  FormatParams chunk_accumulator;
  int32_t has_product;   // 0: exact products
  int32_t rounding;      // Rounding
  int64_t chunk_size;    // 0: sequential
  uint64_t seed;         // the stream seed: stream_seed(config seed, step)
  int32_t flushes_subnormals;  // some format used has subnormals off
  // The output is column group `group` of `groups` equal groups of a wider output (one
  // group of a grouped convolution): the stochastic element index of output (i, j) is
  // i * (N * groups) + group * N + j, its flat index in the wider output (numerics.md
  // section 4). groups <= 1 means the output is the whole tensor.
  int64_t group;
  int64_t groups;
  // The fused multi-term adder (numerics.md section 7; core/fused_adder.h), set by
  // set_fused of accum_params.h: fused_terms = 0 means none (one rounding per addition).
  int32_t fused_terms;          // L, products per block
  int32_t fused_fraction_bits;  // F
  int32_t fused_toward_zero;    // the block's output rounding: 1 toward zero, 0 nearest-even
  double fused_zero_scale;      // 2^zero_exponent, the scale of a zero term
  double fused_operand_min;     // 2^operand_emin, the smallest operand scale
  FormatParams fused_result;    // the accumulator format, for the block's one rounding
};

// ---- Lane-generic primitives ---------------------------------------------------------
// The core below is written once for a value type D with bit type U: D = double,
// U = uint64_t on the GPU and in scalar CPU code; D = VecD, U = VecU (GCC vector types,
// eight lanes) in the CPU engine. The sum rounded to odd, abs_d and copysign_d also take
// binary32 values (float, uint32_t; VecF, VecU32: sixteen lanes) for the engine's binary32
// lanes (rounding_f32.h). A mask is all ones or all zeros per lane.

TFACCUM_HD uint64_t to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}

TFACCUM_HD double from_bits(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

TFACCUM_HD uint32_t to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}

TFACCUM_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

TFACCUM_HD uint64_t mask(bool condition) { return uint64_t{0} - static_cast<uint64_t>(condition); }
// Bits as signed integers, for comparing values below 2^63 (exponent fields): AVX2 has no
// unsigned 64-bit compare, and GCC lowers one lane by lane.
TFACCUM_HD int64_t as_signed(uint64_t u) { return static_cast<int64_t>(u); }
TFACCUM_HD double to_double(uint64_t u) { return static_cast<double>(u); }

#if !defined(__CUDACC__)
typedef double VecD __attribute__((vector_size(64)));
typedef uint64_t VecU __attribute__((vector_size(64)));
typedef int64_t VecI __attribute__((vector_size(64)));
constexpr int kLanes = 8;
TFACCUM_HD VecU to_bits(VecD x) { return reinterpret_cast<VecU>(x); }
TFACCUM_HD VecD from_bits(VecU u) { return reinterpret_cast<VecD>(u); }
TFACCUM_HD VecU mask(VecI condition) { return reinterpret_cast<VecU>(condition); }
TFACCUM_HD VecI as_signed(VecU u) { return reinterpret_cast<VecI>(u); }
TFACCUM_HD VecD to_double(VecU u) { return __builtin_convertvector(u, VecD); }

typedef float VecF __attribute__((vector_size(64)));
typedef uint32_t VecU32 __attribute__((vector_size(64)));
typedef int32_t VecI32 __attribute__((vector_size(64)));
constexpr int kLanesF32 = 16;
TFACCUM_HD VecU32 to_bits(VecF x) { return reinterpret_cast<VecU32>(x); }
TFACCUM_HD VecF from_bits(VecU32 u) { return reinterpret_cast<VecF>(u); }
TFACCUM_HD VecU32 mask(VecI32 condition) { return reinterpret_cast<VecU32>(condition); }
#endif

// The sign bit of D's bit pattern, and its position.
template <class D>
struct SignBit;
template <>
struct SignBit<double> {
  static constexpr uint64_t kMask = 0x8000000000000000ULL;
  static constexpr int kShift = 63;
};
template <>
struct SignBit<float> {
  static constexpr uint32_t kMask = 0x80000000u;
  static constexpr int kShift = 31;
};
#if !defined(__CUDACC__)
template <>
struct SignBit<VecD> : SignBit<double> {};
template <>
struct SignBit<VecF> : SignBit<float> {};
#endif

// select(condition, a, b): `condition` is a comparison result (bool, or a vector of
// all-ones/all-zeros lanes); vector conditionals compile to masked blends.
template <class C, class T>
TFACCUM_HD T select(C condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

#if !defined(__CUDACC__)
// Vector conditions blend bits: GCC lowers a vector `?:` lane by lane (scalar code) where
// the target lacks 512-bit vectors, e.g. for AVX2, but splits bitwise operations into
// halves.
TFACCUM_HD VecU select(VecI condition, VecU if_true, VecU if_false) {
  const VecU m = reinterpret_cast<VecU>(condition);
  return (if_true & m) | (if_false & ~m);
}
TFACCUM_HD VecD select(VecI condition, VecD if_true, VecD if_false) {
  return from_bits(select(condition, to_bits(if_true), to_bits(if_false)));
}
TFACCUM_HD VecU32 select(VecI32 condition, VecU32 if_true, VecU32 if_false) {
  const VecU32 m = reinterpret_cast<VecU32>(condition);
  return (if_true & m) | (if_false & ~m);
}
TFACCUM_HD VecF select(VecI32 condition, VecF if_true, VecF if_false) {
  return from_bits(select(condition, to_bits(if_true), to_bits(if_false)));
}
#endif

template <class D>
TFACCUM_HD D abs_d(D x) {
  return from_bits(to_bits(x) & ~SignBit<D>::kMask);
}

template <class D>
TFACCUM_HD D copysign_d(D magnitude, D sign) {
  return from_bits((to_bits(magnitude) & ~SignBit<D>::kMask) |
                   (to_bits(sign) & SignBit<D>::kMask));
}

inline double pow2_d(int64_t e) {  // 2^e for -1022 <= e <= 1023
  return from_bits(static_cast<uint64_t>(e + 1023) << 52);
}

// ---- The stochastic generator (docs/numerics.md section 4) -------------------------

template <class U>
TFACCUM_HD U mix64(U z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The seed of training step `step`'s stream: every draw of a step is keyed by it. mix64
// is a bijection with mix64(0) = 0, so distinct steps give distinct streams and step 0 is
// the configured seed itself (the stream of the ops before they had a step).
TFACCUM_HD uint64_t stream_seed(uint64_t seed, uint64_t step) {
  return seed ^ mix64<uint64_t>(step * 0xC2B2AE3D27D4EB4FULL);
}

// Per-element key: computed once per output element.
template <class U>
TFACCUM_HD U element_key(uint64_t seed, U element) {
  return mix64(seed + (element + 1) * 0x9E3779B97F4A7C15ULL);
}

// Output (i, j) of an M x N GEMM has the stochastic element index
// i * row_stride + offset + j (see AccumParams::group).
struct ElementIndex {
  uint64_t row_stride, offset;
};
TFACCUM_HD ElementIndex element_index(const AccumParams& p, int64_t N) {
  const uint64_t n = static_cast<uint64_t>(N);
  if (p.groups <= 1) return ElementIndex{n, 0};
  return ElementIndex{n * static_cast<uint64_t>(p.groups), n * static_cast<uint64_t>(p.group)};
}

// The 24-bit draw for rounding number `counter` of an element.
template <class U>
TFACCUM_HD U random_bits24(U key, uint64_t counter) {
  return mix64(key ^ ((counter + 1) * 0xD1B54A32D192ED03ULL)) >> 40;
}

// Counters: which rounding of a dot product a draw belongs to.
TFACCUM_HD uint64_t product_counter(int64_t k) { return 3 * static_cast<uint64_t>(k); }
TFACCUM_HD uint64_t accumulate_counter(int64_t k) { return 3 * static_cast<uint64_t>(k) + 1; }
TFACCUM_HD uint64_t chunk_counter(int64_t j) { return 3 * static_cast<uint64_t>(j) + 2; }

// ---- Quantization -------------------------------------------------------------------

// Rounds x to the format under mode R. x must be exact or rounded to odd with at least
// two more bits than the format (see the file comment). `rbits` is the 24-bit draw and
// is read only by stochastic rounding.
//
// With E = max(exponent(x), emin) the format's grid near x has spacing u = 2^(E - m).
// C = 1.5 * 2^(E - m + 52) has ulp u and |x| < C/3, so the binary64 sum x + C is x
// rounded once to nearest-even on that grid (C is an even multiple of u), and
// (x + C) - C recovers it exactly. That result has x's sign or is +0, so OR-ing in x's
// sign bit gives the signed zero where x rounds to zero and changes nothing elsewhere.
//
// round_to_grid_at takes e = max(exponent field of x, emin field), each shifted into
// place, from a caller that has computed it (the engines use their own max
// instructions); round_to_grid computes it.
template <int R, class D, class U>
TFACCUM_HD D round_to_grid_at(D x, U e, const FormatParams& f, U rbits) {
  const D magic = from_bits(e + static_cast<uint64_t>(f.magic_offset));  // 1.5 * 2^(E-m+52)
  D r = from_bits(to_bits((x + magic) - magic) | (to_bits(x) & SignBit<D>::kMask));
  if (R != kNearestEven) {
    const D ulp = from_bits(e - static_cast<uint64_t>(f.ulp_offset));  // 2^(E - m)
    const D magnitude_x = abs_d(x);
    D truncated = abs_d(r);
    truncated = select(truncated > magnitude_x, truncated - ulp, truncated);
    if (R == kTowardZero) {
      r = copysign_d(truncated, x);
    } else {
      // floor(fraction * 2^24) of the part below the truncated value, exactly.
      const D to_units = from_bits(static_cast<uint64_t>(f.units_offset) - e);  // 2^(24+m-E)
      const D scaled = (magnitude_x - truncated) * to_units;  // exact, in [0, 2^24)
      const D rounded = (scaled + 4503599627370496.0) - 4503599627370496.0;
      const D top24 = select(rounded > scaled, rounded - 1.0, rounded);
      const D away = select(top24 + to_double(rbits) >= 16777216.0, truncated + ulp, truncated);
      r = copysign_d(away, x);
    }
  }
  return r;
}

template <int R, class D, class U>
TFACCUM_HD D round_to_grid(D x, const FormatParams& f, U rbits) {
  const U exponent = to_bits(x) & 0x7ff0000000000000ULL;              // E_field << 52
  const U emin = U{} + (static_cast<uint64_t>(f.emin_field) << 52);
  return round_to_grid_at<R>(x, select(as_signed(exponent) > as_signed(emin), exponent, emin), f,
                             rbits);
}

// The range rules applied to round_to_grid's result r for input x: subnormal flush,
// overflow policy, NaN and Inf passing through.
template <class D>
TFACCUM_HD D apply_range(D x, D r, const FormatParams& f) {
  const D magnitude = abs_d(r);
  r = select(magnitude < f.flush_below, copysign_d(D{}, r), r);
  r = select(magnitude > f.max_value, copysign_d(D{} + f.overflow_value, x), r);
  const auto exponent = to_bits(x) & 0x7ff0000000000000ULL;
  return select(exponent == 0x7ff0000000000000ULL, x, r);  // NaN and Inf pass through
}

// Q_F(x): rounds x to the format under mode R, range rules included.
template <int R, class D, class U>
TFACCUM_HD D quantize(D x, const FormatParams& f, U rbits) {
  return apply_range(x, round_to_grid<R>(x, f, rbits), f);
}

// Zero where apply_range is the identity when subnormals are kept (round_to_grid's
// result r finite and at most the largest value), NaN elsewhere: results above the
// largest value lie on the grid at 2^(emax+1) or beyond, and the scaling overflows them
// to Inf, so probe - probe is NaN exactly for them and for NaN/Inf. No masks involved:
// a caller sums these to check many steps at once.
template <class D>
TFACCUM_HD D range_check(D r, const FormatParams& f) {
  const D probe = r * f.overflow_probe;
  return probe - probe;
}


// Runtime-dispatched form, for code that is not in a hot loop.
TFACCUM_HD double quantize_any(double x, const FormatParams& f, int32_t rounding,
                               uint64_t rbits) {
  if (rounding == kNearestEven) return quantize<kNearestEven>(x, f, rbits);
  if (rounding == kTowardZero) return quantize<kTowardZero>(x, f, rbits);
  return quantize<kStochastic>(x, f, rbits);
}

// s + p as one value of D's format rounded to odd: exact when the sum is, else the
// neighbour of the rounded sum whose last bit is 1 on the side of the exact value. For
// binary32 lanes also (rounding_f32.h), where an overflowing sum is left to the caller.
template <class D>
TFACCUM_HD D add_round_to_odd(D s, D p) {
  const D hi = s + p;
  const D p_virtual = hi - s;
  const D s_virtual = hi - p_virtual;
  const D lo = (s - s_virtual) + (p - p_virtual);  // exact error (TwoSum)
  auto bits = to_bits(hi);
  // Branch-free so that loops over outputs vectorize.
  const auto inexact = mask(abs_d(lo) > D{});  // false for a NaN lo (Inf inputs)
  const auto adjust = inexact & ~bits & 1;                 // only an even hi moves
  const auto shrinks = (bits ^ to_bits(lo)) >> SignBit<D>::kShift;  // lo points to zero
  bits += adjust - 2 * (adjust & shrinks);  // +1 ulp away from zero, or -1 toward it
  return from_bits(bits);
}

#if defined(__CUDA_ARCH__)
// The same round-to-odd sum from the GPU's directed-rounding adds: when the sum is
// inexact, the toward-zero sum with its last bit set is the odd neighbour on the exact
// value's side (round-to-odd is unique, so this equals the generic form; NaN and Inf
// give an "exact" comparison and pass through unchanged).
__device__ __forceinline__ double add_round_to_odd(double s, double p) {
  const double toward_zero = __dadd_rz(s, p);
  const bool inexact = __dadd_rd(s, p) < __dadd_ru(s, p);
  return inexact ? __longlong_as_double(__double_as_longlong(toward_zero) | 1) : toward_zero;
}
#endif

// One accumulation step: Q_F(s + p) of the exact sum.
template <int R, class D, class U>
TFACCUM_HD D accumulate(D s, D p, const FormatParams& f, U rbits) {
  return quantize<R>(add_round_to_odd(s, p), f, rbits);
}

}  // namespace tfaccum

#endif  // TFACCUM_ROUNDING_H_
