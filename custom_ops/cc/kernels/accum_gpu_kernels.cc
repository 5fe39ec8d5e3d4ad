// TensorFlow GPU kernels of the tfaccum ops: thin adapters from tensors to the CUDA
// launchers of custom_ops/cuda (accum_launchers.h), run on the op's own stream. Compiled
// only in CUDA builds (custom_ops/build.py with TFACCUM_CUDA=1 defines TFACCUM_WITH_CUDA);
// the file needs neither CUDA headers nor nvcc, and adds nothing to the CPU build.
//
// The arithmetic, tiling and element indices are those of the CPU kernels (same rounding
// core, same order of every sum): a GPU result equals the CPU result bit for bit.
#if TFACCUM_WITH_CUDA

#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "xla/stream_executor/stream.h"
#include "../../cuda/accum_launchers.h"
#include "../conv_geometry.h"
#include "accum_attrs.h"

namespace tfaccum {
namespace {

using ::tensorflow::DEVICE_GPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

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

absl::Status LaunchStatus(int code, const char* what) {
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(std::string("tfaccum: ") + what + " CUDA kernel launch failed: " +
                             tfaccum_cuda_error_string(code));
}

class GpuQuantizeOp : public OpKernel {
 public:
  explicit GpuQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
    if (x.NumElements() == 0) return;
    CUstream_st* stream = nullptr;
    OP_REQUIRES_OK(ctx, OpStream(ctx, &stream));
    OP_REQUIRES_OK(ctx, LaunchStatus(tfaccum_cuda_quantize(x.flat<float>().data(),
                                                           y->flat<float>().data(),
                                                           x.NumElements(), &format_,
                                                           rounding_, seed_, stream),
                                     "quantize"));
  }

 private:
  FormatParams format_;
  int32_t rounding_ = kNearestEven;
  uint64_t seed_ = 0;
};

class GpuMatMulOp : public OpKernel {
 public:
  explicit GpuMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
    if (M == 0 || N == 0) return;
    CUstream_st* stream = nullptr;
    OP_REQUIRES_OK(ctx, OpStream(ctx, &stream));
    OP_REQUIRES_OK(ctx, LaunchStatus(tfaccum_cuda_matmul(a.flat<float>().data(),
                                                         b.flat<float>().data(),
                                                         c->flat<float>().data(), M, N, K,
                                                         transpose_a_, transpose_b_, &params_,
                                                         stream),
                                     "matmul"));
  }

 private:
  bool transpose_a_ = false, transpose_b_ = false;
  AccumParams params_;
};

// The conv attributes, validation and geometry: the same rules as the CPU kernels
// (accum_conv2d_kernels.cc, ConvOpBase), with the same messages.
class GpuConvOpBase : public OpKernel {
 public:
  explicit GpuConvOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int32_t> strides, dilations;
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("explicit_paddings", &explicit_paddings_));
    OP_REQUIRES(ctx, strides.size() == 2,
                absl::InvalidArgumentError("strides must have 2 entries (height, width)"));
    OP_REQUIRES(ctx, dilations.size() == 2,
                absl::InvalidArgumentError("dilations must have 2 entries (height, width)"));
    OP_REQUIRES(ctx, strides[0] > 0 && strides[1] > 0,
                absl::InvalidArgumentError("strides must be positive"));
    OP_REQUIRES(ctx, dilations[0] > 0 && dilations[1] > 0,
                absl::InvalidArgumentError("dilations must be positive"));
    stride_h_ = strides[0], stride_w_ = strides[1];
    dilation_h_ = dilations[0], dilation_w_ = dilations[1];
    padding_ = padding == "SAME" ? kPaddingSame
               : padding == "VALID" ? kPaddingValid : kPaddingExplicit;
    if (padding_ == kPaddingExplicit) {
      OP_REQUIRES(ctx, explicit_paddings_.size() == 4,
                  absl::InvalidArgumentError("explicit_paddings must be [top, bottom, left, "
                                             "right] with EXPLICIT padding"));
    } else {
      explicit_paddings_.assign(4, 0);
    }
    OP_REQUIRES_OK(ctx, ReadAccumParams(ctx, &params_));
  }

 protected:
  absl::Status Geometry(const TensorShape& input, const TensorShape& filter,
                        ConvGeometry* g) const {
    if (input.dims() != 4)
      return absl::InvalidArgumentError("input must be NHWC (rank 4), got shape " +
                                        input.DebugString());
    if (filter.dims() != 4)
      return absl::InvalidArgumentError("filter must be [KH, KW, Cin, Cout] (rank 4), got "
                                        "shape " + filter.DebugString());
    if (input.dim_size(3) != filter.dim_size(2))
      return absl::InvalidArgumentError(
          "channel mismatch: input has " + std::to_string(input.dim_size(3)) +
          " channels, filter expects " + std::to_string(filter.dim_size(2)));
    if (const char* e = MakeConvGeometry(
            input.dim_size(0), input.dim_size(1), input.dim_size(2), input.dim_size(3),
            filter.dim_size(0), filter.dim_size(1), filter.dim_size(3), stride_h_, stride_w_,
            dilation_h_, dilation_w_, padding_, explicit_paddings_.data(), g)) {
      return absl::InvalidArgumentError(std::string(e) + " (input " + input.DebugString() +
                                        ", filter " + filter.DebugString() + ")");
    }
    return absl::OkStatus();
  }

  static absl::Status CheckOutBackprop(const ConvGeometry& g, const Tensor& dy) {
    const TensorShape expected({g.batch, g.out_h, g.out_w, g.out_c});
    if (dy.shape() != expected)
      return absl::InvalidArgumentError("out_backprop has shape " + dy.shape().DebugString() +
                                        ", the convolution's output has " +
                                        expected.DebugString());
    return absl::OkStatus();
  }

  // A 4-element int32 shape input (HostMemory).
  static absl::Status ShapeFromSizes(const char* what, const Tensor& sizes,
                                     TensorShape* shape) {
    if (sizes.dims() != 1 || sizes.NumElements() != 4)
      return absl::InvalidArgumentError(std::string(what) +
                                        " must be a 4-element int32 vector, got shape " +
                                        sizes.shape().DebugString());
    auto v = sizes.vec<int32_t>();
    for (int i = 0; i < 4; ++i)
      if (v(i) < 0) return absl::InvalidArgumentError(std::string(what) + " must be non-negative");
    *shape = TensorShape({v(0), v(1), v(2), v(3)});
    return absl::OkStatus();
  }

  int64_t stride_h_ = 1, stride_w_ = 1, dilation_h_ = 1, dilation_w_ = 1;
  ConvPadding padding_ = kPaddingSame;
  std::vector<int64_t> explicit_paddings_;
  AccumParams params_;
};

