// Device code of tfaccum's CUDA kernels (included by accum_kernels.cu).
//
// Kept in a header so that the very same code can also be compiled as plain C++ by the
// host emulation in tests/gpu/cuda_emulation.cc (which supplies threadIdx, __syncthreads and
// friends), so the indexing, tiling and chunk logic are tested against the Python
// reference on machines without a GPU.
//
// Every op is a GEMM C[M, N] = A[M, K] . B[K, N] whose output element (i, j) is stored at
// c[i * N + j]; its stochastic element index is element_index(P, N) of rounding.h:
// i * N + j, or, for one group of a grouped convolution, the flat index in the whole
// output (the CPU engine's convention, AccumulateGemm with element_offset 0):
//
//   op                    rows i         columns j   k (summed in this order)   A      B
//   matmul                i              j           k                          a      b
//   conv forward          (b, oy, ox)    co          (ky, kx, ci)               x tap  w
//   conv input gradient   (b, iy, ix)    ci          (ky, kx, co)               dy tap w
//   conv filter gradient  (ky, kx, ci)   co          (b, oy, ox)                x tap  dy
//
// A thread block owns a BM x BN tile of outputs; each thread owns TM x TN of them, keeps
// their partial sums in registers (binary64) for the whole length K and walks k strictly
// in order 0, 1, ..., K-1, so the order of the sums never depends on the tiling. Operand
// tiles of kTileK values of k are staged through shared memory (converted to binary64
// once) so a block of outputs shares every load; the next tile's global loads are issued
// before the current tile is summed. A conv tap that falls outside the image (or, for the
// input gradient, meets no output) is an exact +0 operand, multiplied like any other
// (numerics §5: +0 x w is a zero with the sign of w, +0 x Inf is NaN).
//
// All rounding is rounding.h's quantize/accumulate with D = double, U = uint64_t, and the
// stochastic draws are its element_key/random_bits24 with the same counters as the CPU.
#ifndef TFACCUM_CUDA_ACCUM_KERNELS_CUH_
#define TFACCUM_CUDA_ACCUM_KERNELS_CUH_

#include <stdint.h>

#include "../core/conv_geometry.h"
#include "../core/fused_adder.h"
#include "../core/rounding.h"

namespace tfaccum {
namespace cuda {

enum GemmKind : int32_t {
  kMatMul = 0,
  kConvForward = 1,
  kConvInputGrad = 2,
  kConvFilterGrad = 3,
};

struct GemmDesc {
  const float* a;  // matmul a; conv: x (forward, filter gradient) or dy (input gradient)
  const float* b;  // matmul b; conv: w (forward, input gradient) or dy (filter gradient)
  float* c;
  int64_t M, N, K;
  int64_t col_tiles;  // column tiles of the launch (block t: row tile t / col_tiles)
  int32_t kind;
  int32_t transpose_a, transpose_b;
  int32_t a_k_contiguous;  // consecutive k are adjacent in memory (else consecutive i)
  int32_t b_k_contiguous;  // consecutive k are adjacent in memory (else consecutive j)
  int64_t row_d1, row_d2;  // conv: row i -> (i / (d1 d2), (i / d2) % d1, i % d2)
  int64_t k_d1, k_d2;      // conv: k likewise
  ConvGeometry g;
};

// A row or a k index split into its three conv coordinates.
struct Coords {
  int32_t v0, v1, v2;
};

constexpr int kTileK = 32;  // values of k per shared-memory tile

__device__ __forceinline__ Coords split3(int64_t t, int64_t d1, int64_t d2) {
  const int64_t q = t / d2;
  return Coords{static_cast<int32_t>(q / d1), static_cast<int32_t>(q % d1),
                static_cast<int32_t>(t - q * d2)};
}

// A(i, k); +0 for a conv tap outside the image.
__device__ __forceinline__ float fetch_a(const GemmDesc& d, int64_t i, int64_t k,
                                         const Coords& row, const Coords& kc) {
  const ConvGeometry& g = d.g;
  switch (d.kind) {
    case kMatMul:
      return d.a[d.transpose_a ? k * d.M + i : i * d.K + k];
    case kConvForward: {  // row (b, oy, ox), k (ky, kx, ci): x[b, iy, ix, ci]
      const int64_t iy = g.input_row(row.v1, kc.v0), ix = g.input_col(row.v2, kc.v1);
      if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) return 0.0f;
      return d.a[((row.v0 * g.in_h + iy) * g.in_w + ix) * g.in_c + kc.v2];
    }
    case kConvInputGrad: {  // row (b, iy, ix), k (ky, kx, co): dy[b, oy, ox, co]
      const int64_t oy = g.output_row(row.v1, kc.v0), ox = g.output_col(row.v2, kc.v1);
      if (oy < 0 || ox < 0) return 0.0f;
      return d.a[((row.v0 * g.out_h + oy) * g.out_w + ox) * g.out_c + kc.v2];
    }
    default: {  // kConvFilterGrad: row (ky, kx, ci), k (b, oy, ox): x[b, iy, ix, ci]
      const int64_t iy = g.input_row(kc.v1, row.v0), ix = g.input_col(kc.v2, row.v1);
      if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) return 0.0f;
      return d.a[((kc.v0 * g.in_h + iy) * g.in_w + ix) * g.in_c + row.v2];
    }
  }
}

