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

// x rounded to the format's grid under mode R (nearest-even or toward zero), as
// round_to_grid_at in rounding.h with C = 1.5 * 2^(E - m + 23); e = max(exponent field
// of x, emin_field).
template <int R, class F, class U>
TFACCUM_HD F round_to_grid_f32_at(F x, U e, const Float32Params& f) {
  const F magic = from_bits(e + f.magic_offset);
  F r = from_bits(to_bits((x + magic) - magic) | (to_bits(x) & SignBit<F>::kMask));
  if (R == kTowardZero) {
    const F ulp = from_bits(e) * f.ulp_scale;  // e holds only an exponent: 2^E
    const F magnitude_x = abs_d(x);
    F truncated = abs_d(r);
    truncated = select(truncated > magnitude_x, truncated - ulp, truncated);
    r = copysign_d(truncated, x);
  }
  return r;
}

}  // namespace tfaccum

#endif  // TFACCUM_ROUNDING_F32_H_
