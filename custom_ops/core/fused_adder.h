// The fused multi-term adder of docs/numerics.md §7 (a tensor core's fused dot-product-
// add), as lane-generic arithmetic shared by the CPU engine (D = VecD, eight outputs per
// vector, cpu/gemm_tiles.inc) and the CUDA kernels (D = double, cuda/accum_kernels.cuh).
// The exact oracle is tfaccum/reference.py (fused_block).
//
// How one block D' = FDPA(a[0..l), b[0..l), D) is computed exactly in binary64:
//
// 1. Exponents as powers of two. Every operand x gets its "scale" s(x) = 2^e(x), with
//    e(x) = max(floor(log2|x|), operand_emin), as a float32 (2^-149 .. 2^127 are all
//    float32 values); a zero operand gets 0, a NaN or Inf operand 2^127 (any finite
//    value: a block with a special term ignores its finite terms). A product's exponent
//    e(a) + e(b) is then the exponent of s(a) * s(b), which is exact in binary64
//    (2^-298 .. 2^254), and 0 exactly when the product has a zero operand. Per lane the
//    block keeps the maximum `top` and the minimum `low` of these products: the block's
//    largest exponent is E with 2^E = max(top, low == 0 ? 2^e_zero : 0, scale of D).
// 2. Truncation. With down = 2^(F - E) every term t satisfies |t| < 2^(E + 2) (a
//    significand product lies in [1, 4)), so t * down is exact (a power-of-two scaling
//    that neither overflows nor, since |t| >= 2^-298 and 2^(F-E) >= 2^-511, underflows)
//    and below 2^(F + 2) <= 2^42 in magnitude; truncating it to an integer is the
//    truncation of t to a multiple of 2^(E - F), in units of 2^(E - F).
// 3. Exact sum. The L + 1 <= 65 truncated terms are integers below 2^42, so every partial
//    sum is an integer below 65 * 2^42 < 2^49: exact in binary64, in any order.
//    NaN and Inf terms propagate through the scaling, the truncation and the sum exactly
//    as the IEEE sum of the special terms that §7 asks for (a finite term cannot turn a
//    special sum into anything else).
// 4. One rounding. S = sum * 2^(E - F) is exact; adding +0 turns an exact zero sum
//    (possibly -0, from truncated negative terms) into +0; quantize rounds S once to the
//    accumulator format with the output rounding, range rules included. The §7 exception
//    (overflow="inf" gives Inf under toward-zero too, for |S| >= 2^(emax+1)) is the
//    FormatParams AccumParams::fused_result, whose overflow value is Inf whenever the
//    format overflows to Inf (see set_fused in accum_params.h): toward zero, the
//    truncated magnitude exceeds the largest value exactly when |S| >= 2^(emax + 1).
//
// Framework-free like rounding.h.
#ifndef TFACCUM_FUSED_ADDER_H_
#define TFACCUM_FUSED_ADDER_H_

#include <stdint.h>

#include "rounding.h"