// B(k, j).
__device__ __forceinline__ float fetch_b(const GemmDesc& d, int64_t k, int64_t j,
                                         const Coords& kc) {
  switch (d.kind) {
    case kMatMul:
      return d.b[d.transpose_b ? j * d.K + k : k * d.N + j];
    case kConvInputGrad:  // k (ky, kx, co), j = ci: w[ky, kx, ci, co]
      return d.b[((kc.v0 * d.g.k_w + kc.v1) * d.g.in_c + j) * d.g.out_c + kc.v2];
    default:  // forward: w[(ky, kx, ci), co]; filter gradient: dy[(b, oy, ox), co]
      return d.b[k * d.N + j];
  }
}

// The tile geometry of one kernel instantiation: TM x TN outputs per thread, TX x TY
// threads, so BM x BN outputs per block. Shared-memory rows are padded by one value to
// spread the (rare) transposing stores over the banks.
template <int TM, int TN, int TX, int TY>
struct Tiling {
  static constexpr int BM = TM * TY, BN = TN * TX, NT = TX * TY, BK = kTileK;
  static constexpr int LDA = BM + 1, LDB = BN + 1;
  static constexpr int kAPerThread = BM * BK / NT, kBPerThread = BK * BN / NT;
  static_assert(BM * BK % NT == 0 && BK * BN % NT == 0, "tiles split evenly over threads");
  static_assert(BM <= NT && BK <= NT, "row and k tables are filled one entry per thread");
};

// Position (r or c, kk) in the tile of a thread's n-th loaded element.
template <int Rows, int BK>
__device__ __forceinline__ void tile_position(int e, bool k_contiguous, int* row, int* kk) {
  *row = k_contiguous ? e / BK : e % Rows;
  *kk = k_contiguous ? e % BK : e / Rows;
}

// Issues this thread's global loads of the tile starting at k0 (into registers).
template <class T>
__device__ __forceinline__ void load_tile(const GemmDesc& d, int64_t row0, int64_t col0,
                                          int64_t k0, const Coords* rows, const Coords* kc,
                                          int tid, float (&a)[T::kAPerThread],
                                          float (&b)[T::kBPerThread]) {
#pragma unroll
  for (int n = 0; n < T::kAPerThread; ++n) {
    int r, kk;
    tile_position<T::BM, T::BK>(tid + n * T::NT, d.a_k_contiguous != 0, &r, &kk);
    const int64_t i = row0 + r, k = k0 + kk;
    a[n] = (i < d.M && k < d.K) ? fetch_a(d, i, k, rows[r], kc[kk]) : 0.0f;
  }
#pragma unroll
  for (int n = 0; n < T::kBPerThread; ++n) {
    int c, kk;
    tile_position<T::BN, T::BK>(tid + n * T::NT, d.b_k_contiguous != 0, &c, &kk);
    const int64_t j = col0 + c, k = k0 + kk;
    b[n] = (j < d.N && k < d.K) ? fetch_b(d, k, j, kc[kk]) : 0.0f;
  }
}