class GpuConv2DOp : public GpuConvOpBase {
 public:
  using GpuConvOpBase::GpuConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), w.shape(), &g));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_h, g.out_w, g.out_c}), &y));
    if (y->NumElements() == 0) return;
    CUstream_st* stream = nullptr;
    OP_REQUIRES_OK(ctx, OpStream(ctx, &stream));
    OP_REQUIRES_OK(ctx, LaunchStatus(tfaccum_cuda_conv2d(x.flat<float>().data(),
                                                         w.flat<float>().data(),
                                                         y->flat<float>().data(), &g, &params_,
                                                         stream),
                                     "conv2d"));
  }
};

class GpuConv2DBackpropInputOp : public GpuConvOpBase {
 public:
  using GpuConvOpBase::GpuConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    TensorShape input_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes("input_sizes", ctx->input(0), &input_shape));
    const Tensor& w = ctx->input(1);
    const Tensor& dy = ctx->input(2);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(input_shape, w.shape(), &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input_shape, &dx));
    if (dx->NumElements() == 0) return;
    CUstream_st* stream = nullptr;
    OP_REQUIRES_OK(ctx, OpStream(ctx, &stream));
    OP_REQUIRES_OK(ctx, LaunchStatus(tfaccum_cuda_conv2d_backprop_input(
                                         w.flat<float>().data(), dy.flat<float>().data(),
                                         dx->flat<float>().data(), &g, &params_, stream),
                                     "conv2d_backprop_input"));
  }
};

class GpuConv2DBackpropFilterOp : public GpuConvOpBase {
 public:
  using GpuConvOpBase::GpuConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    TensorShape filter_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes("filter_sizes", ctx->input(1), &filter_shape));
    const Tensor& dy = ctx->input(2);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), filter_shape, &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, filter_shape, &dw));
    if (dw->NumElements() == 0) return;
    CUstream_st* stream = nullptr;
    OP_REQUIRES_OK(ctx, OpStream(ctx, &stream));
    OP_REQUIRES_OK(ctx, LaunchStatus(tfaccum_cuda_conv2d_backprop_filter(
                                         x.flat<float>().data(), dy.flat<float>().data(),
                                         dw->flat<float>().data(), &g, &params_, stream),
                                     "conv2d_backprop_filter"));
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("TfaccumQuantize").Device(DEVICE_GPU), GpuQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfaccumMatMul").Device(DEVICE_GPU), GpuMatMulOp);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2D").Device(DEVICE_GPU), GpuConv2DOp);
REGISTER_KERNEL_BUILDER(
    Name("TfaccumConv2DBackpropInput").Device(DEVICE_GPU).HostMemory("input_sizes"),
    GpuConv2DBackpropInputOp);
REGISTER_KERNEL_BUILDER(
    Name("TfaccumConv2DBackpropFilter").Device(DEVICE_GPU).HostMemory("filter_sizes"),
    GpuConv2DBackpropFilterOp);

}  // namespace tfaccum

#endif  // TFACCUM_WITH_CUDA
