// TensorFlow GPU kernels of the tfaccum ops: the GPU launches of the kernels in
// op_frontends.h (attributes, validation and allocation are shared with the CPU kernels
// there), thin adapters from tensors to the CUDA launchers of custom_ops/cuda
// (accum_launchers.h), run on the op's own stream. Compiled only in CUDA builds
// (custom_ops/build.py with TFACCUM_CUDA=1 defines TFACCUM_WITH_CUDA); the file needs
// neither CUDA headers nor nvcc, and adds nothing to the CPU build.
//
// The arithmetic, tiling and element indices are those of the CPU kernels (same rounding
// core, same order of every sum): a GPU result equals the CPU result bit for bit.
#if TFACCUM_WITH_CUDA

#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "xla/stream_executor/stream.h"
#include "../../cuda/accum_launchers.h"
#include "op_frontends.h"

namespace tfaccum {

using ::tensorflow::DEVICE_GPU;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

namespace {

// The CUDA stream TensorFlow runs this op on (a CUstream, i.e. a cudaStream_t).
absl::Status OpStream(OpKernelContext* ctx, CUstream_st** stream) {
  auto* device_context = ctx->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr)
    return absl::InternalError("tfaccum: no GPU stream for this op");
  *stream = static_cast<CUstream_st*>(
      device_context->stream()->platform_specific_handle().stream);
  if (*stream == nullptr) return absl::InternalError("tfaccum: the GPU stream has no handle");
  return absl::OkStatus();
}

// Runs launch(stream), a tfaccum_cuda_* call on the op's stream, and turns its return
// code into a status naming `what`.
template <typename Launch>
absl::Status LaunchOnStream(OpKernelContext* ctx, const char* what, Launch launch) {
  CUstream_st* stream = nullptr;
  TF_RETURN_IF_ERROR(OpStream(ctx, &stream));
  const int code = launch(stream);
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(std::string("tfaccum: ") + what + " CUDA kernel launch failed: " +
                             tfaccum_cuda_error_string(code));
}

}  // namespace

template <>
absl::Status LaunchQuantize<GpuDevice>(OpKernelContext* ctx, const FormatParams& format,
                                       int32_t rounding, uint64_t seed, const Tensor& x,
                                       Tensor* y) {
  return LaunchOnStream(ctx, "quantize", [&](CUstream_st* stream) {
    return tfaccum_cuda_quantize(x.flat<float>().data(), y->flat<float>().data(),
                                 x.NumElements(), &format, rounding, seed, stream);
  });
}

template <>
absl::Status LaunchMatMul<GpuDevice>(OpKernelContext* ctx, const AccumParams& params,
                                     const MatMulDims& dims, bool transpose_a,
                                     bool transpose_b, const Tensor& a, const Tensor& b,
                                     Tensor* c) {
  const int64_t M = dims.M, N = dims.N, K = dims.K;
  // One launch per matrix of the output, each at its element offset in the whole output.
  return LaunchOnStream(ctx, "matmul", [&](CUstream_st* stream) {
    for (int64_t g = 0; g < dims.batch_count; ++g) {
      const int code = tfaccum_cuda_matmul(
          a.flat<float>().data() + dims.AMatrix(g) * M * K,
          b.flat<float>().data() + dims.BMatrix(g) * K * N, c->flat<float>().data() + g * M * N,
          M, N, K, transpose_a, transpose_b, static_cast<uint64_t>(g * M * N), &params,
          stream);
      if (code != 0) return code;
    }
    return 0;
  });
}

template <>
absl::Status LaunchConv2D<GpuDevice>(OpKernelContext* ctx, const AccumParams& params,
                                     const ConvGeometry& g, const Tensor& x, const Tensor& w,
                                     Tensor* y) {
  return LaunchOnStream(ctx, "conv2d", [&](CUstream_st* stream) {
    return tfaccum_cuda_conv2d(x.flat<float>().data(), w.flat<float>().data(),
                               y->flat<float>().data(), &g, &params, stream);
  });
}

template <>
absl::Status LaunchConv2DBackpropInput<GpuDevice>(OpKernelContext* ctx,
                                                  const AccumParams& params,
                                                  const ConvGeometry& g, const Tensor& w,
                                                  const Tensor& dy, Tensor* dx) {
  return LaunchOnStream(ctx, "conv2d_backprop_input", [&](CUstream_st* stream) {
    return tfaccum_cuda_conv2d_backprop_input(w.flat<float>().data(), dy.flat<float>().data(),
                                              dx->flat<float>().data(), &g, &params, stream);
  });
}

template <>
absl::Status LaunchConv2DBackpropFilter<GpuDevice>(OpKernelContext* ctx,
                                                   const AccumParams& params,
                                                   const ConvGeometry& g, const Tensor& x,
                                                   const Tensor& dy, Tensor* dw) {
  return LaunchOnStream(ctx, "conv2d_backprop_filter", [&](CUstream_st* stream) {
    return tfaccum_cuda_conv2d_backprop_filter(x.flat<float>().data(), dy.flat<float>().data(),
                                               dw->flat<float>().data(), &g, &params, stream);
  });
}

// input_sizes, filter_sizes (ShapeFromSizesTensor) and step (ReadStep: folded into the
// seed on the host, so the CUDA kernels see only the stream seed) are read on the host.
REGISTER_KERNEL_BUILDER(Name("TfaccumQuantize").Device(DEVICE_GPU).HostMemory("step"),
                        QuantizeOp<GpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumMatMul").Device(DEVICE_GPU).HostMemory("step"),
                        MatMulOp<GpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2D").Device(DEVICE_GPU).HostMemory("step"),
                        Conv2DOp<GpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropInput")
                            .Device(DEVICE_GPU)
                            .HostMemory("input_sizes")
                            .HostMemory("step"),
                        Conv2DBackpropInputOp<GpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropFilter")
                            .Device(DEVICE_GPU)
                            .HostMemory("filter_sizes")
                            .HostMemory("step"),
                        Conv2DBackpropFilterOp<GpuDevice>);

}  // namespace tfaccum

#endif  // TFACCUM_WITH_CUDA