// Stores the loaded tile into shared memory as binary64 (exact).
template <class T>
__device__ __forceinline__ void store_tile(const GemmDesc& d, int tid,
                                           const float (&a)[T::kAPerThread],
                                           const float (&b)[T::kBPerThread], double* As,
                                           double* Bs) {
#pragma unroll
  for (int n = 0; n < T::kAPerThread; ++n) {
    int r, kk;
    tile_position<T::BM, T::BK>(tid + n * T::NT, d.a_k_contiguous != 0, &r, &kk);
    As[kk * T::LDA + r] = static_cast<double>(a[n]);
  }
#pragma unroll
  for (int n = 0; n < T::kBPerThread; ++n) {
    int c, kk;
    tile_position<T::BN, T::BK>(tid + n * T::NT, d.b_k_contiguous != 0, &c, &kk);
    Bs[kk * T::LDB + c] = static_cast<double>(b[n]);
  }
}

template <int R>
__device__ __forceinline__ uint64_t draw(uint64_t key, uint64_t counter) {
  return R == kStochastic ? random_bits24(key, counter) : uint64_t{0};
}

// Products k = k0 + kk for kk in [kk0, kk1) into the thread's TM x TN partial sums.
template <int R, bool kProduct, int TM, int TN, int TX, int TY>
__device__ __forceinline__ void accumulate_steps(const AccumParams& P, const double* As,
                                                 const double* Bs, int kk0, int kk1,
                                                 int64_t k0, int tx, int ty,
                                                 double (&part)[TM][TN],
                                                 const uint64_t (&key)[TM][TN]) {
  using T = Tiling<TM, TN, TX, TY>;
#pragma unroll 1
  for (int kk = kk0; kk < kk1; ++kk) {
    const int64_t k = k0 + kk;
    double a[TM], b[TN];
#pragma unroll
    for (int r = 0; r < TM; ++r) a[r] = As[kk * T::LDA + ty + TY * r];
#pragma unroll
    for (int c = 0; c < TN; ++c) b[c] = Bs[kk * T::LDB + tx + TX * c];
#pragma unroll
    for (int r = 0; r < TM; ++r) {
#pragma unroll
      for (int c = 0; c < TN; ++c) {
        double p = a[r] * b[c];  // exact in binary64
        if (kProduct) p = quantize<R>(p, P.product, draw<R>(key[r][c], product_counter(k)));
        part[r][c] = accumulate<R>(part[r][c], p, P.accumulator,
                                   draw<R>(key[r][c], accumulate_counter(k)));
      }
    }
  }
}

// Adds the finished chunk j's partial sums to the totals.
template <int R, int TM, int TN>
__device__ __forceinline__ void fold_chunk(const AccumParams& P, int64_t j,
                                           double (&part)[TM][TN], double (&total)[TM][TN],
                                           const uint64_t (&key)[TM][TN]) {
#pragma unroll
  for (int r = 0; r < TM; ++r) {
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      total[r][c] = accumulate<R>(total[r][c], part[r][c], P.chunk_accumulator,
                                  draw<R>(key[r][c], chunk_counter(j)));
      part[r][c] = 0.0;
    }
  }
}

