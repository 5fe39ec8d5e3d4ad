// CPU kernels of TfaccumMatMul and TfaccumQuantize: the CPU launches of the kernels in
// op_frontends.h, thin adapters from tensors to the engine in ../../cpu/gemm_engine.h.
#define EIGEN_USE_THREADS

#include "tensorflow/core/framework/op_kernel.h"
#include "op_frontends.h"

namespace tfaccum {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

template <>
absl::Status LaunchQuantize<CpuDevice>(OpKernelContext* ctx, const FormatParams& format,
                                       int32_t rounding, uint64_t seed, const Tensor& x,
                                       Tensor* y) {
  CpuEngine engine(ctx);
  QuantizeArray(x.flat<float>().data(), y->flat<float>().data(), x.NumElements(), format,
                rounding, seed, engine.context());
  return absl::OkStatus();
}

template <>
absl::Status LaunchMatMul<CpuDevice>(OpKernelContext* ctx, const AccumParams& params,
                                     const MatMulDims& dims, bool transpose_a,
                                     bool transpose_b, const Tensor& a, const Tensor& b,
                                     Tensor* c) {
  const int64_t N = dims.N, K = dims.K;
  // One product with every batch of a stacked as rows gives each output the same sum and
  // the same element index ((batch * M + i) * N + j) as one GEMM per batch: taken when
  // every batch multiplies the same b by its own, untransposed a (x[B, M, K] . w[K, N]),
  // so that a batch of small products is one parallel GEMM.
  // (The last batch index reads b's matrix 0 only if every batch does.)
  const bool stack_rows = !transpose_a && !dims.a_broadcast && dims.batch_count > 1 &&
                          dims.BMatrix(dims.batch_count - 1) == 0;
  const int64_t M = stack_rows ? dims.M * dims.batch_count : dims.M;
  const int64_t gemms = stack_rows ? 1 : dims.batch_count;
  const int64_t a_stride_i = transpose_a ? 1 : K;  // element (i, k) of logical A
  const int64_t a_stride_k = transpose_a ? M : 1;
  const int64_t b_stride_k = transpose_b ? 1 : N;
  const int64_t b_stride_n = transpose_b ? K : 1;
  CpuEngine engine(ctx);
  for (int64_t g = 0; g < gemms; ++g) {
    const float* a_data = a.flat<float>().data() + dims.AMatrix(g) * dims.M * K;
    const float* b_data = b.flat<float>().data() + dims.BMatrix(g) * K * N;
    float* c_data = c->flat<float>().data() + g * M * N;
    RowGather gather = [=](int64_t row0, int64_t rows, float* panel) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k)
          panel[r * K + k] = a_data[(row0 + r) * a_stride_i + k * a_stride_k];
    };
    if (!AccumulateGemm(params, M, N, K, gather, b_data, b_stride_k, b_stride_n, c_data,
                        static_cast<uint64_t>(g * M * N), engine.context()))
      return engine.failure();
  }
  return absl::OkStatus();
}

REGISTER_KERNEL_BUILDER(Name("TfaccumQuantize").Device(DEVICE_CPU), QuantizeOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumMatMul").Device(DEVICE_CPU), MatMulOp<CpuDevice>);

}  // namespace tfaccum
