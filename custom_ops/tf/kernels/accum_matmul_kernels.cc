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
                                     int64_t M, int64_t N, int64_t K, bool transpose_a,
                                     bool transpose_b, const Tensor& a, const Tensor& b,
                                     Tensor* c) {
  const float* a_data = a.flat<float>().data();
  const int64_t a_stride_i = transpose_a ? 1 : K;  // element (i, k) of logical A
  const int64_t a_stride_k = transpose_a ? M : 1;
  RowGather gather = [=](int64_t row0, int64_t rows, float* panel) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k)
        panel[r * K + k] = a_data[(row0 + r) * a_stride_i + k * a_stride_k];
  };
  const int64_t b_stride_k = transpose_b ? 1 : N;
  const int64_t b_stride_n = transpose_b ? K : 1;
  CpuEngine engine(ctx);
  if (!AccumulateGemm(params, M, N, K, gather, b.flat<float>().data(), b_stride_k, b_stride_n,
                      c->flat<float>().data(), 0, engine.context()))
    return engine.failure();
  return absl::OkStatus();
}

REGISTER_KERNEL_BUILDER(Name("TfaccumQuantize").Device(DEVICE_CPU), QuantizeOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumMatMul").Device(DEVICE_CPU), MatMulOp<CpuDevice>);

}  // namespace tfaccum