// One thread block's BM x BN outputs (block index blockIdx.x, NT threads).
template <int R, bool kProduct, int TM, int TN, int TX, int TY>
__device__ __forceinline__ void gemm_block(const GemmDesc& d, const AccumParams& P) {
  using T = Tiling<TM, TN, TX, TY>;
  constexpr int BM = T::BM, BN = T::BN, BK = T::BK;
  __shared__ double As[BK * T::LDA];
  __shared__ double Bs[BK * T::LDB];
  __shared__ Coords rows[BM];
  __shared__ Coords ks[2][BK];  // k coordinates of the tile being summed and the next one

  const int tid = static_cast<int>(threadIdx.x), tx = tid % TX, ty = tid / TX;
  const int64_t tile = blockIdx.x;
  const int64_t row0 = (tile / d.col_tiles) * BM, col0 = (tile % d.col_tiles) * BN;
  const int64_t M = d.M, N = d.N, K = d.K;
  const bool conv = d.kind != kMatMul;
  if (conv && tid < BM) rows[tid] = split3(row0 + tid, d.row_d1, d.row_d2);
  if (conv && tid < BK) ks[0][tid] = split3(tid, d.k_d1, d.k_d2);

  uint64_t key[TM][TN];
  double part[TM][TN], total[TM][TN];
  const ElementIndex index = element_index(P, N);
#pragma unroll
  for (int r = 0; r < TM; ++r) {
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t i = row0 + ty + TY * r, j = col0 + tx + TX * c;
      key[r][c] = R == kStochastic
                      ? element_key(P.seed, static_cast<uint64_t>(i) * index.row_stride +
                                                index.offset + static_cast<uint64_t>(j))
                      : uint64_t{0};
      part[r][c] = 0.0;
      total[r][c] = 0.0;
    }
  }

  const bool chunked = P.chunk_size > 0;
  const int64_t chunk = chunked ? P.chunk_size : K;
  int64_t chunk_end = chunk < K ? chunk : K;  // end of the current chunk
  int64_t chunk_index = 0;

  float a_next[T::kAPerThread], b_next[T::kBPerThread];
  __syncthreads();  // rows, ks[0]
  if (K > 0) load_tile<T>(d, row0, col0, 0, rows, ks[0], tid, a_next, b_next);

  int parity = 0;
  for (int64_t k0 = 0; k0 < K; k0 += BK, parity ^= 1) {
    store_tile<T>(d, tid, a_next, b_next, As, Bs);
    const int64_t k1 = k0 + BK;
    if (conv && tid < BK && k1 < K) ks[parity ^ 1][tid] = split3(k1 + tid, d.k_d1, d.k_d2);
    __syncthreads();  // the tile and the next k coordinates are visible
    if (k1 < K) load_tile<T>(d, row0, col0, k1, rows, ks[parity ^ 1], tid, a_next, b_next);

    const int kend = static_cast<int>(K - k0 < BK ? K - k0 : BK);
    int kk = 0;
    while (kk < kend) {
      const int seg_end = static_cast<int>(chunk_end - k0 < kend ? chunk_end - k0 : kend);
      accumulate_steps<R, kProduct, TM, TN, TX, TY>(P, As, Bs, kk, seg_end, k0, tx, ty, part,
                                                    key);
      kk = seg_end;
      if (k0 + kk == chunk_end) {  // a chunk is complete
        if (chunked) fold_chunk<R>(P, chunk_index, part, total, key);
        ++chunk_index;
        chunk_end = K - chunk_end > chunk ? chunk_end + chunk : K;
      }
    }
    __syncthreads();  // everyone is done with this tile before it is overwritten
  }

#pragma unroll
  for (int r = 0; r < TM; ++r) {
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t i = row0 + ty + TY * r, j = col0 + tx + TX * c;
      if (i < M && j < N) d.c[i * N + j] = static_cast<float>(chunked ? total[r][c] : part[r][c]);
    }
  }
}

// ---- The fused multi-term adder (numerics.md §7) ---------------------------------------
// One output per thread, kFusedThreads threads per block over the outputs in row-major
// order (consecutive threads take consecutive columns, so B's loads coalesce). A block of
// L products is read twice (once for its largest exponent, once for its truncated terms)
// straight from global memory, through the caches: blocks start at every chunk's first
// product, so they do not line up with shared-memory tiles. The chain and its arithmetic
// are core/fused_adder.h's (fused_dot), the CPU engine's too.
constexpr int kFusedThreads = 64;

template <int R, int kOut>
__device__ __forceinline__ void fused_gemm_block(const GemmDesc& d, const AccumParams& P) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kFusedThreads + threadIdx.x;
  if (t >= d.M * d.N) return;
  const int64_t i = t / d.N, j = t % d.N;
  const bool conv = d.kind != kMatMul;
  const Coords row = conv ? split3(i, d.row_d1, d.row_d2) : Coords{0, 0, 0};
  const auto operand = [&](int64_t k, float* a, float* b) {
    const Coords kc = conv ? split3(k, d.k_d1, d.k_d2) : Coords{0, 0, 0};
    *a = fetch_a(d, i, k, row, kc);
    *b = fetch_b(d, k, j, kc);
  };
  const ElementIndex index = element_index(P, d.N);
  const uint64_t key =
      R == kStochastic ? element_key(P.seed, static_cast<uint64_t>(i) * index.row_stride +
                                                 index.offset + static_cast<uint64_t>(j))
                       : uint64_t{0};
  d.c[i * d.N + j] = static_cast<float>(fused_dot<R, kOut>(P, d.K, operand, key));
}

