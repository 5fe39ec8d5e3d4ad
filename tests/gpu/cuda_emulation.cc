// Host emulation of tfaccum's CUDA kernels, for machines without a GPU.
//
// Compiles the device code of custom_ops/cuda/accum_kernels.cuh as plain C++: every
// thread of a block is an OS thread, __syncthreads is a std::barrier, __shared__ arrays
// are function statics (blocks run one after another). The library exports the same
// C functions as the CUDA build (accum_launchers.h; pointers are host pointers, the
// stream is ignored), tile shape hook included, so
// tests/gpu/gpu_check.py --emulate runs its bit-exactness suite through it.
//
// This checks the kernels' indexing, tiling, chunking and generator counters; it cannot
// check what only a GPU can (nvcc's code generation, the CUDA runtime). Build:
//   g++ -std=c++20 -O1 -ffp-contract=off -fPIC -shared -pthread
//       -Icustom_ops/core -Icustom_ops/cuda tests/gpu/cuda_emulation.cc -o libemu.so
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

// ---- The CUDA built-ins the device code uses ----------------------------------------
struct EmuDim3 {
  unsigned x, y, z;
};
thread_local EmuDim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
thread_local EmuDim3 blockDim{1, 1, 1}, gridDim{1, 1, 1};
static std::barrier<>* g_block_barrier = nullptr;
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__ static

#include "accum_kernels.cuh"
#include "accum_launchers.h"
#include "launcher_helpers.h"

namespace {

using namespace tfaccum;
using namespace tfaccum::cuda;

int g_shape = -1;  // -1: as the CUDA launcher would choose for a 132-multiprocessor GPU

template <int R, bool kProduct, int TM, int TN, int TX, int TY>
void run_grid(GemmDesc d, const AccumParams& p) {
  const int64_t tiles = prepare_tiles(&d, TM * TY, TN * TX);
  const int threads = TX * TY;
  for (int64_t t = 0; t < tiles; ++t) {
    std::barrier<> barrier(threads);
    g_block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int i = 0; i < threads; ++i) {
      pool.emplace_back([&d, &p, i, t] {
        threadIdx = EmuDim3{static_cast<unsigned>(i), 0, 0};
        blockIdx = EmuDim3{static_cast<unsigned>(t), 0, 0};
        gemm_block<R, kProduct, TM, TN, TX, TY>(d, p);
      });
    }
    for (auto& th : pool) th.join();
  }
  g_block_barrier = nullptr;
}

// As launch_shape in accum_kernels.cu (no 4 x 4 tiles for stochastic rounding).
template <int R, bool kProduct>
void run_shape(int shape, const GemmDesc& d, const AccumParams& p) {
  if constexpr (R != kStochastic) {
    if (shape == 0) return run_grid<R, kProduct, 4, 4, 16, 16>(d, p);
  }
  if (shape != 2) return run_grid<R, kProduct, 2, 2, 16, 16>(d, p);
  return run_grid<R, kProduct, 1, 1, 8, 8>(d, p);
}

// As launch_fused in accum_kernels.cu: blocks of kFusedThreads threads, one output each.
template <int R, int kOut>
void run_fused_grid(const GemmDesc& d, const AccumParams& p) {
  const int64_t blocks = fused_blocks(d);
  for (int64_t t = 0; t < blocks; ++t) {
    std::vector<std::thread> pool;
    pool.reserve(kFusedThreads);
    for (int i = 0; i < kFusedThreads; ++i) {
      pool.emplace_back([&d, &p, i, t] {
        threadIdx = EmuDim3{static_cast<unsigned>(i), 0, 0};
        blockIdx = EmuDim3{static_cast<unsigned>(t), 0, 0};
        fused_gemm_block<R, kOut>(d, p);
      });
    }
    for (auto& th : pool) th.join();
  }
}

template <int R>
void run_fused(const GemmDesc& d, const AccumParams& p) {
  if (p.fused_toward_zero) return run_fused_grid<R, kTowardZero>(d, p);
  run_fused_grid<R, kNearestEven>(d, p);
}

int64_t tiles_of(const GemmDesc& d, int64_t bm, int64_t bn) {
  return ((d.M + bm - 1) / bm) * ((d.N + bn - 1) / bn);
}

int run_gemm(const GemmDesc& d, const AccumParams* p) {
  if (p == nullptr || d.M < 0 || d.N < 0 || d.K < 0) return 1;
  if (d.M == 0 || d.N == 0) return 0;
  const int sms = 132;
  const int shape = g_shape >= 0 ? g_shape
                    : tiles_of(d, 64, 64) >= 4 * sms ? 0
                    : tiles_of(d, 32, 32) >= 3 * sms ? 1
                                                     : 2;
  if (p->fused_terms > 0) {
    switch (p->rounding) {
      case kNearestEven: run_fused<kNearestEven>(d, *p); break;
      case kTowardZero: run_fused<kTowardZero>(d, *p); break;
      default: run_fused<kStochastic>(d, *p); break;
    }
    return 0;
  }
  const bool product = p->has_product != 0;
  switch (p->rounding) {
    case kNearestEven:
      product ? run_shape<kNearestEven, true>(shape, d, *p)
              : run_shape<kNearestEven, false>(shape, d, *p);
      break;
    case kTowardZero:
      product ? run_shape<kTowardZero, true>(shape, d, *p)
              : run_shape<kTowardZero, false>(shape, d, *p);
      break;
    default:
      product ? run_shape<kStochastic, true>(shape, d, *p)
              : run_shape<kStochastic, false>(shape, d, *p);
      break;
  }
  return 0;
}

}  // namespace

extern "C" {

void tfaccum_cuda_set_tile_shape(int32_t shape) { g_shape = shape; }

int tfaccum_cuda_matmul(const float* a, const float* b, float* c, int64_t M, int64_t N,
                        int64_t K, int32_t transpose_a, int32_t transpose_b,
                        const AccumParams* params, CUstream_st*) {
  return run_gemm(matmul_desc(a, b, c, M, N, K, transpose_a != 0, transpose_b != 0), params);
}

int tfaccum_cuda_conv2d(const float* x, const float* w, float* y, const ConvGeometry* g,
                        const AccumParams* params, CUstream_st*) {
  return run_gemm(conv_desc(*g, kConvForward, x, w, y), params);
}

int tfaccum_cuda_conv2d_backprop_input(const float* w, const float* dy, float* dx,
                                       const ConvGeometry* g, const AccumParams* params,
                                       CUstream_st*) {
  return run_gemm(conv_desc(*g, kConvInputGrad, dy, w, dx), params);
}

int tfaccum_cuda_conv2d_backprop_filter(const float* x, const float* dy, float* dw,
                                        const ConvGeometry* g, const AccumParams* params,
                                        CUstream_st*) {
  return run_gemm(conv_desc(*g, kConvFilterGrad, x, dy, dw), params);
}

int tfaccum_cuda_quantize(const float* x, float* y, int64_t n, const FormatParams* f,
                          int32_t rounding, uint64_t seed, CUstream_st*) {
  switch (rounding) {
    case kNearestEven: quantize_range<kNearestEven>(x, y, 0, n, 1, *f, seed); break;
    case kTowardZero: quantize_range<kTowardZero>(x, y, 0, n, 1, *f, seed); break;
    default: quantize_range<kStochastic>(x, y, 0, n, 1, *f, seed); break;
  }
  return 0;
}

const char* tfaccum_cuda_error_string(int code) { return code ? "emulation error" : "no error"; }
}  // extern "C"
