// CPU kernels of TfaccumMatMul and TfaccumQuantize: thin adapters from tensors to the
// engine in ../gemm_engine.h.
#define EIGEN_USE_THREADS

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "accum_attrs.h"

namespace tfaccum {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

class QuantizeOp : public OpKernel {
 public:
  explicit QuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int64_t> format;
    std::string rounding;
    int64_t seed = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("format", &format));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rounding", &rounding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("seed", &seed));
    OP_REQUIRES_OK(ctx, ParseRounding(rounding, &rounding_));
    Format parsed;
    OP_REQUIRES_OK(ctx, ParseFormat("format", format, &parsed));
    format_ = make_format_params(parsed, rounding_);
    seed_ = static_cast<uint64_t>(seed);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    QuantizeArray(x.flat<float>().data(), y->flat<float>().data(), x.NumElements(), format_,
                  rounding_, seed_, CpuParallelFor(ctx));
  }

 private:
  FormatParams format_;
  int32_t rounding_ = kNearestEven;
  uint64_t seed_ = 0;
};

class MatMulOp : public OpKernel {
 public:
  explicit MatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_a", &transpose_a_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
    OP_REQUIRES_OK(ctx, ReadAccumParams(ctx, &params_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    OP_REQUIRES(ctx, a.dims() == 2,
                absl::InvalidArgumentError("a must be a matrix (rank 2), got shape " +
                                           a.shape().DebugString()));
    OP_REQUIRES(ctx, b.dims() == 2,
                absl::InvalidArgumentError("b must be a matrix (rank 2), got shape " +
                                           b.shape().DebugString()));
    const int64_t M = a.dim_size(transpose_a_ ? 1 : 0);
    const int64_t K = a.dim_size(transpose_a_ ? 0 : 1);
    const int64_t K_b = b.dim_size(transpose_b_ ? 1 : 0);
    const int64_t N = b.dim_size(transpose_b_ ? 0 : 1);
    OP_REQUIRES(ctx, K == K_b,
                absl::InvalidArgumentError(
                    "inner dimensions differ: a " + a.shape().DebugString() +
                    (transpose_a_ ? " (transposed)" : "") + " has " + std::to_string(K) +
                    ", b " + b.shape().DebugString() + (transpose_b_ ? " (transposed)" : "") +
                    " has " + std::to_string(K_b)));
    Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, N}), &c));
    float* out = c->flat<float>().data();
    if (M == 0 || N == 0) return;

    const float* a_data = a.flat<float>().data();
    const int64_t a_stride_i = transpose_a_ ? 1 : K;  // element (i, k) of logical A
    const int64_t a_stride_k = transpose_a_ ? M : 1;
    RowGather gather = [=](int64_t row0, int64_t rows, double* panel) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k)
          panel[r * K + k] = a_data[(row0 + r) * a_stride_i + k * a_stride_k];
    };
    const int64_t b_stride_k = transpose_b_ ? 1 : N;
    const int64_t b_stride_n = transpose_b_ ? K : 1;
    AccumulateGemm(params_, M, N, K, gather, b.flat<float>().data(), b_stride_k, b_stride_n,
                   out, 0, CpuParallelFor(ctx));
  }

 private:
  bool transpose_a_ = false, transpose_b_ = false;
  AccumParams params_;
};

REGISTER_KERNEL_BUILDER(Name("TfaccumQuantize").Device(DEVICE_CPU), QuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfaccumMatMul").Device(DEVICE_CPU), MatMulOp);

}  // namespace tfaccum
