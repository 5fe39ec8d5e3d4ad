// Plain C launchers of tfaccum's CUDA kernels (custom_ops/cuda/accum_kernels.cu).
//
// Framework-free: no TensorFlow and no CUDA headers are needed to include this file, so
// the TensorFlow GPU kernels (tf/kernels/accum_gpu_kernels.cc) compile with g++ alone,
// and the same functions are reachable through ctypes from a standalone build
// (custom_ops/cuda/standalone.py, tests/gpu/gpu_check.py).
//
// Every launcher takes device pointers, sizes, the accumulation configuration and a
// stream (`struct CUstream_st*` is exactly `cudaStream_t`; null is the legacy default
// stream), enqueues its work and returns at once: 0 on success, otherwise a cudaError_t
// value (tfaccum_cuda_error_string() names it). Launchers never synchronize.
//
// Every output element is the dot product of docs/numerics.md §3, summed strictly in
// the order of §5, with the stochastic generator's element index equal to the flat
// row-major index of the output (of the whole output, for one group of a grouped
// convolution: AccumParams::group): bit for bit what the CPU kernels (cpu/gemm_engine.cc)
// and tfaccum/reference.py compute. The stochastic seed in AccumParams (and the `seed` of
// tfaccum_cuda_quantize) is the stream seed of a step, stream_seed(seed, step) of
// core/rounding.h; tfaccum_cuda_make_params computes it.
#ifndef TFACCUM_CUDA_ACCUM_LAUNCHERS_H_
#define TFACCUM_CUDA_ACCUM_LAUNCHERS_H_

#include <stdint.h>

#include "../core/conv_geometry.h"
#include "../core/rounding.h"

struct CUstream_st;  // cudaStream_t is `struct CUstream_st*`

// Bumped whenever a signature below changes (checked by the ctypes callers).
#define TFACCUM_CUDA_ABI_VERSION 3  // 3: the fused adder (AccumParams grew)

extern "C" {

// c[M, N] = op(a) . op(b): a is [M, K] ([K, M] if transpose_a), b is [K, N] ([N, K] if
// transpose_b), all row-major; c[i, j] sums k = 0..K-1 in order.
int tfaccum_cuda_matmul(const float* a, const float* b, float* c, int64_t M, int64_t N,
                        int64_t K, int32_t transpose_a, int32_t transpose_b,
                        const tfaccum::AccumParams* params, CUstream_st* stream);

// y[B, OH, OW, Cout] from x[B, H, W, Cin] and w[KH, KW, Cin, Cout] (NHWC);
// y[b, oy, ox, co] sums (ky, kx, ci).
int tfaccum_cuda_conv2d(const float* x, const float* w, float* y,
                        const tfaccum::ConvGeometry* geometry,
                        const tfaccum::AccumParams* params, CUstream_st* stream);

// dx[B, H, W, Cin] from w and dy[B, OH, OW, Cout]; dx[b, iy, ix, ci] sums (ky, kx, co).
int tfaccum_cuda_conv2d_backprop_input(const float* w, const float* dy, float* dx,
                                       const tfaccum::ConvGeometry* geometry,
                                       const tfaccum::AccumParams* params,
                                       CUstream_st* stream);

// dw[KH, KW, Cin, Cout] from x and dy; dw[ky, kx, ci, co] sums (b, oy, ox).
int tfaccum_cuda_conv2d_backprop_filter(const float* x, const float* dy, float* dw,
                                        const tfaccum::ConvGeometry* geometry,
                                        const tfaccum::AccumParams* params,
                                        CUstream_st* stream);

// y[i] = Q_F(x[i]) (tfaccum.quantize): element i, counter 0; seed is the stream seed.
int tfaccum_cuda_quantize(const float* x, float* y, int64_t n,
                          const tfaccum::FormatParams* format, int32_t rounding, uint64_t seed,
                          CUstream_st* stream);

// The name of a launcher's return code.
const char* tfaccum_cuda_error_string(int code);

// Tests only: forces the tile shape of every later launch (0: 64 x 64 outputs per block,
// 4 x 4 per thread, not used for stochastic rounding; 1: 32 x 32, 2 x 2; 2: 8 x 8, 1 x 1);
// -1 restores the automatic choice. Results never depend on it.
void tfaccum_cuda_set_tile_shape(int32_t shape);

// ---- Helpers for callers without the C++ structs (ctypes) ----------------------------
// They fill opaque buffers of the reported sizes; each returns nullptr or a message.

int32_t tfaccum_cuda_abi_version(void);
int64_t tfaccum_cuda_params_bytes(void);    // sizeof(AccumParams)
int64_t tfaccum_cuda_format_bytes(void);    // sizeof(FormatParams)
int64_t tfaccum_cuda_geometry_bytes(void);  // sizeof(ConvGeometry)

// formats: accumulator, product, chunk accumulator, each [exponent_bits, mantissa_bits,
// subnormals, overflow_inf]; has_product 0 means exact products (product ignored).
// seed: the configured seed, folded with step (>= 0) into the stream seed. group of
// groups (0 of 1: the whole output): the output is that channel group of a grouped
// convolution's output, for the stochastic element indices.
const char* tfaccum_cuda_make_params(const int32_t formats[12], int32_t has_product,
                                     int32_t rounding, int64_t chunk_size, uint64_t seed,
                                     int64_t step, int64_t group, int64_t groups,
                                     void* params_out);
// Makes params (built by tfaccum_cuda_make_params with this accumulator format) sum
// with a fused adder (numerics.md §7): fused = [terms, fraction_bits, zero_exponent,
// operand_emin, output_rounding (1: toward zero, 0: nearest-even)], as the `fused` op
// attribute; products must be exact.
const char* tfaccum_cuda_set_fused(const int64_t fused[5], const int32_t accumulator[4],
                                   void* params_inout);
const char* tfaccum_cuda_make_format(const int32_t format[4], int32_t rounding,
                                     void* format_out);
// args: batch, in_h, in_w, in_c, k_h, k_w, out_c, stride_h, stride_w, dilation_h,
// dilation_w, padding (0 SAME, 1 VALID, 2 EXPLICIT), pad_top, pad_bottom, pad_left,
// pad_right. dims_out (may be null): out_h, out_w, pad_top, pad_left.
const char* tfaccum_cuda_make_conv_geometry(const int64_t args[16], void* geometry_out,
                                            int64_t dims_out[4]);

}  // extern "C"

#endif  // TFACCUM_CUDA_ACCUM_LAUNCHERS_H_