// The launch's number of blocks of kFusedThreads outputs.
inline int64_t fused_blocks(const GemmDesc& d) {
  return (d.M * d.N + kFusedThreads - 1) / kFusedThreads;
}

// tfaccum.quantize of x[begin, end) with stride `stride` (element i, counter 0).
template <int R>
__device__ __forceinline__ void quantize_range(const float* x, float* y, int64_t begin,
                                               int64_t end, int64_t stride,
                                               const FormatParams& f, uint64_t seed) {
  for (int64_t i = begin; i < end; i += stride) {
    const uint64_t rbits =
        R == kStochastic ? random_bits24(element_key(seed, static_cast<uint64_t>(i)), 0) : 0;
    y[i] = static_cast<float>(quantize<R>(static_cast<double>(x[i]), f, rbits));
  }
}

// ---- Host-side descriptions (plain C++) ----------------------------------------------

inline GemmDesc matmul_desc(const float* a, const float* b, float* c, int64_t M, int64_t N,
                            int64_t K, bool transpose_a, bool transpose_b) {
  GemmDesc d{};
  d.a = a, d.b = b, d.c = c, d.M = M, d.N = N, d.K = K, d.kind = kMatMul;
  d.transpose_a = transpose_a, d.transpose_b = transpose_b;
  d.a_k_contiguous = !transpose_a;  // a[i, k] row-major: k adjacent
  d.b_k_contiguous = transpose_b;   // b[j, k] row-major: k adjacent
  d.row_d1 = d.row_d2 = d.k_d1 = d.k_d2 = 1;
  return d;
}

// a, b: the pass's two operands in the order of the table above.
inline GemmDesc conv_desc(const ConvGeometry& g, GemmKind kind, const float* a,
                          const float* b, float* c) {
  GemmDesc d{};
  d.a = a, d.b = b, d.c = c, d.kind = kind, d.g = g;
  switch (kind) {
    case kConvForward:
      d.M = g.batch * g.out_h * g.out_w, d.N = g.out_c, d.K = g.forward_length();
      d.row_d1 = g.out_h, d.row_d2 = g.out_w;  // (b, oy, ox)
      d.k_d1 = g.k_w, d.k_d2 = g.in_c;         // (ky, kx, ci)
      d.a_k_contiguous = 1, d.b_k_contiguous = 0;
      break;
    case kConvInputGrad:
      d.M = g.batch * g.in_h * g.in_w, d.N = g.in_c, d.K = g.input_grad_length();
      d.row_d1 = g.in_h, d.row_d2 = g.in_w;  // (b, iy, ix)
      d.k_d1 = g.k_w, d.k_d2 = g.out_c;      // (ky, kx, co)
      d.a_k_contiguous = 1, d.b_k_contiguous = 1;
      break;
    default:  // kConvFilterGrad
      d.M = g.k_h * g.k_w * g.in_c, d.N = g.out_c, d.K = g.filter_grad_length();
      d.row_d1 = g.k_w, d.row_d2 = g.in_c;  // (ky, kx, ci)
      d.k_d1 = g.out_h, d.k_d2 = g.out_w;   // (b, oy, ox)
      d.a_k_contiguous = 0, d.b_k_contiguous = 0;
      break;
  }
  // Divisors of split3 must be positive even where a size is 0 (nothing is split then).
  if (d.row_d1 <= 0) d.row_d1 = 1;
  if (d.row_d2 <= 0) d.row_d2 = 1;
  if (d.k_d1 <= 0) d.k_d1 = 1;
  if (d.k_d2 <= 0) d.k_d2 = 1;
  return d;
}

// The launch's number of blocks for BM x BN tiles (sets d->col_tiles).
inline int64_t prepare_tiles(GemmDesc* d, int64_t bm, int64_t bn) {
  d->col_tiles = (d->N + bn - 1) / bn;
  return (d->M + bm - 1) / bm * d->col_tiles;
}

}  // namespace cuda
}  // namespace tfaccum

#endif  // TFACCUM_CUDA_ACCUM_KERNELS_CUH_
