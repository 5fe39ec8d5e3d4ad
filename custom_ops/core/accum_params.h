// Building and validating the parameters of an accumulation: the one place that turns
// formats, a rounding mode, a chunk size, a seed, a step and a channel group into the
// rounding core's FormatParams and AccumParams.
//
// Both front ends use it: the TensorFlow kernels (tf/kernels/accum_attrs.h, from op
// attributes) and the CUDA launchers' helpers (cuda/accum_kernels.cuh, from the plain C
// arguments of accum_launchers.h), so a configuration means the same on every device.
// Framework-free like rounding.h: no TensorFlow and no CUDA headers. Each check returns
// nullptr or a static message naming the problem; a front end may add the offending
// value (the TensorFlow kernels do). The Python side validates the same ranges first
// (tfaccum/config.py, FloatFormat and AccumConfig), with its own messages.
#ifndef TFACCUM_ACCUM_PARAMS_H_
#define TFACCUM_ACCUM_PARAMS_H_

#include <stdint.h>

#include "rounding.h"

namespace tfaccum {

// The four integers of a format, in the order of the `accumulator`/`product`/
// `chunk_accumulator`/`format` op attributes and of the launchers' format arrays.
struct FormatField {
  const char* name;     // as the TensorFlow kernels' messages name it
  int64_t lo, hi;       // the allowed range
  const char* problem;  // validate_format's message
};
inline constexpr FormatField kFormatFields[4] = {
    {"exponent_bits", 2, 8, "exponent_bits must be in 2..8"},
    {"mantissa_bits", 0, 23, "mantissa_bits must be in 0..23"},
    {"subnormals", 0, 1, "subnormals must be 0 or 1"},
    {"overflow_inf (0: saturate, 1: inf)", 0, 1, "overflow must be 0 (saturate) or 1 (inf)"},
};

// The index of the first of [exponent_bits, mantissa_bits, subnormals, overflow_inf] out
// of its range, or -1. Taken as int64 so that an op attribute is checked as it arrives,
// before it is narrowed to the int32 fields of Format.
inline int invalid_format_field(const int64_t values[4]) {
  for (int i = 0; i < 4; ++i)
    if (values[i] < kFormatFields[i].lo || values[i] > kFormatFields[i].hi) return i;
  return -1;
}

// A format from four integers already checked by invalid_format_field.
template <class Int>
inline Format format_from(const Int values[4]) {
  return Format{static_cast<int32_t>(values[0]), static_cast<int32_t>(values[1]),
                static_cast<int32_t>(values[2]), static_cast<int32_t>(values[3])};
}

// Validates a format; returns nullptr or a static message naming the problem.
inline const char* validate_format(const Format& f) {
  const int64_t values[4] = {f.exponent_bits, f.mantissa_bits, f.subnormals, f.overflow_inf};
  const int bad = invalid_format_field(values);
  return bad < 0 ? nullptr : kFormatFields[bad].problem;
}

inline const char* validate_rounding(int32_t rounding) {
  if (rounding < kNearestEven || rounding > kStochastic) return "rounding must be 0, 1 or 2";
  return nullptr;
}

// The quantization constants of a valid format under a valid rounding mode.
inline FormatParams make_format_params(const Format& f, int32_t rounding) {
  const int64_t bias = (int64_t{1} << (f.exponent_bits - 1)) - 1;
  const int64_t emin = 1 - bias;
  const int64_t m = f.mantissa_bits;
  FormatParams p;
  p.emin_field = emin + 1023;
  p.magic_offset = static_cast<int64_t>(((52 - m) << 52) | (int64_t{1} << 51));
  p.ulp_offset = m << 52;
  p.units_offset = (2046 + 24 + m) << 52;  // field = 1023 + 24 + m - (E_field - 1023)
  p.max_value = (2.0 - pow2_d(-m)) * pow2_d(bias);
  p.flush_below = f.subnormals ? 0.0 : pow2_d(emin);
  p.overflow_probe = pow2_d(1023 - bias);
  const bool to_inf = f.overflow_inf && rounding != kTowardZero;
  p.overflow_value = to_inf ? from_bits(uint64_t{0x7ff0000000000000ULL}) : p.max_value;
  return p;
}

// FormatParams of one format, validated (tfaccum.quantize).
inline const char* make_quantize_format(const Format& f, int32_t rounding, FormatParams* out) {
  if (const char* e = validate_rounding(rounding)) return e;
  if (const char* e = validate_format(f)) return e;
  *out = make_format_params(f, rounding);
  return nullptr;
}

// The product format stored when products are exact (never used to round).
inline constexpr Format kExactProducts{8, 23, 1, 0};

// The AccumParams of one GEMM's configuration (numerics.md section 3), validated:
// `product` null means exact products; `seed` is the configured seed (at_step folds a
// step in); the output is the whole tensor (set_group changes that).
// flushes_subnormals is set when any format used has subnormals off: the CPU engine then
// keeps the range checks that its fast path leaves out.
inline const char* make_accum_params(const Format& accumulator, const Format* product,
                                     const Format& chunk_accumulator, int32_t rounding,
                                     int64_t chunk_size, uint64_t seed, AccumParams* out) {
  if (const char* e = validate_rounding(rounding)) return e;
  if (chunk_size < 0) return "chunk_size must be >= 0 (0: sequential)";
  const Format prod = product != nullptr ? *product : kExactProducts;
  const Format* formats[3] = {&accumulator, &prod, &chunk_accumulator};
  for (const Format* f : formats)
    if (const char* e = validate_format(*f)) return e;
  AccumParams p{};
  p.accumulator = make_format_params(accumulator, rounding);
  p.product = make_format_params(prod, rounding);
  p.chunk_accumulator = make_format_params(chunk_accumulator, rounding);
  p.has_product = product != nullptr;
  p.rounding = rounding;
  p.chunk_size = chunk_size;
  p.seed = seed;
  p.flushes_subnormals = !accumulator.subnormals || !chunk_accumulator.subnormals ||
                         (product != nullptr && !product->subnormals);
  p.group = 0;
  p.groups = 1;
  *out = p;
  return nullptr;
}

// Makes the output column group `group` of `groups` (one group of a grouped convolution;
// see AccumParams::group).
inline const char* set_group(int64_t group, int64_t groups, AccumParams* params) {
  if (groups < 1 || group < 0 || group >= groups)
    return "group must be in [0, groups) and groups >= 1";
  params->group = group;
  params->groups = groups;
  return nullptr;
}

// The five integers of a fused adder (numerics.md section 7), in the order of the `fused`
// op attribute (tfaccum.FusedAdder.kernel_attr) and of tfaccum_cuda_set_fused.
inline constexpr FormatField kFusedFields[5] = {
    {"terms", 1, 64, "fused terms must be in 1..64"},
    {"fraction_bits", 1, 40, "fused fraction_bits must be in 1..40"},
    {"zero_exponent", -512, 512, "fused zero_exponent must be in -512..512"},
    {"operand_emin", -149, 0, "fused operand_emin must be in -149..0"},
    {"output_rounding (1: toward zero, 0: nearest-even)", 0, 1,
     "fused output_rounding must be 0 (nearest-even) or 1 (toward zero)"},
};

// The index of the first of the five fused fields out of its range, or -1 (as int64, as
// invalid_format_field).
inline int invalid_fused_field(const int64_t values[5]) {
  for (int i = 0; i < 5; ++i)
    if (values[i] < kFusedFields[i].lo || values[i] > kFusedFields[i].hi) return i;
  return -1;
}

// Makes `params` (built by make_accum_params with the same `accumulator`) sum with the
// fused adder `values` = [terms, fraction_bits, zero_exponent, operand_emin,
// output_rounding]. The ranges are tfaccum.FusedAdder's; the adder takes exact products.
// The bounds matter for exactness (core/fused_adder.h): F <= 40 and L <= 64 keep the
// block's integer sum below 2^53, and |zero_exponent| <= 512 keeps 2^(E -+ F) normal.
inline const char* set_fused(const int64_t values[5], const Format& accumulator,
                             AccumParams* params) {
  const int bad = invalid_fused_field(values);
  if (bad >= 0) return kFusedFields[bad].problem;
  if (params->has_product) return "a fused adder takes exact products: product must be empty";
  params->fused_terms = static_cast<int32_t>(values[0]);
  params->fused_fraction_bits = static_cast<int32_t>(values[1]);
  params->fused_zero_scale = pow2_d(values[2]);
  params->fused_operand_min = pow2_d(values[3]);
  params->fused_toward_zero = static_cast<int32_t>(values[4]);
  // The block's rounding overflows to Inf whenever the format does, toward zero included
  // (the §7 exception): the constants under nearest-even have exactly that overflow value,
  // and the others do not depend on the rounding.
  params->fused_result = make_format_params(accumulator, kNearestEven);
  // The block's rounding reads the range rules itself, so the engine's lazy range checks
  // (flushes_subnormals) need not change.
  return nullptr;
}

// The training step, an int64 input or argument, must be non-negative.
inline const char* validate_step(int64_t step) {
  return step < 0 ? "step must be >= 0" : nullptr;
}

// `params` (built with the configured seed) for training step `step`: its seed becomes
// the step's stream seed, stream_seed(seed, step) (numerics.md section 4).
inline AccumParams at_step(AccumParams params, uint64_t step) {
  params.seed = stream_seed(params.seed, step);
  return params;
}

}  // namespace tfaccum

#endif  // TFACCUM_ACCUM_PARAMS_H_
