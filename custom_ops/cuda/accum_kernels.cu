// tfaccum's CUDA kernels: matmul, the three conv passes and quantize, bit for bit what
// the CPU kernels compute (docs/numerics.md). Framework-free: CUDA runtime only, no
// TensorFlow. Built into the op library by custom_ops/build.py (TFACCUM_CUDA=1) and as a
// standalone library by custom_ops/cuda/standalone.py; the launchers are declared in
// accum_launchers.h, the device code (and its design) is in accum_kernels.cuh.
//
// Must be compiled with `nvcc --fmad=false`: the TwoSum in rounding.h must not be
// contracted into fused multiply-adds.
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "accum_kernels.cuh"
#include "accum_launchers.h"
#include "launcher_helpers.h"

namespace tfaccum {
namespace cuda {
namespace {

template <int R, bool kProduct, int TM, int TN, int TX, int TY>
__global__ void __launch_bounds__(TX * TY)
    gemm_kernel(const GemmDesc d, const AccumParams P) {
  gemm_block<R, kProduct, TM, TN, TX, TY>(d, P);
}

// Minimum one block per multiprocessor: without it ptxas caps the kernel at 64 registers
// and spills (it needs about 90).
template <int R, int kOut>
__global__ void __launch_bounds__(kFusedThreads, 1) fused_kernel(const GemmDesc d, const AccumParams P) {
  fused_gemm_block<R, kOut>(d, P);
}

template <int R>
__global__ void quantize_kernel(const float* x, float* y, int64_t n, const FormatParams f,
                                uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  quantize_range<R>(x, y, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, n,
                    stride, f, seed);
}

// ---- Host side ------------------------------------------------------------------------

// Makes the stream's device current (the caller may be on another one) and returns its
// number of multiprocessors.
cudaError_t prepare_device(cudaStream_t stream, int* multiprocessors) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
  if (stream != nullptr) {
    int stream_device = device;
    err = cudaStreamGetDevice(stream, &stream_device);
    if (err != cudaSuccess) return err;
    if (stream_device != device) {
      err = cudaSetDevice(stream_device);
      if (err != cudaSuccess) return err;
      device = stream_device;
    }
  }
#endif
  return cudaDeviceGetAttribute(multiprocessors, cudaDevAttrMultiProcessorCount, device);
}

template <int R, bool kProduct, int TM, int TN, int TX, int TY>
cudaError_t launch_tiles(GemmDesc d, const AccumParams& p, cudaStream_t stream) {
  const int64_t tiles = prepare_tiles(&d, TM * TY, TN * TX);
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  gemm_kernel<R, kProduct, TM, TN, TX, TY>
      <<<static_cast<unsigned>(tiles), TX * TY, 0, stream>>>(d, p);
  return cudaGetLastError();
}

// Tile shapes: (TM, TN) outputs per thread, TX x TY threads.
enum TileShape { kLarge = 0, kMedium = 1, kSmall = 2 };

std::atomic<int> g_forced_shape{-1};  // tfaccum_cuda_set_tile_shape (tests only)

// Stochastic rounding keeps a generator key per output in registers: it gets no 4 x 4
// tiles (they need about 250 of a thread's 255 registers, on the edge of spilling).
template <int R, bool kProduct>
cudaError_t launch_shape(TileShape shape, const GemmDesc& d, const AccumParams& p,
                         cudaStream_t stream) {
  if constexpr (R != kStochastic) {
    if (shape == kLarge) return launch_tiles<R, kProduct, 4, 4, 16, 16>(d, p, stream);  // 64^2
  }
  if (shape != kSmall) return launch_tiles<R, kProduct, 2, 2, 16, 16>(d, p, stream);  // 32^2
  return launch_tiles<R, kProduct, 1, 1, 8, 8>(d, p, stream);                          // 8^2
}

template <int R>
cudaError_t launch_fused(const GemmDesc& d, const AccumParams& p, cudaStream_t stream) {
  const int64_t blocks = fused_blocks(d);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (p.fused_toward_zero)
    fused_kernel<R, kTowardZero>
        <<<static_cast<unsigned>(blocks), kFusedThreads, 0, stream>>>(d, p);
  else
    fused_kernel<R, kNearestEven>
        <<<static_cast<unsigned>(blocks), kFusedThreads, 0, stream>>>(d, p);
  return cudaGetLastError();
}

int64_t tile_count(const GemmDesc& d, int64_t bm, int64_t bn) {
  return ((d.M + bm - 1) / bm) * ((d.N + bn - 1) / bn);
}

cudaError_t launch_gemm(const GemmDesc& d, const AccumParams* p, cudaStream_t stream) {
  if (p == nullptr || d.M < 0 || d.N < 0 || d.K < 0) return cudaErrorInvalidValue;
  if (d.M == 0 || d.N == 0) return cudaSuccess;
  if (d.c == nullptr || (d.K > 0 && (d.a == nullptr || d.b == nullptr)))
    return cudaErrorInvalidValue;
  if (p->rounding < kNearestEven || p->rounding > kStochastic || p->chunk_size < 0)
    return cudaErrorInvalidValue;
  int sms = 1;
  cudaError_t err = prepare_device(stream, &sms);
  if (err != cudaSuccess) return err;
  // The largest tiles that still give every multiprocessor several blocks; small
  // problems (few outputs, long sums) are latency-bound and want many small blocks.
  const int forced = g_forced_shape.load(std::memory_order_relaxed);
  const TileShape shape = forced >= kLarge && forced <= kSmall ? static_cast<TileShape>(forced)
                          : tile_count(d, 64, 64) >= 4 * sms   ? kLarge
                          : tile_count(d, 32, 32) >= 3 * sms   ? kMedium
                                                               : kSmall;
  if (p->fused_terms > 0) {  // a fused adder (exact products): its own kernel
    switch (p->rounding) {
      case kNearestEven: return launch_fused<kNearestEven>(d, *p, stream);
      case kTowardZero: return launch_fused<kTowardZero>(d, *p, stream);
      default: return launch_fused<kStochastic>(d, *p, stream);
    }
  }
  const bool product = p->has_product != 0;
  switch (p->rounding) {
    case kNearestEven:
      return product ? launch_shape<kNearestEven, true>(shape, d, *p, stream)
                     : launch_shape<kNearestEven, false>(shape, d, *p, stream);
    case kTowardZero:
      return product ? launch_shape<kTowardZero, true>(shape, d, *p, stream)
                     : launch_shape<kTowardZero, false>(shape, d, *p, stream);
    default:
      return product ? launch_shape<kStochastic, true>(shape, d, *p, stream)
                     : launch_shape<kStochastic, false>(shape, d, *p, stream);
  }
}

int conv_launch(const ConvGeometry* g, GemmKind kind, const float* a, const float* b, float* c,
                const AccumParams* p, CUstream_st* stream) {
  if (g == nullptr) return cudaErrorInvalidValue;
  return launch_gemm(conv_desc(*g, kind, a, b, c), p, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace tfaccum

using tfaccum::AccumParams;
using tfaccum::ConvGeometry;
using tfaccum::FormatParams;

extern "C" {

int tfaccum_cuda_matmul(const float* a, const float* b, float* c, int64_t M, int64_t N,
                        int64_t K, int32_t transpose_a, int32_t transpose_b,
                        const AccumParams* params, CUstream_st* stream) {
  namespace tc = tfaccum::cuda;
  return tc::launch_gemm(tc::matmul_desc(a, b, c, M, N, K, transpose_a != 0, transpose_b != 0),
                         params, stream);
}

int tfaccum_cuda_conv2d(const float* x, const float* w, float* y, const ConvGeometry* geometry,
                        const AccumParams* params, CUstream_st* stream) {
  return tfaccum::cuda::conv_launch(geometry, tfaccum::cuda::kConvForward, x, w, y, params,
                                    stream);
}

int tfaccum_cuda_conv2d_backprop_input(const float* w, const float* dy, float* dx,
                                       const ConvGeometry* geometry, const AccumParams* params,
                                       CUstream_st* stream) {
  return tfaccum::cuda::conv_launch(geometry, tfaccum::cuda::kConvInputGrad, dy, w, dx, params,
                                    stream);
}

int tfaccum_cuda_conv2d_backprop_filter(const float* x, const float* dy, float* dw,
                                        const ConvGeometry* geometry,
                                        const AccumParams* params, CUstream_st* stream) {
  return tfaccum::cuda::conv_launch(geometry, tfaccum::cuda::kConvFilterGrad, x, dy, dw,
                                    params, stream);
}

int tfaccum_cuda_quantize(const float* x, float* y, int64_t n, const FormatParams* format,
                          int32_t rounding, uint64_t seed, CUstream_st* stream) {
  namespace tc = tfaccum::cuda;
  if (format == nullptr || n < 0 || rounding < tfaccum::kNearestEven ||
      rounding > tfaccum::kStochastic)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  int sms = 1;
  cudaError_t err = tc::prepare_device(stream, &sms);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 32 * sms ? wanted : 32 * sms);
  switch (rounding) {
    case tfaccum::kNearestEven:
      tc::quantize_kernel<tfaccum::kNearestEven>
          <<<blocks, kThreads, 0, stream>>>(x, y, n, *format, seed);
      break;
    case tfaccum::kTowardZero:
      tc::quantize_kernel<tfaccum::kTowardZero>
          <<<blocks, kThreads, 0, stream>>>(x, y, n, *format, seed);
      break;
    default:
      tc::quantize_kernel<tfaccum::kStochastic>
          <<<blocks, kThreads, 0, stream>>>(x, y, n, *format, seed);
      break;
  }
  return cudaGetLastError();
}

const char* tfaccum_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

void tfaccum_cuda_set_tile_shape(int32_t shape) {
  tfaccum::cuda::g_forced_shape.store(shape, std::memory_order_relaxed);
}

}  // extern "C"
