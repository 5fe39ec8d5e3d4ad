// The C helpers of accum_launchers.h that need no GPU: struct sizes, and the builders of
// AccumParams, FormatParams and ConvGeometry for callers without the C++ structs
// (ctypes). Defined once here for both libraries that export accum_launchers.h: the CUDA
// build (accum_kernels.cu) and the host emulation (tests/gpu/cuda_emulation.cc). Each
// includes this file exactly once, after accum_launchers.h.
//
// The parameters come from the core's builder (core/accum_params.h), the one the
// TensorFlow kernels use, so a configuration means the same on every device.
#ifndef TFACCUM_CUDA_LAUNCHER_HELPERS_H_
#define TFACCUM_CUDA_LAUNCHER_HELPERS_H_

#include <stdint.h>

#include "../core/accum_params.h"
#include "../core/conv_geometry.h"
#include "accum_launchers.h"

extern "C" {

int32_t tfaccum_cuda_abi_version(void) { return TFACCUM_CUDA_ABI_VERSION; }
int64_t tfaccum_cuda_params_bytes(void) { return sizeof(tfaccum::AccumParams); }
int64_t tfaccum_cuda_format_bytes(void) { return sizeof(tfaccum::FormatParams); }
int64_t tfaccum_cuda_geometry_bytes(void) { return sizeof(tfaccum::ConvGeometry); }

// `seed` is the configured seed, folded with `step` into the stream seed as the
// TensorFlow kernels do (WithStep in tf/kernels/accum_attrs.h).
const char* tfaccum_cuda_make_params(const int32_t formats[12], int32_t has_product,
                                     int32_t rounding, int64_t chunk_size, uint64_t seed,
                                     int64_t step, int64_t group, int64_t groups,
                                     void* params_out) {
  using namespace tfaccum;
  const Format product = format_from(formats + 4);
  AccumParams p;
  if (const char* e = make_accum_params(format_from(formats), has_product ? &product : nullptr,
                                        format_from(formats + 8), rounding, chunk_size, seed,
                                        &p))
    return e;
  if (const char* e = validate_step(step)) return e;
  if (const char* e = set_group(group, groups, &p)) return e;
  *static_cast<AccumParams*>(params_out) = at_step(p, static_cast<uint64_t>(step));
  return nullptr;
}

const char* tfaccum_cuda_set_fused(const int64_t fused[5], const int32_t accumulator[4],
                                   void* params_inout) {
  return tfaccum::set_fused(fused, tfaccum::format_from(accumulator),
                            static_cast<tfaccum::AccumParams*>(params_inout));
}

const char* tfaccum_cuda_make_format(const int32_t format[4], int32_t rounding,
                                     void* format_out) {
  return tfaccum::make_quantize_format(tfaccum::format_from(format), rounding,
                                       static_cast<tfaccum::FormatParams*>(format_out));
}

const char* tfaccum_cuda_make_conv_geometry(const int64_t args[16], void* geometry_out,
                                            int64_t dims_out[4]) {
  using namespace tfaccum;
  for (int i = 0; i < 7; ++i)
    if (args[i] < 0) return "sizes must be non-negative";
  if (args[11] < kPaddingSame || args[11] > kPaddingExplicit)
    return "padding must be 0 (SAME), 1 (VALID) or 2 (EXPLICIT)";
  ConvGeometry g{};
  if (const char* e = MakeConvGeometry(args[0], args[1], args[2], args[3], args[4], args[5],
                                       args[6], args[7], args[8], args[9], args[10],
                                       static_cast<ConvPadding>(args[11]), args + 12, &g))
    return e;
  *static_cast<ConvGeometry*>(geometry_out) = g;
  if (dims_out != nullptr) {
    dims_out[0] = g.out_h, dims_out[1] = g.out_w, dims_out[2] = g.pad_top,
    dims_out[3] = g.pad_left;
  }
  return nullptr;
}

}  // extern "C"

#endif  // TFACCUM_CUDA_LAUNCHER_HELPERS_H_