namespace tfaccum {

constexpr uint64_t kExponentMask = 0x7ff0000000000000ULL;

// The lane-wise maximum and minimum of non-negative, non-NaN values (the scales).
template <class D>
TFACCUM_HD D max_scale(D a, D b) {
  return select(a > b, a, b);
}
template <class D>
TFACCUM_HD D min_scale(D a, D b) {
  return select(a < b, a, b);
}

// s(x) of step 1 for float32 operands widened to binary64 (one, or a vector of them): 0
// for a zero, 2^127 for NaN and Inf, else 2^max(floor(log2|x|), operand_emin), a power
// of two >= 2^-149, so exact as a float32. `operand_min` is 2^operand_emin. In binary64
// every float32 (subnormals included) is normal, so its exponent field is floor(log2|x|).
template <class D>
TFACCUM_HD D fused_operand_scales(D x, double operand_min) {
  const D power = from_bits(to_bits(x) & kExponentMask);  // Inf for NaN and Inf
  const D scale = max_scale(min_scale(power, D{} + 1.7014118346046923e38),  // 2^127
                            D{} + operand_min);
  return select(x == D{}, D{}, scale);
}
TFACCUM_HD float fused_operand_scale(float x, double operand_min) {
  return static_cast<float>(fused_operand_scales(static_cast<double>(x), operand_min));
}

// 2^E of step 1, from the block's product scales (`top`, `low`) and the running sum `d`.
// D's exponent is max(floor(log2|D|), emin) of the accumulator format (`d_min` =
// 2^emin); a zero D, like a zero product, has exponent e_zero; an infinite or NaN D a
// finite stand-in (2^128), as the operands.
template <class D>
TFACCUM_HD D fused_block_scale(D top, D low, D d, const AccumParams& p) {
  const double d_min = from_bits(static_cast<uint64_t>(p.accumulator.emin_field) << 52);
  const D zero_scale = D{} + p.fused_zero_scale;
  D d_scale = from_bits(to_bits(d) & kExponentMask);  // 2^floor(log2|d|); Inf for NaN/Inf
  d_scale = min_scale(max_scale(d_scale, D{} + d_min), D{} + 3.402823669209385e38);  // 2^128
  d_scale = select(d == D{}, zero_scale, d_scale);
  const D zero_term = select(low == D{}, zero_scale, D{});
  return max_scale(max_scale(top, zero_term), d_scale);
}

// 2^(F - E) and 2^(E - F) from 2^E, by exponent-field arithmetic (E in [-512, 512], so
// both are normal binary64 values).
template <class D>
TFACCUM_HD D fused_down_scale(D block_scale, const AccumParams& p) {
  return from_bits((static_cast<uint64_t>(2046 + p.fused_fraction_bits) << 52) -
                   to_bits(block_scale));
}
template <class D>
TFACCUM_HD D fused_up_scale(D block_scale, const AccumParams& p) {
  return from_bits(to_bits(block_scale) -
                   (static_cast<uint64_t>(p.fused_fraction_bits) << 52));
}

// x truncated toward zero to an integer, for |x| < 2^52 (NaN and Inf pass through):
// adding and subtracting 2^52 rounds the magnitude to the nearest integer (exact: the
// sum lies in [2^52, 2^53), where binary64 spacing is 1), and a result above the
// magnitude is one too large. Portable form; the engines' paths may use a truncating
// instruction instead, which gives the same value.
template <class D>
TFACCUM_HD D truncate_integer(D x) {
#if defined(__CUDA_ARCH__)
  return trunc(x);  // device code uses D = double only
#else
  const D magnitude = abs_d(x);
  const D nearest = (magnitude + 4503599627370496.0) - 4503599627370496.0;
  return copysign_d(select(nearest > magnitude, nearest - 1.0, nearest), x);
#endif
}

// Steps 3 and 4: the block's result from the integer sum of its truncated terms (in
// units of 2^(E - F), `up` = 2^(E - F)). kOut: the adder's output rounding.
template <int kOut, class D>
TFACCUM_HD D fused_block_result(D units, D up, const AccumParams& p) {
  const D exact = units * up + 0.0;  // exact; + 0.0 makes an exact zero sum +0
  using U = decltype(to_bits(exact));
  return quantize<kOut>(exact, p.fused_result, U{});
}

// One output's whole dot product with the fused adder, in scalar binary64 (the CUDA
// kernels, one output per thread; the CPU engine runs the same chain over a tile of
// vectors in gemm_tiles.inc, AccumulateTileFused). `operand(k, &a, &b)` reads the k-th
// operand pair; `key` is the output's generator key (stochastic chunk sums only).
// The chain of numerics.md §7: D_0 = +0, one block per L products; with promotion it
// restarts from +0 at every chunk of chunk_size products (blocks start at the chunk's
// first product), and each chunk's result is added to the total in the chunk format
// under the config's rounding R, with the chunk sums' counters.
template <int R, int kOut, class Operand>
TFACCUM_HD double fused_dot(const AccumParams& p, int64_t K, const Operand& operand,
                            uint64_t key) {
  const int64_t L = p.fused_terms;
  const bool chunked = p.chunk_size > 0;
  const int64_t chunk = chunked ? p.chunk_size : K;
  double total = 0.0;
  int64_t chunk_index = 0;
  for (int64_t k0 = 0; k0 < K; k0 += chunk, ++chunk_index) {
    const int64_t k1 = K < k0 + chunk ? K : k0 + chunk;
    double d = 0.0;
    for (int64_t b0 = k0; b0 < k1; b0 += L) {
      const int64_t b1 = k1 < b0 + L ? k1 : b0 + L;
      double top = 0.0, low = 1.0;  // the block's largest and smallest product scale
      for (int64_t k = b0; k < b1; ++k) {
        float a, b;
        operand(k, &a, &b);
        const double scale = static_cast<double>(fused_operand_scale(a, p.fused_operand_min)) *
                             static_cast<double>(fused_operand_scale(b, p.fused_operand_min));
        top = max_scale(top, scale);
        low = min_scale(low, scale);
      }
      const double block_scale = fused_block_scale(top, low, d, p);
      const double down = fused_down_scale(block_scale, p), up = fused_up_scale(block_scale, p);
      double units = truncate_integer(d * down);
      for (int64_t k = b0; k < b1; ++k) {
        float a, b;
        operand(k, &a, &b);
        units += truncate_integer((static_cast<double>(a) * static_cast<double>(b)) * down);
      }
      d = fused_block_result<kOut>(units, up, p);
    }
    if (chunked) {
      const uint64_t rbits = R == kStochastic ? random_bits24(key, chunk_counter(chunk_index)) : 0;
      total = accumulate<R>(total, d, p.chunk_accumulator, rbits);
    } else {
      total = d;
    }
  }
  return total;
}

}  // namespace tfaccum

#endif  // TFACCUM_FUSED_ADDER_H_
