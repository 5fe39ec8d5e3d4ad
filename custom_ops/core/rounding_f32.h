// Float32-lane forms of the rounding core, for the engines' float32 path
// (docs/numerics.md section 6).
//
// The binary64 core (rounding.h) is exact for every tfaccum configuration. This header
// does the same arithmetic in binary32 lanes, twice as many per vector, and is exact only
// under preconditions that the engine checks for each tile before it trusts a result:
//
//   P1  every product a*b of the tile is exact in binary32 (FP8 operands, or bfloat16 /
//       float16 operands within an exponent range: see OperandStats in the engine);
//   P2  every format used has m <= 21: the binary32 sum rounded to odd has 24 bits, at
//       least two more than the format's m + 1, so rounding it again to the format is the
//       single rounding of the exact sum (Boldo and Melquiond 2008), as in binary64;
//   P3  rounding is nearest-even or toward zero (stochastic rounding reads 24 bits below
//       the format's last bit, which a binary32 sum rounded to odd does not hold);
//   P4  no format flushes subnormals, and every value rounded is below 2^limit with
//       limit = min(emax, 105 + m) (Float32Params::limit_field): then the format's range
//       rules are the identity and the magic constant below is finite. Values are not
//       checked one by one: each rounding records its input's exponent field and the
//       engine compares the maximum with the limit once per tile (and recomputes the tile
//       in binary64 when it is exceeded, or when a value is NaN or Inf).
#ifndef TFACCUM_ROUNDING_F32_H_
#define TFACCUM_ROUNDING_F32_H_

#include "rounding.h"

namespace tfaccum {

// A format's constants for binary32 lanes, derived from its binary64 FormatParams.
struct Float32Params {
  uint32_t emin_field;    // binary32 exponent field of 2^emin, shifted into place
  uint32_t magic_offset;  // bits(1.5 * 2^(E - m + 23)) = E_field + magic_offset
  float ulp_scale;        // 2^-m: the grid spacing 2^(E - m) is 2^E * ulp_scale, exactly
                          // (also where it is a binary32 subnormal: E - m >= -147)
  uint32_t limit_field;   // P4: a rounded value's exponent field must not exceed this
  bool usable;            // P2 and P3 hold for this format under the given rounding
};

inline Float32Params float32_params(const FormatParams& f, int32_t rounding) {
  const int64_t emin = f.emin_field - 1023;
  const int64_t m = 52 - (f.magic_offset >> 52);
  const int64_t emax = static_cast<int64_t>((to_bits(f.max_value) >> 52) & 0x7ff) - 1023;
  Float32Params p{};
  p.usable = m <= 21 && f.flush_below == 0.0 &&
             (rounding == kNearestEven || rounding == kTowardZero);
  if (!p.usable) return p;
  p.emin_field = static_cast<uint32_t>(emin + 127) << 23;
  p.magic_offset = static_cast<uint32_t>(((23 - m) << 23) | (int64_t{1} << 22));
  p.ulp_scale = static_cast<float>(pow2_d(-m));
  // Below 2^emax no value rounds past the largest finite one, and E - m + 23 <= 127
  // keeps the magic constant finite; a value with exponent `limit` passes, the next fails.
  const int64_t limit = emax - 1 < 104 + m ? emax - 1 : 104 + m;
  p.limit_field = static_cast<uint32_t>(limit + 127) << 23;
  return p;
}

#if !defined(__CUDACC__)
typedef float VecF __attribute__((vector_size(64)));
typedef uint32_t VecU32 __attribute__((vector_size(64)));
typedef int32_t VecI32 __attribute__((vector_size(64)));
constexpr int kLanesF32 = 16;
TFACCUM_HD VecU32 to_bits(VecF x) { return reinterpret_cast<VecU32>(x); }
TFACCUM_HD VecF from_bits(VecU32 u) { return reinterpret_cast<VecF>(u); }
TFACCUM_HD VecU32 mask(VecI32 condition) { return reinterpret_cast<VecU32>(condition); }
// As select in rounding.h: vector conditions blend bits.
TFACCUM_HD VecU32 select(VecI32 condition, VecU32 if_true, VecU32 if_false) {
  const VecU32 m = reinterpret_cast<VecU32>(condition);
  return (if_true & m) | (if_false & ~m);
}
TFACCUM_HD VecF select(VecI32 condition, VecF if_true, VecF if_false) {
  return from_bits(select(condition, to_bits(if_true), to_bits(if_false)));
}
#endif

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

template <class F>
TFACCUM_HD F abs_f32(F x) {
  return from_bits(to_bits(x) & 0x7fffffffu);
}

template <class F>
TFACCUM_HD F copysign_f32(F magnitude, F sign) {
  return from_bits((to_bits(magnitude) & 0x7fffffffu) | (to_bits(sign) & 0x80000000u));
}

// s + p as one binary32 rounded to odd, by TwoSum (the portable form; the AVX-512 and
// CUDA engines use directed-rounding adds instead). Exact for finite s, p whose sum does
// not overflow (an overflow fails P4).
template <class F>
TFACCUM_HD F add_round_to_odd_f32(F s, F p) {
  const F hi = s + p;
  const F p_virtual = hi - s;
  const F s_virtual = hi - p_virtual;
  const F lo = (s - s_virtual) + (p - p_virtual);
  auto bits = to_bits(hi);
  const auto inexact = mask(abs_f32(lo) > 0.0f);
  const auto adjust = inexact & ~bits & 1u;
  const auto shrinks = (bits ^ to_bits(lo)) >> 31;
  bits += adjust - 2u * (adjust & shrinks);
  return from_bits(bits);
}

// x rounded to the format's grid under mode R (nearest-even or toward zero), as
// round_to_grid_at in rounding.h with C = 1.5 * 2^(E - m + 23); e = max(exponent field
// of x, emin_field).
template <int R, class F, class U>
TFACCUM_HD F round_to_grid_f32_at(F x, U e, const Float32Params& f) {
  const F magic = from_bits(e + f.magic_offset);
  F r = from_bits(to_bits((x + magic) - magic) | (to_bits(x) & 0x80000000u));
  if (R == kTowardZero) {
    const F ulp = from_bits(e) * f.ulp_scale;  // e holds only an exponent: 2^E
    const F magnitude_x = abs_f32(x);
    F truncated = abs_f32(r);
    truncated = select(truncated > magnitude_x, truncated - ulp, truncated);
    r = copysign_f32(truncated, x);
  }
  return r;
}

}  // namespace tfaccum

#endif  // TFACCUM_ROUNDING_F32_H_
