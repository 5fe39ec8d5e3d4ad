// The CPU accumulation engine: C = A.B with every dot product accumulated as
// docs/numerics.md section 3 defines. Matmul and all three conv ops reduce to it: they
// differ only in how a row of A is gathered (a matrix row, an image patch, ...).
//
// No TensorFlow here: the kernels pass a row gatherer and a parallel-for.
#ifndef TFACCUM_GEMM_ENGINE_H_
#define TFACCUM_GEMM_ENGINE_H_

#include <cstdint>
#include <functional>

#include "rounding.h"

namespace tfaccum {

// The engine asks a RowGather for at most this many rows at a time.
constexpr int kMaxPanelRows = 4;

// Fills `panel` (rows x K, row-major, binary64) with rows row0 .. row0+rows-1 of A.
// Entries are float32 values (exact in binary64); out-of-range taps are exact zeros.
using RowGather = std::function<void(int64_t row0, int64_t rows, double* panel)>;

// Runs body(begin, end) over [0, total) in parallel; cost_per_unit is a hint in cycles.
using ParallelFor =
    std::function<void(int64_t total, int64_t cost_per_unit,
                       const std::function<void(int64_t, int64_t)>& body)>;

// c[i * N + j] = dot(A row i, B column j) for i < M, j < N, where B(k, j) is
// b[k * b_stride_k + j * b_stride_n]. The stochastic generator's
// element index of c[i * N + j] is element_offset + i * N + j, or with params.groups > 1
// element_offset + i * N * groups + group * N + j (see AccumParams::group).
void AccumulateGemm(const AccumParams& params, int64_t M, int64_t N, int64_t K,
                    const RowGather& gather_a, const float* b, int64_t b_stride_k,
                    int64_t b_stride_n, float* c, uint64_t element_offset,
                    const ParallelFor& parallel_for);

// Elementwise quantization (tfaccum.quantize): element index is the flat index.
void QuantizeArray(const float* x, float* y, int64_t n, const FormatParams& format,
                   int32_t rounding, uint64_t seed, const ParallelFor& parallel_for);

}  // namespace tfaccum

#endif  // TFACCUM_GEMM_ENGINE_H_
